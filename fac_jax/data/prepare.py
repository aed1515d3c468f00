"""Manifests -> a tensorflow-datasets folder of sharded ArrayRecord files (log-mel of user audio,
speech codes of assistant audio, the conversation as JSON), plus the tokenizers they were made with.

  python -m fac_jax.data.prepare --config=configs/tiny.py --manifest=train=train.jsonl,\
validation=validation.jsonl --out=DIR [--tokenizer=FOLDER] [--speech_tokenizer=FILE|FOLDER] [--beam]

DIR receives `conversation_dataset/1.0.0/` (read it with `open_split`, no TensorFlow needed),
`tokenizer/tokenizer.json` (copied from --tokenizer, else a BPE trained on the manifests' text),
the speech tokenizer and `prepare_report.json` (kept and skipped lines, each skip with file, line
and reason; each split's fingerprint and tasks; the properties a model reading it must agree with,
`check_dataset`). A split that keeps no line is refused. The speech tokenizer is either the released
model's S3Tokenizer v3 (--speech_tokenizer=FOLDER written by fac_jax.speech.convert_s3; a GB of
weights, so not copied: `speech_tokenizer.json` records its path and fingerprint, and a rerun
without the flag uses it again) or a k-means tokenizer, `speech_tokenizer.npz` (copied from
--speech_tokenizer=FILE, else trained on the train split's audio). Features are extracted in
chunks of manifest lines cached under `DIR/extract/` (keyed by the lines and the settings,
speech tokenizer included), so a rerun after an interruption resumes; the tfds writer commits
each dataset version atomically, and a finished one is reused only if made from the same manifests,
splits and settings (else rebuilt from the cache, or refused with --on_mismatch=refuse). A tokenizer
trained here is trained again once the manifest lines it learnt from have changed.
With --beam the same builder runs on Apache Beam (local DirectRunner unless --beam_options say
otherwise), for corpora that outgrow one machine.

A manifest may also hold preference pairs (fac_jax.data.preference; e.g. --manifest=prefs_train=
prefs_train.jsonl): each pair is one record whose conversation JSON has the prompt's `turns` and
`chosen` and `rejected` entries, the chosen answer's codes, then the rejected one's, in `codes`.
"""

import collections
import dataclasses
import hashlib
import io
import json
import os
import shutil
import time

from absl import app, flags, logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm
from ml_collections import config_flags

from fac_jax import audio, files, fingerprint
from fac_jax.checkpoints import checkpoint, text_tokenizer
from fac_jax.data import conversation, manifest, preference, tools as tools_lib
from fac_jax.speech import s3tokenizer, speech_tokenizer

DATASET_NAME = 'conversation_dataset'
SPEECH_TOKENIZER_FILE = 'speech_tokenizer.npz'
SPEECH_TOKENIZER_RECORD = 'speech_tokenizer.json'  # where a converted S3Tokenizer folder is
TOKENIZER_FOLDER = 'tokenizer'
REPORT_FILE = 'prepare_report.json'
# What prepare trained a tokenizer on (a rerun trains it again when that has changed); given
# tokenizers have none.
TEXT_TOKENIZER_TRAINED_ON = 'trained_on.json'  # in TOKENIZER_FOLDER
SPEECH_TOKENIZER_TRAINED_ON = 'speech_tokenizer_trained_on.json'
SPEECH_TOKENIZER_CLIPS = 400  # clips of the train manifest a k-means speech tokenizer learns from
MEL_DTYPE = np.float16  # halves disk and I/O; log-mel values are O(1), float16 keeps ~1e-3


class DatasetError(ValueError):
  """A prepared dataset that cannot be used as asked; the message names the file, the property
  and both values."""


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Manifest lines [first, first + len(lines)) of one split, cached as one extraction unit."""
  split: str
  path: str
  first_line: int
  lines: tuple[str, ...]

  def cache_path(self, cache_dir: str, extract: str) -> str:
    """Where this chunk's extraction is cached; the name changes with its lines and settings
    (`extract`: the extractor's fingerprint)."""
    return os.path.join(cache_dir, self.key(extract) + '.npz')

  def key(self, extract: str) -> str:
    digest = hashlib.sha1(extract.encode())
    for line in self.lines:
      digest.update(line.encode())
    return f'{self.split}-{self.first_line:08d}-{digest.hexdigest()[:16]}'


@dataclasses.dataclass
class Extractor:
  """Turns manifest lines into records: log-mel for user audio, codes for assistant audio."""
  num_mel_bins: int
  max_audio_seconds: float
  speech_tokenizer: speech_tokenizer.SpeechTokenizer

  def fingerprint(self) -> str:
    return (f'mel{self.num_mel_bins}-max{self.max_audio_seconds}-'
            f'codes{self.speech_tokenizer.fingerprint()}-{MEL_DTYPE.__name__}')

  def _entry(self, turn: manifest.Turn, mels: list, codes: list) -> dict:
    """A turn's record entry; its user log-mel or assistant codes are appended to `mels` or
    `codes`, and the entry holds their [start, stop) span in the record's concatenation."""
    entry = {'role': turn.role, 'text': turn.text}
    if turn.tool_call is not None:
      entry['tool_call'] = dataclasses.asdict(turn.tool_call)
    if turn.audio is not None:
      waveform = audio.load(turn.audio, max_seconds=self.max_audio_seconds)
      entry['seconds'] = len(waveform) / audio.SAMPLE_RATE
      if turn.role == 'user':
        mel = audio.log_mel(waveform, self.num_mel_bins).astype(MEL_DTYPE)
        start = sum(map(len, mels))
        entry['mel'] = [start, start + len(mel)]
        mels.append(mel)
      else:
        turn_codes = self.speech_tokenizer.encode(waveform).astype(np.int32)
        start = sum(map(len, codes))
        entry['codes'] = [start, start + len(turn_codes)]
        codes.append(turn_codes)
    return entry

  def _record(self, header: dict, mels: list, codes: list) -> dict:
    return {
        'conversation': json.dumps(header, ensure_ascii=False),
        'mel': (np.concatenate(mels) if mels
                else np.zeros((0, self.num_mel_bins), MEL_DTYPE)),
        'codes': np.concatenate(codes) if codes else np.zeros((0,), np.int32),
    }

  def conversation(self, conv: manifest.Conversation) -> dict:
    """One parsed conversation -> record (raises audio.AudioError for unusable audio)."""
    mels, codes = [], []
    turns = [self._entry(turn, mels, codes) for turn in conv.turns]
    return self._record({'id': conv.id, 'task': conv.task, 'system': conv.system, 'turns': turns,
                         'meta': conv.meta, 'source': conv.source,
                         **({'tools': conv.tools} if conv.tools else {})}, mels, codes)

  def pair(self, pair: preference.PreferencePair) -> dict:
    """One preference pair -> one record: the prompt's turns, then `chosen` and `rejected`
    entries whose code spans follow the prompt's in `codes`."""
    mels, codes = [], []
    turns = [self._entry(turn, mels, codes) for turn in pair.prompt]
    chosen, rejected = (self._entry(answer, mels, codes) for answer in (pair.chosen, pair.rejected))
    return self._record({'id': pair.id, 'task': pair.task, 'system': pair.system, 'turns': turns,
                         'chosen': chosen, 'rejected': rejected, 'meta': pair.meta,
                         'source': pair.source}, mels, codes)

  def chunk(self, chunk: Chunk) -> tuple[list[tuple[str, dict]], list[dict]]:
    """(key, record) for every usable line of the chunk, and a skip entry for every other."""
    records, skipped = [], []
    for offset, line in enumerate(chunk.lines):
      number = chunk.first_line + offset
      if not line.strip():
        continue
      try:
        item = preference.parse_any(line, chunk.path, number)
        record = (self.pair(item) if isinstance(item, preference.PreferencePair)
                  else self.conversation(item))
        records.append((f'{chunk.split}:{number}', record))
      except manifest.ManifestError as e:
        skipped.append({'where': f'{chunk.path}:{number}', 'reason': 'malformed_line',
                        'message': str(e)})
      except audio.AudioError as e:
        skipped.append({'where': f'{chunk.path}:{number}', 'reason': e.reason,
                        'message': str(e)})
    for skip in skipped:
      logging.warning('skipped %s', skip['message'])
    return records, skipped


def read_chunks(split: str, path: str, chunk_size: int) -> list[Chunk]:
  if not os.path.exists(path):
    raise FileNotFoundError(f'manifest for split {split!r} not found: {path}')
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  if not any(line.strip() for line in lines):
    raise DatasetError(f'{path}: the manifest of split {split!r} holds no lines')
  return [Chunk(split, path, start + 1, tuple(lines[start:start + chunk_size]))
          for start in range(0, len(lines), chunk_size)]


def _save_chunk(path: str, records: list, skipped: list) -> None:
  """Records and skips of one chunk in one .npz, written to a temporary name and renamed."""
  arrays = {'index': np.frombuffer(json.dumps({
      'keys': [key for key, _ in records],
      'conversations': [r['conversation'] for _, r in records],
      'skipped': skipped}).encode(), np.uint8)}
  for i, (_, record) in enumerate(records):
    arrays[f'mel_{i}'], arrays[f'codes_{i}'] = record['mel'], record['codes']
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  files.write_atomically(path, buffer.getvalue())


def _chunk_index(path: str) -> dict:
  with np.load(path) as data:
    return json.loads(data['index'].tobytes())


def _load_chunk(path: str) -> tuple[list, list]:
  with np.load(path) as data:
    index = json.loads(data['index'].tobytes())
    records = [(key, {'conversation': text, 'mel': data[f'mel_{i}'], 'codes': data[f'codes_{i}']})
               for i, (key, text) in enumerate(zip(index['keys'], index['conversations']))]
  return records, index['skipped']


class ConversationDataset(tfds.core.GeneratorBasedBuilder):
  """Prepared conversations; each split is written from its manifest's chunks."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Conversation JSON, float16 user log-mel, int32 assistant codes.'}

  def __init__(self, *, chunks: dict[str, list[Chunk]], extractor: Extractor, cache_dir: str,
               use_beam: bool = False, **kwargs):
    self._chunks, self._extractor, self._cache_dir = chunks, extractor, cache_dir
    self._use_beam = use_beam
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Spoken conversations prepared by fac_jax.data.prepare.',
        features=tfds.features.FeaturesDict({
            'conversation': tfds.features.Text(),
            'mel': tfds.features.Tensor(shape=(None, self._extractor.num_mel_bins),
                                        dtype=MEL_DTYPE),
            'codes': tfds.features.Tensor(shape=(None,), dtype=np.int32),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._chunks}

  def _generate_examples(self, split: str):
    if self._use_beam:
      import apache_beam as beam
      extractor = self._extractor
      return (beam.Create(self._chunks[split])
              | beam.FlatMap(lambda chunk: extractor.chunk(chunk)[0]))
    return self._cached_examples(split)

  def _cached_examples(self, split: str):
    extract = self._extractor.fingerprint()
    chunks = self._chunks[split]
    total = sum(len(c.lines) for c in chunks)
    kept, reasons = 0, collections.Counter()
    with tqdm.tqdm(total=total, desc=f'extracting {split}', unit='conv') as progress:
      for chunk in chunks:
        path = chunk.cache_path(self._cache_dir, extract)
        if os.path.exists(path):
          records, skipped = _load_chunk(path)
        else:
          records, skipped = self._extractor.chunk(chunk)
          _save_chunk(path, records, skipped)
        progress.update(len(chunk.lines))
        kept += len(records)
        reasons.update(skip['reason'] for skip in skipped)
        yield from records
    if not kept:  # on Beam, tfds refuses an empty split itself
      raise DatasetError(f'{chunks[0].path}: split {split!r} keeps none of its lines (skipped by '
                         f'reason: {dict(reasons)})')


def dataset_dir(out: str) -> str:
  return os.path.join(out, DATASET_NAME, str(ConversationDataset.VERSION))


def open_split(out: str, split: str):
  """Random-access source of one prepared split (tfds ArrayRecord data source, no TensorFlow)."""
  return tfds.builder_from_directory(dataset_dir(out)).as_data_source(split=split)


def parse_manifest_flag(value: str) -> dict[str, str]:
  """'train=a.jsonl,validation=b.jsonl' (or a single path, the train split) -> {split: path}."""
  splits = {}
  for item in value.split(','):
    split, sep, path = item.partition('=')
    if not sep:
      split, path = 'train', item
    if not split or not path or split in splits:
      raise ValueError(f'--manifest: cannot read {item!r}; expected split=path[,split=path]')
    splits[split] = path
  return splits


def _manifest_audio(path: str, limit: int, read: dict):
  """Up to `limit` waveforms of the manifest's assistant and user audio, skipping bad files;
  read['lines'] becomes the line of the last one once there are `limit` ('all' until then)."""
  read['lines'], found = 'all', 0
  for number, conv in preference.read(path):
    if isinstance(conv, manifest.ManifestError):
      continue
    for turn in conv.turns:
      if turn.audio is None:
        continue
      try:
        waveform = audio.load(turn.audio)
      except audio.AudioError:
        continue
      yield waveform
      found += 1
      if found == limit:
        read['lines'] = number
        return


def _kmeans_training(path: str, lines_read: int | str, model: ml_collections.ConfigDict,
                     clips: int) -> dict:
  """What a k-means speech tokenizer trained on manifest `path` depends on: its first
  `lines_read` lines (or 'all'), the codes and the clips asked for."""
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  return {'lines_read': lines_read,
          'lines': fingerprint.digest(lines if lines_read == 'all' else lines[:lines_read]),
          'codes': model.speech.bos_id, 'clips': clips}


def _text_training(splits: dict[str, str], model: ml_collections.ConfigDict) -> dict:
  """What a text BPE trained on the manifests depends on."""
  return {'manifests': {split: fingerprint.of_files([path]) for split, path in splits.items()},
          'tokens': dict(model.tokens)}


def _train_manifest(splits: dict[str, str]) -> str:
  return splits.get('train', next(iter(splits.values())))


def _manifest_texts(paths):
  yield from conversation.CHAT_TEMPLATE_TEXTS
  for path in paths:
    for _, conv in preference.read(path):
      if isinstance(conv, manifest.ManifestError):
        continue
      tools = getattr(conv, 'tools', None)  # preference pairs declare none
      yield tools_lib.system_text(conv.system, tools) if tools else conv.system or ''
      for turn in conv.turns:
        if turn.tool_call is not None:
          yield tools_lib.call_text(turn.tool_call)
        else:
          yield tools_lib.response_text(turn.text) if turn.role == 'tool' else turn.text or ''


def manifest_tasks(path: str) -> dict:
  """Each task of a manifest, most conversations first: its most common system prompt, question
  ('speech' or 'text': its last user turn) and answer (the last turn, or the chosen one), whether
  it declares tools (`tools`, only when it does), and its number of conversations; `chat` reads
  them in the checkpoints trained on the split."""
  shapes = collections.defaultdict(collections.Counter)
  for _, item in preference.read(path):
    if isinstance(item, manifest.ManifestError):
      continue
    is_pair = isinstance(item, preference.PreferencePair)
    prompt, answer = (item.prompt, item.chosen) if is_pair else (item.turns[:-1], item.turns[-1])
    question = next((turn for turn in reversed(prompt) if turn.role == 'user'), None)
    kind = lambda turn: 'speech' if turn is not None and turn.audio else 'text'
    shapes[item.task][item.system, kind(question), kind(answer),
                      bool(getattr(item, 'tools', None))] += 1
  tasks = {}
  for task, counts in sorted(shapes.items(), key=lambda item: -item[1].total()):
    (system, question, answer, tools), _ = counts.most_common(1)[0]
    tasks[task] = {'system': system, 'question': question, 'answer': answer,
                   'conversations': counts.total(), **({'tools': True} if tools else {})}
  return tasks


def _speech_tokenizer(out: str, splits: dict[str, str], model: ml_collections.ConfigDict,
                      given: str | None, audio_limit: int) -> speech_tokenizer.SpeechTokenizer:
  """The speech tokenizer `given` (a converted S3Tokenizer folder, recorded in `out`, or a k-means
  .npz, copied there), else the one `out` already has, else a k-means one trained on the train
  split. Switching kinds removes the other kind's file, so `out` names one tokenizer."""
  copied = os.path.join(out, SPEECH_TOKENIZER_FILE)
  record = os.path.join(out, SPEECH_TOKENIZER_RECORD)
  trained_on = os.path.join(out, SPEECH_TOKENIZER_TRAINED_ON)
  if (given and os.path.isdir(given)) or (not given and os.path.exists(record)):
    if not given:
      with open(record, encoding='utf-8') as f:
        given = json.load(f)['folder']
    tokenizer = s3tokenizer.S3Tokenizer.from_converted(given)
    files.write_atomically(record, json.dumps(
        {'folder': os.path.abspath(given), 'fingerprint': tokenizer.fingerprint()}, indent=1))
    for stale in (copied, trained_on):
      if os.path.exists(stale):
        os.remove(stale)
    return tokenizer
  if given:
    shutil.copy(given, copied)
    if os.path.exists(trained_on):
      os.remove(trained_on)
  elif not os.path.exists(copied):
    train_manifest, read = _train_manifest(splits), {}
    logging.info('training a %d-code speech tokenizer on %s', model.speech.bos_id, train_manifest)
    trained = speech_tokenizer.KMeansSpeechTokenizer.train(
        _manifest_audio(train_manifest, audio_limit, read), model.speech.bos_id, seed=0)
    trained.save(copied)
    fingerprint.write(trained_on, _kmeans_training(train_manifest, read['lines'], model,
                                                   audio_limit))
  if os.path.exists(record):
    os.remove(record)
  return speech_tokenizer.KMeansSpeechTokenizer.load(copied)


def prepare_tokenizers(out: str, splits: dict[str, str], model: ml_collections.ConfigDict,
                       tokenizer_folder: str | None, speech_tokenizer_file: str | None,
                       speech_tokenizer_audio: int = SPEECH_TOKENIZER_CLIPS
                       ) -> speech_tokenizer.SpeechTokenizer:
  """Puts the text and speech tokenizers in `out` (copied or recorded, or trained when not given
  and not already there) and returns the speech tokenizer."""
  tokenizer_out = os.path.join(out, TOKENIZER_FOLDER)
  trained_on = os.path.join(tokenizer_out, TEXT_TOKENIZER_TRAINED_ON)
  if tokenizer_folder:
    os.makedirs(tokenizer_out, exist_ok=True)
    for name in text_tokenizer.TOKENIZER_FILES:
      if os.path.exists(os.path.join(tokenizer_folder, name)):
        shutil.copy(os.path.join(tokenizer_folder, name), tokenizer_out)
    if os.path.exists(trained_on):
      os.remove(trained_on)
  elif not os.path.exists(os.path.join(tokenizer_out, 'tokenizer.json')):
    logging.info('training a text BPE tokenizer on the manifests')
    text_tokenizer.train_bpe(_manifest_texts(splits.values()), dict(model.tokens), tokenizer_out)
    fingerprint.write(trained_on, _text_training(splits, model))
  ids = text_tokenizer.special_ids(text_tokenizer.load(tokenizer_out), tokenizer_out)
  if ids != dict(model.tokens):
    raise ValueError(f'{tokenizer_out}: special token ids {ids} differ from the config\'s '
                     f'model.tokens {dict(model.tokens)}')

  codes = _speech_tokenizer(out, splits, model, speech_tokenizer_file, speech_tokenizer_audio)
  if codes.vocab_size > model.speech.bos_id:
    raise ValueError(f'the speech tokenizer ({speech_tokenizer_file or out}) has '
                     f'{codes.vocab_size} codes; the model has room for {model.speech.bos_id}')
  return codes


def _drop_stale_tokenizers(out: str, splits: dict[str, str], model: ml_collections.ConfigDict,
                           given_text: str | None, given_speech: str | None,
                           on_mismatch: str) -> None:
  """Tokenizers prepare trained on manifests that have changed since are removed ('redo'), so that
  they are trained again, or refused."""
  text_dir = os.path.join(out, TOKENIZER_FOLDER)
  text_record = os.path.join(text_dir, TEXT_TOKENIZER_TRAINED_ON)
  if not given_text and os.path.exists(text_record) and not fingerprint.reuse(
      fingerprint.read(text_record), _text_training(splits, model), on_mismatch, text_dir):
    shutil.rmtree(text_dir)
  speech_record = os.path.join(out, SPEECH_TOKENIZER_TRAINED_ON)
  if given_speech or not os.path.exists(speech_record):
    return
  recorded = fingerprint.read(speech_record)
  now = _kmeans_training(_train_manifest(splits), recorded['lines_read'], model,
                         SPEECH_TOKENIZER_CLIPS)
  if not fingerprint.reuse(recorded, now, on_mismatch, os.path.join(out, SPEECH_TOKENIZER_FILE)):
    os.remove(os.path.join(out, SPEECH_TOKENIZER_FILE))
    os.remove(speech_record)


def text_tokenizer_fingerprint(folder: str) -> str:
  """A hash of the tokenizer files the folder holds."""
  return fingerprint.of_files([os.path.join(folder, name)
                               for name in text_tokenizer.TOKENIZER_FILES
                               if os.path.exists(os.path.join(folder, name))])


def _drop_stale_dataset(out: str, made_from: dict, on_mismatch: str) -> None:
  """tfds reuses a finished dataset as it is: one made from other manifests, splits or settings
  (as its report records) is removed ('redo'), so that it is rebuilt from the extraction cache,
  or refused."""
  if not os.path.exists(dataset_dir(out)):
    return
  report_path = os.path.join(out, REPORT_FILE)
  recorded = None
  if os.path.exists(report_path):
    with open(report_path, encoding='utf-8') as f:
      recorded = json.load(f).get('made_from')
  if not fingerprint.reuse(recorded, made_from, on_mismatch, dataset_dir(out)):
    shutil.rmtree(dataset_dir(out))


def _split_report(split: str, path: str, chunks: list[Chunk], cache_dir: str, made_from: dict,
                  text_fingerprint: str, info) -> dict:
  """Kept and skipped lines of one split, each skip with its reason where the extraction cache
  has it (not where Beam workers extracted: they log theirs), and the split's fingerprint."""
  lines = sum(1 for chunk in chunks for line in chunk.lines if line.strip())
  caches = [chunk.cache_path(cache_dir, made_from['extract']) for chunk in chunks]
  skips = ([skip for cache in caches for skip in _chunk_index(cache)['skipped']]
           if all(map(os.path.exists, caches)) else None)
  kept = info.splits[split].num_examples
  return {'manifest': path, 'lines': lines, 'kept': kept, 'shards': info.splits[split].num_shards,
          'skipped': lines - kept,
          'skipped_by_reason': None if skips is None else dict(
              collections.Counter(skip['reason'] for skip in skips)),
          'skips': skips, 'tasks': manifest_tasks(path),
          'fingerprint': fingerprint.digest({**made_from['splits'][split],
                                             'extract': made_from['extract'],
                                             'text_tokenizer': text_fingerprint})}


def prepare(out: str, splits: dict[str, str], model: ml_collections.ConfigDict, *,
            max_audio_seconds: float = 30.0, tokenizer_folder: str | None = None,
            speech_tokenizer_file: str | None = None, chunk_size: int = 64,
            num_shards: int | None = None, use_beam: bool = False,
            beam_options: list[str] | None = None, on_mismatch: str = 'redo') -> dict:
  """Builds (or resumes building) the dataset in `out`; returns the report it also writes. What
  was made from manifests or settings that have changed since is rebuilt ('redo') or refused."""
  start = time.time()
  for split in splits:  # split names name files in `out`
    if not files.is_plain_name(split):
      raise ValueError(f'split name {split!r} must be a plain name (no path separator, not "." '
                       'or "..")')
  tfds.disable_progress_bar()  # its bars would interleave with ours
  os.makedirs(out, exist_ok=True)
  _drop_stale_tokenizers(out, splits, model, tokenizer_folder, speech_tokenizer_file, on_mismatch)
  codes = prepare_tokenizers(out, splits, model, tokenizer_folder, speech_tokenizer_file)
  extractor = Extractor(model.encoder.num_mel_bins, max_audio_seconds, codes)
  chunks = {split: read_chunks(split, path, chunk_size) for split, path in splits.items()}
  cache_dir = os.path.join(out, 'extract')
  os.makedirs(cache_dir, exist_ok=True)
  # Manifests by content, as the extraction cache keys its chunks: a moved folder stays valid.
  made_from = {'extract': extractor.fingerprint(), 'num_shards': num_shards, 'splits': {
      split: {'content': fingerprint.of_files([path])} for split, path in splits.items()}}
  _drop_stale_dataset(out, made_from, on_mismatch)
  builder = ConversationDataset(chunks=chunks, extractor=extractor, cache_dir=cache_dir,
                                use_beam=use_beam, data_dir=out, file_format='array_record')
  if use_beam:
    from apache_beam.options.pipeline_options import PipelineOptions
    beam_options = PipelineOptions(beam_options or ['--runner=DirectRunner'])
  config = tfds.download.DownloadConfig(try_download_gcs=False, num_shards=num_shards,
                                        beam_options=beam_options)
  builder.download_and_prepare(download_dir=cache_dir, download_config=config)

  info = tfds.builder_from_directory(dataset_dir(out)).info
  tokenizer_dir = os.path.join(out, TOKENIZER_FOLDER)
  text_fingerprint = text_tokenizer_fingerprint(tokenizer_dir)
  tokenizer = text_tokenizer.load(tokenizer_dir)
  report = {'dataset': dataset_dir(out), 'seconds': round(time.time() - start, 1),
            'speech_tokenizer': {'kind': type(codes).__name__, 'vocab_size': codes.vocab_size,
                                 'fingerprint': codes.fingerprint(),
                                 'file': os.path.join(out, SPEECH_TOKENIZER_RECORD if isinstance(
                                     codes, s3tokenizer.S3Tokenizer) else SPEECH_TOKENIZER_FILE)},
            'extract_fingerprint': made_from['extract'], 'made_from': made_from,
            # What a model reading the dataset must agree with (check_dataset).
            'properties': {
                'num_mel_bins': model.encoder.num_mel_bins,
                'mel_frames_per_second': audio.SAMPLE_RATE // audio.HOP_LENGTH,
                'speech_codebook_size': codes.vocab_size,
                'speech_tokenizer': codes.fingerprint(), 'text_tokenizer': text_fingerprint,
                'text_vocab_size': tokenizer.get_vocab_size(),
                'special_token_ids': text_tokenizer.special_ids(tokenizer, tokenizer_dir)},
            'splits': {split: _split_report(split, path, chunks[split], cache_dir, made_from,
                                            text_fingerprint, info)
                       for split, path in splits.items()}}
  if any(entry['skips'] is None for entry in report['splits'].values()):
    report['note'] = 'built on Beam: the reasons of the skips are in the workers\' logs'
  files.write_atomically(os.path.join(out, REPORT_FILE), json.dumps(report, indent=1))
  return report


def _report(data_dir: str) -> tuple[str, dict]:
  path = os.path.join(data_dir, REPORT_FILE)
  if not os.path.exists(path):
    raise DatasetError(f'{path} does not exist: make {data_dir} with python -m '
                       'fac_jax.data.prepare')
  with open(path, encoding='utf-8') as f:
    report = json.load(f)
  if 'properties' not in report:
    raise DatasetError(f'{path}: field "properties" is missing (an older fac_jax.data.prepare '
                       'made it); run prepare again')
  return path, report


def split_fingerprint(data_dir: str, split: str) -> str:
  """The fingerprint of a prepared split: its manifest, extraction settings and text tokenizer."""
  path, report = _report(data_dir)
  if split not in report['splits']:
    raise DatasetError(f'{path}: no split {split!r}; it has {sorted(report["splits"])}')
  return report['splits'][split]['fingerprint']


def chat_assets(data_dir: str, split: str) -> checkpoint.ChatAssets:
  """What a checkpoint trained on `split` carries for chat: the text and speech tokenizers and the
  split's tasks (manifest_tasks)."""
  path, report = _report(data_dir)
  if 'tasks' not in report['splits'].get(split, {}):
    raise DatasetError(f'{path}: split {split!r} has no field "tasks" (an older '
                       'fac_jax.data.prepare made it, or no such split); run prepare again')
  return checkpoint.ChatAssets(os.path.join(data_dir, TOKENIZER_FOLDER),
                               report['splits'][split]['tasks'], report['speech_tokenizer'])


def check_dataset(data_dir: str, model: ml_collections.ConfigDict) -> None:
  """Refuses (DatasetError) a prepared folder whose recorded properties disagree with the model
  config or with the tokenizers the folder holds now."""
  path, report = _report(data_dir)
  recorded = report['properties']
  tokenizer_dir = os.path.join(data_dir, TOKENIZER_FOLDER)
  s3_record = os.path.join(data_dir, SPEECH_TOKENIZER_RECORD)
  if os.path.exists(s3_record):
    with open(s3_record, encoding='utf-8') as f:
      speech = json.load(f)['fingerprint']
  else:
    speech = speech_tokenizer.KMeansSpeechTokenizer.load(
        os.path.join(data_dir, SPEECH_TOKENIZER_FILE)).fingerprint()
  equal = {'num_mel_bins': ('model.encoder.num_mel_bins', model.encoder.num_mel_bins),
           'mel_frames_per_second': ('the audio front end',
                                     audio.SAMPLE_RATE // audio.HOP_LENGTH),
           'special_token_ids': ('model.tokens', dict(model.tokens)),
           'text_tokenizer': (tokenizer_dir, text_tokenizer_fingerprint(tokenizer_dir)),
           'speech_tokenizer': (f'the speech tokenizer in {data_dir}', speech)}
  for name, (source, value) in equal.items():
    if recorded[name] != value:
      was = recorded[name]
      if isinstance(value, dict):  # only the entries that differ
        keys = sorted(k for k in was.keys() | value.keys() if was.get(k) != value.get(k))
        was, value = ({k: d.get(k) for k in keys} for d in (was, value))
      raise DatasetError(f'{path}: {name} is {was}, but {source} has {value}')
  at_most = {'speech_codebook_size': ('model.speech.bos_id', model.speech.bos_id),
             'text_vocab_size': ('model.llm.vocab_size', model.llm.vocab_size)}
  for name, (source, value) in at_most.items():
    if recorded[name] > value:
      raise DatasetError(f'{path}: {name} is {recorded[name]}, but {source} has room for {value}')


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program (it is also a library)."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
  flags.DEFINE_string('manifest', None, 'split=path.jsonl[,split=path.jsonl]', required=True)
  flags.DEFINE_string('out', None, 'Output folder.', required=True)
  flags.DEFINE_string('tokenizer', None, 'Text tokenizer folder (default: train a BPE on the '
                      'manifests).')
  flags.DEFINE_string('speech_tokenizer', None, 'S3Tokenizer v3 folder written by '
                      'fac_jax.speech.convert_s3, or a k-means speech tokenizer .npz (default: the '
                      'one DIR has, else a k-means one trained on the train split).')
  flags.DEFINE_integer('chunk_size', 64, 'Manifest lines per cached extraction unit.')
  flags.DEFINE_integer('num_shards', None, 'ArrayRecord shards per split (default: by size).')
  flags.DEFINE_bool('beam', False, 'Run the builder on Apache Beam.')
  flags.DEFINE_list('beam_options', None, 'Beam pipeline options, e.g. '
                    '--runner=DataflowRunner,--project=...')
  flags.DEFINE_enum('on_mismatch', 'redo', fingerprint.ON_MISMATCH, 'What was made from '
                    'manifests or settings that have changed since: rebuild it, or refuse.')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.config is None:
    raise app.UsageError('--config is required (its model sizes fix the mel bins and codes)')
  try:
    report = prepare(FLAGS.out, parse_manifest_flag(FLAGS.manifest), FLAGS.config.model,
                     max_audio_seconds=FLAGS.config.data.max_audio_seconds,
                     tokenizer_folder=FLAGS.tokenizer,
                     speech_tokenizer_file=FLAGS.speech_tokenizer, chunk_size=FLAGS.chunk_size,
                     num_shards=FLAGS.num_shards, use_beam=FLAGS.beam,
                     beam_options=FLAGS.beam_options, on_mismatch=FLAGS.on_mismatch)
  except ValueError as e:  # refusals: split names, tokenizers, settings, empty splits
    raise SystemExit(f'prepare: {e}') from None
  for split, entry in report['splits'].items():
    reasons = entry['skipped_by_reason']
    print(f'{split}: kept {entry["kept"]} conversations in {entry["shards"]} shard(s); skipped '
          f'{entry["skipped"]} ' + ("(reasons in the Beam workers' logs)" if reasons is None
                                    else str(reasons or '')))
  print(f'dataset: {report["dataset"]} ({report["seconds"]} s); report: '
        f'{os.path.join(FLAGS.out, REPORT_FILE)}')


def run():
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
