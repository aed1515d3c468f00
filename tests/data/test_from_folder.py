"""A manifest from a folder of recordings: one conversation a NAME with paths relative to the
manifest, read back by the manifest parser; a missing part is refused naming the file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

import paths

from fac_jax.data import from_folder, manifest


def recording(path, seconds=0.5):
  soundfile.write(path, np.zeros(int(16000 * seconds), np.float32), 16000)


@pytest.fixture
def folder(tmp_path):
  root = tmp_path / 'recordings'
  root.mkdir()
  for name, answer in (('b_second', 'paris'), ('a_first', 'seven')):
    recording(root / f'{name}.question.wav')
    recording(root / f'{name}.answer.wav')
    (root / f'{name}.answer.txt').write_text(f'  {answer}\n')
  (root / 'a_first.question.txt').write_text('what is two plus five')
  return root


def run(*args):
  return subprocess.run([sys.executable, '-m', 'fac_jax.data.from_folder', *args], cwd=paths.REPO,
                        capture_output=True, text=True, timeout=120)


def test_each_name_becomes_a_spoken_conversation_the_manifest_reads(folder, tmp_path):
  out = tmp_path / 'data' / 'mine.jsonl'
  out.parent.mkdir()
  result = run(f'--folder={folder}', f'--out={out}', '--system=Answer briefly.',
               '--task=spoken_qa')
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().endswith(f'2 conversations from {folder}')
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['id'] for r in records] == ['a_first', 'b_second']  # sorted
  first = records[0]
  assert first['system'] == 'Answer briefly.' and first['task'] == 'spoken_qa'
  assert first['turns'][0] == {'role': 'user', 'audio': '../recordings/a_first.question.wav',
                               'text': 'what is two plus five'}
  assert first['turns'][1] == {'role': 'assistant', 'text': 'seven',
                               'audio': '../recordings/a_first.answer.wav'}
  assert 'text' not in records[1]['turns'][0]  # no transcript given
  parsed = [c for _, c in manifest.read(str(out))]
  assert all(not isinstance(c, Exception) for c in parsed) and len(parsed) == 2
  for turn in first['turns']:  # the paths resolve from the manifest's folder
    assert os.path.exists(os.path.join(out.parent, turn['audio']))


def test_text_answers_need_no_answer_recording(folder, tmp_path):
  os.remove(folder / 'a_first.answer.wav')
  records = from_folder.records(str(folder), str(tmp_path / 'm.jsonl'), spoken_answers=False)
  assert all('audio' not in r['turns'][1] for r in records)


@pytest.mark.parametrize('remove, expected', [
    ('a_first.answer.txt', 'a_first.answer.txt: missing (the answer\'s words)'),
    ('a_first.answer.wav', 'a_first.answer.wav: missing (the spoken answer; pass --text_answers'),
    ('a_first.question.wav', 'a_first.question.wav: missing (the spoken question'),
])
def test_a_missing_part_is_refused_naming_the_file_and_nothing_is_written(folder, tmp_path,
                                                                         remove, expected):
  os.remove(folder / remove)
  out = tmp_path / 'mine.jsonl'
  result = run(f'--folder={folder}', f'--out={out}')
  assert result.returncode != 0 and not out.exists()
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and expected in last and str(folder) in last


def test_an_empty_answer_or_an_empty_folder_is_refused(folder, tmp_path):
  (folder / 'a_first.answer.txt').write_text('  \n')
  with pytest.raises(from_folder.FolderError, match='a_first.answer.txt: empty'):
    from_folder.records(str(folder), str(tmp_path / 'm.jsonl'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(from_folder.FolderError, match='holds no NAME.question.wav'):
    from_folder.records(str(empty), str(tmp_path / 'm.jsonl'))
