"""Fun-Audio-Chat-8B: the released sizes (DESIGN.md section 1)."""

from fac_jax import config as base


def get_config(stage=None):
  """`configs/fac_8b.py:<stage>`: prealign, stage1 (default) or stage2."""
  config = base.default_config()
  config.train = base.train_config(stage or 'stage1')
  config.model.dtype = 'bfloat16'
  config.model.remat_policy = 'full'
  # A 2048-position row's losses in 4 chunks: 311 MB of float32 text logits a row, not 1.2 GB.
  config.model.loss_chunk_positions = 512
  # Released SFT settings (DESIGN.md section 2): 2048-position context, packing, bf16, remat.
  config.data.update(seq_len=2048, batch_size=256)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
