"""Main job until the trainer lands: build the model from a config, then train a few steps on
synthetic speech conversations, printing the text and speech losses.

  python -m fac_jax.demo --config=configs/tiny.py [--config.model.llm.num_layers=3] [--steps=5]
"""

import os
import time

from absl import app, flags, logging
import jax
import numpy as np
import optax
from ml_collections import config_flags

from fac_jax import sharding, steps
from fac_jax.data import synthetic

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'tiny.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Experiment config file.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 5, 'Gradient steps to run.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 4, 'Rows per batch.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'LLM positions (5 Hz) per row.')
_NUM_WINDOWS = flags.DEFINE_integer('num_windows', 24, 'Mel windows per row.')
_LEARNING_RATE = flags.DEFINE_float('learning_rate', 1e-3, 'AdamW learning rate.')


def main(argv):
  del argv
  cfg = _CONFIG.value
  mesh = sharding.make_mesh(cfg.mesh)
  print(f'devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}')
  optimizer = optax.adamw(_LEARNING_RATE.value)

  start = time.time()
  graphdef, params, opt_state, param_shardings, opt_shardings = steps.init_sharded(
      cfg.model, optimizer, mesh, cfg.seed)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(f'model: {num_params:,} parameters, initialised in {time.time() - start:.1f} s')

  rng = np.random.default_rng(cfg.seed)
  make_batch = lambda: synthetic.batch(rng, cfg.model, _BATCH_SIZE.value, _SEQ_LEN.value,
                                       _NUM_WINDOWS.value)
  first = make_batch()
  train_step, batch_shardings = steps.jit_train_step(
      cfg.model, graphdef, optimizer, mesh, param_shardings, opt_shardings, first)
  batch = first
  for step in range(1, _STEPS.value + 1):
    start = time.time()
    params, opt_state, metrics = train_step(params, opt_state,
                                            jax.device_put(batch, batch_shardings))
    metrics = jax.device_get(metrics)
    took = time.time() - start
    tokens = int((batch['segment_ids'] > 0).sum())
    print(f'step {step}/{_STEPS.value}  loss {metrics["loss"]:.4f}  '
          f'text_loss {metrics["text_loss"]:.4f}  speech_loss {metrics["speech_loss"]:.4f}  '
          f'grad_norm {metrics["grad_norm"]:.3f}  {tokens / took:,.0f} positions/s'
          f'{"  (includes compile)" if step == 1 else ""}')
    if not np.isfinite(metrics['loss']):
      raise SystemExit(f'non-finite loss at step {step}')
    batch = make_batch()
  logging.info('done')


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == '__main__':
  run()
