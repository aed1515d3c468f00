"""Fine-tuning a checkpoint on your own conversations: the checkpoint's own model config, the stage
starting from it, LoRA on the LLM's projections by default (README "Fine-tune on your data")."""

from fac_jax import config as base
from fac_jax.checkpoints import checkpoint


def get_config(arg=None):
  """`configs/finetune.py:CKPT[,stage]`: CKPT a fac_jax checkpoint (imported, trained or an
  adapter checkpoint), stage one of prealign, stage1 (default), stage2, dpo. Full fine-tuning:
  --config.train.lora.rank=0; QLoRA: --config.train.lora.base_quantization=int8 (or int4)."""
  if not arg:
    raise ValueError('configs/finetune.py needs the checkpoint to fine-tune: '
                     'configs/finetune.py:CKPT[,stage]')
  ckpt, _, stage = arg.partition(',')
  config = base.default_config()
  config.model = checkpoint.load_config(ckpt)
  config.train = base.train_config(stage or 'stage1')
  config.train.update(init_checkpoint=ckpt, steps=200, warmup_fraction=0.05, eval_every=50,
                      checkpoint_every=50)
  config.train.lora.update(rank=16, alpha=32.0)
  config.data.update(batch_size=8, seq_len=2048, num_windows=32)
  return config
