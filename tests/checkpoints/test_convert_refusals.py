"""The importer refuses a bad official folder before writing anything, naming what is wrong; a
failure while writing leaves nothing behind; the command says each in one line."""

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fac_jax.checkpoints import checkpoint, convert
import official_tiny
import paths


@pytest.fixture
def hf_dir(tmp_path):
  folder = tmp_path / 'hf'
  shutil.copytree(official_tiny.DIR, folder)
  return folder


def rewrite_tensors(folder, edit):
  path = folder / 'model.safetensors'
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={'format': 'pt'})


def refused(hf_dir, tmp_path, match):
  out = tmp_path / 'ckpt'
  with pytest.raises(convert.CheckpointError, match=match):
    convert.import_checkpoint(str(hf_dir), str(out))
  assert not out.exists() and not (tmp_path / 'ckpt.incomplete').exists()


def test_missing_and_unexpected_keys_are_listed(hf_dir, tmp_path):
  def edit(tensors):
    del tensors['language_model.model.norm.weight']
    del tensors['audio_tower.output_matching.weight']
    tensors['language_model.model.layers.9.mlp.up_proj.weight'] = np.zeros((2, 2), np.float32)
  rewrite_tensors(hf_dir, edit)
  refused(hf_dir, tmp_path, r"missing 2 keys: \['audio_tower.output_matching.weight', "
          r"'language_model.model.norm.weight'\](.|\n)*unexpected 1 keys: "
          r"\['language_model.model.layers.9.mlp.up_proj.weight'\]")


def test_wrong_shape_says_expected_and_found(hf_dir, tmp_path):
  def edit(tensors):
    tensors['audio_invert_tower.input_matching.weight'] = np.zeros((33, 64), np.float32)
  rewrite_tensors(hf_dir, edit)
  refused(hf_dir, tmp_path, r'audio_invert_tower.input_matching.weight: expected shape '
          r'\(32, 64\), found \(33, 64\)')


def test_untied_speech_head_is_refused(hf_dir, tmp_path):
  def edit(tensors):
    tensors['audio_invert_tower.lm_head.weight'] = tensors['audio_tower.embed_tokens.weight'] + 1
  rewrite_tensors(hf_dir, edit)
  refused(hf_dir, tmp_path, 'audio_invert_tower.lm_head.weight differs from '
          'audio_tower.embed_tokens.weight')


def test_unknown_model_type(hf_dir, tmp_path):
  config = json.loads((hf_dir / 'config.json').read_text())
  config['model_type'] = 'qwen2_audio'
  (hf_dir / 'config.json').write_text(json.dumps(config))
  refused(hf_dir, tmp_path, r"config.json: model_type is 'qwen2_audio'; expected 'funaudiochat'")


def test_truncated_safetensors(hf_dir, tmp_path):
  path = hf_dir / 'model.safetensors'
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 1000])
  refused(hf_dir, tmp_path, r'model.safetensors: tensor .* ends at byte \d+ of the data section '
          r'but the file holds \d+ \(truncated\?\)')


def test_existing_output_is_not_overwritten(tmp_path):
  out = tmp_path / 'ckpt'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  with pytest.raises(FileExistsError):
    convert.import_checkpoint(official_tiny.DIR, str(out))
  assert (out / 'keep.txt').read_text() == 'mine'


def test_interrupted_import_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
  out = tmp_path / 'ckpt'
  calls = []

  def failing_read_block(read, m, index, dtype=None):
    calls.append(m.path)
    if len(calls) == 20:
      raise KeyboardInterrupt  # the process is stopped half-way
    return original(read, m, index, dtype)

  original = convert.official_layout.read_block
  monkeypatch.setattr(convert.official_layout, 'read_block', failing_read_block)
  with pytest.raises(KeyboardInterrupt):
    convert.import_checkpoint(official_tiny.DIR, str(out))
  assert not out.exists()
  with pytest.raises(FileNotFoundError, match='not a complete fac_jax checkpoint'):
    checkpoint.load_config(str(out))
  monkeypatch.setattr(convert.official_layout, 'read_block', original)
  assert convert.import_checkpoint(official_tiny.DIR, str(out)) == str(out)  # a rerun starts clean
  assert not (tmp_path / 'ckpt.incomplete').exists()
  assert checkpoint.Reader(str(out)).load()['llm']['lm_head']['kernel'].shape == (64, 256)


def convert_command(*args, program=('-m',)):
  return subprocess.run([sys.executable, *program, 'fac_jax.checkpoints.convert', *args],
                        capture_output=True, text=True, cwd=paths.REPO, timeout=300)


def test_command_refuses_in_one_line(hf_dir, tmp_path):
  config = json.loads((hf_dir / 'config.json').read_text())
  config['model_type'] = 'qwen2_audio'
  (hf_dir / 'config.json').write_text(json.dumps(config))
  result = convert_command('import', f'--hf_dir={hf_dir}', f'--out={tmp_path / "ckpt"}',
                           '--without_tokenizer')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {hf_dir}/config.json: model_type is 'qwen2_audio'; expected 'funaudiochat'")


def test_command_refuses_a_folder_without_tokenizer_files_unless_asked(tmp_path):
  out = tmp_path / 'ckpt'
  result = convert_command('import', f'--hf_dir={official_tiny.DIR}', f'--out={out}')
  assert result.returncode != 0 and not out.exists()
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: {official_tiny.DIR} has no tokenizer files (tokenizer.json, or vocab.json with '
      'merges.txt), which chat needs: copy them there, or pass --without_tokenizer to import the '
      'weights alone')
  result = convert_command('import', f'--hf_dir={official_tiny.DIR}', f'--out={out}',
                           '--without_tokenizer')
  assert result.returncode == 0, result.stderr[-2000:]
  assert checkpoint.load_config(str(out)).llm.vocab_size == 256


def test_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
  out = tmp_path / 'ckpt'
  calls = []

  def failing_read_block(read, m, index, dtype=None):
    calls.append(m.path)
    if len(calls) == 20:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return original(read, m, index, dtype)

  original = convert.official_layout.read_block
  monkeypatch.setattr(convert.official_layout, 'read_block', failing_read_block)
  with pytest.raises(OSError, match='No space left on device'):
    convert.import_checkpoint(official_tiny.DIR, str(out))
  assert not out.exists() and not (tmp_path / 'ckpt.incomplete').exists()


def test_full_disk_is_the_last_line(tmp_path):
  out = tmp_path / 'ckpt'
  result = convert_command('import', f'--hf_dir={official_tiny.DIR}', f'--out={out}',
                           '--without_tokenizer',
                           program=(os.path.join(paths.TESTS, 'disk_full.py'),))
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: no space left on device writing {out}.incomplete/params/d/0; free some space and '
      'run it again')
  assert not out.exists() and not (tmp_path / 'ckpt.incomplete').exists()
