"""Synthetic conversations (tone-sequence speech, random codes and text) for smoke runs and tests."""

import numpy as np
import ml_collections

from fac_jax import audio
from fac_jax.data import conversation


def tone_speech(rng: np.random.Generator, seconds: float) -> np.ndarray:
  """A 16 kHz waveform of syllable-like harmonic tones with gliding pitch and pauses."""
  samples = int(seconds * audio.SAMPLE_RATE)
  wave = np.zeros(samples)
  start = 0
  while start < samples:
    length = int(rng.uniform(0.08, 0.3) * audio.SAMPLE_RATE)
    stop = min(start + length, samples)
    f0 = rng.uniform(90, 260) * np.linspace(1.0, rng.uniform(0.8, 1.25), stop - start)
    phase = 2 * np.pi * np.cumsum(f0) / audio.SAMPLE_RATE
    syllable = sum(np.sin(k * phase) / k for k in range(1, 6))
    wave[start:stop] = syllable * np.hanning(stop - start)
    start = stop + int(rng.uniform(0.0, 0.12) * audio.SAMPLE_RATE)
  return (0.3 * wave + 0.003 * rng.normal(size=samples)).astype(np.float32)


def conversation_pieces(rng: np.random.Generator, cfg: ml_collections.ConfigDict) -> list:
  """System prompt, a spoken user turn and a spoken assistant answer, in the chat template."""
  tok = cfg.tokens
  plain_vocab = min(cfg.llm.vocab_size, *tok.values())  # ids below every special token
  words = lambda n: rng.integers(0, plain_vocab, size=n).tolist()
  seconds = rng.uniform(0.6, 2.2)
  mel = audio.log_mel(tone_speech(rng, seconds), cfg.encoder.num_mel_bins)
  num_frames = int(seconds * 25)
  answer_codes = rng.integers(0, cfg.speech.bos_id, size=int(rng.integers(8, 40))).tolist()
  answer_text = words(int(rng.integers(2, 8)))
  return [
      conversation.Text([tok.im_start] + words(4) + [tok.im_end, tok.im_start] + words(2)
                        + [tok.audio_bos], trained=False),
      conversation.user_audio(mel, num_frames, cfg),
      conversation.Text([tok.audio_eos, tok.im_end, tok.im_start] + words(2), trained=False),
      conversation.Text([tok.audio_bos], trained=True),
      conversation.assistant_audio(answer_codes, answer_text, cfg),
      conversation.Text([tok.audio_eos, tok.im_end], trained=True),
  ]


def batch(rng: np.random.Generator, cfg: ml_collections.ConfigDict, batch_size: int,
          seq_len: int, num_windows: int) -> dict:
  """Packs synthetic conversations into `batch_size` rows, as many per row as fit."""
  rows = []
  for _ in range(batch_size):
    row, used, windows = [], 0, 0
    while True:
      example = conversation.format_conversation(conversation_pieces(rng, cfg), cfg)
      length, needed = len(example['input_ids']), len(example['mel_lengths'])
      if used + length > seq_len or windows + needed > num_windows:
        break
      row.append(example)
      used, windows = used + length, windows + needed
    if not row:
      raise ValueError(f'seq_len={seq_len}, num_windows={num_windows} cannot hold one synthetic '
                       'conversation')
    rows.append(row)
  return conversation.pack(rows, seq_len, num_windows, cfg)
