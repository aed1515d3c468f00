"""Run by test_train.py: what two processes of `fac_jax.train.trainer` must compute, in one process.

The global batch of a two-process run is process 0's local rows then process 1's; here both
local pipelines run in this process and their rows are concatenated. Prints the train losses as
JSON and saves the final parameters to --out (npz, '/'-joined paths).
"""

import json
import os
import sys

from absl import app, flags
import jax
import numpy as np
from flax import nnx
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import sharding  # noqa: E402
from fac_jax.data import input_pipeline  # noqa: E402
from fac_jax.model import fun_audio_chat  # noqa: E402
from fac_jax.train import steps  # noqa: E402
from fac_jax.train import optim  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config.')
_OUT = flags.DEFINE_string('out', None, 'Where to save the final parameters.')


def main(argv):
  del argv
  cfg = _CONFIG.value
  mesh = sharding.make_mesh(cfg.mesh)
  abstract = nnx.to_pure_dict(nnx.split(fun_audio_chat.abstract_model(cfg.model))[1])
  optimizer = optim.make_optimizer(cfg.train, abstract)
  graphdef, params, opt_state, param_shardings, opt_shardings = steps.init_sharded(
      cfg.model, optimizer, mesh, cfg.seed)
  local = [iter(input_pipeline.dataset(cfg, cfg.data.train_split, process_index=i, process_count=2))
           for i in range(2)]
  next_batch = lambda: {name: np.concatenate([b[name] for b in batches])
                        for batches in [[next(it) for it in local]] for name in batches[0]}
  batch = next_batch()
  train_step, batch_shardings = steps.jit_train_step(
      cfg.model, graphdef, optimizer, mesh, param_shardings, opt_shardings, batch)
  losses = []
  for _ in range(cfg.train.steps):
    params, opt_state, metrics = train_step(params, opt_state,
                                            jax.device_put(batch, batch_shardings))
    losses.append(float(metrics['loss']))
    batch = next_batch()
  flat = {optim.path_name(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]}
  np.savez(_OUT.value, **flat)
  print(json.dumps({'losses': losses}))


if __name__ == '__main__':
  app.run(main)
