"""Log-mel front end against transformers' WhisperFeatureExtractor (the Whisper-v3 definition).

Tolerance: max absolute error 1e-4 on the normalised log-mel (values are O(1); the extractor works
in float32, we in float64, which shows only in near-silent bins).
"""

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from fac_jax.data import audio, synthetic


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
