"""Speech tokenizer interface and the embedded default: k-means over log-mel, Griffin-Lim back."""

import hashlib
import os
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import librosa
import numpy as np

from fac_jax import audio

FRAME_RATE = 25
FRAMES_PER_CODE = 4  # log-mel frames (100 Hz) per code (25 Hz)
FORMAT_VERSION = 1


@runtime_checkable
class SpeechTokenizer(Protocol):
  """Waveform -> discrete speech codes, about one per 1 / frame_rate seconds.

  fac_jax.speech.s3tokenizer.S3Tokenizer, the released model's S3Tokenizer v3, fits as
  sample_rate 16000, frame_rate 25, vocab_size 6561.
  """
  sample_rate: int
  frame_rate: int
  vocab_size: int

  def encode(self, waveform: np.ndarray) -> np.ndarray:
    """(samples,) float waveform at sample_rate -> int32 codes in [0, vocab_size), about
    samples / sample_rate * frame_rate of them; the exact count is the tokenizer's (k-means:
    int(samples / 16000 * 25); S3: ceil((n // 160) / 4) for each 30 s piece of n samples)."""
    ...

  def fingerprint(self) -> str:
    """A string that changes whenever the codes `encode` makes could change (cache keys)."""
    ...


@runtime_checkable
class SpeechDetokenizer(Protocol):
  """Speech codes -> waveform at sample_rate.

  lookahead: how many codes to the right of the last one to be played a streaming caller should
  wait for before decoding it (0 for a decoder whose output per code depends on that code only).
  """
  sample_rate: int
  vocab_size: int
  lookahead: int

  def decode(self, codes: np.ndarray) -> np.ndarray:
    """(num_codes,) integer codes in [0, vocab_size) -> (samples,) float32 waveform in [-1, 1]."""
    ...


@runtime_checkable
class StreamingSpeechDetokenizer(SpeechDetokenizer, Protocol):
  """A detokenizer with a streaming session of its own (real caches), rather than re-decoding
  windows of codes: session = stream(); session.push(codes) -> the samples they complete;
  session.finish() -> the rest."""

  def stream(self):
    ...


def checked_codes(codes, vocab_size: int) -> np.ndarray:
  """`codes` as a 1-D int32 array, refused (ValueError) unless integers in [0, vocab_size)."""
  codes = np.asarray(codes)
  if codes.ndim != 1 or not (codes.size == 0 or np.issubdtype(codes.dtype, np.integer)):
    raise ValueError(f'expected a 1-D integer array of codes, got {codes.dtype} of shape '
                     f'{codes.shape}')
  outside = codes[(codes < 0) | (codes >= vocab_size)]
  if outside.size:
    raise ValueError(f'code {int(outside[0])} is outside [0, {vocab_size})')
  return codes.astype(np.int32)


def num_codes(num_samples: int) -> int:
  return int(num_samples / audio.SAMPLE_RATE * FRAME_RATE)


def _check_waveform(waveform: np.ndarray) -> np.ndarray:
  waveform = np.asarray(waveform)
  if waveform.ndim != 1:
    raise ValueError(f'expected a mono waveform (samples,), got shape {waveform.shape}')
  if not np.all(np.isfinite(waveform)):
    raise ValueError('waveform contains NaN or infinite samples')
  return waveform


def stacked_log_mel(waveform: np.ndarray, num_mel_bins: int) -> np.ndarray:
  """(samples,) at 16 kHz -> (num_codes(samples), 4 * num_mel_bins) float32: each row is 4
  consecutive frames of audio.log_mel; a last incomplete group is dropped, and a missing last frame
  is repeated when the code count rounds up."""
  waveform = _check_waveform(waveform)
  count = num_codes(len(waveform))
  if count == 0:
    return np.zeros((0, FRAMES_PER_CODE * num_mel_bins), np.float32)
  mel = audio.log_mel(waveform, num_mel_bins)
  wanted = count * FRAMES_PER_CODE
  if len(mel) < wanted:
    mel = np.concatenate([mel, np.repeat(mel[-1:], wanted - len(mel), axis=0)])
  return mel[:wanted].reshape(count, FRAMES_PER_CODE * num_mel_bins)


def _nearest(points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Index of the nearest centroid for each point and the squared distance to it."""
  centroid_norms = np.sum(centroids ** 2, axis=1)
  chunk = max(1, 2 ** 22 // len(centroids))  # bounds the (chunk, k) distance matrix
  labels = np.empty(len(points), np.int64)
  distances = np.empty(len(points))
  for start in range(0, len(points), chunk):
    block = points[start:start + chunk]
    squared = np.sum(block ** 2, axis=1, keepdims=True) - 2 * block @ centroids.T + centroid_norms
    block_labels = np.argmin(squared, axis=1)
    labels[start:start + chunk] = block_labels
    distances[start:start + chunk] = np.maximum(squared[np.arange(len(block)), block_labels], 0.0)
  return labels, distances


def _kmeans_plus_plus(points: np.ndarray, num_clusters: int,
                      rng: np.random.Generator) -> np.ndarray:
  chosen = [int(rng.integers(len(points)))]
  closest = np.sum((points - points[chosen[0]]) ** 2, axis=1)
  for _ in range(1, num_clusters):
    total = closest.sum()
    # Only when every point already coincides with a centroid; then any point will do.
    probabilities = closest / total if total > 0 else None
    chosen.append(int(rng.choice(len(points), p=probabilities)))
    closest = np.minimum(closest, np.sum((points - points[chosen[-1]]) ** 2, axis=1))
  return points[chosen].copy()


def _updated_centroids(points: np.ndarray, labels: np.ndarray, distances: np.ndarray,
                       centroids: np.ndarray) -> np.ndarray:
  """Means of the assigned points; empty clusters move onto the points farthest from theirs."""
  counts = np.bincount(labels, minlength=len(centroids))
  filled = np.flatnonzero(counts)
  starts = np.concatenate([[0], np.cumsum(counts[filled])[:-1]])
  sums = np.add.reduceat(points[np.argsort(labels, kind='stable')], starts, axis=0)
  updated = centroids.copy()
  updated[filled] = sums / counts[filled, None]
  empty = np.flatnonzero(counts == 0)
  updated[empty] = points[np.argsort(-distances, kind='stable')[:len(empty)]]
  return updated


def kmeans(points: np.ndarray, num_clusters: int, seed: int,
           iterations: int) -> tuple[np.ndarray, list[float]]:
  """k-means++ initialisation, then up to `iterations` Lloyd steps (stops early at a fixed point).

  Returns the centroids and the objective (mean squared distance to the nearest centroid) at the
  initialisation and after each step; it never increases.
  """
  points = np.asarray(points, np.float64)
  if not 1 <= num_clusters <= len(points):
    raise ValueError(f'cannot make {num_clusters} clusters from {len(points)} points')
  centroids = _kmeans_plus_plus(points, num_clusters, np.random.default_rng(seed))
  labels, distances = _nearest(points, centroids)
  objective = [float(distances.mean())]
  for _ in range(iterations):
    centroids = _updated_centroids(points, labels, distances, centroids)
    new_labels, distances = _nearest(points, centroids)
    objective.append(float(distances.mean()))
    converged = np.array_equal(new_labels, labels)
    labels = new_labels
    if converged:
      break
  return centroids, objective


class KMeansSpeechTokenizer:
  """Codes = nearest centroid of 4 stacked log-mel frames, standardised per dimension."""

  sample_rate = audio.SAMPLE_RATE
  frame_rate = FRAME_RATE

  def __init__(self, centroids: np.ndarray, mean: np.ndarray, std: np.ndarray,
               num_mel_bins: int = 80):
    self.centroids = np.asarray(centroids, np.float32)
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self.num_mel_bins = int(num_mel_bins)
    self.vocab_size = len(self.centroids)

  def standardise(self, features: np.ndarray) -> np.ndarray:
    return (np.asarray(features, np.float64) - self.mean) / self.std

  def fingerprint(self) -> str:
    """Hash of the codebook: centroids, standardisation and mel bins."""
    digest = hashlib.sha1(np.ascontiguousarray(self.centroids))
    digest.update(np.ascontiguousarray(self.mean))
    digest.update(np.ascontiguousarray(self.std))
    return f'kmeans{self.num_mel_bins}-{digest.hexdigest()}'

  def encode(self, waveform: np.ndarray) -> np.ndarray:
    features = self.standardise(stacked_log_mel(waveform, self.num_mel_bins))
    return _nearest(features, self.centroids.astype(np.float64))[0].astype(np.int32)

  @classmethod
  def train(cls, waveforms: Iterable[np.ndarray], vocab_size: int, seed: int = 0,
            iterations: int = 20, num_mel_bins: int = 80) -> 'KMeansSpeechTokenizer':
    """k-means over the stacked log-mel frames of `waveforms` (16 kHz), standardised."""
    features = np.concatenate([stacked_log_mel(waveform, num_mel_bins) for waveform in waveforms])
    mean = features.mean(axis=0, dtype=np.float64)
    # Floored so that a dimension that never varies (e.g. an always-floored mel bin) stays finite.
    std = np.maximum(features.std(axis=0, dtype=np.float64), 1e-3)
    centroids, _ = kmeans((features - mean) / std, vocab_size, seed, iterations)
    return cls(centroids, mean, std, num_mel_bins)

  def save(self, path: str) -> None:
    with open(path, 'wb') as file:
      np.savez(file, format_version=np.int64(FORMAT_VERSION), centroids=self.centroids,
               mean=self.mean, std=self.std, num_mel_bins=np.int64(self.num_mel_bins),
               vocab_size=np.int64(self.vocab_size))

  @classmethod
  def load(cls, path: str) -> 'KMeansSpeechTokenizer':
    if not os.path.exists(path):
      raise FileNotFoundError(f'speech tokenizer file {path} does not exist')
    with np.load(path, allow_pickle=False) as stored:
      fields = {name: stored[name] for name in stored.files}

    def field(name: str, shape: tuple) -> np.ndarray:
      if name not in fields:
        raise ValueError(f'speech tokenizer file {path} has no field {name!r}')
      if fields[name].shape != shape:
        raise ValueError(f'speech tokenizer file {path}: field {name!r} has shape '
                         f'{fields[name].shape}, expected {shape}')
      return fields[name]

    version = int(field('format_version', ()))
    if version != FORMAT_VERSION:
      raise ValueError(f'speech tokenizer file {path}: field \'format_version\' is {version}, '
                       f'this code reads {FORMAT_VERSION}')
    num_mel_bins = int(field('num_mel_bins', ()))
    vocab_size = int(field('vocab_size', ()))
    dim = FRAMES_PER_CODE * num_mel_bins
    return cls(field('centroids', (vocab_size, dim)), field('mean', (dim,)), field('std', (dim,)),
               num_mel_bins)


def _periodic_hann() -> np.ndarray:
  return np.hanning(audio.N_FFT + 1)[:-1]


def _spectrum(padded: np.ndarray, window: np.ndarray) -> np.ndarray:
  """Frames at 0, hop, 2 hop, ... of an already padded signal -> (frames, n_fft // 2 + 1)."""
  frames = np.lib.stride_tricks.sliding_window_view(padded, audio.N_FFT)[::audio.HOP_LENGTH]
  return np.fft.rfft(frames * window, axis=-1)


def _overlap_add(spectrum: np.ndarray, window: np.ndarray, window_power: np.ndarray) -> np.ndarray:
  """Least-squares inverse of _spectrum: the padded signal whose frames best match `spectrum`."""
  frames = np.fft.irfft(spectrum, n=audio.N_FFT, axis=-1) * window
  signal = np.zeros(len(window_power))
  for index, frame in enumerate(frames):
    start = index * audio.HOP_LENGTH
    signal[start:start + audio.N_FFT] += frame
  return signal / window_power


def griffin_lim(magnitude: np.ndarray, iterations: int = 32, momentum: float = 0.99,
                seed: int = 0) -> np.ndarray:
  """(frames, 201) STFT magnitude -> (frames * 160,) float64 waveform whose STFT has it.

  Framing as in audio.log_mel: frame t is centred on sample 160 t, periodic Hann window of 400.
  The fast Griffin-Lim of Perraudin et al. (2013): Griffin-Lim with momentum on the projections;
  momentum 0 is the original algorithm. The initial phase is uniform noise drawn from `seed`.
  """
  magnitude = np.asarray(magnitude, np.float64)
  num_frames = len(magnitude)
  window = _periodic_hann()
  window_power = np.zeros((num_frames - 1) * audio.HOP_LENGTH + audio.N_FFT)
  for index in range(num_frames):
    window_power[index * audio.HOP_LENGTH:index * audio.HOP_LENGTH + audio.N_FFT] += window ** 2
  # Only the outermost samples of the padding lack window coverage; they are cut off below.
  window_power = np.maximum(window_power, 1e-8)

  with_magnitude = lambda spectrum: magnitude * np.exp(1j * np.angle(spectrum))
  rng = np.random.default_rng(seed)
  estimate = magnitude * np.exp(2j * np.pi * rng.random(magnitude.shape))
  previous = estimate
  for _ in range(iterations):
    consistent = _spectrum(_overlap_add(with_magnitude(estimate), window, window_power), window)
    estimate = consistent + momentum * (consistent - previous)
    previous = consistent
  signal = _overlap_add(with_magnitude(estimate), window, window_power)
  start = audio.N_FFT // 2
  return signal[start:start + num_frames * audio.HOP_LENGTH]


class GriffinLimDetokenizer:
  """Codes -> the centroid's log-mel frames -> linear magnitude -> waveform by Griffin-Lim."""

  sample_rate = audio.SAMPLE_RATE
  lookahead = 0  # each code's spectrum depends on that code only

  def __init__(self, tokenizer: KMeansSpeechTokenizer, iterations: int = 32,
               momentum: float = 0.99, seed: int = 0):
    self.vocab_size = tokenizer.vocab_size
    self.iterations = iterations
    self.momentum = momentum
    self.seed = seed
    normalised = (tokenizer.centroids.astype(np.float64) * tokenizer.std + tokenizer.mean)
    mel_power = 10.0 ** (normalised.reshape(-1, tokenizer.num_mel_bins) * 4.0 - 4.0)
    filters = librosa.filters.mel(sr=audio.SAMPLE_RATE, n_fft=audio.N_FFT,
                                  n_mels=tokenizer.num_mel_bins, fmin=0.0,
                                  fmax=audio.SAMPLE_RATE / 2, htk=False, norm='slaney')
    # Below 1 kHz the filters are narrower than the 40 Hz FFT bins, and some are (nearly) linear
    # combinations of others. A quantised mel frame is not exactly in the filters' range, and the
    # full pseudo-inverse would amplify its residual along those directions many-fold (measured:
    # 140 times the original's energy), so singular values below 1e-3 of the largest are dropped.
    power = np.maximum(mel_power @ np.linalg.pinv(filters, rcond=1e-3).T, 0.0)
    # (vocab_size, 4, 201): the STFT magnitude of each code's 4 frames.
    self.magnitudes = np.sqrt(power).reshape(self.vocab_size, FRAMES_PER_CODE, -1)

  @classmethod
  def load(cls, path: str, **kwargs) -> 'GriffinLimDetokenizer':
    return cls(KMeansSpeechTokenizer.load(path), **kwargs)

  def decode(self, codes: np.ndarray) -> np.ndarray:
    codes = checked_codes(codes, self.vocab_size)
    if codes.size == 0:
      return np.zeros(0, np.float32)
    magnitude = self.magnitudes[codes.astype(np.int64)].reshape(-1, self.magnitudes.shape[-1])
    waveform = griffin_lim(magnitude, self.iterations, self.momentum, self.seed)
    return np.clip(waveform, -1.0, 1.0).astype(np.float32)
