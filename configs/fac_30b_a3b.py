"""Fun-Audio-Chat-30B-A3B: the released model's structure with Qwen3-30B-A3B as the shared LLM
(a mixture of experts, 3B of its 30B parameters active a token); encoder, adapters and refined
head as in Fun-Audio-Chat-8B."""

from fac_jax import config as base


def get_config(stage=None):
  """`configs/fac_30b_a3b.py:<stage>`: prealign, stage1 (default) or stage2."""
  config = base.default_config()
  config.train = base.train_config(stage or 'stage1')
  # Qwen3-30B-A3B (transformers' Qwen3MoeConfig of the released model): every layer MoE, 128
  # experts of width 768, 8 a token, their weights renormalised. mlp_dim is its dense width,
  # used only by layers in mlp_only_layers (none). The 30B Fun-Audio-Chat's RoPE theta is not
  # published: 1e6 is Qwen3-30B-A3B's; import reads the checkpoint's own from its config.json.
  config.model.llm.update(num_layers=48, hidden_size=2048, num_heads=32, num_kv_heads=4,
                          head_dim=128, mlp_dim=6144, rope_theta=1e6, vocab_size=151936)
  config.model.llm.moe.update(num_experts=128, experts_per_token=8, moe_mlp_dim=768,
                              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=(),
                              router_aux_loss_coef=0.001)
  base.use_released_sft_settings(config)  # as configs/fac_8b.py
  return config
