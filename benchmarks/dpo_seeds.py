"""Benchmark: how much multi-task DPO moves the held-out SFT loss, across data-order seeds, from a
finished main job's stage 2 (one seed measured +12.5 % in one run and +18.1 % in another).

  python benchmarks/dpo_seeds.py --workdir=/tmp/fac_jax_pipeline [--seeds=1,2] [--out=DIR]

Seed 0 is the main job's own DPO stage (its evaluation is read from DIR/eval/dpo.json); every
other seed reruns the same DPO stage from stage 2 with `config.seed` set to it (the order of the
preference pairs) into DIR/dpo_seed<N>/, and measures the held-out loss as the main job does
(speech_eval/loss: the validation split, 8 batches). Writes <out>/report.md and report.json.
"""

import json
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import sharding  # noqa: E402
from fac_jax.evaluation import spoken_eval  # noqa: E402
from fac_jax.merging import merge_study  # noqa: E402
from fac_jax.pipeline import main_job, reports  # noqa: E402
from fac_jax.train import trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py'),
    'The main job\'s config.')
flags.DEFINE_string('workdir', '/tmp/fac_jax_pipeline', 'A finished main job.')
flags.DEFINE_list('seeds', ['1', '2'], 'Data-order seeds to rerun DPO with (0 is the main job\'s).')
flags.DEFINE_string('out', os.path.join(reports.REPORTS, 'dpo_seeds'), 'Report folder.')


def held_out_loss(cfg, data_dir: str, ckpt: str) -> float:
  """speech_eval/loss of the main job's evaluation: validation split, 8 batches."""
  params = spoken_eval.load_model(ckpt, cfg)[1]
  evaluator = merge_study.Evaluator(cfg, sharding.make_mesh(cfg.mesh), max_batches=8)
  return float(evaluator(params, f'{data_dir}@validation')['loss'])


def main(argv):
  del argv
  start = time.time()
  workdir = flags.FLAGS.workdir
  cfg = main_job.pipeline_model(_CONFIG.value)
  data_dir = os.path.join(workdir, 'prepared')
  stage2 = os.path.join(workdir, main_job.MODELS['stage2'])
  evaluation = {}
  for name in ('stage2', 'dpo'):
    with open(os.path.join(workdir, 'eval', f'{name}.json')) as f:
      evaluation[name] = json.load(f)['metrics']['speech_eval/loss']
  eval_cfg = cfg.copy_and_resolve_references()
  eval_cfg.data.dir = data_dir
  rows = [{'seed': cfg.seed, 'dpo_loss': evaluation['dpo'], 'source': 'the main job'}]
  for seed in map(int, flags.FLAGS.seeds):
    dpo_cfg = main_job.stage_config(cfg, 'dpo', data_dir, 'prefs_train', 'prefs_validation',
                                    stage2)
    dpo_cfg.seed = seed
    run_dir = os.path.join(workdir, f'dpo_seed{seed}')
    print(f'DPO from stage 2 with seed {seed} -> {run_dir}', flush=True)
    trainer.train_to_final(dpo_cfg, run_dir, 'redo')
    rows.append({'seed': seed, 'source': run_dir,
                 'dpo_loss': held_out_loss(eval_cfg, data_dir, os.path.join(run_dir, 'final'))})
  for row in rows:
    row['change'] = row['dpo_loss'] / evaluation['stage2'] - 1
  changes = [row['change'] for row in rows]
  summary = {'stage2_loss': evaluation['stage2'], 'rows': rows,
             'mean_change': statistics.mean(changes), 'min_change': min(changes),
             'max_change': max(changes)}
  lines = ['# DPO: held-out SFT loss across data-order seeds', '',
           f'From the main job in `{workdir}`: stage 2 held-out speech loss '
           f'{evaluation["stage2"]:.3f}.', '',
           '| seed | after DPO | change | run |', '|---:|---:|---:|---|']
  lines += [f'| {r["seed"]} | {r["dpo_loss"]:.3f} | {r["change"]:+.1%} | {r["source"]} |'
            for r in rows]
  lines += ['', f'Mean {summary["mean_change"]:+.1%}, from {summary["min_change"]:+.1%} to '
            f'{summary["max_change"]:+.1%} over {len(rows)} seeds.']
  reports.write_benchmark_report(flags.FLAGS.out, lines, summary, start)


if __name__ == '__main__':
  app.run(main)
