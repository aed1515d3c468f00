"""Parity of our Qwen3 decoder and continuous speech encoder with Hugging Face transformers.

Tiny random torch models are built offline from a config, every weight (norm scales and biases
included) is re-drawn, the state dict goes through official_layout into our modules, and both
sides run on the same inputs. Within each model the sizes all differ, so a wrong transpose or
head split cannot pass.

Tolerance: float32 everywhere, max relative error <= 1e-4, where the relative error is
max|ours - theirs| / max|theirs| over the compared outputs.
"""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (
    Qwen2_5OmniAudioEncoderConfig)
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

from fac_jax import config as config_lib
from fac_jax.checkpoints import official_layout
from fac_jax.data import conversation
from fac_jax.model import audio_encoder, qwen3

RTOL = 1e-4

# Decoder: hidden 40, 6 query heads over 2 kv heads (groups of 3), head_dim 12 != 40 / 6.
DECODER = dict(vocab=97, hidden=40, layers=3, heads=6, kv_heads=2, head_dim=12, mlp=56,
               rope_theta=7919.0)
# Encoder: 13 mel bins, width 36 (3 heads of 12), ffn 44, output 29, windows of 20 mel frames.
ENCODER = dict(mels=13, hidden=36, layers=2, heads=3, mlp=44, n_window=10, output=29,
               max_positions=17)


def relative_error(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def randomize(model: torch.nn.Module, seed: int):
  """Re-draws every parameter: HF leaves norm scales at 1 and biases at 0, which hide mix-ups."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith('bias'):
        p.copy_(0.2 * noise)
      else:  # norm scales
        p.copy_(1.0 + 0.3 * noise)


def state_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def merge_into(abstract: nnx.Module, tensors, maps, ignored=()) -> nnx.Module:
  """Our module with the official tensors loaded; every torch parameter must be used."""
  used = {k for m in maps for k in m.keys}
  unused = set(tensors) - used - set(ignored)
  assert not unused, f'official tensors not read by the maps: {sorted(unused)}'
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, official_layout.load_params(tensors, maps))


# ---------------------------------------------------------------------------------------------
# Qwen3 decoder


def decoder_pair(attn_implementation: str, dtype=jnp.float32):
  """The HF decoder and ours with its weights; ours computes in `dtype`, parameters float32."""
  d = DECODER
  hf_config = Qwen3Config(
      vocab_size=d['vocab'], hidden_size=d['hidden'], intermediate_size=d['mlp'],
      num_hidden_layers=d['layers'], num_attention_heads=d['heads'],
      num_key_value_heads=d['kv_heads'], head_dim=d['head_dim'], rms_norm_eps=1e-6,
      rope_parameters={'rope_type': 'default', 'rope_theta': d['rope_theta']},
      max_position_embeddings=128, tie_word_embeddings=False, attention_dropout=0.0)
  hf_config._attn_implementation = attn_implementation
  torch.manual_seed(0)
  hf_model = Qwen3ForCausalLM(hf_config).eval()
  randomize(hf_model, seed=1)

  cfg = config_lib.decoder_config(num_layers=d['layers'], hidden_size=d['hidden'],
                                  num_heads=d['heads'], num_kv_heads=d['kv_heads'],
                                  head_dim=d['head_dim'], mlp_dim=d['mlp'],
                                  rope_theta=d['rope_theta'])
  cfg.vocab_size = d['vocab']
  abstract = nnx.eval_shape(lambda: qwen3.CausalLM(cfg, dtype=dtype, param_dtype=jnp.float32,
                                                   rngs=nnx.Rngs(0)))
  ours = merge_into(abstract, state_numpy(hf_model), official_layout.causal_lm_maps(cfg))
  return hf_model, ours


def hf_logits(hf_model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize('attn_implementation', ['eager', 'sdpa'])
def test_qwen3_causal_lm_matches_hf(attn_implementation):
  hf_model, ours = decoder_pair(attn_implementation)
  ids = np.random.default_rng(2).integers(0, DECODER['vocab'], size=(3, 23))
  theirs = hf_logits(hf_model, ids)
  logits = np.asarray(ours(jnp.asarray(ids)))
  assert logits.shape == theirs.shape == (3, 23, DECODER['vocab'])
  err = relative_error(logits, theirs)
  print(f'qwen3 {attn_implementation}: max relative error {err:.3g}')
  assert err <= RTOL


def test_qwen3_packed_segments_match_separate_hf_runs():
  hf_model, ours = decoder_pair('sdpa')
  rng = np.random.default_rng(3)
  lengths = (7, 11, 5)
  seqs = [rng.integers(0, DECODER['vocab'], size=(1, n)) for n in lengths]
  ids = np.concatenate(seqs, axis=1)
  segment_ids = np.concatenate([np.full((1, n), s + 1) for s, n in enumerate(lengths)], axis=1)
  positions = np.concatenate([np.arange(n)[None] for n in lengths], axis=1)

  packed = np.asarray(ours(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(segment_ids)))
  starts = np.cumsum((0,) + lengths)
  errors = []
  for seq, start, n in zip(seqs, starts, lengths):
    errors.append(relative_error(packed[:, start:start + n], hf_logits(hf_model, seq)))
  print(f'qwen3 packed: max relative errors per segment {[f"{e:.3g}" for e in errors]}')
  assert max(errors) <= RTOL


# ---------------------------------------------------------------------------------------------
# Continuous speech encoder


def encoder_pair(attn_implementation: str, n_window: int = ENCODER['n_window']):
  e = ENCODER
  hf_config = Qwen2_5OmniAudioEncoderConfig(
      num_mel_bins=e['mels'], d_model=e['hidden'], encoder_layers=e['layers'],
      encoder_attention_heads=e['heads'], encoder_ffn_dim=e['mlp'], n_window=n_window,
      output_dim=e['output'], max_source_positions=e['max_positions'])
  hf_config._attn_implementation = attn_implementation
  torch.manual_seed(0)
  hf_model = Qwen2_5OmniAudioEncoder(hf_config).eval()
  randomize(hf_model, seed=4)

  cfg = ml_collections.ConfigDict(dict(
      num_mel_bins=e['mels'], hidden_size=e['hidden'], num_layers=e['layers'],
      num_heads=e['heads'], mlp_dim=e['mlp'], window_frames=2 * n_window,
      max_positions=e['max_positions'], norm_eps=1e-5))
  abstract = nnx.eval_shape(lambda: audio_encoder.ContinuousSpeechEncoder(
      cfg, e['output'], dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  ours = merge_into(abstract, state_numpy(hf_model), official_layout.encoder_maps(cfg),
                    ignored=('audio_bos_eos_token.weight',))
  return hf_model, ours


def to_windows(audios: list[np.ndarray], window: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """(frames, mels) audios -> our (B, W, window, mels) windows and (B, W) valid lengths.

  Padding is filled with noise rather than zeros, so a leak of padded frames shows.
  """
  num_windows = max(-(-len(a) // window) for a in audios)
  mels = audios[0].shape[1]
  out = rng.normal(size=(len(audios), num_windows * window, mels)).astype(np.float32) * 5
  lengths = np.zeros((len(audios), num_windows), np.int32)
  for b, audio in enumerate(audios):
    out[b, :len(audio)] = audio
    lengths[b] = np.clip(len(audio) - window * np.arange(num_windows), 0, window)
  return out.reshape(len(audios), num_windows, window, mels), lengths


@pytest.mark.parametrize('attn_implementation', ['eager', 'sdpa'])
def test_continuous_encoder_matches_hf(attn_implementation):
  hf_model, ours = encoder_pair(attn_implementation)
  window = 2 * ENCODER['n_window']
  # 45 mel frames: two full windows and a 5-frame one (3 conv frames: the odd one is dropped);
  # 13 frames: under one window, 7 conv frames, again odd.
  mel_lengths = (2 * window + 5, 13)
  rng = np.random.default_rng(5)
  audios = [rng.normal(size=(n, ENCODER['mels'])).astype(np.float32) for n in mel_lengths]

  with torch.no_grad():
    theirs = hf_model(
        input_features=torch.from_numpy(np.concatenate(audios, axis=0).T.copy()),
        feature_lens=torch.tensor(mel_lengths, dtype=torch.long)).last_hidden_state.numpy()
  frames_25hz = [((n - 1) // 2 + 1) // 2 for n in mel_lengths]
  assert theirs.shape == (sum(frames_25hz), ENCODER['output'])

  mel, lengths = to_windows(audios, window, rng)
  out = np.asarray(ours(jnp.asarray(mel), jnp.asarray(lengths)))
  assert out.shape == (len(audios), mel.shape[1] * window // 4, ENCODER['output'])
  # One audio a row: its 25 Hz frames come first; a slot whose first 50 Hz frame is padding is 0.
  conv_valid = np.arange(window // 2) < ((lengths + 1) // 2)[..., None]
  assert not np.any(out[~conv_valid.reshape(len(audios), -1)[:, ::2]])
  ours_frames = np.concatenate([out[b, :n] for b, n in enumerate(frames_25hz)])
  err = relative_error(ours_frames, theirs)
  print(f'encoder {attn_implementation}: max relative error {err:.3g}')
  assert err <= RTOL


def test_continuous_encoder_pools_across_odd_windows_like_hf():
  """n_window 5: each window yields 5 frames at 50 Hz, so 25 Hz pairs span two windows, over the
  windows of each audio, as in the official encoder and Qwen2.5-Omni's. Audios go through the data
  pipeline's formatting and packing; one audio of 2 mel frames has a single 50 Hz frame, which
  the official encoder passes through unpooled (Qwen2.5-Omni drops it: its expected value is
  computed from that encoder's last layer, ln_post and proj)."""
  n_window = 5
  hf_model, ours = encoder_pair('sdpa', n_window)
  cfg = config_lib.default_config().model
  cfg.encoder.update(num_mel_bins=ENCODER['mels'], window_frames=2 * n_window)
  # 50 Hz frames per audio: 12 (3 windows), 1, 19 (odd: the last is dropped), 7.
  mel_lengths = (23, 2, 37, 13)
  rng = np.random.default_rng(6)
  audios = [rng.normal(size=(n, ENCODER['mels'])).astype(np.float32) for n in mel_lengths]
  speech = [conversation.user_audio(a, conversation.encoder_frames(len(a)), cfg) for a in audios]
  text = lambda: conversation.Text([11, 12], trained=False)
  examples = [conversation.format_conversation(pieces, cfg)
              for pieces in ([text(), speech[0], text(), speech[1]], [text(), speech[2]],
                             [speech[3], text()])]
  rows = [examples[:2], examples[2:]]
  batch = conversation.pack(rows, max(sum(len(e['input_ids']) for e in r) for r in rows),
                            max(sum(len(e['mel_lengths']) for e in r) for r in rows), cfg)
  assert batch['mel_lengths'][0].tolist() == [10, 10, 3, 0, 2, 0, 10, 10, 10, 7]

  out = np.asarray(ours(jnp.asarray(batch['mel']), jnp.asarray(batch['mel_lengths'])))
  index = batch['continuous_frames']
  ours_frames = np.concatenate([out[b, index[b][index[b] >= 0]] for b in range(len(rows))])

  with torch.no_grad():
    result = hf_model(input_features=torch.from_numpy(np.concatenate(audios).T.copy()),
                      feature_lens=torch.tensor(mel_lengths), output_hidden_states=True)
    single = hf_model.proj(hf_model.ln_post(result.hidden_states[-1][12])).numpy()
  pooled = result.last_hidden_state.numpy()
  assert len(pooled) == 6 + 9 + 3
  theirs = np.concatenate([pooled[:6], single[None], pooled[6:]])
  assert ours_frames.shape == theirs.shape
  err = relative_error(ours_frames, theirs)
  print(f'encoder, odd windows: max relative error {err:.3g}')
  assert err <= RTOL
