"""The ASR judge (fac_jax.evaluation.asr_judge): parity with CTranslate2 running the same model.bin, real
speech from piper and espeak-ng transcribed with a low WER, scoring, and refusal of a damaged
model file."""

import os
import struct

import ctranslate2
import jax
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from fac_jax import audio
from fac_jax.checkpoints import whisper
from fac_jax.data import synth
from fac_jax.evaluation import asr_judge

# (engine, voice, speed, pitch, text): the text as spoken is the reference too.
SPEECH = (
    (synth.PIPER, synth.PIPER_VOICE, 1.0, None, 'The dog runs in the park.'),
    (synth.PIPER, synth.PIPER_VOICE, 1.0, None, 'What is twenty three plus four?'),
    (synth.PIPER, synth.PIPER_VOICE, 0.9, None, 'My friend likes the red ball.'),
    (synth.PIPER, synth.PIPER_VOICE, 1.1, None, 'It is cold in the morning.'),
    (synth.ESPEAK, 'en-us', 150, 50, 'The cat sleeps at home.'),
    (synth.ESPEAK, 'en-gb', 160, 40, 'What is three plus five?'),
    (synth.ESPEAK, 'en-us+f3', 150, 60, 'What colour is snow?'),
    (synth.ESPEAK, 'en-gb-x-rp', 140, 50, 'How many legs does a dog have?'),
)
# Measured: piper 0.0 in each of 8 syntheses (piper's output varies from run to run; 'what
# colour is' and 'the cat sleeps' at piper's faster rates sometimes lose 2-3 words, so they are
# left to espeak-ng, which is deterministic); espeak-ng 0.048 ('the cat sleep at home').
MAX_PIPER_WER = 0.1
MAX_ESPEAK_WER = 0.15
# CTranslate2 4.8.5 in float32 on CPU against the JAX encoder in 30 s windows, over states of
# magnitude up to 13: 1.7e-5 to 7.9e-4 measured on 18 corpus-like clips.
ENCODER_ATOL = 2e-3
# WhisperFeatureExtractor's 80-bin log-mel against fac_jax.audio's: 1.6e-5 measured.
LOG_MEL_ATOL = 2e-4


@pytest.fixture(scope='module')
def judge():
  return asr_judge.load()


@pytest.fixture(scope='module')
def speech(tmp_path_factory):
  """[(engine, 16 kHz waveform, reference)] made the way the demo corpus makes its wavs."""
  out = tmp_path_factory.mktemp('speech')
  os.makedirs(out / 'audio')
  piper_voice, _ = synth.open_piper('on')
  clips = []
  for engine, voice, speed, pitch, text in SPEECH:
    utterance = synth.Speech(engine, voice, speed, pitch, text)
    synth.make_wav(str(out), utterance, piper_voice)
    clips.append((engine, audio.load(str(out / utterance.path)), text))
  return clips


@pytest.fixture(scope='module')
def transcripts(judge, speech):
  return judge.token_ids([wav for _, wav, _ in speech])


def _features(wavs, seconds):
  return np.stack([audio.log_mel(np.pad(w, (0, seconds * audio.SAMPLE_RATE - len(w))),
                                 whisper.NUM_MELS) for w in wavs])


def _ct2(judge):
  return ctranslate2.models.Whisper(judge.model_dir, device='cpu', compute_type='float32')


def test_front_end_and_encoder_match_references(judge, speech):
  wavs = [speech[0][1], speech[4][1]]
  mels = _features(wavs, 30)
  extractor = WhisperFeatureExtractor(feature_size=whisper.NUM_MELS)
  expected = extractor(wavs, sampling_rate=audio.SAMPLE_RATE, return_tensors='np').input_features
  np.testing.assert_allclose(mels, expected.transpose(0, 2, 1), atol=LOG_MEL_ATOL)
  states = np.asarray(jax.jit(asr_judge.encode)(judge.params, mels))
  reference = np.asarray(_ct2(judge).encode(ctranslate2.StorageView.from_array(
      np.ascontiguousarray(mels.transpose(0, 2, 1)))))
  assert states.shape == reference.shape == (2, whisper.AUDIO_POSITIONS, whisper.WIDTH)
  assert np.abs(states - reference).max() < ENCODER_ATOL


def test_greedy_tokens_match_ctranslate2(judge, speech, transcripts):
  picked = (1, 6)  # a piper and an espeak-ng clip, from the batch of all of them
  features = _features([speech[i][1] for i in picked], asr_judge.WINDOW_SECONDS)
  results = _ct2(judge).generate(ctranslate2.StorageView.from_array(
      np.ascontiguousarray(features.transpose(0, 2, 1))), [list(judge.prompt)] * 2, beam_size=1)
  assert [transcripts[i] for i in picked] == [r.sequences_ids[0] for r in results]
  assert all(transcripts)


def test_real_speech_is_transcribed(judge, speech, transcripts):
  hyps = [judge.tokenizer.decode(ids).strip() for ids in transcripts]
  for engine, bound in ((synth.PIPER, MAX_PIPER_WER), (synth.ESPEAK, MAX_ESPEAK_WER)):
    refs = [text for e, _, text in speech if e == engine]
    wer = asr_judge.word_error_rate(refs, [h for (e, _, _), h in zip(speech, hyps) if e == engine])
    assert wer <= bound, (engine, wer, hyps)


def test_normalisation_and_word_error_rate():
  assert asr_judge.normalise("What's 23 plus 4? It's 1,000 - colour!") == \
      'whats twenty three plus four its one thousand color'
  assert [asr_judge.spoken_number(n) for n in (0, 19, 40, 100, 115, 999, 4021)] == [
      'zero', 'nineteen', 'forty', 'one hundred', 'one hundred fifteen',
      'nine hundred ninety nine', 'four thousand twenty one']
  # One substitution and one deletion over six reference words; an insertion over three.
  assert asr_judge.word_error_rate(['the dog runs', 'in the park'], ['The dog ran.', 'in park']) \
      == pytest.approx(2 / 6)
  assert asr_judge.word_error_rate(['what is two'], ['what is 2 2']) == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match='reference 1 has no words'):
    asr_judge.word_error_rate(['a', '?'], ['a', 'b'])


def _write_model_bin(path, variables, aliases):
  """CTranslate2's model.bin layout (binary version 6), written independently of the reader."""
  type_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2,
              np.dtype(np.float16): 4}

  def string(text):
    return struct.pack('<H', len(text) + 1) + text.encode() + b'\0'

  with open(path, 'wb') as f:
    f.write(struct.pack('<I', 6) + string('WhisperSpec') + struct.pack('<II', 3, len(variables)))
    for name, value in variables.items():
      value = np.asarray(value)
      f.write(string(name) + struct.pack(f'<B{value.ndim}I', value.ndim, *value.shape))
      f.write(struct.pack('<BI', type_ids[value.dtype], value.nbytes) + value.tobytes())
    f.write(struct.pack('<I', len(aliases)))
    for alias, target in aliases.items():
      f.write(string(alias) + string(target))


@pytest.fixture(scope='module')
def stored(judge):
  return whisper.read_model_bin(os.path.join(judge.model_dir, 'model.bin'))


def test_int8_weights_are_dequantised(stored, tmp_path):
  variables, aliases = stored
  assert {v.dtype for v in variables.values() if v.ndim} == {np.dtype(np.float16)}  # this file
  quantised, originals = dict(variables), {}
  for name, value in variables.items():
    if value.ndim == 2 and name.endswith('/weight'):  # linear and embedding weights
      weight = value.astype(np.float32)
      scale = 127 / np.abs(weight).max(axis=1)
      quantised[name] = np.rint(weight * scale[:, None]).astype(np.int8)
      quantised[f'{name}_scale'] = scale.astype(np.float32)
      originals[name] = (weight, scale)
  _write_model_bin(tmp_path / 'model.bin', quantised, aliases)
  weights = whisper.read_weights(str(tmp_path / 'model.bin'))
  for name, (weight, scale) in originals.items():
    assert np.all(np.abs(weights[name] - weight) <= 0.5 / scale[:, None] * (1 + 1e-5)), name
  np.testing.assert_array_equal(weights['decoder/projection/weight'],
                                weights['decoder/embeddings/weight'])


@pytest.mark.parametrize('damage, message', [
    ('misshapen', r'tensor encoder/layer_1/self_attention/linear_0/weight has shape \(1152, 383\)'),
    ('missing', 'lacks tensor decoder/layer_2/ffn/linear_0/bias'),
    ('extra', 'unexpected tensor decoder/layer_4/ffn/linear_0/bias'),
    ('heads', 'decoder/num_heads is 8'),
    ('truncated', 'is truncated: tensor encoder/position_encodings/encodings needs'),
])
def test_damaged_model_file_is_refused(stored, tmp_path, damage, message):
  variables, aliases = stored
  variables = dict(variables)
  path = tmp_path / 'model.bin'
  for name in ('config.json', 'vocabulary.txt', 'tokenizer.json'):
    os.symlink(os.path.join(whisper.default_model_dir(), name), tmp_path / name)
  if damage == 'misshapen':
    name = 'encoder/layer_1/self_attention/linear_0/weight'
    variables[name] = variables[name][:, :383]
  elif damage == 'missing':
    del variables['decoder/layer_2/ffn/linear_0/bias']
  elif damage == 'extra':
    variables['decoder/layer_4/ffn/linear_0/bias'] = variables['decoder/layer_3/ffn/linear_0/bias']
  elif damage == 'heads':
    variables['decoder/num_heads'] = np.array(8, np.int16).reshape(())
  _write_model_bin(path, variables, aliases)
  if damage == 'truncated':
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) - 1000)
  with pytest.raises(ValueError, match=message) as error:
    asr_judge.load(str(tmp_path))
  assert str(path) in str(error.value)
