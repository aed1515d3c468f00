"""Safetensors files read lazily (memory-mapped, bfloat16 included) and written shard by shard.

The `safetensors` package's NumPy API cannot hold bfloat16, the released weights' dtype, so this
reads and writes the (simple) format directly: an 8-byte little-endian header size, a JSON
header {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes.
"""

from collections.abc import Iterable, Iterator
import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'),
    'I16': np.dtype('<i2'), 'I8': np.dtype('i1'), 'U8': np.dtype('u1'), 'BOOL': np.dtype('?'),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = 'model.safetensors.index.json'


class FormatError(ValueError):
  """A safetensors file or index that cannot be read as it claims."""


class SafetensorsFile:
  """One .safetensors file: names, shapes and dtypes from the header; tensors memory-mapped."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise FormatError(f'{path}: {size} bytes, too short for a safetensors header')
      (header_size,) = struct.unpack('<Q', prefix)
      if 8 + header_size > size:
        raise FormatError(f'{path}: header of {header_size} bytes runs past the end of the '
                          f'{size}-byte file (truncated?)')
      try:
        header = json.loads(f.read(header_size))
      except json.JSONDecodeError as e:
        raise FormatError(f'{path}: header is not valid JSON ({e})') from None
    self.metadata = header.pop('__metadata__', {})
    self._data_start = 8 + header_size
    self.entries = header
    data_size = size - self._data_start
    for name, entry in header.items():
      if entry.get('dtype') not in DTYPES:
        raise FormatError(f'{path}: tensor {name!r} has unsupported dtype {entry.get("dtype")!r}')
      begin, end = entry['data_offsets']
      expected = int(np.prod(entry['shape'])) * DTYPES[entry['dtype']].itemsize
      if end - begin != expected:
        raise FormatError(f'{path}: tensor {name!r} {entry["dtype"]}{entry["shape"]} needs '
                          f'{expected} bytes, its offsets span {end - begin}')
      if end > data_size:
        raise FormatError(f'{path}: tensor {name!r} ends at byte {end} of the data section but '
                          f'the file holds {data_size} (truncated?)')

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]['shape'])

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self.entries[name]['dtype']]

  def array(self, name: str) -> np.ndarray:
    """A read-only memory map of the tensor: pages are read only when touched."""
    begin, _ = self.entries[name]['data_offsets']
    shape = self.shape(name)
    if not np.prod(shape):
      return np.zeros(shape, self.dtype(name))
    return np.memmap(self.path, dtype=self.dtype(name), mode='r',
                     offset=self._data_start + begin, shape=shape)


class Checkpoint:
  """All tensors of a folder: `model.safetensors.index.json` with its shards, or one file."""

  def __init__(self, folder: str):
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get('weight_map')
      if not isinstance(weight_map, dict):
        raise FormatError(f'{index_path}: no "weight_map" object')
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(n for n in os.listdir(folder) if n.endswith('.safetensors'))
      if not files:
        raise FormatError(f'{folder}: neither {INDEX_NAME} nor any .safetensors file')
      weight_map = None
    self.files = {}
    for name in files:
      path = os.path.join(folder, name)
      if not os.path.exists(path):
        raise FormatError(f'{index_path}: lists {name}, which is not in {folder}')
      self.files[name] = SafetensorsFile(path)
    self._where = {}
    for name, file in self.files.items():
      for key in file.entries:
        if key in self._where:
          raise FormatError(f'{folder}: tensor {key!r} is in both {self._where[key]} and {name}')
        self._where[key] = name
    if weight_map is not None:
      wrong = sorted(k for k, f in weight_map.items() if self._where.get(k) != f)
      if wrong:
        raise FormatError(f'{index_path}: {len(wrong)} tensors are not where the index says, '
                          f'first: {wrong[:5]}')

  def keys(self) -> list[str]:
    return sorted(self._where)

  def file_of(self, key: str) -> SafetensorsFile:
    return self.files[self._where[key]]

  def shape(self, key: str) -> tuple[int, ...]:
    return self.file_of(key).shape(key)

  def array(self, key: str) -> np.ndarray:
    return self.file_of(key).array(key)


def _header(tensors: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for name, shape, dtype in tensors:
    size = int(np.prod(shape)) * dtype.itemsize
    header[name] = {'dtype': DTYPE_NAMES[dtype], 'shape': list(shape),
                    'data_offsets': [offset, offset + size]}
    offset += size
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # keep the data section 8-byte aligned
  return struct.pack('<Q', len(encoded)) + encoded


def plan_shards(tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
  """Groups (name, shape, dtype) in order into shards of at most max_shard_bytes (a larger single
  tensor gets a shard of its own)."""
  shards, current, current_bytes = [], [], 0
  for name, shape, dtype in tensors:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if current and current_bytes + size > max_shard_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append((name, tuple(shape), np.dtype(dtype)))
    current_bytes += size
  if current:
    shards.append(current)
  return shards


def _write_array(f, array: np.ndarray, dtype: np.dtype, chunk_bytes: int = 64 << 20) -> None:
  """Writes C-order bytes in chunks, so a transposed view is never copied whole."""
  if array.ndim == 0:
    f.write(np.asarray(array, dtype).tobytes())
    return
  row_bytes = max(1, array[0].size * dtype.itemsize)
  step = max(1, chunk_bytes // row_bytes)
  for start in range(0, len(array), step):
    f.write(np.ascontiguousarray(array[start:start + step], dtype=dtype).reshape(-1).view(np.uint8))


def write_sharded(folder: str, shards: list[list[tuple[str, tuple[int, ...], np.dtype]]],
                  arrays: Iterator[np.ndarray]) -> dict:
  """Writes planned shards, pulling each tensor from `arrays` in plan order (one in memory at a
  time), and the index. Returns the index dict."""
  weight_map, total = {}, 0
  for i, shard in enumerate(shards, start=1):
    name = (f'model-{i:05d}-of-{len(shards):05d}.safetensors' if len(shards) > 1
            else 'model.safetensors')
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(_header(shard))
      for key, shape, dtype in shard:
        array = next(arrays)
        if array.shape != shape:
          raise ValueError(f'tensor {key!r}: planned shape {shape}, got {array.shape}')
        _write_array(f, array, dtype)
        weight_map[key] = name
        total += array.size * dtype.itemsize
  index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
  with open(os.path.join(folder, INDEX_NAME), 'w') as f:
    json.dump(index, f, indent=2)
  return index
