"""Manifests -> ArrayRecord dataset: contents against the audio front end and speech tokenizer,
every bad-input case reported with file, line and reason, resumption, and the Beam runner."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import speech_corpus
import paths

from fac_jax import audio
from fac_jax.data import manifest, prepare
from fac_jax.speech import speech_tokenizer
def records(out: str, split: str) -> dict[str, dict]:
  source = prepare.open_split(out, split)
  return {json.loads(r['conversation'])['id']: r for r in (source[i] for i in range(len(source)))}


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  from fac_jax import config as config_lib
  cfg = config_lib.load(paths.TINY_CONFIG)
  root = str(tmp_path_factory.mktemp('corpus'))
  splits = speech_corpus.write(root)
  out = os.path.join(root, 'prepared')
  report = prepare.prepare(out, splits, cfg.model, chunk_size=5, num_shards=2)
  return cfg, root, splits, out, report


def test_every_bad_line_is_reported_with_file_line_and_reason(prepared):
  _, root, splits, _, report = prepared
  train = report['splits']['train']
  assert train['kept'] == 12 and report['splits']['validation']['kept'] == 4
  assert train['skipped'] == len(speech_corpus.BAD_LINES)
  expected = collections.Counter(reason for reason, _ in speech_corpus.BAD_LINES)
  assert train['skipped_by_reason'] == dict(expected)
  for number, ((reason, line), skip) in enumerate(zip(speech_corpus.BAD_LINES, train['skips']),
                                                  start=13):
    assert skip['where'] == f'{splits["train"]}:{number}'
    assert skip['reason'] == reason
    if isinstance(line, dict) and reason != 'malformed_line':
      assert os.path.join(root, line['turns'][0]['audio']) in skip['message']
    else:
      assert f'{splits["train"]}:{number}' in skip['message']
  with open(os.path.join(prepared[3], prepare.REPORT_FILE)) as f:
    assert json.load(f)['splits']['train']['skipped_by_reason'] == dict(expected)


def test_records_hold_the_front_end_features_in_sharded_array_record_files(prepared):
  cfg, _, splits, out, _ = prepared
  files = sorted(os.listdir(prepare.dataset_dir(out)))
  assert [f for f in files if 'train.array_record' in f] == [
      'conversation_dataset-train.array_record-00000-of-00002',
      'conversation_dataset-train.array_record-00001-of-00002']
  codes = speech_tokenizer.KMeansSpeechTokenizer.load(os.path.join(out,
                                                                   prepare.SPEECH_TOKENIZER_FILE))
  assert codes.vocab_size == cfg.model.speech.bos_id
  stored = records(out, 'train')
  assert len(stored) == 12
  for number, conv in manifest.read(splits['train']):
    if number > 12:
      break
    record = stored[conv.id]
    meta = json.loads(record['conversation'])
    assert [t['text'] for t in meta['turns']] == [t.text for t in conv.turns]
    assert meta['source'] == f'{splits["train"]}:{number}'
    user, answer = conv.turns
    if user.audio is None:
      assert record['mel'].shape == (0, cfg.model.encoder.num_mel_bins)
      assert record['codes'].shape == (0,)
      continue
    mel = audio.log_mel(audio.load(user.audio), cfg.model.encoder.num_mel_bins)
    np.testing.assert_allclose(record['mel'].astype(np.float32), mel, atol=2e-3, rtol=1e-3)
    assert meta['turns'][0]['mel'] == [0, len(mel)]
    np.testing.assert_array_equal(record['codes'], codes.encode(audio.load(answer.audio)))
    assert abs(meta['turns'][1]['seconds'] - len(audio.load(answer.audio)) / 16000) < 1e-6


def test_reading_needs_no_tensorflow(prepared):
  out = prepared[3]
  script = ('import sys; from fac_jax.data import prepare; s = prepare.open_split(sys.argv[1], '
            '"validation"); assert len(s) == 4 and s[0]["codes"].dtype.name == "int32"; '
            'print("tensorflow" in sys.modules)')
  result = subprocess.run([sys.executable, '-c', script, out], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == 'False'


def test_interrupted_run_resumes_from_its_cached_chunks(tmp_path, tiny_config, monkeypatch):
  splits = speech_corpus.write(str(tmp_path), num_train=12, num_validation=4, bad_lines=False)
  out = str(tmp_path / 'prepared')
  extracted = []
  original = prepare.Extractor.conversation

  def interrupted_after_five(self, conv):
    if len(extracted) == 5:
      raise KeyboardInterrupt('simulated interruption')
    extracted.append(conv.id)
    return original(self, conv)

  monkeypatch.setattr(prepare.Extractor, 'conversation', interrupted_after_five)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(out, splits, tiny_config.model, chunk_size=4)
  assert not os.path.exists(prepare.dataset_dir(out))  # nothing that looks complete

  extracted.clear()
  monkeypatch.setattr(prepare.Extractor, 'conversation',
                      lambda self, conv: extracted.append(conv.id) or original(self, conv))
  report = prepare.prepare(out, splits, tiny_config.model, chunk_size=4)
  # Lines 1-4 were cached as a whole chunk before the interruption; line 5 was not.
  assert extracted == [f'c{i}' for i in range(4, 16)]
  assert report['splits']['train']['kept'] == 12

  extracted.clear()
  prepare.prepare(out, splits, tiny_config.model, chunk_size=4)
  assert extracted == []  # a finished dataset is reused, not rebuilt

  fresh = str(tmp_path / 'fresh')
  prepare.prepare(fresh, splits, tiny_config.model, chunk_size=4,
                  speech_tokenizer_file=os.path.join(out, prepare.SPEECH_TOKENIZER_FILE))
  resumed, uninterrupted = records(out, 'train'), records(fresh, 'train')
  assert resumed.keys() == uninterrupted.keys()
  for key in resumed:
    for field in ('conversation', 'mel', 'codes'):
      np.testing.assert_array_equal(resumed[key][field], uninterrupted[key][field])


def test_beam_direct_runner_builds_the_same_dataset(prepared):
  cfg, root, splits, out, _ = prepared
  beam_out = os.path.join(root, 'beam')
  prepare.prepare(beam_out, splits, cfg.model, use_beam=True, num_shards=2,
                  tokenizer_folder=os.path.join(out, prepare.TOKENIZER_FOLDER),
                  speech_tokenizer_file=os.path.join(out, prepare.SPEECH_TOKENIZER_FILE))
  for split in splits:
    local, beam = records(out, split), records(beam_out, split)
    assert local.keys() == beam.keys()
    for key in local:
      for field in ('conversation', 'mel', 'codes'):
        np.testing.assert_array_equal(local[key][field], beam[key][field])


def test_refuses_a_tokenizer_whose_special_ids_differ_from_the_config(prepared, tiny_config,
                                                                      tmp_path):
  _, _, splits, out, _ = prepared
  tiny_config.model.tokens.sil = 260
  with pytest.raises(ValueError, match='special token ids .* differ from the config'):
    prepare.prepare(str(tmp_path), splits, tiny_config.model,
                    tokenizer_folder=os.path.join(out, prepare.TOKENIZER_FOLDER))
