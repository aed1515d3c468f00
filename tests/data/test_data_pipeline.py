"""The grain pipeline: chat-template formatting on a hand-checked record, packing that covers an
epoch exactly once, per-process shards, determinism, exact resumption, global batches on an
8-device mesh, and conversations that fit no row: counted, and an error when none fits."""

import collections
import copy
import json
import os
import threading

import jax
import numpy as np
import pytest

import speech_corpus
from conftest import run_on_host_devices
import paths

from fac_jax.batch import IGNORE_ID
from fac_jax.checkpoints import text_tokenizer
from fac_jax.data import conversation, input_pipeline, prepare


@pytest.fixture(scope='module')
def data_cfg(tmp_path_factory):
  from fac_jax import config as config_lib
  cfg = config_lib.load(paths.TINY_CONFIG)
  root = str(tmp_path_factory.mktemp('corpus'))
  splits = speech_corpus.write(root, num_train=30, num_validation=6, bad_lines=False)
  cfg.data.dir = os.path.join(root, 'prepared')
  prepare.prepare(cfg.data.dir, splits, cfg.model)
  cfg.data.update(batch_size=2, seq_len=64, num_windows=16)
  return cfg


def segment_lengths(batches) -> collections.Counter:
  lengths = collections.Counter()
  for batch in batches:
    for row in batch['segment_ids']:
      lengths.update(collections.Counter(row[row > 0].tolist()).values())
  return lengths


def test_formatting_of_a_hand_checked_record(tiny_config, tmp_path):
  model, tok = tiny_config.model, tiny_config.model.tokens
  model.encoder.window_frames = 20  # several windows for one second of user audio
  texts = list(conversation.CHAT_TEMPLATE_TEXTS) + ['Be brief.', 'Two.']
  tokenizer = text_tokenizer.train_bpe(texts, dict(tok), str(tmp_path))
  enc = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
  codes = np.arange(23, dtype=np.int32)  # 2 delay groups + 23 codes -> 7 positions
  mel = np.random.default_rng(0).normal(size=(100, model.encoder.num_mel_bins))
  record = {
      'conversation': json.dumps({'id': 'x', 'task': 't', 'system': 'Be brief.', 'meta': {},
                                  'turns': [{'role': 'user', 'text': None, 'seconds': 1.0,
                                             'mel': [0, 100]},
                                            {'role': 'assistant', 'text': 'Two.', 'seconds': 0.92,
                                             'codes': [0, 23]}]}),
      'mel': mel.astype(np.float16), 'codes': codes}
  out = input_pipeline.FormatRecord(str(tmp_path), model)(record)

  head = ([tok.im_start] + enc('system\nBe brief.') + [tok.im_end] + enc('\n') + [tok.im_start]
          + enc('user\n') + [tok.audio_bos])
  user = list(range(len(head), len(head) + 25 // 5))
  middle = [tok.audio_eos, tok.im_end] + enc('\n') + [tok.im_start] + enc('assistant\n') + [
      tok.audio_bos]
  answer_start = len(head) + len(user) + len(middle)
  answer = list(range(answer_start, answer_start + 7))
  text = enc('Two.') + [tok.sil] * (7 - len(enc('Two.')))
  expected_ids = head + [tok.audio] * 5 + middle + text + [tok.audio_eos, tok.im_end] + enc('\n')
  np.testing.assert_array_equal(out['input_ids'], expected_ids)
  np.testing.assert_array_equal(np.flatnonzero(out['audio_mask']), user + answer)
  np.testing.assert_array_equal(np.flatnonzero(out['continuous_mask']), user)
  np.testing.assert_array_equal(np.flatnonzero(out['text_mask']), answer)
  np.testing.assert_array_equal(out['continuous_frames'][user].ravel(), np.arange(25))
  # 100 mel frames in windows of 20 -> 5 windows; mel is the record's, as float32.
  assert out['mel_lengths'].tolist() == [20] * 5
  np.testing.assert_allclose(out['mel'].reshape(-1, model.encoder.num_mel_bins),
                             mel.astype(np.float16).astype(np.float32))
  stream = [model.speech.bos_id] * 10 + codes.tolist() + [model.speech.pad_id] * 2
  np.testing.assert_array_equal(out['speech_codes'][answer].ravel(), stream)
  # Targets: nothing before the assistant's audio_bos is trained; the position before it
  # predicts it, then each audio position predicts the next group, the last one 5 x eos.
  bos_position = answer_start - 1
  assert (out['text_targets'][:bos_position - 1] == IGNORE_ID).all()
  assert out['text_targets'][bos_position - 1] == tok.audio_bos
  np.testing.assert_array_equal(out['text_targets'][bos_position:answer[-1]], text)
  assert out['text_targets'][answer[-1]] == tok.audio_eos
  np.testing.assert_array_equal(out['speech_targets'][bos_position], [model.speech.bos_id] * 5)
  np.testing.assert_array_equal(out['speech_targets'][answer[-1]], [model.speech.eos_id] * 5)
  np.testing.assert_array_equal(out['speech_targets'][bos_position:answer[-1]].ravel(),
                                stream[:-2] + [IGNORE_ID] * 2)


def test_one_epoch_packs_every_conversation_once(data_cfg):
  batches = list(input_pipeline.dataset(data_cfg, 'train', num_epochs=1, shuffle=False))
  format_record = input_pipeline.FormatRecord(os.path.join(data_cfg.data.dir, 'tokenizer'),
                                        data_cfg.model)
  source = prepare.open_split(data_cfg.data.dir, 'train')
  expected = collections.Counter(len(format_record(source[i])['input_ids'])
                                 for i in range(len(source)))
  assert segment_lengths(batches) == expected
  for batch in batches:
    assert batch['input_ids'].shape == (2, 64) and batch['mel'].shape[:2] == (2, 16)
    for row in batch['segment_ids']:  # segments 1, 2, ... then padding
      used = row[row > 0]
      assert (np.diff(used) >= 0).all() and (row[len(used):] == 0).all()


def test_process_shards_split_the_epoch(data_cfg, monkeypatch):
  whole = segment_lengths(input_pipeline.dataset(data_cfg, 'train', num_epochs=1, shuffle=False))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  shards = collections.Counter()
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    batches = list(input_pipeline.dataset(data_cfg, 'train', num_epochs=1, shuffle=False))
    assert batches[0]['input_ids'].shape[0] == 1  # local rows: 2 global over 2 processes
    shards += segment_lengths(batches)
  assert shards == whole


def test_same_seed_same_batches_and_resumption_is_exact(data_cfg):
  take = lambda iterator, n: [next(iterator) for _ in range(n)]
  first = take(iter(input_pipeline.dataset(data_cfg, 'train', seed=3)), 12)
  again = take(iter(input_pipeline.dataset(data_cfg, 'train', seed=3)), 12)
  other = take(iter(input_pipeline.dataset(data_cfg, 'train', seed=4)), 12)
  same = lambda a, b: all(np.array_equal(a[k], b[k]) for k in a)
  assert all(same(a, b) for a, b in zip(first, again))
  assert not all(same(a, b) for a, b in zip(first, other))

  iterator = iter(input_pipeline.dataset(data_cfg, 'train', seed=3))
  take(iterator, 5)
  state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
  resumed = iter(input_pipeline.dataset(data_cfg, 'train', seed=3))
  resumed.set_state(state)
  assert all(same(a, b) for a, b in zip(take(resumed, 7), first[5:]))


def test_local_batches_become_global_arrays_on_an_8_device_mesh(data_cfg):
  summary = run_on_host_devices('pipeline_on_mesh_check.py', args=[data_cfg.data.dir])
  assert summary['devices'] == 8
  assert summary['input_ids_spec'] == "P(('data', 'fsdp', 'expert'), None)"
  assert summary['mel_spec'] == "P(('data', 'fsdp', 'expert'), None, None, None)"
  assert summary['equal_to_local'] and summary['loss_finite']


def test_conversations_that_fit_no_row_are_counted_and_none_fitting_is_an_error(data_cfg):
  source = prepare.open_split(data_cfg.data.dir, 'train')
  format_record = input_pipeline.FormatRecord(os.path.join(data_cfg.data.dir, 'tokenizer'),
                                              data_cfg.model)
  lengths = sorted(len(format_record(source[i])['input_ids']) for i in range(len(source)))
  cfg = copy.deepcopy(data_cfg)
  cfg.data.seq_len = lengths[len(lengths) // 2]
  iterator = iter(input_pipeline.dataset(cfg, 'train', num_epochs=1, shuffle=False))
  list(iterator)
  assert iterator.dropped == sum(n > cfg.data.seq_len for n in lengths) > 0

  cfg.data.seq_len = lengths[0] - 1  # no row holds any conversation: training would spin forever
  outcome = []

  def first_batch():
    try:
      next(iter(input_pipeline.dataset(cfg, 'train')))
    except prepare.DatasetError as e:
      outcome.append(str(e))

  searching = threading.Thread(target=first_batch, daemon=True)
  searching.start()
  searching.join(timeout=120)
  assert len(outcome) == 1 and outcome[0].startswith(
      f"split 'train' of {cfg.data.dir}: none of the last 60 conversations read (the split holds "
      f'30) fits a row of data.seq_len={cfg.data.seq_len} positions')
