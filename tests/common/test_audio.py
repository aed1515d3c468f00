"""Log-mel front end against transformers' WhisperFeatureExtractor (the Whisper-v3 definition).

Tolerance: max absolute error 1e-4 on the normalised log-mel (values are O(1); the extractor works
in float32, we in float64, which shows only in near-silent bins).
"""

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from fac_jax import audio
from fac_jax.data import synthetic


@pytest.mark.parametrize('num_samples,num_mel_bins', [(32123, 128), (48000, 80), (1234, 128)])
def test_log_mel_matches_whisper_feature_extractor(num_samples, num_mel_bins):
  rng = np.random.default_rng(num_samples)
  waveform = synthetic.tone_speech(rng, num_samples / audio.SAMPLE_RATE)[:num_samples]
  extractor = WhisperFeatureExtractor(feature_size=num_mel_bins)
  reference = extractor(waveform, sampling_rate=16000, return_tensors='np',
                        padding='longest')['input_features'][0].T
  ours = audio.log_mel(waveform, num_mel_bins)
  assert ours.shape == reference.shape == (num_samples // 160, num_mel_bins)
  np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_log_mel_refuses_stereo():
  with pytest.raises(ValueError, match='mono'):
    audio.log_mel(np.zeros((2, 1600)))


def test_load_resamples_to_16k_mono_and_refuses_bad_files(tmp_path):
  import soundfile
  rng = np.random.default_rng(0)
  stereo = rng.normal(size=(44100, 2)).astype(np.float32) * 0.1
  path = tmp_path / 'stereo.wav'
  soundfile.write(path, stereo, 44100)
  waveform = audio.load(str(path))
  assert waveform.ndim == 1 and abs(len(waveform) - 16000) <= 1

  empty, corrupt, nan, long, silent, narrow = (
      tmp_path / n for n in ('empty.wav', 'corrupt.wav', 'nan.wav', 'long.wav', 'silent.wav',
                             'narrow.wav'))
  soundfile.write(empty, np.zeros(0, np.float32), 16000)
  corrupt.write_bytes(b'RIFF\x00\x00\x00\x00WAVEnot really')
  soundfile.write(nan, np.full(16000, np.nan, np.float32), 16000, subtype='FLOAT')
  soundfile.write(long, np.ones(16000 * 3, np.float32) * 0.1, 16000)
  soundfile.write(silent, np.zeros(16000, np.float32), 16000)
  soundfile.write(narrow, rng.normal(size=8000).astype(np.float32) * 0.1, 8000)
  for bad, message in [(empty, 'too short'), (corrupt, 'cannot read audio file'),
                       (tmp_path / 'missing.wav', 'does not exist'),
                       (nan, 'not finite'), (silent, 'silent'), (narrow, 'sampled at 8000 Hz')]:
    with pytest.raises(audio.AudioError, match=message) as error:
      audio.load(str(bad))
    assert str(bad) in str(error.value)
  with pytest.raises(audio.AudioError, match='is 3.0 s long; the limit is 2 s'):
    audio.load(str(long), max_seconds=2)


def test_load_checks_the_header_before_decoding_and_says_why_it_refuses(tmp_path, monkeypatch):
  import soundfile
  rng = np.random.default_rng(1)
  long, cut, corrupt = (tmp_path / n for n in ('long.wav', 'cut.wav', 'corrupt.wav'))
  soundfile.write(long, rng.normal(size=16000 * 3).astype(np.float32) * 0.1, 16000)
  soundfile.write(cut, rng.normal(size=16000).astype(np.float32) * 0.1, 16000)
  cut.write_bytes(cut.read_bytes()[:16000])  # a copy interrupted half-way
  corrupt.write_bytes(b'RIFF\x00\x00\x00\x00WAVEnot really')
  with pytest.raises(audio.AudioError, match=r"corrupt.wav: .*No 'data' chunk"):
    audio.load(str(corrupt))

  def decode(*args, **kwargs):
    raise AssertionError('decoded before the header was checked')

  monkeypatch.setattr(audio.librosa, 'load', decode)
  with pytest.raises(audio.AudioError, match='long.wav is 3.0 s long; the limit is 2 s'):
    audio.load(str(long), max_seconds=2)
  with pytest.raises(audio.AudioError, match=r'cut.wav is cut short .*: its header promises '
                     r'32,000 bytes of samples, the file holds 15,956') as error:
    audio.load(str(cut))
  assert error.value.reason == 'truncated'
