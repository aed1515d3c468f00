"""The grain input pipeline: prepared records -> formatted conversations -> packed batches on the
mesh. Its iterator state is checkpointable, and resuming from it gives the same batches.

  source (tfds ArrayRecord) -> seeded shuffle -> repeat -> this process's shard
    -> chat-template formatting (fac_jax.data.conversation) -> first-fit packing into rows
    -> local batch (batch_size / process_count rows) -> jax.make_array_from_process_local_data
"""

import copy
import dataclasses
import functools
import json
import os

from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from fac_jax import sharding, tokenizer as text_tokenizer
from fac_jax.batch import FIELDS
from fac_jax.data import conversation, prepare

@dataclasses.dataclass
class FormatRecord:
  """A prepared record -> the arrays of one conversation (conversation.format_conversation) in
  ChatML, with audio between <|audio_bos|> and <|audio_eos|>; assistant turns are trained."""
  tokenizer_dir: str
  model: ml_collections.ConfigDict

  @functools.cached_property
  def _tokenizer(self):
    return text_tokenizer.load(self.tokenizer_dir)

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def pieces(self, record: dict) -> list:
    tok, model = self.model.tokens, self.model
    conv = json.loads(record['conversation'])
    Text = conversation.Text
    pieces = []
    if conv['system']:
      pieces.append(Text([tok.im_start] + self.encode('system\n' + conv['system'])
                         + [tok.im_end] + self.encode('\n'), trained=False))
    for turn in conv['turns']:
      pieces.append(Text([tok.im_start] + self.encode(turn['role'] + '\n'), trained=False))
      if turn['role'] == 'user':
        if 'mel' in turn:
          start, stop = turn['mel']
          mel = np.asarray(record['mel'][start:stop], np.float32)
          pieces += [Text([tok.audio_bos], trained=False),
                     conversation.user_audio(mel, int(turn['seconds'] * 25), model),
                     Text([tok.audio_eos], trained=False)]
        else:
          pieces.append(Text(self.encode(turn['text']), trained=False))
        pieces.append(Text([tok.im_end] + self.encode('\n'), trained=False))
      elif 'codes' in turn:
        start, stop = turn['codes']
        pieces += [Text([tok.audio_bos], trained=True),
                   conversation.assistant_audio(record['codes'][start:stop],
                                                self.encode(turn['text']), model),
                   Text([tok.audio_eos, tok.im_end], trained=True),
                   Text(self.encode('\n'), trained=False)]
      else:
        pieces += [Text(self.encode(turn['text']) + [tok.im_end], trained=True),
                   Text(self.encode('\n'), trained=False)]
    return pieces

  def __call__(self, record: dict) -> dict:
    return conversation.format_conversation(self.pieces(record), self.model)


class _PackedBatchIterator(grain.DatasetIterator):
  """First-fit packing of conversations into `batch_size` rows; a batch is emitted when the next
  conversation fits no row, and that conversation starts the next batch. Conversations longer than
  a whole row are dropped and counted."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, seq_len: int,
               num_windows: int, model: ml_collections.ConfigDict):
    super().__init__(parent)
    self._batch_size, self._seq_len, self._num_windows = batch_size, seq_len, num_windows
    self._model = model
    self._carried = None  # (parent state before it, conversation) that did not fit the last batch
    self.dropped = 0

  def _take(self):
    if self._carried is not None:
      state, example = self._carried
      self._carried = None
      return state, example
    state = copy.deepcopy(self._parent.get_state())
    return state, next(self._parent)

  def __next__(self) -> dict:
    rows = [[] for _ in range(self._batch_size)]
    room = [[self._seq_len, self._num_windows] for _ in range(self._batch_size)]
    while True:
      try:
        state, example = self._take()
      except StopIteration:
        if any(rows):
          break
        raise
      length, windows = len(example['input_ids']), len(example['mel_lengths'])
      if length > self._seq_len or windows > self._num_windows:
        self.dropped += 1
        logging.warning('dropped a conversation of %d positions and %d mel windows: a row holds '
                        '%d and %d', length, windows, self._seq_len, self._num_windows)
        continue
      row = next((r for r, (s, w) in enumerate(room) if length <= s and windows <= w), None)
      if row is None:
        self._carried = (state, example)
        break
      rows[row].append(example)
      room[row][0] -= length
      room[row][1] -= windows
    return conversation.pack(rows, self._seq_len, self._num_windows, self._model)

  def get_state(self) -> dict:
    parent = self._carried[0] if self._carried is not None else self._parent.get_state()
    return {'parent': copy.deepcopy(parent), 'dropped': self.dropped}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state['parent'])
    self._carried = None
    self.dropped = state['dropped']


class PackedBatches(grain.IterDataset):
  """grain IterDataset of packed batches (dicts of NumPy arrays, fac_jax.batch fields)."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, seq_len: int, num_windows: int,
               model: ml_collections.ConfigDict):
    super().__init__(parent)
    self._args = (batch_size, seq_len, num_windows, model)

  def __iter__(self) -> _PackedBatchIterator:
    return _PackedBatchIterator(self._parent.__iter__(), *self._args)


def dataset(cfg: ml_collections.ConfigDict, split: str, *, seed: int | None = None,
            num_epochs: int | None = None, shuffle: bool = True,
            process_index: int | None = None, process_count: int | None = None
            ) -> grain.IterDataset:
  """Packed local batches of one prepared split (cfg.data.dir) for one process (default: this
  one, of jax.process_count()); the global batch is the processes' local batches in order.

  num_epochs None repeats forever (training); eval passes 1 and shuffle False.
  """
  data = cfg.data
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if data.batch_size % process_count:
    raise ValueError(f'data.batch_size={data.batch_size} does not split over {process_count} '
                     'processes')
  source = prepare.open_split(data.dir, split)
  if len(source) == 0:
    raise ValueError(f'split {split!r} of {data.dir} holds no conversations')
  records = grain.MapDataset.source(source)
  if shuffle:
    records = records.shuffle(seed=cfg.seed if seed is None else seed)
  records = records.repeat(num_epochs)
  records = records[process_index::process_count]
  formatted = records.map(FormatRecord(os.path.join(data.dir, prepare.TOKENIZER_FOLDER),
                                       cfg.model))
  stream = formatted.to_iter_dataset()
  if data.worker_count > 0:
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
  return PackedBatches(stream, data.batch_size // process_count, data.seq_len, data.num_windows,
                       cfg.model)


def global_batch_shardings(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Shardings of the global batch that every process's local batch is a slice of."""
  count = jax.process_count()
  shapes = {name: jax.ShapeDtypeStruct((value.shape[0] * count,) + value.shape[1:], value.dtype)
            for name, value in local_batch.items()}
  return sharding.batch_shardings(shapes, mesh)


def to_global(local_batch: dict, shardings: dict) -> dict:
  """This process's rows -> global jax.Arrays laid out by `shardings` (batch axis over
  data x fsdp)."""
  return {name: jax.make_array_from_process_local_data(shardings[name], local_batch[name])
          for name in FIELDS}
