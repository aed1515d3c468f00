"""Main job until the end-to-end pipeline lands: synthesise a small spoken corpus, prepare it
(log-mel, speech codes, ArrayRecord), then train the model a few steps on batches from the grain
pipeline, printing the text and speech losses and a held-out loss before and after.

  python -m fac_jax.demo --config=configs/tiny.py [--workdir=/tmp/fac_jax_demo] [--steps=30]
"""

import os
import time

from absl import app, flags
import jax
import numpy as np
import optax
from ml_collections import config_flags

from fac_jax import sharding, steps
from fac_jax.data import pipeline, prepare, synth

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'tiny.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/fac_jax_demo', 'Corpus, prepared data.')
_CONVERSATIONS = flags.DEFINE_integer('conversations', 120, 'Synthesised train conversations.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Gradient steps to run.')
_LEARNING_RATE = flags.DEFINE_float('learning_rate', 3e-3, 'AdamW learning rate.')


def main(argv):
  del argv
  cfg = _CONFIG.value
  corpus = os.path.join(_WORKDIR.value, 'corpus')
  summary = synth.synthesise(corpus, _CONVERSATIONS.value, max(8, _CONVERSATIONS.value // 6),
                             seed=cfg.seed)
  print(f'corpus: {corpus} ({", ".join(summary["engines_used"])})')
  cfg.data.dir = os.path.join(_WORKDIR.value, 'prepared')
  report = prepare.prepare(cfg.data.dir, {split: os.path.join(corpus, f'{split}.jsonl')
                                          for split in ('train', 'validation')}, cfg.model,
                           max_audio_seconds=cfg.data.max_audio_seconds)
  print('prepared: ' + ', '.join(f'{split} {entry["kept"]} kept / {entry["skipped"]} skipped'
                                 for split, entry in report['splits'].items()))

  mesh = sharding.make_mesh(cfg.mesh)
  print(f'devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}')
  optimizer = optax.adamw(_LEARNING_RATE.value)
  start = time.time()
  graphdef, params, opt_state, param_shardings, opt_shardings = steps.init_sharded(
      cfg.model, optimizer, mesh, cfg.seed)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(f'model: {num_params:,} parameters, initialised in {time.time() - start:.1f} s')

  train_batches = iter(pipeline.dataset(cfg, cfg.data.train_split))
  eval_batches = list(pipeline.dataset(cfg, cfg.data.eval_split, num_epochs=1, shuffle=False))
  first = next(train_batches)
  shardings = pipeline.global_batch_shardings(first, mesh)
  train_step, _ = steps.jit_train_step(cfg.model, graphdef, optimizer, mesh, param_shardings,
                                       opt_shardings, first)
  eval_loss = jax.jit(lambda params, batch: steps.loss_fn(graphdef, params, batch)[0])
  held_out = lambda: np.mean([float(eval_loss(params, pipeline.to_global(b, shardings)))
                              for b in eval_batches])
  print(f'held-out loss before training: {held_out():.4f}')

  batch = first
  for step in range(1, _STEPS.value + 1):
    start = time.time()
    params, opt_state, metrics = train_step(params, opt_state, pipeline.to_global(batch, shardings))
    metrics = jax.device_get(metrics)
    took = time.time() - start
    if step == 1 or step % 5 == 0 or step == _STEPS.value:
      tokens = int((batch['segment_ids'] > 0).sum())
      print(f'step {step}/{_STEPS.value}  loss {metrics["loss"]:.4f}  '
            f'text_loss {metrics["text_loss"]:.4f}  speech_loss {metrics["speech_loss"]:.4f}  '
            f'{tokens / took:,.0f} positions/s{"  (includes compile)" if step == 1 else ""}')
    if not np.isfinite(metrics['loss']):
      raise SystemExit(f'non-finite loss at step {step}')
    batch = next(train_batches)
  print(f'held-out loss after {_STEPS.value} steps: {held_out():.4f}')


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == '__main__':
  run()
