"""The pretrained continuous encoder (fac_jax.checkpoints.whisper): Whisper tiny.en's weights
in ContinuousSpeechEncoder compute what CTranslate2 computes with the same model.bin; configs and
files that do not fit are refused by name."""

import os

import ctranslate2
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fac_jax import audio
from fac_jax.checkpoints import whisper
from fac_jax.data import synth
from fac_jax.evaluation import asr_judge
from fac_jax.model import audio_encoder

# Over one 30 s window, states of magnitude up to 13. CTranslate2 4.8.5 (float32, CPU) adds the
# file's float16 copy of the position table, the encoder computes it in float32: 6.0e-3 measured.
CT2_ATOL = 1e-2
# The ASR judge's encoder (itself held to CTranslate2 in test_asr_judge) given the computed table:
# 1.1e-5 measured.
JUDGE_ATOL = 1e-4


def whisper_sized(window_frames: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      **whisper.WHISPER_TINY_EN_SIZES, window_frames=window_frames,
      max_positions=whisper.AUDIO_POSITIONS, pretrained='whisper_tiny_en'))


def test_loaded_encoder_matches_ctranslate2(tmp_path):
  os.makedirs(tmp_path / 'audio')
  mels = []
  for text, voice in (('What is three plus five?', 'en-gb'), ('The dog runs in the park.', 'en-us')):
    utterance = synth.Speech(synth.ESPEAK, voice, 150, 50, text)
    synth.make_wav(str(tmp_path), utterance, None)
    wav = audio.load(str(tmp_path / utterance.path))
    mels.append(audio.log_mel(np.pad(wav, (0, asr_judge.CHUNK_SAMPLES - len(wav))),
                              whisper.NUM_MELS))
  mels = np.stack(mels)  # (2, 3000, 80): Whisper's own 30 s input

  cfg = whisper_sized(window_frames=2 * whisper.AUDIO_POSITIONS)
  encoder = audio_encoder.ContinuousSpeechEncoder(cfg, 32, dtype=jax.numpy.float32,
                                                  param_dtype=jax.numpy.float32,
                                                  rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(encoder)
  random = nnx.to_pure_dict(state)
  params = whisper.with_pretrained_encoder({'continuous_encoder': random},
                                                      cfg)['continuous_encoder']
  np.testing.assert_array_equal(params['proj']['kernel'], random['proj']['kernel'])

  @jax.jit
  def whisper_states(params, mel):
    model = nnx.merge(graphdef, params)
    lengths = np.full((len(mel), 1), mel.shape[1], np.int32)
    states, _ = model.window_states(mel[:, None], lengths)
    return model.final_norm(states)

  states = np.asarray(whisper_states(params, mels))
  judge = asr_judge.load()
  reference = np.asarray(ctranslate2.models.Whisper(judge.model_dir, device='cpu',
                                                    compute_type='float32').encode(
      ctranslate2.StorageView.from_array(np.ascontiguousarray(mels.transpose(0, 2, 1)))))
  assert states.shape == reference.shape == (2, whisper.AUDIO_POSITIONS, whisper.WIDTH)
  assert np.abs(states - reference).max() < CT2_ATOL
  computed_table = {**judge.params, 'encoder': {
      **judge.params['encoder'], 'positions': audio_encoder.sinusoids(*reference.shape[1:])}}
  judge_states = np.asarray(jax.jit(asr_judge.encode)(computed_table, mels))
  assert np.abs(states - judge_states).max() < JUDGE_ATOL
  # Negative control: the query weights in place of the key weights.
  swapped = jax.tree.map(np.asarray, params)
  swapped['layers']['k_proj']['kernel'] = params['layers']['q_proj']['kernel']
  assert np.abs(np.asarray(whisper_states(swapped, mels)) - reference).max() > 10 * CT2_ATOL


@pytest.mark.parametrize('field, value', [('hidden_size', 256), ('num_mel_bins', 128),
                                          ('num_layers', 2), ('window_frames', 3200)])
def test_configs_that_whisper_does_not_fit_are_refused(field, value):
  cfg = whisper_sized(window_frames=200)
  cfg[field] = value
  with pytest.raises(ValueError, match=f'model.encoder.{field}={value}'):
    whisper.check_config(cfg)
  cfg = whisper_sized(window_frames=200)
  cfg.pretrained = 'whisper_large'
  with pytest.raises(ValueError, match="model.encoder.pretrained='whisper_large'"):
    whisper.check_config(cfg)


def test_a_key_bias_or_other_positions_are_refused():
  path = os.path.join(whisper.default_model_dir(), 'model.bin')
  weights = whisper.read_weights(path)
  name = 'encoder/layer_2/self_attention/linear_0/bias'
  biased = dict(weights, **{name: weights[name] + 0.1})
  with pytest.raises(ValueError, match=f'{name} has a key bias'):
    whisper.trunk_from_whisper(biased, path)
  shifted = dict(weights, **{'encoder/position_encodings/encodings':
                             np.roll(weights['encoder/position_encodings/encodings'], 1, axis=0)})
  with pytest.raises(ValueError, match='position_encodings are not'):
    whisper.trunk_from_whisper(shifted, path)
