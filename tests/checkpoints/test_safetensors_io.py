"""Safetensors folders through the `safetensors` library: bit-exact round trips, lazy slices, an
index kept inside its folder, and one-line errors naming the file for cut or corrupt files."""

import json
import os
import re
import resource
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from fac_jax.checkpoints import convert, safetensors_io
import official_tiny

RNG = np.random.default_rng(0)
TENSORS = {
    'f32': RNG.standard_normal((3, 5)).astype(np.float32),
    # Every bit pattern of bfloat16, NaNs and infinities included.
    'bf16': np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(256, 256),
    'i64': np.array([-(1 << 62), -1, 0, 1 << 62], np.int64),
    'i32': RNG.integers(-(1 << 31), 1 << 31, (7,), dtype=np.int32),
    'u8': np.arange(256, dtype=np.uint8),
    'bool': np.array([True, False, True]),
    'scalar': np.array(2.5, np.float32),
    # Written from a transposed (non-contiguous) view: the file holds it in C order.
    'transposed': RNG.standard_normal((4, 6)).astype(np.float32).T,
}


def write(folder, tensors, max_shard_bytes):
  os.makedirs(folder, exist_ok=True)
  plan = [(k, v.shape, v.dtype) for k, v in tensors.items()]
  shards = safetensors_io.plan_shards(plan, max_shard_bytes)
  return safetensors_io.write_sharded(str(folder), shards, iter(tensors.values()))


@pytest.mark.parametrize('max_shard_bytes, files', [(1 << 62, 1), (4096, 3)])
def test_round_trip_is_bit_exact(tmp_path, max_shard_bytes, files):
  index = write(tmp_path, TENSORS, max_shard_bytes)
  assert len(set(index['weight_map'].values())) == files
  assert len(list(tmp_path.glob('*.safetensors'))) == files
  tensors = safetensors_io.Checkpoint(str(tmp_path))
  assert tensors.keys() == sorted(TENSORS)
  for key, want in TENSORS.items():
    got = tensors.array(key)
    assert tensors.shape(key) == want.shape and tensors.dtype(key) == want.dtype, key
    assert got.dtype == want.dtype and got.shape == want.shape, key
    assert got.tobytes() == np.ascontiguousarray(want).tobytes(), key


def test_slices_read_the_right_part(tmp_path):
  write(tmp_path, TENSORS, 4096)
  tensors = safetensors_io.Checkpoint(str(tmp_path))
  for key, index in [('bf16', (slice(3, 70), slice(200, 256))), ('transposed', (slice(1, 5),)),
                     ('f32', (slice(None), slice(2, 3))), ('scalar', ())]:
    got = tensors.slice(key)[index]
    assert got.tobytes() == np.ascontiguousarray(TENSORS[key][index]).tobytes(), key


def sparse_checkpoint(folder, rows, cols):
  """A folder with one bfloat16 tensor 'big' of zeros, in a sparse file that costs no disk."""
  header = json.dumps({'big': {'dtype': 'BF16', 'shape': [rows, cols],
                               'data_offsets': [0, rows * cols * 2]}}).encode()
  header += b' ' * (-len(header) % 8)
  with open(folder / 'model.safetensors', 'wb') as f:
    f.write(struct.pack('<Q', len(header)) + header)
    f.truncate(8 + len(header) + rows * cols * 2)
  return safetensors_io.Checkpoint(str(folder))


def test_a_slice_of_a_large_tensor_reads_only_that_part(tmp_path):
  tensors = sparse_checkpoint(tmp_path, 1 << 14, 1 << 15)  # 1 GiB
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
  block = tensors.slice('big')[5:7, 100:200]
  grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - before
  assert block.shape == (2, 100) and block.dtype == ml_dtypes.bfloat16 and not block.any()
  assert grown < 256 << 20, f'peak RSS grew by {grown} bytes for a 400-byte slice'


def resident_file_bytes():
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) << 10 for line in f if line.startswith('RssFile:'))


def test_read_pages_do_not_stay_resident(tmp_path):
  tensors = sparse_checkpoint(tmp_path, 1 << 12, 1 << 15)  # 256 MiB
  before = resident_file_bytes()
  for start in range(0, 1 << 12, 1 << 10):
    assert not tensors.slice('big')[start:start + (1 << 10)].any()
  assert not tensors.array('big').any()
  grown = resident_file_bytes() - before
  assert grown < 32 << 20, f'{grown} bytes of the file stay mapped after reading it'


@pytest.fixture
def escaping_index(tmp_path):
  """An index in tmp_path/hf whose shard is a valid file outside that folder, in tmp_path/ok."""
  hf, ok = tmp_path / 'hf', tmp_path / 'ok'
  write(ok, {'w': np.ones(3, np.float32)}, 1 << 62)
  hf.mkdir()

  def point_to(shard):
    path = hf / safetensors_io.INDEX_NAME
    path.write_text(json.dumps({'weight_map': {'w': shard}}))
    return path
  return point_to


@pytest.mark.parametrize('shard', ['../ok/model.safetensors', '/etc/passwd',
                                   'sub/model.safetensors', '..\\ok\\model.safetensors', '..', ''])
def test_index_cannot_lead_out_of_its_folder(escaping_index, shard, monkeypatch):
  index_path = escaping_index(shard)
  opened = []
  monkeypatch.setattr(safetensors_io.safetensors, 'safe_open',
                      lambda path, *args: opened.append(path))
  with pytest.raises(safetensors_io.FormatError) as e:
    safetensors_io.Checkpoint(str(index_path.parent))
  assert str(e.value) == (f"{index_path}: weight_map['w'] is {shard!r}; expected the name of a "
                          f'file in {index_path.parent}')
  assert not opened


def test_import_refuses_an_index_that_leads_out(tmp_path):
  ok, hf = tmp_path / 'ok', tmp_path / 'hf'
  shutil.copytree(official_tiny.DIR, ok)
  hf.mkdir()
  shutil.copy(ok / 'config.json', hf / 'config.json')
  keys = safetensors_io.Checkpoint(str(ok)).keys()
  (hf / safetensors_io.INDEX_NAME).write_text(
      json.dumps({'weight_map': {k: '../ok/model.safetensors' for k in keys}}))
  with pytest.raises(convert.CheckpointError, match=r"index.json: weight_map\['.*'\] is "
                     r"'../ok/model.safetensors'; expected the name of a file in"):
    convert.import_checkpoint(str(hf), str(tmp_path / 'ckpt'))
  assert not (tmp_path / 'ckpt').exists()


def refused(folder, match):
  with pytest.raises(safetensors_io.FormatError, match=match) as e:
    safetensors_io.Checkpoint(str(folder))
  assert '\n' not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__
  return str(e.value)


def test_truncated_file_names_the_file_and_tensor(tmp_path):
  write(tmp_path, TENSORS, 1 << 62)
  path = tmp_path / 'model.safetensors'
  path.write_bytes(path.read_bytes()[:-1000])
  # The 1000 bytes cut hold the small tensors written after bf16, and bf16's end.
  refused(tmp_path, rf"^{re.escape(str(path))}: tensor 'bf16' ends at byte \d+ of the data "
          r'section but the file holds \d+ \(truncated\?\)$')


@pytest.mark.parametrize('content', [b'', b'\x05\x00', b'\x20' + b'\x00' * 7 + b'not json at all',
                                     b'\xff' * 8 + b'{}'])
def test_corrupt_file_names_the_file(tmp_path, content):
  path = tmp_path / 'model.safetensors'
  path.write_bytes(content)
  message = refused(tmp_path, rf'^{re.escape(str(path))}: not a readable safetensors file \(.+\)$')
  assert 'SafetensorError' not in message


def test_unsupported_dtype_is_named(tmp_path):
  save_file({'w': np.zeros(2, np.uint16)}, str(tmp_path / 'model.safetensors'))
  tensors = safetensors_io.Checkpoint(str(tmp_path))
  with pytest.raises(safetensors_io.FormatError, match=r"model.safetensors: tensor 'w' has dtype "
                     r'U16; expected one of F64, F32'):
    tensors.dtype('w')
