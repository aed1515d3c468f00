"""The user side of the duplex model's 5 Hz clock: 200 ms chunks of 16 kHz audio, their causal
log-mel, whether each chunk holds speech, and how a chunk is laid out for the continuous encoder.

Step p of a session covers user samples [3200 p, 3200 (p + 1)), i.e. mel frames [20 p, 20 p + 20)
and, after the encoder, the 5 frames at 25 Hz that make one LLM position.

Causal log-mel: Whisper-v3's definition (fac_jax.audio.log_mel) with two changes so that a
chunk's frames never depend on later audio. Frame t covers samples [160 t - 240, 160 t + 160), a
window that ends where its hop ends (Whisper centres it and reads 200 samples ahead), with zeros
before the stream starts; and the dynamic-range floor is the running maximum of the frames so far
minus 8 (Whisper uses the whole clip's maximum). Training timelines and the live loop use this same
front end, so the model is trained on exactly what it hears when streaming.

Encoder windows ("window prefix" policy): the encoder attends inside windows of
`encoder.window_frames` mel frames (2 s for the 8B model, 200 ms for the tiny one), aligned with the
session's start. Chunk k of a window is encoded from that window's first 20 (k + 1) frames (later
frames do not exist yet), and the chunk takes output frames [5 k, 5 k + 5). At a window's last chunk
this is exactly the offline encoding; earlier chunks see only their window's past. When windows are
one chunk long (tiny config) every chunk is exactly its offline encoding.
"""

import numpy as np

from fac_jax import audio
from fac_jax.speech import speech_tokenizer

STEP_SECONDS = 0.2
CHUNK_MEL_FRAMES = 5 * speech_tokenizer.FRAMES_PER_CODE  # 20 frames at 100 Hz
CHUNK_SAMPLES = CHUNK_MEL_FRAMES * audio.HOP_LENGTH  # 3200 samples at 16 kHz
CHUNK_ENCODER_FRAMES = CHUNK_MEL_FRAMES // speech_tokenizer.FRAMES_PER_CODE  # 5 frames at 25 Hz
_CONTEXT_SAMPLES = audio.N_FFT - audio.HOP_LENGTH  # samples before a frame's own hop


class CausalLogMel:
  """Streaming causal log-mel (see the module docstring): call it with consecutive pieces of a
  16 kHz waveform, each a multiple of 160 samples; it returns their frames (n / 160, mels).
  Feeding a waveform whole or in any such pieces gives the same frames."""

  def __init__(self, num_mel_bins: int):
    self.filters = audio.mel_filters(num_mel_bins)
    self.window = np.hanning(audio.N_FFT + 1)[:-1]
    self.context = np.zeros(_CONTEXT_SAMPLES)
    self.running_max = -np.inf

  def __call__(self, samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples, np.float64)
    if samples.ndim != 1 or len(samples) % audio.HOP_LENGTH:
      raise ValueError(f'CausalLogMel takes mono pieces of a multiple of {audio.HOP_LENGTH} '
                       f'samples, got shape {samples.shape}')
    padded = np.concatenate([self.context, samples])
    self.context = padded[len(padded) - _CONTEXT_SAMPLES:]
    if not len(samples):
      return np.zeros((0, len(self.filters)), np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(padded, audio.N_FFT)[::audio.HOP_LENGTH]
    power = np.abs(np.fft.rfft(frames * self.window, axis=-1)) ** 2
    log_spec = np.log10(np.maximum(power @ self.filters.T, 1e-10))
    running_max = np.maximum.accumulate(np.maximum(log_spec.max(axis=1), self.running_max))
    self.running_max = running_max[-1]
    log_spec = np.maximum(log_spec, running_max[:, None] - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def causal_log_mel(waveform: np.ndarray, num_mel_bins: int) -> np.ndarray:
  """A whole waveform (a multiple of 160 samples) through a fresh CausalLogMel."""
  return CausalLogMel(num_mel_bins)(waveform)


def chunk_rms(waveform: np.ndarray) -> np.ndarray:
  """(num_chunks,) root mean square of each 200 ms chunk (a last partial chunk is dropped)."""
  chunks = len(waveform) // CHUNK_SAMPLES
  blocks = np.asarray(waveform[:chunks * CHUNK_SAMPLES], np.float64).reshape(chunks, -1)
  return np.sqrt(np.mean(blocks ** 2, axis=1))


def voice_activity(waveform: np.ndarray, threshold: float) -> np.ndarray:
  """(num_chunks,) bool: the chunk's RMS exceeds `threshold` (user speech on the 5 Hz clock)."""
  return chunk_rms(waveform) > threshold


def chunks_per_window(window_frames: int) -> int:
  if window_frames % CHUNK_MEL_FRAMES:
    raise ValueError(f'encoder.window_frames={window_frames} is not a multiple of the '
                     f'{CHUNK_MEL_FRAMES} mel frames of a 200 ms chunk; the duplex model streams '
                     'whole chunks')
  return window_frames // CHUNK_MEL_FRAMES


def chunk_window(mel: np.ndarray, step: int, window_frames: int) -> tuple[np.ndarray, int, int]:
  """Step `step`'s encoder input under the window-prefix policy: (window (window_frames, mels)
  zero-padded, its valid frames, the first of the chunk's 5 output frames in that window)."""
  k = step % chunks_per_window(window_frames)
  start = (step - k) * CHUNK_MEL_FRAMES
  length = (k + 1) * CHUNK_MEL_FRAMES
  window = np.zeros((window_frames, mel.shape[1]), np.float32)
  window[:length] = mel[start:start + length]
  return window, length, k * CHUNK_ENCODER_FRAMES
