"""Format a conversation into model positions at 5 Hz; pack formatted conversations into batches.

A conversation is a list of pieces in stream order:
  Text(ids, trained)                 chat-template and text tokens; `trained` marks the response
  Speech(codes, mel, text, trained)  one audio: its 25 Hz code stream, and optionally log-mel
                                     (continuous path, replacing the codes) and a text token per
                                     5 Hz position (mixed in as (E(text) + G) / 2)
`user_audio` and `assistant_audio` build the two usual Speech pieces. An audio of n codes fills
ceil(n / 5) positions; the caller writes <|audio_bos|> and <|audio_eos|> around it as Text.
The meaning of each output field is documented in fac_jax.batch.
"""

import dataclasses
import math

import ml_collections
import numpy as np

from fac_jax.batch import FIELDS, IGNORE_ID

# Text of the ChatML template around turns (a trained tokenizer must know these).
CHAT_TEMPLATE_TEXTS = ('system\n', 'user\n', 'assistant\n', '\n')


@dataclasses.dataclass
class Text:
  ids: list[int]
  trained: bool


@dataclasses.dataclass
class Speech:
  codes: list[int]  # 25 Hz code stream as the model reads it (delay groups included)
  mel: np.ndarray | None = None  # (frames, mels) log-mel at 100 Hz
  text: list[int] | None = None  # response text, one token per 5 Hz position
  trained: bool = False


def user_audio(mel: np.ndarray, num_frames: int, cfg: ml_collections.ConfigDict) -> Speech:
  """User speech: `num_frames` 25 Hz frames (int(duration * 25)) read by the continuous encoder."""
  return Speech(codes=[cfg.speech.pad_id] * num_frames, mel=mel)


def assistant_audio(codes, text, cfg: ml_collections.ConfigDict) -> Speech:
  """Assistant speech: the codes behind `delay_groups` groups of bos, with its response text."""
  delay = [cfg.speech.bos_id] * (cfg.speech.delay_groups * cfg.speech.group_size)
  return Speech(codes=delay + list(codes), text=list(text), trained=True)


def encoder_frames(num_mel_frames: int) -> int:
  """25 Hz frames the continuous encoder yields for this many mel frames: pairs of its 50 Hz
  frames, except that the official encoder keeps an audio of one 50 Hz frame unpooled."""
  conv_frames = (num_mel_frames + 1) // 2
  return conv_frames // 2 if conv_frames > 1 else conv_frames


def pooled_offset(num_windows: int, window_frames: int) -> int:
  """Index of the encoder's first 25 Hz frame after `num_windows` mel windows of a row."""
  return num_windows * (window_frames // 2) // 2


def format_conversation(pieces, cfg: ml_collections.ConfigDict) -> dict:
  """One conversation -> unpadded per-position arrays (length S) plus its mel windows."""
  group, tokens, speech = cfg.speech.group_size, cfg.tokens, cfg.speech
  window = cfg.encoder.window_frames
  ids, audio, continuous, has_text, codes, frames = [], [], [], [], [], []
  labels, speech_labels = [], []  # what each position holds, unshifted (official convention)
  windows, window_lengths = [], []

  def add(n, *, input_id, is_audio=False, is_continuous=False, text=False, code_groups=None,
          frame_groups=None, label=None, speech_label=None):
    for p in range(n):
      ids.append(input_id[p] if isinstance(input_id, list) else input_id)
      audio.append(is_audio)
      continuous.append(is_continuous)
      has_text.append(text)
      codes.append(code_groups[p] if code_groups is not None else [speech.pad_id] * group)
      frames.append(frame_groups[p] if frame_groups is not None else [-1] * group)
      labels.append(label[p] if isinstance(label, list) else label)
      speech_labels.append(speech_label[p] if speech_label is not None else [IGNORE_ID] * group)

  for piece in pieces:
    if isinstance(piece, Text):
      for t in piece.ids:
        eos_group = piece.trained and t == tokens.audio_eos
        add(1, input_id=t, label=t if piece.trained else IGNORE_ID,
            speech_label=[[speech.eos_id] * group] if eos_group else None)
    elif isinstance(piece, Speech):
      n = math.ceil(len(piece.codes) / group)
      padding = n * group - len(piece.codes)
      stream = list(piece.codes) + [speech.pad_id] * padding
      code_groups = [stream[p * group:(p + 1) * group] for p in range(n)]
      frame_groups = None
      if piece.mel is not None:
        base = pooled_offset(len(windows), window)
        available = encoder_frames(len(piece.mel))
        for start in range(0, len(piece.mel), window):
          chunk = piece.mel[start:start + window]
          windows.append(np.pad(chunk, ((0, window - len(chunk)), (0, 0))))
          window_lengths.append(len(chunk))
        # The encoder averages pairs of 50 Hz frames over a row's windows: with an odd number of
        # them per window, an audio takes an even number of windows, so the next starts a pair.
        if (window // 2) % 2 and len(windows) % 2:
          windows.append(np.zeros_like(windows[-1]))
          window_lengths.append(0)
        frame_groups = [[base + k if k < available else -1
                         for k in range(p * group, (p + 1) * group)] for p in range(n)]
      text = None
      if piece.text is not None:
        text = [tokens.sil if t in (tokens.endoftext, tokens.im_end) else t for t in piece.text[:n]]
        text += [tokens.sil] * (n - len(text))
      speech_label = None
      if piece.trained:
        targets = list(piece.codes) + [IGNORE_ID] * padding
        speech_label = [targets[p * group:(p + 1) * group] for p in range(n)]
      add(n, input_id=text if text is not None else tokens.audio, is_audio=True,
          is_continuous=piece.mel is not None, text=text is not None, code_groups=code_groups,
          frame_groups=frame_groups, label=text if piece.trained and text else IGNORE_ID,
          speech_label=speech_label)
    else:
      raise TypeError(f'unknown conversation piece {type(piece).__name__}')

  length = len(ids)
  text_targets = labels[1:] + [IGNORE_ID]
  speech_targets = speech_labels[1:] + [[IGNORE_ID] * group]
  mels = cfg.encoder.num_mel_bins
  return {
      'input_ids': np.asarray(ids, np.int32),
      'positions': np.arange(length, dtype=np.int32),
      'segment_ids': np.ones(length, np.int32),
      'audio_mask': np.asarray(audio, bool),
      'continuous_mask': np.asarray(continuous, bool),
      'text_mask': np.asarray(has_text, bool),
      'speech_codes': np.asarray(codes, np.int32).reshape(length, group),
      'mel': np.asarray(windows, np.float32).reshape(-1, window, mels),
      'mel_lengths': np.asarray(window_lengths, np.int32),
      'continuous_frames': np.asarray(frames, np.int32).reshape(length, group),
      'text_targets': np.asarray(text_targets, np.int32),
      'speech_targets': np.asarray(speech_targets, np.int32).reshape(length, group),
  }


def pack(rows: list[list[dict]], seq_len: int, num_windows: int,
         cfg: ml_collections.ConfigDict) -> dict:
  """Batch of B rows, each packing its formatted conversations (segments 1, 2, ...) and padding
  to `seq_len` positions and `num_windows` mel windows; at least one row must hold one."""
  fill = {'input_ids': cfg.tokens.endoftext, 'speech_codes': cfg.speech.pad_id,
          'continuous_frames': -1, 'text_targets': IGNORE_ID, 'speech_targets': IGNORE_ID}
  batch = {name: [] for name in FIELDS}
  template = next(example for row in rows for example in row)  # an empty row is all padding
  for r, row in enumerate(rows):
    parts = {name: [] for name in FIELDS}
    windows_so_far = 0
    for segment, example in enumerate(row, start=1):
      for name in FIELDS:
        value = example[name]
        if name == 'segment_ids':
          value = np.full_like(value, segment)
        elif name == 'continuous_frames':
          offset = pooled_offset(windows_so_far, cfg.encoder.window_frames)
          value = np.where(value >= 0, value + offset, -1)
        parts[name].append(value)
      windows_so_far += len(example['mel_lengths'])
    for name in FIELDS:
      value = np.concatenate(parts[name]) if parts[name] else template[name][:0]
      target = num_windows if name in ('mel', 'mel_lengths') else seq_len
      if len(value) > target:
        what = 'mel windows' if target == num_windows else 'positions'
        raise ValueError(f'row {r} needs {len(value)} {what}; the batch has room for {target}')
      pad = [(0, target - len(value))] + [(0, 0)] * (value.ndim - 1)
      batch[name].append(np.pad(value, pad, constant_values=fill.get(name, 0)))
  return {name: np.stack(values) for name, values in batch.items()}


def prompt_batch(examples: list[dict], cfg: ml_collections.ConfigDict,
                 prompt_len: int | None = None, num_windows: int | None = None) -> dict:
  """Generation prompts (fac_jax.inference.generate): one formatted conversation a row, left-padded
  to `prompt_len` positions (default: the longest), mel windows padded to `num_windows`; no
  targets."""
  prompt_len = prompt_len or max(len(e['input_ids']) for e in examples)
  num_windows = num_windows or max(len(e['mel_lengths']) for e in examples)
  fill = {'input_ids': cfg.tokens.endoftext, 'speech_codes': cfg.speech.pad_id,
          'continuous_frames': -1}
  rows = []
  for example in examples:
    row = pack([[example]], len(example['input_ids']), num_windows, cfg)
    pad = prompt_len - len(example['input_ids'])
    rows.append({name: value if name in ('mel', 'mel_lengths') else np.concatenate(
        [np.full((1, pad) + value.shape[2:], fill.get(name, 0), value.dtype), value], axis=1)
                 for name, value in row.items() if not name.endswith('targets')})
  return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
