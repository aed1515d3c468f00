"""Input-pipeline throughput against what the tiny model's train step consumes, in one run.

  python benchmarks/loader_throughput.py [--config=configs/tiny.py] [--conversations=400]
      [--batches=40] [--workers=0,2]

Synthesises a demo corpus (fac_jax.data.synth), prepares it, then times: reading raw records,
formatting them, the whole grain pipeline (packed batches) with each worker count, and the
jitted train step on those batches. Prints conversations/s and audio-seconds/s for each, so the
loader's headroom over the step shows as a ratio measured on the same machine.
"""

import os
import tempfile
import time

from absl import app, flags
import jax
import optax
from ml_collections import config_flags

from fac_jax import sharding
from fac_jax.data import input_pipeline, prepare, synth
from fac_jax.train import steps

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py'), 'Config.')
_CONVERSATIONS = flags.DEFINE_integer('conversations', 400, 'Synthesised train conversations.')
_BATCHES = flags.DEFINE_integer('batches', 40, 'Batches timed per pipeline setting.')
_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'grain worker processes to compare.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Keep the corpus here (default: a temp dir).')


def batch_audio_seconds(batch: dict, model) -> float:
  """User audio (mel frames at 100 Hz) plus assistant audio (real codes at 25 Hz) in a batch."""
  user = batch['mel_lengths'].sum() / 100
  discrete = batch['audio_mask'] & ~batch['continuous_mask']
  codes = batch['speech_codes'][discrete]
  return float(user + (codes < model.speech.bos_id).sum() / 25)


def timed(fn, repeats: int) -> float:
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def main(argv):
  del argv
  cfg = _CONFIG.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='loader_bench_')
  corpus = os.path.join(workdir, 'corpus')
  synth.synthesise(corpus, _CONVERSATIONS.value, 20, seed=0, use_piper='off')
  cfg.data.dir = os.path.join(workdir, 'prepared')
  prepare.prepare(cfg.data.dir, {'train': os.path.join(corpus, 'train.jsonl')}, cfg.model)

  source = prepare.open_split(cfg.data.dir, 'train')
  n = len(source)
  format_record = input_pipeline.FormatRecord(os.path.join(cfg.data.dir, prepare.TOKENIZER_FOLDER),
                                        cfg.model)
  records = [source[i] for i in range(n)]
  rows = []
  read_time = timed(lambda: [source[i] for i in range(n)], 3)
  rows.append(('read records', n / read_time, None))
  format_time = timed(lambda: [format_record(r) for r in records], 2)
  rows.append(('read + format', n / (read_time + format_time), None))

  conversations_per_batch = seconds_per_batch = None
  for workers in (int(w) for w in _WORKERS.value):
    cfg.data.worker_count = workers
    iterator = iter(input_pipeline.dataset(cfg, 'train'))
    batches = [next(iterator) for _ in range(3)]  # start-up (worker processes) not timed
    start = time.perf_counter()
    batches = [next(iterator) for _ in range(_BATCHES.value)]
    took = time.perf_counter() - start
    conversations = sum(int(b['segment_ids'].max(axis=1).sum()) for b in batches)
    seconds = sum(batch_audio_seconds(b, cfg.model) for b in batches)
    conversations_per_batch, seconds_per_batch = (conversations / len(batches),
                                                  seconds / len(batches))
    rows.append((f'grain pipeline, {workers} workers', conversations / took, seconds / took))

  mesh = sharding.make_mesh(cfg.mesh)
  optimizer = optax.adamw(1e-3)
  graphdef, params, opt_state, param_shardings, opt_shardings = steps.init_sharded(
      cfg.model, optimizer, mesh, cfg.seed)
  train_step, batch_shardings = steps.jit_train_step(
      cfg.model, graphdef, optimizer, mesh, param_shardings, opt_shardings, batches[0])
  placed = [jax.device_put(b, batch_shardings) for b in batches[:8]]
  params, opt_state, metrics = train_step(params, opt_state, placed[0])  # compile
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in placed:
    params, opt_state, metrics = train_step(params, opt_state, batch)
  jax.block_until_ready(metrics)
  step_time = (time.perf_counter() - start) / len(placed)
  step_rate = conversations_per_batch / step_time
  rows.append(('train step consumes', step_rate, seconds_per_batch / step_time))

  print(f'\n{jax.device_count()} x {jax.devices()[0].platform}; {n} conversations; batch '
        f'{cfg.data.batch_size} x {cfg.data.seq_len} positions; '
        f'{conversations_per_batch:.1f} conversations and {seconds_per_batch:.1f} audio-s per '
        'batch')
  print(f'| {"stage":32} | {"conversations/s":>15} | {"audio-s/s":>10} | {"x train step":>12} |')
  print(f'|{"-" * 34}|{"-" * 17}:|{"-" * 11}:|{"-" * 13}:|')
  for name, rate, seconds in rows:
    seconds = f'{seconds:10.1f}' if seconds is not None else f'{"":10}'
    print(f'| {name:32} | {rate:15.1f} | {seconds} | {rate / step_rate:12.2f} |')


if __name__ == '__main__':
  app.run(main)
