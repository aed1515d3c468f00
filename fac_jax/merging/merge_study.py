"""Merge studies: sweep a merge coefficient (and methods) between a base and a fine-tuned model,
and measure for each merged model what the base knew and what the fine-tune learned.

  python -m fac_jax.merging.merge_study --config=configs/tiny.py --base=M0 --finetuned=M1
      --workdir=DIR --knowledge_data=DIR[@SPLIT] --task_data=DIR[@SPLIT]
      [--alphas=0,0.25,0.5,0.75,1] [--methods=linear,slerp] [--include=^llm/] [--eval_batches=8]
      [--on_mismatch=redo|refuse]

`alpha` is the fine-tune's weight: linear and slerp interpolate (alpha = 0 is the base's merged
leaves, 1 the fine-tune); task arithmetic, TIES and DARE scale the task vector by it. Knowledge
is the text loss and accuracy on a held-out text set (e.g. the prepared text_facts); the task is
the speech data's text and speech losses and accuracies (a data spec is a prepared folder and a
split, `validation` by default). Writes DIR/merge_study.csv, .md and
.png; each result is cached in DIR/results.json as it is measured, so a rerun resumes. The cache
records the fingerprints of the models, data and settings it was measured with: a rerun with
others measures again (or with --on_mismatch=refuse stops, naming what differs).
"""

import csv
import json
import os

from absl import flags
import jax
import ml_collections
from flax import nnx

from fac_jax import cli, files, fingerprint, sharding
from fac_jax.checkpoints import adapters
from fac_jax.data import input_pipeline, prepare
from fac_jax.merging import merge, methods as merge_methods
from fac_jax.model import fun_audio_chat
from fac_jax.train import held_out

COLUMNS = ('method', 'alpha', 'knowledge_text_loss', 'knowledge_text_accuracy',
           'task_text_loss', 'task_text_accuracy', 'task_speech_loss', 'task_speech_accuracy')
SWEPT_ARG = {'linear': 'alpha', 'slerp': 'alpha', 'task_arithmetic': 'scale', 'ties': 'scale',
             'dare': 'scale'}
METHOD_DEFAULTS = {'ties': {'density': 0.2}, 'dare': {'drop_rate': 0.5}}


class Evaluator:
  """Evaluates parameter trees on prepared datasets with jitted steps built once per dataset."""

  def __init__(self, cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, max_batches: int):
    self.cfg, self.mesh, self.max_batches = cfg, mesh, max_batches
    self.graphdef, abstract_state = nnx.split(fun_audio_chat.abstract_model(cfg.model))
    self.param_shardings = sharding.param_shardings(abstract_state, mesh)
    self._steps = {}

  def __call__(self, params, data: str) -> dict:
    """Metrics on `data`: 'DIR' (its validation split) or 'DIR@SPLIT'."""
    data_dir, _, split = data.partition('@')
    cfg = self.cfg.copy_and_resolve_references()
    cfg.data.dir = data_dir
    if data not in self._steps:
      first = next(iter(input_pipeline.dataset(cfg, split or 'validation', num_epochs=1,
                                         shuffle=False)))
      shardings = input_pipeline.global_batch_shardings(first, self.mesh)
      self._steps[data] = (held_out.make_eval_step(self.graphdef, self.param_shardings,
                                                     shardings), shardings)
    eval_step, shardings = self._steps[data]
    return held_out.evaluate(cfg, params, eval_step, shardings, split or 'validation',
                               self.max_batches)


def base_leaves(base: str, model: ml_collections.ConfigDict, include: str | None,
                exclude: str | None, mesh: jax.sharding.Mesh) -> dict:
  """The base's selected leaves as a nested tree (a text-only base maps onto `llm/`)."""
  leaves = merge.open_base(base, model.llm)
  paths = [p for p in leaves.shapes if merge_methods.is_selected('/'.join(p), include, exclude)]
  if not paths:
    raise ValueError(f'{base}: no leaf matches include={include!r} exclude={exclude!r}')
  return merge.nest(leaves.read(paths, merge.leaf_shardings(model, paths, mesh)))


def _split_fingerprint(data: str) -> str:
  data_dir, _, split = data.partition('@')
  return prepare.split_fingerprint(data_dir, split or 'validation')


def sweep_settings(cfg, base: str, finetuned: str, knowledge_data: str, task_data: str,
                   include: str | None, exclude: str | None, eval_batches: int) -> dict:
  """What every result of a sweep depends on besides its method and alpha."""
  return {'config': {'model': cfg.model,
                     'data': {k: cfg.data[k] for k in ('batch_size', 'seq_len', 'num_windows')},
                     'include': include, 'exclude': exclude, 'eval_batches': eval_batches,
                     'method_defaults': METHOD_DEFAULTS},
          'inputs': {'base': fingerprint.of_folder(base),
                     'finetuned': fingerprint.of_folder(finetuned),
                     'knowledge_data': _split_fingerprint(knowledge_data),
                     'task_data': _split_fingerprint(task_data)}}


def sweep(cfg, base: str, finetuned: str, workdir: str, knowledge_data: str, task_data: str,
          alphas, methods, include: str | None = None, exclude: str | None = None,
          eval_batches: int = 8, on_mismatch: str = 'redo') -> list[dict]:
  """Measures every (method, alpha), reusing results cached with the same settings; returns the
  rows in sweep order."""
  os.makedirs(workdir, exist_ok=True)
  cache_path = os.path.join(workdir, 'results.json')
  made = sweep_settings(cfg, base, finetuned, knowledge_data, task_data, include, exclude,
                        eval_batches)
  cache = {}
  if os.path.exists(cache_path):
    with open(cache_path) as f:
      stored = json.load(f)
    if fingerprint.reuse(stored.get('made_from'), made, on_mismatch, cache_path):
      cache = stored['results']
  mesh = sharding.make_mesh(cfg.mesh)
  evaluate = Evaluator(cfg, mesh, eval_batches)
  finetuned_params, base_params = None, None
  rows = []
  for method in methods:
    for alpha in alphas:
      key = f'{method}:{alpha:g}'
      if key not in cache:
        if finetuned_params is None:
          finetuned_params = adapters.load_params(finetuned, mesh)  # adapters folded
          base_params = base_leaves(base, cfg.model, include, exclude, mesh)
        merged = merge_methods.merge_trees(method, base_params, [finetuned_params],
                                           include=include, exclude=exclude,
                                           **{SWEPT_ARG[method]: alpha},
                                           **METHOD_DEFAULTS.get(method, {}))
        knowledge, task = evaluate(merged, knowledge_data), evaluate(merged, task_data)
        cache[key] = {'method': method, 'alpha': alpha,
                      'knowledge_text_loss': knowledge['text_loss'],
                      'knowledge_text_accuracy': knowledge['text_accuracy'],
                      **{f'task_{name}': task[name] for name in
                         ('text_loss', 'text_accuracy', 'speech_loss', 'speech_accuracy')}}
        if jax.process_index() == 0:
          files.write_atomically(cache_path, json.dumps(
              {'made_from': fingerprint.plain(made), 'results': cache}, indent=1))
          print('  '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                          for k, v in cache[key].items()), flush=True)
      rows.append(cache[key])
  return rows


def write_reports(rows: list[dict], workdir: str) -> None:
  """merge_study.csv, merge_study.md and merge_study.png (metrics against alpha per method, and
  the knowledge / task trade-off)."""
  with open(os.path.join(workdir, 'merge_study.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  lines += ['| ' + ' | '.join(f'{r[c]:.4f}' if isinstance(r[c], float) else str(r[c])
                              for c in COLUMNS) + ' |' for r in rows]
  with open(os.path.join(workdir, 'merge_study.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for method in dict.fromkeys(r['method'] for r in rows):
    mine = [r for r in rows if r['method'] == method]
    alphas = [r['alpha'] for r in mine]
    axes[0].plot(alphas, [r['knowledge_text_loss'] for r in mine], 'o-', label=method)
    axes[1].plot(alphas, [r['task_speech_loss'] for r in mine], 'o-', label=method)
    axes[2].plot([r['task_speech_loss'] for r in mine], [r['knowledge_text_loss'] for r in mine],
                 'o-', label=method)
    for r in mine:
      axes[2].annotate(f'{r["alpha"]:g}', (r['task_speech_loss'], r['knowledge_text_loss']),
                       fontsize=7)
  axes[0].set(title='what the base knew: text loss on held-out text', xlabel='alpha')
  axes[1].set(title='what the fine-tune learned: speech loss', xlabel='alpha')
  axes[2].set(title='trade-off (labels: alpha)', xlabel='task speech loss',
              ylabel='knowledge text loss')
  for ax in axes:
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'merge_study.png'), dpi=100)
  plt.close(fig)


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Experiment config (model, data, mesh).')
  flags.DEFINE_string('base', None, 'Base checkpoint M_0 (fac_jax, or a Qwen3 HF folder).',
                      required=True)
  flags.DEFINE_string('finetuned', None, 'Fine-tuned checkpoint M_1 (or an adapter checkpoint).',
                      required=True)
  flags.DEFINE_string('workdir', None, 'Results, tables and plot.', required=True)
  flags.DEFINE_string('knowledge_data', None, 'Held-out text set: prepared DIR[@SPLIT].',
                      required=True)
  flags.DEFINE_string('task_data', None, 'Speech task set: prepared DIR[@SPLIT].', required=True)
  flags.DEFINE_list('alphas', ['0', '0.1', '0.2', '0.3', '0.4', '0.5', '0.6', '0.7', '0.8', '0.9',
                               '1'], 'Fine-tune weights to sweep.')
  flags.DEFINE_list('methods', ['linear'], f'Merge methods: {sorted(SWEPT_ARG)}.')
  flags.DEFINE_string('include', '^llm/', 'Regex of merged paths (the rest from the fine-tune).')
  flags.DEFINE_string('exclude', None, 'Regex of paths never merged.')
  flags.DEFINE_integer('eval_batches', 8, 'Batches per held_out.')
  flags.DEFINE_enum('on_mismatch', 'redo', fingerprint.ON_MISMATCH, 'Results cached with other '
                    'models, data or settings: measure again, or refuse.')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  try:
    rows = sweep(FLAGS.config, FLAGS.base, FLAGS.finetuned, FLAGS.workdir, FLAGS.knowledge_data,
                 FLAGS.task_data, [float(a) for a in FLAGS.alphas], FLAGS.methods,
                 FLAGS.include or None, FLAGS.exclude or None, FLAGS.eval_batches,
                 FLAGS.on_mismatch)
  except (fingerprint.Mismatch, prepare.DatasetError) as e:
    raise SystemExit(f'error: {e}') from None
  if jax.process_index() == 0:
    write_reports(rows, FLAGS.workdir)
    print(f'wrote {FLAGS.workdir}/merge_study.csv, .md and .png')


def run():
  """Console-script entry point."""
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
