"""Fun-Audio-Chat-8B: the released sizes (DESIGN.md section 1)."""

from fac_jax import config as base


def get_config(stage=None):
  """`configs/fac_8b.py:<stage>`: prealign, stage1 (default) or stage2."""
  config = base.default_config()
  config.train = base.train_config(stage or 'stage1')
  base.use_released_sft_settings(config)
  return config
