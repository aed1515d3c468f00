"""The duplex fine-tune: a half-duplex (Core-Cocktail) checkpoint trained on synthesised full-duplex
timelines with the trainer's step and optimizer, then scored in closed loop on held-out timelines
against the same checkpoint untrained.

  python -m fac_jax.duplex.finetune --config=configs/tiny.py:stage1 --corpus=CORPUS \
      --data_dir=PREPARED --workdir=DIR [--config.train.init_checkpoint=CKPT] \
      [--config.train.steps=300] [--eval_timelines=64]

CORPUS is a folder of manifests (train.jsonl, validation.jsonl) such as python -m
fac_jax.data.synth writes; its conversations that end with a spoken question and a spoken answer
become exchanges (fac_jax.duplex.timeline), train's for training and validation's (held-out
voices and items) for evaluation. PREPARED is the folder python -m fac_jax.data.prepare made of
it (its text and speech tokenizers are used). The stage's settings (learning rate, schedule,
clipping, frozen parameters, steps) are config.train's; a batch holds config.data.batch_size
timelines of config.data.seq_len positions (the system prompt, then one step each).

DIR/final/         the duplex checkpoint (fac_jax.duplex.model), for python -m fac_jax.duplex
DIR/metrics.json   metrics before and after on held-out timelines (validation exchanges) and on
                   new timelines of train exchanges, and the training losses
"""

import dataclasses
import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from ml_collections import config_flags

from fac_jax import cli, sharding
from fac_jax.checkpoints import text_tokenizer
from fac_jax.data import input_pipeline, prepare
from fac_jax.duplex import metrics, model as duplex_model, stream, timeline
from fac_jax.train import optim, steps

SYSTEM_PROMPT = 'Answer the question in a few words.'


@dataclasses.dataclass
class DuplexData:
  """What timelines are made of, and the prompt and tokenizers they are read with."""
  train: list[timeline.Exchange]
  validation: list[timeline.Exchange]
  clips: dict
  text_tokenizer: object
  prompt_ids: list[int]
  tokenizer_dir: str
  speech_tokenizer_file: str | None  # a k-means tokenizer .npz (its detokenizer voices codes)

  def decode(self, ids, cfg: ml_collections.ConfigDict) -> str:
    special = set(cfg.tokens.values())
    return self.text_tokenizer.decode([int(i) for i in ids if int(i) not in special])


def load_data(corpus: str, data_dir: str, cfg: ml_collections.ConfigDict,
              tcfg: timeline.TimelineConfig, system: str = SYSTEM_PROMPT) -> DuplexData:
  """Exchanges of the corpus's train and validation manifests, read with the text and speech
  tokenizers of the prepared folder (a k-means one or a recorded S3Tokenizer), and backchannels
  in their voices."""
  manifests = {split: os.path.join(corpus, f'{split}.jsonl') for split in ('train', 'validation')}
  codes = prepare.prepare_tokenizers(data_dir, manifests, cfg, None, None)  # the folder's own
  tokenizer_dir = os.path.join(data_dir, prepare.TOKENIZER_FOLDER)
  text = text_tokenizer.load(tokenizer_dir)
  splits = {split: timeline.load_exchanges(path, text, codes) for split, path in manifests.items()}
  clips = timeline.backchannel_clips(corpus, splits['train'] + splits['validation'],
                                     tcfg.backchannel_max_steps)
  kmeans = os.path.join(data_dir, prepare.SPEECH_TOKENIZER_FILE)
  return DuplexData(splits['train'], splits['validation'], clips, text,
                    stream.system_prompt_ids(text, cfg, system), tokenizer_dir,
                    kmeans if os.path.exists(kmeans) else None)


def timelines(data: DuplexData, split: str, cfg, tcfg, seed: int, count: int, first: int = 0):
  """Timelines first .. first + count - 1 of a split; timeline i depends on (seed, i) only."""
  exchanges = data.train if split == 'train' else data.validation
  return [timeline.synthesise([seed, i], exchanges, data.clips, cfg, tcfg)
          for i in range(first, first + count)]


def make_batch(data: DuplexData, items, cfg, tcfg) -> dict:
  """One timeline a row; every session step may hold one encoder window."""
  rows = [timeline.format_timeline(t, data.prompt_ids, cfg) for t in items]
  return timeline.batch(rows, len(data.prompt_ids) + tcfg.steps, tcfg.steps, cfg)


def loop_config(tcfg: timeline.TimelineConfig) -> stream.LoopConfig:
  """The loop of evaluations: greedy text, sampled speech, caches that hold a whole timeline."""
  return stream.LoopConfig(window_steps=tcfg.steps, evict_steps=tcfg.steps)


def evaluate(simulate, params, data: DuplexData, items, cfg: ml_collections.ConfigDict,
             tcfg: timeline.TimelineConfig, key: jax.Array, batch_size: int = 16) -> dict:
  """Closed-loop metrics (fac_jax.duplex.metrics) of a parameter tree on these timelines;
  `simulate` is stream.make_simulate_fn's (made once: it compiles at its first call). Batches
  are padded to `batch_size` rows so that every call has the same shapes."""
  counts = []
  for start in range(0, len(items), batch_size):
    chunk = items[start:start + batch_size]
    rows = chunk + chunk[-1:] * (batch_size - len(chunk))
    heard = [timeline.chunked_user_audio(t, cfg.encoder.num_mel_bins) for t in rows]
    out = jax.device_get(simulate(
        params, jnp.asarray([data.prompt_ids] * batch_size),
        jnp.asarray(np.stack([mel for mel, _ in heard])),
        jnp.asarray(np.stack([speech for _, speech in heard])), jax.random.fold_in(key, start)))
    for row, item in enumerate(chunk):
      phases = metrics.assistant_phases(out['phase'][row])
      texts = np.concatenate([[cfg.tokens.sil], out['text'][row][:-1]])
      counts.append(metrics.score(item.events, phases, texts,
                                  lambda ids: data.decode(ids, cfg), tcfg.stop_steps))
  return metrics.summarise(counts)


def _mesh_setup(cfg: ml_collections.ConfigDict):
  """(mesh, graphdef, abstract parameters, their shardings) of the duplex model on cfg.mesh."""
  mesh = sharding.make_mesh(cfg.mesh)
  graphdef, abstract_state = nnx.split(duplex_model.abstract_model(cfg.model))
  return (mesh, graphdef, nnx.to_pure_dict(abstract_state),
          sharding.param_shardings(abstract_state, mesh))


def finetune(cfg: ml_collections.ConfigDict, params: dict, data: DuplexData,
             tcfg: timeline.TimelineConfig, log=print) -> tuple[dict, list[dict]]:
  """cfg.train.steps steps of the trainer's SFT step (fac_jax.train.steps, with its optimizer, clipping
  and non-finite guard) on fresh train timelines: global batch i holds timelines
  [i * B, (i + 1) * B) of seed cfg.seed, each process making its own rows. Returns the
  parameters and the logged metrics."""
  mesh, graphdef, abstract_params, param_shardings = _mesh_setup(cfg)
  optimizer = optim.make_optimizer(cfg.train, abstract_params)
  opt_shardings = steps.optimizer_shardings(jax.eval_shape(optimizer.init, abstract_params),
                                            param_shardings, mesh)
  params = jax.device_put(params, param_shardings)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
  if cfg.data.batch_size % jax.process_count():
    raise ValueError(f'data.batch_size={cfg.data.batch_size} does not split over '
                     f'{jax.process_count()} processes')
  size = cfg.data.batch_size // jax.process_count()  # this process's rows

  def batch_of(i: int) -> dict:
    first = (i * jax.process_count() + jax.process_index()) * size
    return make_batch(data, timelines(data, 'train', cfg.model, tcfg, cfg.seed, size, first),
                      cfg.model, tcfg)

  batch = batch_of(0)
  train_step, _ = steps.jit_train_step(cfg.model, graphdef, optimizer, mesh, param_shardings,
                                       opt_shardings, batch, cfg.train.grad_accum_steps,
                                       cfg.train.frozen)
  shardings = input_pipeline.global_batch_shardings(batch, mesh)
  history, start, skipped_in_row = [], time.time(), 0
  for i in range(cfg.train.steps):
    params, opt_state, step_metrics = train_step(params, opt_state,
                                                 input_pipeline.to_global(batch, shardings))
    if i + 1 < cfg.train.steps:
      batch = batch_of(i + 1)
    step_metrics = jax.device_get(step_metrics)
    skipped_in_row = skipped_in_row + 1 if step_metrics['skipped'] else 0
    if skipped_in_row >= cfg.train.max_skipped_in_row:
      raise FloatingPointError(f'{skipped_in_row} steps in a row had a non-finite loss or '
                               f'gradient (last at step {i + 1}); lower the learning rate')
    if (i + 1) % cfg.train.log_every == 0 or i + 1 == cfg.train.steps:
      entry = {'step': i + 1, **{k: float(v) for k, v in step_metrics.items()}}
      history.append(entry)
      log(f'step {i + 1}/{cfg.train.steps}  loss {entry["loss"]:.4f} (text '
          f'{entry["text_loss"]:.4f}, speech {entry["speech_loss"]:.4f})  '
          f'{(time.time() - start) / (i + 1):.2f} s/step')
  return params, history


def initial_params(cfg: ml_collections.ConfigDict) -> dict:
  """Duplex parameters from config.train.init_checkpoint (a half-duplex or duplex checkpoint),
  else from a random model of config.seed, laid out on cfg.mesh as training lays them out."""
  _, _, abstract_params, param_shardings = _mesh_setup(cfg)
  path = cfg.train.init_checkpoint
  if path:
    _, params, _ = duplex_model.load(path)
    if jax.tree.map(np.shape, params) != jax.tree.map(np.shape, abstract_params):
      raise ValueError(f'train.init_checkpoint={path}: its parameter shapes do not match '
                       'config.model')
  else:
    params = nnx.to_pure_dict(nnx.split(duplex_model.create(cfg.model, cfg.seed))[1])
  return jax.device_put(params, param_shardings)


def settings(tcfg: timeline.TimelineConfig, system: str) -> dict:
  """What a duplex checkpoint records about its training data (read by python -m fac_jax.duplex)."""
  return {'system_prompt': system, 'timeline': dataclasses.asdict(tcfg)}


SUMMARY_COLUMNS = ('turn_taking_success', 'interruption_success', 'backchannel_false_stop',
                   'pause_false_takeover', 'spoken_qa_accuracy', 'response_latency_ms',
                   'stop_latency_ms')


def summary_table(rows: dict[str, dict]) -> str:
  """Metric summaries (fac_jax.duplex.metrics.summarise) as a fixed-width table."""
  lines = [f'{"":<22}' + ''.join(f'{k:>24}' for k in SUMMARY_COLUMNS)]
  lines += [f'{name:<22}' + ''.join(f'{summary[k]:>24.3f}' for k in SUMMARY_COLUMNS)
            for name, summary in rows.items()]
  return '\n'.join(lines)


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'configs/<exp>.py:<stage>')
  flags.DEFINE_string('corpus', None, 'Folder with train.jsonl and validation.jsonl.',
                      required=True)
  flags.DEFINE_string('data_dir', None, 'Prepared folder of that corpus (its tokenizers).',
                      required=True)
  flags.DEFINE_string('workdir', None, 'Duplex checkpoint and metrics.', required=True)
  flags.DEFINE_integer('eval_timelines', 64, 'Timelines scored before and after, of held-out '
                       'exchanges and, for comparison, of train ones.')
  flags.DEFINE_string('system', SYSTEM_PROMPT, 'System prompt of every session.')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  cfg = FLAGS.config
  if cfg is None:
    raise app.UsageError('--config=configs/<exp>.py:<stage> is required')
  tcfg = timeline.TimelineConfig()
  data = load_data(FLAGS.corpus, FLAGS.data_dir, cfg.model, tcfg, FLAGS.system)
  tcfg = dataclasses.replace(tcfg, steps=cfg.data.seq_len - len(data.prompt_ids))
  print(f'exchanges: train {len(data.train)}, validation {len(data.validation)}; '
        f'{tcfg.steps} steps a timeline', flush=True)
  params = initial_params(cfg)
  graphdef, _ = nnx.split(duplex_model.abstract_model(cfg.model))
  sets = {'held-out': timelines(data, 'validation', cfg.model, tcfg, cfg.seed + 1,
                                FLAGS.eval_timelines),
          'train items': timelines(data, 'train', cfg.model, tcfg, cfg.seed + 2,
                                   FLAGS.eval_timelines)}
  simulate = stream.make_simulate_fn(graphdef, cfg.model, loop_config(tcfg))
  key = jax.random.key(cfg.seed)
  scores = {f'before, {name}': evaluate(simulate, params, data, items, cfg.model, tcfg, key)
            for name, items in sets.items()}
  print(summary_table(scores), flush=True)
  params, history = finetune(cfg, params, data, tcfg, log=lambda m: print(m, flush=True))
  scores.update({f'after, {name}': evaluate(simulate, params, data, items, cfg.model, tcfg, key)
                 for name, items in sets.items()})
  print(summary_table(scores), flush=True)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  duplex_model.save(os.path.join(FLAGS.workdir, 'final'), cfg.model, jax.device_get(params),
                    settings=settings(tcfg, FLAGS.system), tokenizer_dir=data.tokenizer_dir,
                    speech_tokenizer_file=data.speech_tokenizer_file)
  with open(os.path.join(FLAGS.workdir, 'metrics.json'), 'w') as f:
    json.dump({'scores': scores, 'train': history}, f, indent=2)


def run():
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
