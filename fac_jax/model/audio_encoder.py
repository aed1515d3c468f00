"""Continuous speech encoder: Whisper-v3 layout over 2 s mel windows, pooled to 25 Hz, projected."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import ml_collections

from fac_jax import sharding
from fac_jax.model import attention, layers


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
  """Whisper's fixed position table, [sin | cos]."""
  log_increment = np.log(max_timescale) / (channels // 2 - 1)
  inv_timescales = np.exp(-log_increment * np.arange(channels // 2, dtype=np.float32))
  scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
  return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


class EncoderLayer(nnx.Module):
  """Pre-LayerNorm Whisper block; k_proj has no bias."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.self_attn_norm = layers.layer_norm(d, cfg.norm_eps, **kw)
    self.q_proj = layers.linear(d, d, ('encoder_embed', 'encoder_heads'), use_bias=True, **kw)
    self.k_proj = layers.linear(d, d, ('encoder_embed', 'encoder_heads'), **kw)
    self.v_proj = layers.linear(d, d, ('encoder_embed', 'encoder_heads'), use_bias=True, **kw)
    self.out_proj = layers.linear(d, d, ('encoder_heads', 'encoder_embed'), use_bias=True, **kw)
    self.mlp_norm = layers.layer_norm(d, cfg.norm_eps, **kw)
    self.fc1 = layers.linear(d, cfg.mlp_dim, ('encoder_embed', 'encoder_mlp'), use_bias=True, **kw)
    self.fc2 = layers.linear(cfg.mlp_dim, d, ('encoder_mlp', 'encoder_embed'), use_bias=True, **kw)

  def __call__(self, x, mask):
    """mask: an attention.Windows, or a (B, 1, T, T) boolean array for XLA."""
    batch, length, d = x.shape
    heads = lambda t: t.reshape(batch, length, self.num_heads, d // self.num_heads)
    h = self.self_attn_norm(x)
    attn = attention.attend(heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h)),
                            mask)
    x = x + self.out_proj(attn.reshape(batch, length, d))
    x = x + self.fc2(jax.nn.gelu(self.fc1(self.mlp_norm(x)), approximate=False))
    return x


class ContinuousSpeechEncoder(nnx.Module):
  """Log-mel windows -> 25 Hz vectors at the LLM width.

  Each window of `window_frames` mel frames (2 s) is encoded on its own: positions restart at 0
  and attention stays inside the window, which is Whisper's block-diagonal windowed attention.
  As in the official encoder, the 50 Hz outputs of a row's windows are then concatenated and
  averaged in pairs, so with an odd number of 50 Hz frames per window a pair spans two windows.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, output_dim: int, *, dtype, param_dtype,
               remat_policy: str = 'none', attention: str = 'auto', rngs: nnx.Rngs):
    if cfg.window_frames % 2:
      raise ValueError(f'encoder.window_frames={cfg.window_frames}: must be even (the official '
                       'chunk is 2 * n_window mel frames)')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.hidden_size
    self.window_frames = cfg.window_frames
    self.remat_policy = remat_policy
    self.attention = attention  # model.attention
    conv_kw = dict(kernel_metadata={'logical_axes': ('conv_kernel', 'mel', 'encoder_embed')},
                   bias_metadata={'logical_axes': ('encoder_embed',)}, **kw)
    self.conv1 = nnx.Conv(cfg.num_mel_bins, d, kernel_size=3, padding=((1, 1),), **conv_kw)
    conv_kw['kernel_metadata'] = {'logical_axes': ('conv_kernel', 'encoder_embed', 'encoder_embed')}
    self.conv2 = nnx.Conv(d, d, kernel_size=3, strides=2, padding=((1, 1),), **conv_kw)
    if cfg.window_frames // 2 > cfg.max_positions:
      raise ValueError(f'encoder.window_frames={cfg.window_frames} needs '
                       f'{cfg.window_frames // 2} positions; max_positions={cfg.max_positions}')
    self.layers = layers.stacked_layers(lambda r: EncoderLayer(cfg, rngs=r, dtype=dtype,
                                                               param_dtype=param_dtype),
                                        cfg.num_layers, rngs)
    self.final_norm = layers.layer_norm(d, cfg.norm_eps, **kw)
    self.proj = layers.linear(d, output_dim, ('encoder_embed', 'embed'), use_bias=True, **kw)

  def window_states(self, mel: jax.Array, mel_lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each window through the convolutions and layers: (B * W, window_frames // 2, hidden) at
    50 Hz, and (B * W,) valid frames of each at that rate. Over one 30 s window this is
    Whisper's encoder before its final LayerNorm."""
    batch, windows, frames, mels = mel.shape
    if frames != self.window_frames:
      raise ValueError(f'mel windows have {frames} frames; the encoder expects '
                       f'{self.window_frames}')
    x = mel.reshape(batch * windows, frames, mels)
    lengths = mel_lengths.reshape(batch * windows)
    valid_mel = jnp.arange(frames)[None, :] < lengths[:, None]
    x = jnp.where(valid_mel[..., None], x, 0)
    x = jax.nn.gelu(self.conv1(x), approximate=False) * valid_mel[..., None]
    x = jax.nn.gelu(self.conv2(x), approximate=False)
    conv_frames = frames // 2
    x = x + jnp.asarray(sinusoids(conv_frames, x.shape[-1]), x.dtype)

    conv_lengths = jnp.where(lengths > 0, (lengths - 1) // 2 + 1, 0)
    valid_conv = jnp.arange(conv_frames)[None, :] < conv_lengths[:, None]
    mask = attention.Windows(valid_conv, self.attention)
    x = sharding.constrain(x, ('batch', 'length', 'encoder_embed'))
    return layers.scan_layers(self.layers, x, mask, remat_policy=self.remat_policy), conv_lengths

  def __call__(self, mel: jax.Array, mel_lengths: jax.Array) -> jax.Array:
    """mel: (B, W, window_frames, mels); mel_lengths: (B, W) valid frames per window. An audio's
    windows are consecutive and it starts on an even 50 Hz frame (fac_jax.data.conversation).

    Returns (B, W * (window_frames // 2) // 2, output_dim): frame m averages the row's 50 Hz
    frames 2m and 2m + 1, zero where frame 2m is padding. Where 2m + 1 is padding, frame m is 2m
    alone: the official encoder does not pool an audio of one 50 Hz frame (any longer audio drops
    its odd last frame, which no position reads).
    """
    batch, windows = mel.shape[:2]
    x, conv_lengths = self.window_states(mel, mel_lengths)
    conv_frames = x.shape[1]
    valid = jnp.arange(conv_frames)[None, :] < conv_lengths[:, None]
    pairs = windows * conv_frames // 2
    x = x.reshape(batch, windows * conv_frames, -1)[:, :2 * pairs].reshape(batch, pairs, 2, -1)
    valid = valid.reshape(batch, windows * conv_frames)[:, :2 * pairs].reshape(batch, pairs, 2)
    first = x[:, :, 0]
    x = (first + jnp.where(valid[:, :, 1, None], x[:, :, 1], first)) / 2
    x = self.proj(self.final_norm(x))
    return jnp.where(valid[:, :, 0, None], x, 0)
