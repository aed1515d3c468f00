"""Audio front end: any common audio file -> 16 kHz mono waveform -> log-mel with the definition
of Whisper-v3's feature extractor."""

import functools

import librosa
import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160


@functools.cache
def _mel_filters(num_mel_bins: int) -> np.ndarray:
  return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=num_mel_bins, fmin=0.0,
                             fmax=SAMPLE_RATE / 2, htk=False, norm='slaney').astype(np.float64)


class AudioError(ValueError):
  """An audio file that cannot be used; the message names the file and why."""


def load(path: str, max_seconds: float | None = None, min_samples: int = 4 * HOP_LENGTH
         ) -> np.ndarray:
  """Reads any file librosa reads, resampled to 16 kHz mono float32; refuses unreadable (librosa
  also refuses non-finite samples), too short (default: under 4 mel frames) or overlong audio."""
  try:
    waveform, _ = librosa.load(path, sr=SAMPLE_RATE, mono=True)
  except Exception as e:  # librosa raises many kinds for unreadable files
    raise AudioError(f'cannot read audio file {path}: {e}') from None
  seconds = len(waveform) / SAMPLE_RATE
  if len(waveform) < min_samples:
    raise AudioError(f'{path} holds {seconds:.3f} s of audio: too short')
  if max_seconds is not None and seconds > max_seconds:
    raise AudioError(f'{path} is {seconds:.1f} s long; the limit is {max_seconds:g} s')
  return waveform


def log_mel(waveform: np.ndarray, num_mel_bins: int = 128) -> np.ndarray:
  """(samples,) float waveform at 16 kHz -> (frames, num_mel_bins) float32, frames = samples // 160.

  Periodic Hann window of 400, hop 160, centred with reflect padding, power spectrum, Slaney mel
  filters, log10 floored at 1e-10 and at (max - 8), then (x + 4) / 4: Whisper's recipe.
  """
  waveform = np.asarray(waveform, np.float64)
  if waveform.ndim != 1:
    raise ValueError(f'log_mel expects a mono waveform (samples,), got shape {waveform.shape}')
  padded = np.pad(waveform, N_FFT // 2, mode='reflect')
  num_frames = 1 + (len(padded) - N_FFT) // HOP_LENGTH
  frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:num_frames]
  window = np.hanning(N_FFT + 1)[:-1]
  power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
  log_spec = np.log10(np.maximum(power @ _mel_filters(num_mel_bins).T, 1e-10))[:-1]
  log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
  return ((log_spec + 4.0) / 4.0).astype(np.float32)
