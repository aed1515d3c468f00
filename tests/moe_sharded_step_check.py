"""Run by test_sharding.py in a process with 8 host devices: the tiny MoE model's train step on a
(fsdp=2, expert=2, tensor=2) mesh, experts dispatched by all-to-all, and on one device; then the
forward of a one-row batch (too small to split over the expert axis: each device runs its own
experts on every token) on both. Prints a JSON summary."""

import json
import os
import sys

import jax
import numpy as np
import ml_collections
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import config as config_lib  # noqa: E402
from fac_jax import sharding  # noqa: E402
from fac_jax.data import synthetic  # noqa: E402
from fac_jax.model import fun_audio_chat  # noqa: E402
from fac_jax.train import steps  # noqa: E402


def run(cfg, mesh, batch, one_row):
  """(initial params, params after one step, its metrics, the step's compiled HLO, the one-row
  forward's outputs), everything traced with the mesh in scope as the trainer does."""
  optimizer = optax.sgd(0.1)  # Adam would amplify rounding in near-zero gradients
  with jax.set_mesh(mesh):
    graphdef, params, opt_state, param_shardings, opt_shardings = steps.init_sharded(
        cfg.model, optimizer, mesh, seed=0)
    train_step, batch_shardings = steps.jit_train_step(
        cfg.model, graphdef, optimizer, mesh, param_shardings, opt_shardings, batch)
    forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b),
                      in_shardings=(param_shardings, sharding.batch_shardings(one_row, mesh)))
    outputs = jax.device_get(forward(params, one_row))
    initial = jax.device_get(params)
    batch = jax.device_put(batch, batch_shardings)
    hlo = train_step.lower(params, opt_state, batch).compile().as_text()
    params, opt_state, metrics = train_step(params, opt_state, batch)
  return initial, jax.device_get(params), jax.device_get(metrics), hlo, outputs


def main():
  jax.config.update('jax_default_matmul_precision', 'highest')
  cfg = config_lib.load(os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py:moe'))
  cfg.model.llm.update(vocab_size=264)  # split by tensor, as in sharded_step_check.py
  rng = np.random.default_rng(0)
  batch = synthetic.batch(rng, cfg.model, batch_size=4, seq_len=64, num_windows=8)
  one_row = synthetic.batch(rng, cfg.model, batch_size=1, seq_len=64, num_windows=8)
  big = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, expert=2, tensor=2)))
  single = sharding.make_mesh(ml_collections.ConfigDict(), devices=jax.devices()[:1])
  init_a, final_a, metrics_a, hlo, out_a = run(cfg, big, batch, one_row)
  init_b, final_b, metrics_b, _, out_b = run(cfg, single, batch, one_row)
  rel = lambda a, b: float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
  max_rel = lambda a, b: max(jax.tree.leaves(jax.tree.map(rel, a, b)))
  abstract_state = nnx.split(fun_audio_chat.abstract_model(cfg.model))[1]
  moe_specs = jax.tree.map(lambda s: str(s.spec), sharding.param_shardings(
      abstract_state, big)['llm']['decoder']['layers']['moe'])
  print(json.dumps({
      'devices': jax.device_count(), 'mesh': dict(big.shape),
      'loss_sharded': float(metrics_a['loss']), 'loss_single': float(metrics_b['loss']),
      'router_aux_loss_sharded': float(metrics_a['router_aux_loss']),
      'router_aux_loss_single': float(metrics_b['router_aux_loss']),
      'init_max_rel_err': max_rel(init_a, init_b),
      'params_max_rel_err': max_rel(final_a, final_b),
      'one_row_max_rel_err': max_rel(out_a, out_b),
      'all_to_all_in_step': 'all-to-all' in hlo,
      'moe_specs': moe_specs,
  }))


if __name__ == '__main__':
  main()
