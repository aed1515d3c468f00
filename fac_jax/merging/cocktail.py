"""Core-Cocktail as one resumable job: stage 1 -> merge M_r = alpha * M_1 + (1 - alpha) * M_0 of the
paths that have a base counterpart -> stage 2 from M_r (DESIGN.md section 2).

  python -m fac_jax.merging.cocktail --config=configs/tiny.py --workdir=DIR --config.data.dir=...
      --config.train.init_checkpoint=PREALIGNED --config.cocktail.base_checkpoint=M0
      [--on_mismatch=refuse|redo]

DIR/stage1/ and DIR/stage2/ are trainer workdirs (fac_jax.train.trainer), DIR/merged/ the merged
checkpoint. A rerun skips what is finished with the same settings and inputs (their fingerprints):
a stage whose final/ was made so, a merge already committed; an interrupted stage resumes from its
latest checkpoint. A part made otherwise is refused, naming what differs, or with
--on_mismatch=redo made again.
"""

import copy
import os
import shutil

from absl import flags
from jax.experimental import multihost_utils

from fac_jax import cli, fingerprint
from fac_jax.merging import merge
from fac_jax.train import trainer


def merge_settings(cfg, stage1_final: str) -> dict:
  """What the merged checkpoint depends on: the merge, and the fingerprints of what it mixes."""
  return {'config': {'cocktail': {k: cfg.cocktail[k]
                                  for k in ('method', 'alpha', 'include', 'exclude')}},
          'inputs': {'base': fingerprint.of_folder(cfg.cocktail.base_checkpoint),
                     'stage1': fingerprint.of_folder(stage1_final)}}


def run_cocktail(cfg, workdir: str, on_mismatch: str = 'refuse') -> str:
  """Runs or resumes the three parts; returns the path of stage 2's final checkpoint."""
  if not cfg.cocktail.base_checkpoint:
    raise ValueError('config.cocktail.base_checkpoint is empty: the base model M_0 to merge with')
  if cfg.train.stage != 'stage1':
    raise ValueError(f'config.train is stage {cfg.train.stage!r}; cocktail starts from stage1')
  stage1, merged, stage2 = (os.path.join(workdir, name) for name in ('stage1', 'merged', 'stage2'))

  m1 = trainer.train_to_final(cfg, stage1, on_mismatch)

  record, made = os.path.join(merged, fingerprint.FILE), merge_settings(cfg, m1)
  if os.path.exists(merged) and not fingerprint.reuse(fingerprint.read(record), made,
                                                      on_mismatch, merged):
    if trainer.is_main_process():
      shutil.rmtree(merged)
    multihost_utils.sync_global_devices(f'stale merge removed: {merged}')
  if not os.path.exists(merged):
    weight = 'alpha' if cfg.cocktail.method in ('linear', 'slerp') else 'scale'
    summary = merge.merge_checkpoints(
        cfg.cocktail.method, cfg.cocktail.base_checkpoint, [m1], merged,
        include=cfg.cocktail.include or None, exclude=cfg.cocktail.exclude or None,
        **{weight: cfg.cocktail.alpha})
    if trainer.is_main_process():
      fingerprint.write(record, made)
      print(f'merged {summary}', flush=True)

  stage2_cfg = copy.deepcopy(cfg)
  stage2_cfg.unlock()
  stage2_cfg.train = copy.deepcopy(cfg.cocktail.stage2)
  stage2_cfg.train.init_checkpoint = merged
  return trainer.train_to_final(stage2_cfg, stage2, on_mismatch)


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'configs/<exp>.py (stage 1 in config.train).')
  flags.DEFINE_string('workdir', None, 'Holds stage1/, merged/ and stage2/.', required=True)
  flags.DEFINE_enum('on_mismatch', 'refuse', fingerprint.ON_MISMATCH, 'A part made with other '
                    'settings or inputs: refuse it, or make it again.')


def main(argv):
  del argv
  try:
    final = run_cocktail(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.on_mismatch)
  except (trainer.TrainingError, ValueError) as e:  # refusals: settings, data, config
    raise SystemExit(f'error: {e}') from None
  if trainer.is_main_process():
    print(f'Core-Cocktail done: {final}')


def run():
  """Console-script entry point."""
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
