"""Read a batch in the official Fun-Audio-Chat training format into our batch dict.

The official format (FunAudioChatForConditionalGeneration.forward) keeps audios in flat tensors
over the whole batch, in order of appearance, and scatters them into <|AUDIO|> slots; ours keeps
every position's inputs and targets in place (fac_jax.batch). The conversion goes through
conversation pieces, so it is the same formatting the data pipeline uses.
"""

import math

import ml_collections
import numpy as np

from fac_jax.batch import IGNORE_ID
from fac_jax.data import conversation


def to_pieces(official: dict, cfg: ml_collections.ConfigDict) -> list[list]:
  """Official batch arrays (names without the `in.` prefix) -> conversation pieces per row."""
  group, audio_id = cfg.speech.group_size, cfg.tokens.audio
  input_ids, labels = np.asarray(official['input_ids']), np.asarray(official['labels'])
  attention = np.asarray(official['attention_mask']).astype(bool)
  speech_ids = np.asarray(official['speech_ids'])
  speech_lengths = np.asarray(official['speech_attention_mask']).sum(-1)
  has_text = np.asarray(official['text_attention_mask']).astype(bool)
  has_features = np.asarray(official['feature_exist_mask']).astype(bool)
  feature_lengths = np.asarray(official['feature_attention_mask']).sum(-1)
  features = np.asarray(official['input_features'])
  feature_of_audio = np.cumsum(has_features) - 1

  rows, audio = [], 0
  for b in range(input_ids.shape[0]):
    length = int(attention[b].sum())
    if not attention[b, :length].all():
      raise ValueError(f'official batch row {b}: attention_mask must be right-padded')
    pieces, i = [], 0
    while i < length:
      if input_ids[b, i] == audio_id:
        n_codes = int(speech_lengths[audio])
        n = math.ceil(n_codes / group)
        if not (input_ids[b, i:i + n] == audio_id).all():
          raise ValueError(f'official batch row {b}: audio {audio} has {n_codes} codes, i.e. {n} '
                           f'<|AUDIO|> slots, which do not start at position {i}')
        stream = speech_ids[audio, :n * group]
        if not (stream[n_codes:] == cfg.speech.pad_id).all():
          raise ValueError(f'official batch: speech_ids[{audio}] is not padded with '
                           f'pad id {cfg.speech.pad_id} inside its last group')
        mel = None
        if has_features[audio]:
          f = feature_of_audio[audio]
          mel = features[f, :, :feature_lengths[f]].T
        text = list(official['text_ids'][audio]) if has_text[audio] else None
        pieces.append(conversation.Speech(codes=list(stream[:n_codes]), mel=mel, text=text,
                                          trained=bool(labels[b, i] != IGNORE_ID)))
        audio, i = audio + 1, i + n
      else:
        trained = labels[b, i] != IGNORE_ID
        if trained and labels[b, i] != input_ids[b, i]:
          raise ValueError(f'official batch row {b} position {i}: label {labels[b, i]} differs '
                           f'from input {input_ids[b, i]}')
        if pieces and isinstance(pieces[-1], conversation.Text) and pieces[-1].trained == trained:
          pieces[-1].ids.append(int(input_ids[b, i]))
        else:
          pieces.append(conversation.Text([int(input_ids[b, i])], bool(trained)))
        i += 1
    rows.append(pieces)
  if audio != len(speech_lengths):
    raise ValueError(f'official batch has {len(speech_lengths)} audios but {audio} audio spans')
  return rows


def to_batch(official: dict, cfg: ml_collections.ConfigDict) -> dict:
  """Official batch -> our batch dict with the same number of rows and positions."""
  rows = [[conversation.format_conversation(pieces, cfg)] for pieces in to_pieces(official, cfg)]
  seq_len = np.shape(official['input_ids'])[1]
  num_windows = max(len(row[0]['mel_lengths']) for row in rows)
  return conversation.pack(rows, seq_len, num_windows, cfg)
