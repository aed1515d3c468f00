"""Audio front end: any common audio file -> 16 kHz mono waveform -> log-mel with the definition
of Whisper-v3's feature extractor."""

import functools
import os

import librosa
import numpy as np
import soundfile

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160


@functools.cache
def mel_filters(num_mel_bins: int) -> np.ndarray:
  return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=num_mel_bins, fmin=0.0,
                             fmax=SAMPLE_RATE / 2, htk=False, norm='slaney').astype(np.float64)


class AudioError(ValueError):
  """An audio file that cannot be used; the message names the file and why, `reason` is a short
  tag for counting (missing, unreadable, truncated, non_finite, low_sample_rate, overlong,
  too_short, silent)."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


def _cut_short(path: str) -> tuple[int, int] | None:
  """(bytes of samples the header promises, bytes the file holds) of a WAV file cut short, else
  None; libsndfile reads such a file up to where it ends without a word."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    riff = f.read(12)
    if riff[:4] != b'RIFF' or riff[8:] != b'WAVE':
      return None
    while len(header := f.read(8)) == 8:
      length = int.from_bytes(header[4:], 'little')
      if header[:4] == b'data':
        held = size - f.tell()
        unknown = length == 0xFFFFFFFF  # what a writer streaming to a pipe puts there
        return (length, held) if held < length and not unknown else None
      f.seek(length + length % 2, os.SEEK_CUR)
  return None


def _check_length(path: str, seconds: float, max_seconds: float | None) -> None:
  if max_seconds is not None and seconds > max_seconds:
    raise AudioError(f'{path} is {seconds:.1f} s long; the limit is {max_seconds:g} s', 'overlong')


def _why(error: Exception) -> str:
  """libsndfile's own words where it has them (its message also repeats the path), else the
  message, else the kind of error."""
  return (getattr(error, 'error_string', None) or str(error)).strip() or type(error).__name__


def load(path: str, max_seconds: float | None = None, min_samples: int = 4 * HOP_LENGTH,
         min_sample_rate: int = SAMPLE_RATE, silence_peak: float = 1e-4) -> np.ndarray:
  """Reads any file librosa reads as 16 kHz mono float32. Refuses, naming the file: unreadable,
  a WAV cut short, overlong (from the header before decoding, where soundfile reads it),
  non-finite, recorded below `min_sample_rate` (upsampling cannot restore the missing band), too
  short (default: under 4 mel frames), or silent (peak under `silence_peak`)."""
  if not os.path.exists(path):
    raise AudioError(f'audio file {path} does not exist', 'missing')
  header_error = None
  try:
    info = soundfile.info(path)
  except Exception as e:  # not a soundfile format: librosa may still decode it with audioread
    header_error = e
  else:
    _check_length(path, info.frames / info.samplerate, max_seconds)
    short = _cut_short(path) if info.format == 'WAV' else None
    if short:
      raise AudioError(f'{path} is cut short (an interrupted copy?): its header promises '
                       f'{short[0]:,} bytes of samples, the file holds {short[1]:,}', 'truncated')
  try:  # mono=False: librosa's own down-mix refuses non-finite samples with a vaguer message
    waveform, native_rate = librosa.load(path, sr=None, mono=False)
  except Exception as e:  # librosa raises many kinds for unreadable files, some without a message
    raise AudioError(f'cannot read audio file {path}: {_why(header_error or e)}',
                     'unreadable') from None
  if waveform.ndim == 2:
    waveform = waveform.mean(axis=0)
  if not np.all(np.isfinite(waveform)):
    raise AudioError(f'{path} holds samples that are not finite (NaN or infinite)', 'non_finite')
  if native_rate < min_sample_rate:
    raise AudioError(f'{path} is sampled at {native_rate} Hz; at least {min_sample_rate} Hz is '
                     'needed', 'low_sample_rate')
  seconds = len(waveform) / native_rate
  _check_length(path, seconds, max_seconds)
  if native_rate != SAMPLE_RATE:
    waveform = librosa.resample(waveform, orig_sr=native_rate, target_sr=SAMPLE_RATE)
  if len(waveform) < min_samples:
    raise AudioError(f'{path} holds {seconds:.3f} s of audio: too short', 'too_short')
  if np.max(np.abs(waveform)) < silence_peak:
    raise AudioError(f'{path} is silent (peak amplitude under {silence_peak:g})', 'silent')
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
  log_spec = np.log10(np.maximum(power @ mel_filters(num_mel_bins).T, 1e-10))[:-1]
  log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
  return ((log_spec + 4.0) / 4.0).astype(np.float32)
