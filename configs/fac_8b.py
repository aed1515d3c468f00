"""Fun-Audio-Chat-8B: the released sizes (DESIGN.md section 1)."""

from fac_jax import config as base


def get_config(arg=None):
  del arg
  config = base.default_config()
  config.model.dtype = 'bfloat16'
  config.model.remat_policy = 'full'
  return config
