"""Manifests -> ArrayRecord dataset: contents against the audio front end and speech tokenizer,
every bad-input case reported with file, line and reason, resumption, the Beam runner, reruns
after the manifests change, and refusals: names that would leave their folder, empty splits."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import speech_corpus
import paths

from fac_jax import audio, fingerprint
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
  report = prepare.prepare(beam_out, splits, cfg.model, use_beam=True, num_shards=2,
                           tokenizer_folder=os.path.join(out, prepare.TOKENIZER_FOLDER),
                           speech_tokenizer_file=os.path.join(out, prepare.SPEECH_TOKENIZER_FILE))
  # The workers logged why they skipped lines; how many is still known, never a silent 0.
  train = report['splits']['train']
  assert train['skipped'] == len(speech_corpus.BAD_LINES) and train['skipped_by_reason'] is None
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


def given_tokenizers(out: str) -> dict:
  """prepare's arguments that reuse the tokenizers of the prepared folder `out`."""
  return dict(tokenizer_folder=os.path.join(out, prepare.TOKENIZER_FOLDER),
              speech_tokenizer_file=os.path.join(out, prepare.SPEECH_TOKENIZER_FILE))


def test_a_line_added_and_a_new_split_rebuild_only_what_they_change(prepared, tiny_config,
                                                                     tmp_path, monkeypatch):
  splits = speech_corpus.write(str(tmp_path), num_train=8, num_validation=2, bad_lines=False)
  out = str(tmp_path / 'prepared')
  first = prepare.prepare(out, splits, tiny_config.model, chunk_size=4,
                          **given_tokenizers(prepared[3]))
  with open(splits['validation']) as f:
    added = f.readline()
  with open(splits['train'], 'a') as f:
    f.write(added)  # line 9 of train: a chunk of its own
  extracted = []
  original = prepare.Extractor.conversation
  monkeypatch.setattr(prepare.Extractor, 'conversation',
                      lambda self, conv: extracted.append(conv.id) or original(self, conv))
  report = prepare.prepare(out, dict(splits, more=splits['validation']), tiny_config.model,
                           chunk_size=4, **given_tokenizers(prepared[3]))
  assert extracted == ['c8', 'c8', 'c9']  # train's new line, then the new split
  assert [report['splits'][s]['kept'] for s in ('train', 'validation', 'more')] == [9, 2, 2]
  assert len(records(out, 'more')) == 2 and len(prepare.open_split(out, 'train')) == 9
  fingerprints = {split: (first['splits'][split]['fingerprint'],
                          report['splits'][split]['fingerprint']) for split in splits}
  assert fingerprints['train'][0] != fingerprints['train'][1]
  assert fingerprints['validation'][0] == fingerprints['validation'][1]


def test_smoke_then_full_corpus_in_one_folder_retrains_the_tokenizers(tiny_config, tmp_path,
                                                                      capsys):
  root, out = str(tmp_path), str(tmp_path / 'prepared')
  small = prepare.prepare(out, speech_corpus.write(root, num_train=6, num_validation=2,
                                                   bad_lines=False), tiny_config.model)
  full = prepare.prepare(out, speech_corpus.write(root, num_train=10, num_validation=2,
                                                  bad_lines=False), tiny_config.model)
  assert full['splits']['train']['kept'] == 10
  # Both tokenizers learnt from every line of the small corpus: trained again on the full one.
  assert full['properties']['speech_tokenizer'] != small['properties']['speech_tokenizer']
  assert full['properties']['text_tokenizer'] != small['properties']['text_tokenizer']
  printed = capsys.readouterr().out
  assert f'{out}/speech_tokenizer.npz was made with other settings (lines: ' in printed
  with pytest.raises(fingerprint.Mismatch, match=r'manifests\.train: .*--on_mismatch=redo'):
    prepare.prepare(out, speech_corpus.write(root, num_train=12, num_validation=2,
                                             bad_lines=False), tiny_config.model,
                    on_mismatch='refuse')


def test_ids_and_split_names_that_would_leave_their_folder_are_refused(prepared, tiny_config,
                                                                       tmp_path):
  line = json.dumps({'id': '../../x', 'turns': [{'role': 'user', 'text': 'Hi'},
                                                 {'role': 'assistant', 'text': 'Hi.'}]})
  with pytest.raises(manifest.ManifestError,
                     match=r'm\.jsonl:3: field "id" must be a plain name .*got \'\.\./\.\./x\''):
    manifest.parse_line(line, 'm.jsonl', 3)
  out = tmp_path / 'deep' / 'out'
  with pytest.raises(ValueError, match=r"split name '\.\./\.\./escape' must be a plain name"):
    prepare.prepare(str(out), {'../../escape': prepared[2]['train']}, tiny_config.model)
  assert os.listdir(tmp_path) == []  # nothing written, inside --out or beside it


def test_a_split_that_keeps_no_line_is_refused(prepared, tiny_config, tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"turns": []}\n{"id": "../x", "turns": [{"role": "user", "text": "Hi"}, '
                 '{"role": "assistant", "text": "Hi."}]}\n')
  with pytest.raises(prepare.DatasetError, match=rf"{bad}: split 'facts' keeps none of its lines "
                                                 r"\(skipped by reason: {'malformed_line': 2}\)"):
    prepare.prepare(str(tmp_path / 'out'), {'facts': str(bad)}, tiny_config.model,
                    **given_tokenizers(prepared[3]))
