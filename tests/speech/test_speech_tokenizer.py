"""Embedded speech tokenizer: code counts, k-means training, the saved file, Griffin-Lim decoding.

Trained on 40 s of synthetic tone speech with 64 codes; held-out audio comes from another seed.
"""

import numpy as np
import pytest

from fac_jax import audio
from fac_jax.data import synthetic
from fac_jax.speech import speech_tokenizer as st

VOCAB_SIZE = 64
NUM_MEL_BINS = 80


@pytest.fixture(scope='module')
def training_waveforms():
  rng = np.random.default_rng(1)
  return [synthetic.tone_speech(rng, 4.0) for _ in range(10)]


@pytest.fixture(scope='module')
def tokenizer(training_waveforms):
  return st.KMeansSpeechTokenizer.train(training_waveforms, VOCAB_SIZE, seed=0, iterations=20)


@pytest.fixture(scope='module')
def detokenizer(tokenizer):
  return st.GriffinLimDetokenizer(tokenizer)


@pytest.fixture(scope='module')
def held_out():
  return synthetic.tone_speech(np.random.default_rng(99), 3.0)


def standardised_features(tokenizer, waveforms):
  return np.concatenate([tokenizer.standardise(st.stacked_log_mel(waveform, NUM_MEL_BINS))
                         for waveform in waveforms])


def test_implements_the_interfaces(tokenizer, detokenizer):
  assert isinstance(tokenizer, st.SpeechTokenizer)
  assert isinstance(detokenizer, st.SpeechDetokenizer)
  assert (tokenizer.sample_rate, tokenizer.frame_rate, tokenizer.vocab_size) == (16000, 25, 64)
  assert (detokenizer.sample_rate, detokenizer.vocab_size) == (16000, 64)


# 18560 samples: int(18560 / 16000 * 25) is 28 in floating point, one less than 18560 // 640.
@pytest.mark.parametrize('num_samples', [0, 639, 640, 641, 8000, 16000, 18560, 19679, 59999])
def test_one_code_per_40_ms_within_the_vocabulary(tokenizer, num_samples):
  waveform = synthetic.tone_speech(np.random.default_rng(num_samples), 4.0)[:num_samples]
  codes = tokenizer.encode(waveform)
  assert codes.dtype == np.int32
  assert codes.shape == (int(num_samples / 16000 * 25),)
  assert np.all((codes >= 0) & (codes < VOCAB_SIZE))


def test_stacked_features_are_four_consecutive_log_mel_frames(held_out):
  features = st.stacked_log_mel(held_out, NUM_MEL_BINS)
  mel = audio.log_mel(held_out, NUM_MEL_BINS)
  np.testing.assert_array_equal(features[7], mel[28:32].reshape(-1))


@pytest.mark.parametrize('waveform,message', [
    (np.zeros((2, 16000)), 'mono'),
    (np.full(16000, np.nan), 'NaN or infinite'),
    (np.concatenate([np.zeros(1000), [np.inf]]), 'NaN or infinite'),
])
def test_encode_refuses_bad_waveforms(tokenizer, waveform, message):
  with pytest.raises(ValueError, match=message):
    tokenizer.encode(waveform)


@pytest.mark.parametrize('codes', [[0, 64], [-1, 3], [[1, 2]], [0.5, 1.0]])
def test_decode_refuses_codes_outside_the_vocabulary(detokenizer, codes):
  with pytest.raises(ValueError, match='outside|1-D integer'):
    detokenizer.decode(np.array(codes))


def test_training_is_deterministic_for_a_seed(tokenizer, training_waveforms):
  again = st.KMeansSpeechTokenizer.train(training_waveforms, VOCAB_SIZE, seed=0, iterations=20)
  other_seed = st.KMeansSpeechTokenizer.train(training_waveforms, VOCAB_SIZE, seed=1,
                                              iterations=20)
  np.testing.assert_array_equal(again.centroids, tokenizer.centroids)
  np.testing.assert_array_equal(again.mean, tokenizer.mean)
  np.testing.assert_array_equal(again.std, tokenizer.std)
  assert not np.array_equal(other_seed.centroids, tokenizer.centroids)


def test_save_load_gives_identical_codes(tokenizer, detokenizer, held_out, tmp_path):
  path = str(tmp_path / 'tokenizer.npz')
  tokenizer.save(path)
  assert [p.name for p in tmp_path.iterdir()] == ['tokenizer.npz']
  loaded = st.KMeansSpeechTokenizer.load(path)
  assert (loaded.vocab_size, loaded.num_mel_bins) == (VOCAB_SIZE, NUM_MEL_BINS)
  np.testing.assert_array_equal(loaded.encode(held_out), tokenizer.encode(held_out))
  np.testing.assert_array_equal(st.GriffinLimDetokenizer.load(path).decode(np.arange(5)),
                                detokenizer.decode(np.arange(5)))


@pytest.mark.parametrize('field,corrupt', [
    ('centroids', None),
    ('std', None),
    ('format_version', None),
    ('centroids', lambda value: value[:, :-1]),
    ('mean', lambda value: value[:10]),
    ('std', lambda value: value[None]),
    ('vocab_size', lambda value: value + 1),  # centroids no longer match it
    ('format_version', lambda value: value + 1),
])
def test_load_refuses_a_corrupted_file_naming_the_field(tokenizer, tmp_path, field, corrupt):
  good, bad = str(tmp_path / 'good.npz'), str(tmp_path / 'bad.npz')
  tokenizer.save(good)
  with np.load(good) as stored:
    fields = {name: stored[name] for name in stored.files}
  if corrupt is None:
    del fields[field]
  else:
    fields[field] = corrupt(fields[field])
  np.savez(bad, **fields)
  blamed = 'centroids' if field == 'vocab_size' else field
  with pytest.raises(ValueError, match=f"bad.npz.*'{blamed}'"):
    st.KMeansSpeechTokenizer.load(bad)


def test_load_refuses_a_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='absent.npz'):
    st.KMeansSpeechTokenizer.load(str(tmp_path / 'absent.npz'))


def test_kmeans_objective_never_increases(tokenizer, training_waveforms):
  points = standardised_features(tokenizer, training_waveforms)
  _, objective = st.kmeans(points, VOCAB_SIZE, seed=0, iterations=20)
  # Measured: 327.4 after k-means++, 182.1 at the fixed point after 7 steps.
  assert len(objective) > 2
  assert np.all(np.diff(objective) <= 1e-9 * objective[0])
  assert objective[-1] < 0.7 * objective[0]


def test_kmeans_plus_plus_puts_a_centroid_in_every_separated_blob():
  rng = np.random.default_rng(0)
  blob_centres = 100.0 * rng.normal(size=(8, 5))
  points = (blob_centres[:, None] + rng.normal(size=(8, 50, 5))).reshape(-1, 5)
  _, objective = st.kmeans(points, 8, seed=0, iterations=0)
  # Measured 7.9: one centroid per blob leaves about twice the within-blob variance (5). A blob
  # without a centroid would add over a thousand; uniform sampling misses one 99.8% of the time.
  assert objective[0] < 20.0


def test_empty_clusters_move_to_the_farthest_points():
  points = np.array([[0.0], [1.0], [10.0], [20.0]])
  labels = np.array([0, 0, 0, 2])
  distances = np.array([0.0, 1.0, 100.0, 0.0])
  centroids = st._updated_centroids(points, labels, distances, np.array([[0.0], [5.0], [20.0]]))
  np.testing.assert_array_equal(centroids, [[11 / 3], [10.0], [20.0]])


def test_trained_codebook_beats_random_training_frames(tokenizer, training_waveforms, held_out):
  features = standardised_features(tokenizer, [held_out])
  random_frames = standardised_features(tokenizer, training_waveforms)[
      np.random.default_rng(3).choice(40 * 25, VOCAB_SIZE, replace=False)]
  random_codebook = st.KMeansSpeechTokenizer(random_frames, tokenizer.mean, tokenizer.std,
                                             NUM_MEL_BINS)
  error = lambda codebook: np.mean(
      np.sum((features - codebook.centroids[codebook.encode(held_out)]) ** 2, axis=1))
  # Measured squared error per frame: 202.5 trained, 350.2 random.
  assert error(tokenizer) < 0.75 * error(random_codebook)


def test_round_trip_keeps_the_log_mel(tokenizer, detokenizer, held_out):
  reconstruction = detokenizer.decode(tokenizer.encode(held_out))
  np.testing.assert_array_equal(reconstruction, detokenizer.decode(tokenizer.encode(held_out)))
  assert reconstruction.dtype == np.float32 and reconstruction.shape == held_out.shape
  assert np.max(np.abs(reconstruction)) <= 1.0

  original = audio.log_mel(held_out, NUM_MEL_BINS)
  error = lambda waveform: np.mean(np.abs(audio.log_mel(waveform, NUM_MEL_BINS) - original))
  noise = np.random.default_rng(5).normal(size=len(held_out)) * np.std(held_out)
  # Measured mean absolute log-mel error: 0.086 reconstruction, 0.705 noise of equal RMS,
  # 1.542 silence; the codebook's own frames (no Griffin-Lim) are 0.083 off.
  assert error(reconstruction) < 0.2
  assert error(reconstruction) < 0.3 * error(noise)
  assert error(reconstruction) < 0.15 * error(np.zeros_like(held_out))

  # Per-frame log energy, as the mean over mel bins. Measured r: 0.955 (noise: 0.04).
  envelope = lambda waveform: audio.log_mel(waveform, NUM_MEL_BINS).mean(axis=1)
  assert np.corrcoef(envelope(reconstruction), envelope(held_out))[0, 1] > 0.8


def reference_magnitude(waveform):
  """|STFT| framed as audio.log_mel: centred, reflect padding, periodic Hann 400, hop 160."""
  padded = np.pad(waveform, 200, mode='reflect')
  frames = np.lib.stride_tricks.sliding_window_view(padded, 400)[::160][:len(waveform) // 160]
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
  return np.abs(np.fft.rfft(frames * window, axis=-1))


@pytest.mark.parametrize('momentum', [0.0, 0.99])
def test_griffin_lim_converges_to_a_real_signals_magnitude(momentum):
  time = np.arange(16000) / 16000
  glide = 2 * np.pi * (150 * time + 100 * time ** 2)
  signal = 0.3 * sum(np.sin(k * glide) / k for k in range(1, 5))
  magnitude = reference_magnitude(signal)
  spectral_convergence = [
      np.linalg.norm(reference_magnitude(st.griffin_lim(magnitude, iterations, momentum))
                     - magnitude) / np.linalg.norm(magnitude)
      for iterations in (0, 4, 16, 64)]
  # Measured: 0.557 0.278 0.204 0.124 without momentum, 0.557 0.249 0.134 0.092 with.
  assert np.all(np.diff(spectral_convergence) < 0)
  assert spectral_convergence[-1] < 0.2
