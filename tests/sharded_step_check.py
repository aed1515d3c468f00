"""Run by test_sharding.py in a process with 8 host devices: the same train steps on a
(data=2, fsdp=2, tensor=2) mesh and on one device; prints a JSON summary."""

import json
import os
import sys

import jax
import numpy as np
import ml_collections
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import config as config_lib  # noqa: E402
from fac_jax import sharding  # noqa: E402
from fac_jax.train import steps  # noqa: E402
from fac_jax.data import synthetic  # noqa: E402


def run(cfg, mesh, batch, num_steps=2):
  optimizer = optax.sgd(0.1)  # Adam would amplify rounding in near-zero gradients
  graphdef, params, opt_state, param_shardings, opt_shardings = steps.init_sharded(
      cfg.model, optimizer, mesh, seed=0)
  train_step, batch_shardings = steps.jit_train_step(
      cfg.model, graphdef, optimizer, mesh, param_shardings, opt_shardings, batch)
  initial = jax.device_get(params)
  losses = []
  for _ in range(num_steps):
    params, opt_state, metrics = train_step(params, opt_state,
                                            jax.device_put(batch, batch_shardings))
    losses.append(float(metrics['loss']))
  specs = jax.tree.map(lambda x: str(x.sharding.spec), params)
  return initial, jax.device_get(params), losses, specs


def main():
  jax.config.update('jax_default_matmul_precision', 'highest')
  cfg = config_lib.load(os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py'))
  # Sizes that the tensor axis divides, so that every rule of the table is exercised.
  cfg.model.llm.update(vocab_size=264, mlp_dim=86)
  cfg.model.speech_refined_head.update(mlp_dim=62, num_heads=4, num_kv_heads=2)
  cfg.model.encoder.update(mlp_dim=72)
  batch = synthetic.batch(np.random.default_rng(0), cfg.model, batch_size=4, seq_len=96,
                          num_windows=16)
  big = sharding.make_mesh(ml_collections.ConfigDict(
      dict(data=2, fsdp=2, tensor=-1)))
  single = sharding.make_mesh(ml_collections.ConfigDict(
      dict(data=1, fsdp=1, tensor=1)), devices=jax.devices()[:1])
  init_a, final_a, losses_a, specs = run(cfg, big, batch)
  init_b, final_b, losses_b, _ = run(cfg, single, batch)
  rel = lambda a, b: float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
  print(json.dumps({
      'devices': jax.device_count(),
      'mesh': dict(big.shape),
      'losses_sharded': losses_a, 'losses_single': losses_b,
      'init_max_rel_err': max(jax.tree.leaves(jax.tree.map(rel, init_a, init_b))),
      'params_max_rel_err': max(jax.tree.leaves(jax.tree.map(rel, final_a, final_b))),
      'specs': specs,
  }))


if __name__ == '__main__':
  main()
