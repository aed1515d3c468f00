"""Core-Cocktail as one resumable job: stage 1 -> merge M_r = alpha * M_1 + (1 - alpha) * M_0 of the
paths that have a base counterpart -> stage 2 from M_r (DESIGN.md section 2).

  python -m fac_jax.merging.cocktail --config=configs/tiny.py --workdir=DIR --config.data.dir=...
      --config.train.init_checkpoint=PREALIGNED --config.cocktail.base_checkpoint=M0

DIR/stage1/ and DIR/stage2/ are trainer workdirs (fac_jax.train.trainer), DIR/merged/ the merged
checkpoint. A rerun skips what is finished: a stage whose final/ exists, a merge already
committed; an interrupted stage resumes from its latest checkpoint.
"""

import copy
import os

from absl import app, flags

from fac_jax.merging import merge
from fac_jax.train import trainer
def run_cocktail(cfg, workdir: str) -> str:
  """Runs or resumes the three parts; returns the path of stage 2's final checkpoint."""
  if not cfg.cocktail.base_checkpoint:
    raise ValueError('config.cocktail.base_checkpoint is empty: the base model M_0 to merge with')
  if cfg.train.stage != 'stage1':
    raise ValueError(f'config.train is stage {cfg.train.stage!r}; cocktail starts from stage1')
  stage1, merged, stage2 = (os.path.join(workdir, name) for name in ('stage1', 'merged', 'stage2'))

  m1 = os.path.join(stage1, 'final')
  if not os.path.exists(m1):
    trainer.Trainer(cfg, stage1).run()
  if not os.path.exists(m1):
    raise SystemExit(f'stage 1 stopped before its last step; rerun to resume ({stage1})')

  if not os.path.exists(merged):
    weight = 'alpha' if cfg.cocktail.method in ('linear', 'slerp') else 'scale'
    summary = merge.merge_checkpoints(
        cfg.cocktail.method, cfg.cocktail.base_checkpoint, [m1], merged,
        include=cfg.cocktail.include or None, exclude=cfg.cocktail.exclude or None,
        **{weight: cfg.cocktail.alpha})
    if trainer.is_main_process():
      print(f'merged {summary}', flush=True)

  m2 = os.path.join(stage2, 'final')
  if not os.path.exists(m2):
    stage2_cfg = copy.deepcopy(cfg)
    stage2_cfg.unlock()
    stage2_cfg.train = copy.deepcopy(cfg.cocktail.stage2)
    stage2_cfg.train.init_checkpoint = merged
    trainer.Trainer(stage2_cfg, stage2).run()
  return m2


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'configs/<exp>.py (stage 1 in config.train).')
  flags.DEFINE_string('workdir', None, 'Holds stage1/, merged/ and stage2/.', required=True)


def main(argv):
  del argv
  final = run_cocktail(flags.FLAGS.config, flags.FLAGS.workdir)
  if trainer.is_main_process():
    print(f'Core-Cocktail done: {final}')


def run():
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
