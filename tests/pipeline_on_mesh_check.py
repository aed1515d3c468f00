"""Run by test_data_pipeline.py with 8 host devices: a pipeline batch placed on a (2, 2, 2) mesh
with make_array_from_process_local_data, then one train step on it; prints a JSON summary."""

import json
import os
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import config as config_lib  # noqa: E402
from fac_jax import sharding  # noqa: E402
from fac_jax.data import input_pipeline  # noqa: E402
from fac_jax.train import steps  # noqa: E402


def main():
  cfg = config_lib.load(os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py'))
  cfg.data.update(dir=sys.argv[1], batch_size=4, seq_len=64, num_windows=16)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(cfg.mesh)
  local = next(iter(input_pipeline.dataset(cfg, 'train')))
  shardings = input_pipeline.global_batch_shardings(local, mesh)
  batch = input_pipeline.to_global(local, shardings)
  optimizer = optax.sgd(0.1)
  graphdef, params, opt_state, param_shardings, opt_shardings = steps.init_sharded(
      cfg.model, optimizer, mesh, cfg.seed)
  train_step, _ = steps.jit_train_step(cfg.model, graphdef, optimizer, mesh, param_shardings,
                                       opt_shardings, local)
  _, _, metrics = train_step(params, opt_state, batch)
  print(json.dumps({
      'devices': jax.device_count(),
      'input_ids_spec': str(batch['input_ids'].sharding.spec),
      'mel_spec': str(batch['mel'].sharding.spec),
      'equal_to_local': all(np.array_equal(np.asarray(batch[k]), local[k]) for k in local),
      'loss_finite': bool(np.isfinite(float(metrics['loss']))),
  }))


if __name__ == '__main__':
  main()
