"""Analytic training FLOPs of Fun-Audio-Chat by component: the model FLOPs behind MFU in the
train-speed benchmark and the ahead-of-time report (XLA's cost analysis counts a scanned layer
stack once)."""

from fac_jax.model import moe


def decoder_matmul_params(cfg) -> int:
  """Matmul weights one position meets in a Qwen3 stack: q, k, v, o and the SwiGLU MLP, or in an
  MoE stack the router and its experts_per_token experts."""
  d = cfg.hidden_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  if moe.is_sparse_stack(cfg):
    feed_forward = (3 * d * cfg.moe.moe_mlp_dim * cfg.moe.experts_per_token
                    + d * cfg.moe.num_experts)
  else:
    feed_forward = 3 * d * cfg.mlp_dim
  return cfg.num_layers * (2 * d * q + 2 * d * kv + feed_forward)


def attention_flops(num_layers, sequences, queries, keys, heads, head_dim) -> float:
  """QK^T and PV: 2 matmuls x 2 FLOPs forward, twice that backward."""
  return 12 * num_layers * sequences * queries * keys * heads * head_dim


def analytic_flops(cfg, batch_size: int, seq_len: int, num_windows: int,
                   causal: bool = True) -> dict[str, float]:
  """Training FLOPs (forward + backward) of one step by component, for these batch shapes.

  Matmuls: 6 x (matmul weights a position meets) x positions, over every position of the batch
  shapes (padding included, as executed). The adapters' two projections both run on every LLM
  position (the model picks one after). Attention: 12 x layers x queries x keys x heads x
  head_dim. causal=True counts half the keys of the LLM and refined head (the useful causal
  triangle: model FLOPs, for MFU); causal=False counts the dense masked square XLA executes. The
  encoder attends inside each 2 s window, not causally: keys = the window's frames either way.
  Not counted: embedding gathers, norms, activations, softmax, loss, optimizer; and the first
  convolution needs no input gradient, which the factor 6 ignores.
  """
  enc, llm, head = cfg.encoder, cfg.llm, cfg.speech_refined_head
  d, group = llm.hidden_size, cfg.speech.group_size
  windows = batch_size * num_windows
  conv_frames = enc.window_frames // 2
  positions = batch_size * seq_len
  sub_positions = positions * group
  key_share = 0.5 if causal else 1.0
  e = enc.hidden_size
  encoder_layer = 4 * e * e + 2 * e * enc.mlp_dim
  encoder = windows * (enc.window_frames * 3 * enc.num_mel_bins * e
                       + conv_frames * (3 * e * e + enc.num_layers * encoder_layer)
                       + conv_frames // 2 * e * d)
  refined_head = (positions * group * d * d
                  + sub_positions * (d * head.hidden_size + decoder_matmul_params(head)
                                     + head.hidden_size * d + d * cfg.speech.codebook_size))
  return {
      'encoder (mel windows)': 6 * encoder,
      'encoder attention (in-window)': attention_flops(
          enc.num_layers, windows, conv_frames, conv_frames, enc.num_heads,
          e // enc.num_heads),
      'grouping adapters': 6 * positions * 2 * d * d,
      'LLM + lm_head': 6 * positions * (decoder_matmul_params(llm) + d * llm.vocab_size),
      'LLM attention': attention_flops(llm.num_layers, batch_size, seq_len, seq_len * key_share,
                                       llm.num_heads, llm.head_dim),
      'speech refined head (SRH)': 6 * refined_head,
      'SRH attention': attention_flops(head.num_layers, batch_size, group * seq_len,
                                       group * seq_len * key_share, head.num_heads,
                                       head.head_dim),
  }
