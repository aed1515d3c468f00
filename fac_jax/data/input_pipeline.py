"""The grain input pipeline: prepared records -> formatted conversations -> packed batches on the
mesh. Its iterator state is checkpointable, and resuming from it gives the same batches.

  source (tfds ArrayRecord) -> seeded shuffle -> repeat -> this process's shard
    -> chat-template formatting (fac_jax.data.conversation) -> first-fit packing into rows
    -> local batch (batch_size / process_count rows) -> jax.make_array_from_process_local_data

Preference splits (DPO) take the same path up to formatting; each pair then becomes row i of a
chosen batch and of a rejected batch, one conversation a row (`dpo_dataset`). A conversation or
pair that fits no row is dropped and counted in the iterator's `dropped`; a split none of whose
conversations fits is an error (prepare.DatasetError), not an endless search.
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

from fac_jax import sharding
from fac_jax.checkpoints import text_tokenizer
from fac_jax.data import conversation, preference, prepare, tools


@dataclasses.dataclass
class FormatRecord:
  """A prepared record -> the arrays of one conversation (conversation.format_conversation) in
  ChatML, with audio between <|audio_bos|> and <|audio_eos|>; assistant turns are trained (a
  tool call's text and <|im_end|>; fac_jax.data.tools), tool results are context."""
  tokenizer_dir: str
  model: ml_collections.ConfigDict

  @functools.cached_property
  def _tokenizer(self):
    return text_tokenizer.load(self.tokenizer_dir)

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def turn_pieces(self, turn: dict, record: dict, trained: bool) -> list:
    """One turn entry of the record's conversation JSON; `trained` marks an assistant turn as a
    response to learn (else it is context, like a user turn)."""
    tok, model = self.model.tokens, self.model
    Text = conversation.Text
    if turn['role'] == 'tool':  # Qwen3 returns a tool's result in a user turn
      return [Text([tok.im_start] + self.encode('user\n' + tools.response_text(turn['text']))
                   + [tok.im_end] + self.encode('\n'), trained=False)]
    pieces = [Text([tok.im_start] + self.encode(turn['role'] + '\n'), trained=False)]
    if 'tool_call' in turn:  # text only: nothing is spoken during a call
      call = tools.call_text(tools.Call(**turn['tool_call']))
      pieces += [Text(self.encode(call) + [tok.im_end], trained=trained),
                 Text(self.encode('\n'), trained=False)]
    elif turn['role'] == 'user':
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
      speech = conversation.assistant_audio(record['codes'][start:stop],
                                            self.encode(turn['text']), model)
      pieces += [Text([tok.audio_bos], trained=trained),
                 dataclasses.replace(speech, trained=trained),
                 Text([tok.audio_eos, tok.im_end], trained=trained),
                 Text(self.encode('\n'), trained=False)]
    else:
      pieces += [Text(self.encode(turn['text']) + [tok.im_end], trained=trained),
                 Text(self.encode('\n'), trained=False)]
    return pieces

  def conversation_pieces(self, conv: dict, record: dict, train_replies: bool) -> list:
    """The system prompt and every turn of `conv`; assistant turns are trained when
    `train_replies`."""
    tok = self.model.tokens
    pieces = []
    system = tools.system_text(conv['system'], conv['tools']) if conv.get('tools') else (
        conv['system'])
    if system:
      pieces.append(conversation.Text([tok.im_start] + self.encode('system\n' + system)
                                      + [tok.im_end] + self.encode('\n'), trained=False))
    for turn in conv['turns']:
      pieces += self.turn_pieces(turn, record, train_replies and turn['role'] == 'assistant')
    return pieces

  def pieces(self, record: dict) -> list:
    conv = json.loads(record['conversation'])
    if 'chosen' in conv:
      raise ValueError(f'{conv["source"]} is a preference pair, not a conversation: read its '
                       'split with dpo_dataset')
    return self.conversation_pieces(conv, record, train_replies=True)

  def __call__(self, record: dict) -> dict:
    return conversation.format_conversation(self.pieces(record), self.model)


@dataclasses.dataclass
class FormatPair:
  """A prepared preference record -> {'chosen': arrays, 'rejected': arrays, 'task_id': int}: the
  prompt followed by each answer, formatted as FormatRecord does, with only the answer trained
  (assistant turns inside the prompt are context). The task id is the index in `tasks`."""
  format_record: FormatRecord
  tasks: tuple[str, ...]

  def __call__(self, record: dict) -> dict:
    conv = json.loads(record['conversation'])
    if 'chosen' not in conv:
      raise ValueError(f'{conv["source"]} is a conversation, not a preference pair: read its '
                       'split with dataset')
    if conv['task'] not in self.tasks:
      raise ValueError(f'{conv["source"]}: task {conv["task"]!r} is not in config.dpo.tasks '
                       f'{list(self.tasks)}; add it there, with its weight in dpo.task_weights')
    fmt = self.format_record
    prompt = fmt.conversation_pieces(conv, record, train_replies=False)
    pair = {answer: conversation.format_conversation(
        prompt + fmt.turn_pieces(conv[answer], record, trained=True), fmt.model)
            for answer in preference.ANSWER_FIELDS}
    pair['task_id'] = self.tasks.index(conv['task'])
    return pair


@dataclasses.dataclass(frozen=True)
class Rows:
  """What the batches of one split are made of: rows a (local) batch, their size, the model, and
  the split (`records` conversations, named by `where` in errors)."""
  batch_size: int
  seq_len: int
  num_windows: int
  model: ml_collections.ConfigDict
  records: int
  where: str


class _RowIterator(grain.DatasetIterator):
  """Batches of conversations in rows; `dropped` counts the conversations (or pairs) that fit no
  row. Twice the split's size dropped in a row means that none fits: an error, not an endless
  search."""

  def __init__(self, parent: grain.DatasetIterator, rows: Rows):
    super().__init__(parent)
    self._rows = rows
    self._batch_size, self._seq_len = rows.batch_size, rows.seq_len
    self._num_windows, self._model = rows.num_windows, rows.model
    self.dropped = 0
    self._dropped_in_row = 0

  def _drop(self, what: str) -> None:
    self.dropped += 1
    self._dropped_in_row += 1
    logging.warning('dropped %s: a row holds %d positions and %d mel windows', what,
                    self._seq_len, self._num_windows)
    if self._dropped_in_row >= 2 * self._rows.records:
      raise prepare.DatasetError(
          f'{self._rows.where}: none of the last {self._dropped_in_row} conversations read (the '
          f'split holds {self._rows.records}) fits a row of data.seq_len={self._seq_len} positions '
          f'and data.num_windows={self._num_windows} mel windows; the last was {what}')

  def _kept(self) -> None:
    self._dropped_in_row = 0


class _PackedBatchIterator(_RowIterator):
  """First-fit packing of conversations into `batch_size` rows; a batch is emitted when the next
  conversation fits no row, and that conversation starts the next batch. Conversations longer than
  a whole row are dropped and counted."""

  def __init__(self, parent: grain.DatasetIterator, rows: Rows):
    super().__init__(parent, rows)
    self._carried = None  # (parent state before it, conversation) that did not fit the last batch

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
        self._drop(f'a conversation of {length} positions and {windows} mel windows')
        continue
      self._kept()
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


class Batches(grain.IterDataset):
  """grain IterDataset of the batches an iterator class (_PackedBatchIterator or
  _PairBatchIterator) makes of its parent's formatted examples."""

  def __init__(self, parent: grain.IterDataset, iterator: type, rows: Rows):
    super().__init__(parent)
    self._iterator, self._rows = iterator, rows

  def __iter__(self) -> grain.DatasetIterator:
    return self._iterator(self._parent.__iter__(), self._rows)


class _PairBatchIterator(_RowIterator):
  """`batch_size` formatted pairs a batch, pair i in row i of both `chosen` and `rejected`, one
  conversation a row (no packing); when the data ends inside a batch, the rest of its rows are
  empty with task id -1. Pairs with an answer longer than a row are dropped and counted."""

  def _fits(self, example: dict) -> bool:
    return (len(example['input_ids']) <= self._seq_len
            and len(example['mel_lengths']) <= self._num_windows)

  def __next__(self) -> dict:
    pairs = []
    while len(pairs) < self._batch_size:
      try:
        pair = next(self._parent)
      except StopIteration:
        if pairs:
          break
        raise
      if self._fits(pair['chosen']) and self._fits(pair['rejected']):
        self._kept()
        pairs.append(pair)
        continue
      self._drop(f'a preference pair of {len(pair["chosen"]["input_ids"])} and '
                 f'{len(pair["rejected"]["input_ids"])} positions')
    empty_rows = [[]] * (self._batch_size - len(pairs))
    batch = {answer: conversation.pack([[pair[answer]] for pair in pairs] + empty_rows,
                                       self._seq_len, self._num_windows, self._model)
             for answer in preference.ANSWER_FIELDS}
    batch['task_ids'] = np.asarray([pair['task_id'] for pair in pairs] + [-1] * len(empty_rows),
                                   np.int32)
    return batch

  def get_state(self) -> dict:
    return {'parent': copy.deepcopy(self._parent.get_state()), 'dropped': self.dropped}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state['parent'])
    self.dropped = state['dropped']


def _format_record(cfg: ml_collections.ConfigDict) -> FormatRecord:
  return FormatRecord(os.path.join(cfg.data.dir, prepare.TOKENIZER_FOLDER), cfg.model)


def _formatted_stream(cfg: ml_collections.ConfigDict, split: str, formatter, *, seed, num_epochs,
                      shuffle, process_index, process_count) -> tuple[grain.IterDataset, Rows]:
  """This process's share of a prepared split (seeded shuffle, repeat, shard), each record mapped
  by `formatter`; and the rows of its local batches."""
  data = cfg.data
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if data.batch_size % process_count:
    raise ValueError(f'data.batch_size={data.batch_size} does not split over {process_count} '
                     'processes')
  source = prepare.open_split(data.dir, split)
  if len(source) == 0:
    raise ValueError(f'split {split!r} of {data.dir} holds no records')
  records = grain.MapDataset.source(source)
  if shuffle:
    records = records.shuffle(seed=cfg.seed if seed is None else seed)
  records = records.repeat(num_epochs)
  records = records[process_index::process_count]
  stream = records.map(formatter).to_iter_dataset()
  if data.worker_count > 0:
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
  return stream, Rows(data.batch_size // process_count, data.seq_len, data.num_windows, cfg.model,
                      len(source), f'split {split!r} of {data.dir}')


def dataset(cfg: ml_collections.ConfigDict, split: str, *, seed: int | None = None,
            num_epochs: int | None = None, shuffle: bool = True,
            process_index: int | None = None, process_count: int | None = None
            ) -> grain.IterDataset:
  """Packed local batches of one prepared split (cfg.data.dir) for one process (default: this
  one, of jax.process_count()); the global batch is the processes' local batches in order.

  num_epochs None repeats forever (training); eval passes 1 and shuffle False.
  """
  stream, rows = _formatted_stream(
      cfg, split, _format_record(cfg), seed=seed, num_epochs=num_epochs, shuffle=shuffle,
      process_index=process_index, process_count=process_count)
  return Batches(stream, _PackedBatchIterator, rows)


def dpo_dataset(cfg: ml_collections.ConfigDict, split: str, *, seed: int | None = None,
                num_epochs: int | None = None, shuffle: bool = True,
                process_index: int | None = None, process_count: int | None = None
                ) -> grain.IterDataset:
  """Local DPO batches of one prepared preference split, as `dataset` shards and repeats it:
  {'chosen': batch, 'rejected': batch, 'task_ids': (B,) int32}, chosen and rejected ordinary
  batches (fac_jax.batch) with pair i in row i of both, padded to data.seq_len positions and
  data.num_windows mel windows; task ids index cfg.dpo.tasks, -1 marks an empty row."""
  stream, rows = _formatted_stream(
      cfg, split, FormatPair(_format_record(cfg), tuple(cfg.dpo.tasks)), seed=seed,
      num_epochs=num_epochs, shuffle=shuffle, process_index=process_index,
      process_count=process_count)
  return Batches(stream, _PairBatchIterator, rows)


def global_batch_shardings(local_batch, mesh: jax.sharding.Mesh):
  """Shardings of the global batch (any pytree of arrays: an SFT or a DPO batch) that every
  process's local batch is a slice of."""
  count = jax.process_count()
  shapes = jax.tree.map(lambda value: jax.ShapeDtypeStruct(
      (value.shape[0] * count,) + value.shape[1:], value.dtype), local_batch)
  return sharding.batch_shardings(shapes, mesh)


def to_global(local_batch, shardings):
  """This process's rows -> global jax.Arrays laid out by `shardings` (batch axis over
  data x fsdp); row i of every array stays row i."""
  return jax.tree.map(lambda s, value: jax.make_array_from_process_local_data(s, value),
                      shardings, local_batch)
