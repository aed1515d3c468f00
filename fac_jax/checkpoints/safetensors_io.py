"""Safetensors folders (an index with its shards, or plain .safetensors files): read through the
`safetensors` library, whose NumPy API holds bfloat16 (ml_dtypes) and slices tensors lazily out
of a memory map; written shard by shard, one tensor in memory at a time, with the index.
"""

from collections.abc import Iterable, Iterator
import json
import os
import struct

import ml_dtypes  # also registers 'bfloat16' with NumPy, which the library's reader needs
import numpy as np
import safetensors

DTYPES = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'),
    'I16': np.dtype('<i2'), 'I8': np.dtype('i1'), 'U8': np.dtype('u1'), 'BOOL': np.dtype('?'),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = 'model.safetensors.index.json'


class FormatError(ValueError):
  """A safetensors file or index that cannot be read as it claims."""


def _cut_tensor(path: str) -> str | None:
  """Which tensor a truncated file cuts, read from its header; None if the header says nothing.

  Hand-written because the library's error for a cut file ('incomplete metadata, file not fully
  covered') names neither the tensor nor the sizes.
  """
  size = os.path.getsize(path)
  try:
    with open(path, 'rb') as f:
      (header_size,) = struct.unpack('<Q', f.read(8))
      if 8 + header_size > size:
        return None
      header = json.loads(f.read(header_size))
    data_size = size - 8 - header_size
    end, name = min((entry['data_offsets'][1], name) for name, entry in header.items()
                    if name != '__metadata__' and entry['data_offsets'][1] > data_size)
  except (struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError):
    return None
  return (f'{path}: tensor {name!r} ends at byte {end} of the data section but the file holds '
          f'{data_size} (truncated?)')


def _open(path: str):
  """The library's lazy reader of one file (`safe_open(path, 'np')`), or FormatError naming it."""
  try:
    return safetensors.safe_open(path, 'np')
  except safetensors.SafetensorError as e:
    raise FormatError(_cut_tensor(path) or f'{path}: not a readable safetensors file ({e})'
                      ) from None


def _weight_map(index_path: str) -> dict[str, str]:
  """The index's tensor -> shard map. Every shard must be a plain file name in the index's own
  folder: an index must not make us open any file outside it."""
  try:
    with open(index_path) as f:
      index = json.load(f)
  except ValueError as e:
    raise FormatError(f'{index_path}: not valid JSON ({e})') from None
  weight_map = index.get('weight_map') if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise FormatError(f'{index_path}: no "weight_map" object')
  for key, name in weight_map.items():
    if not isinstance(name, str) or name in ('', '.', '..') or any(c in name for c in '/\\\0'):
      raise FormatError(f'{index_path}: weight_map[{key!r}] is {name!r}; expected the name of a '
                        f'file in {os.path.dirname(index_path) or "."}')
  return weight_map


class Checkpoint:
  """All tensors of a folder: `model.safetensors.index.json` with its shards, or one file."""

  def __init__(self, folder: str):
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index_path):
      weight_map = _weight_map(index_path)
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(n for n in os.listdir(folder) if n.endswith('.safetensors'))
      if not files:
        raise FormatError(f'{folder}: neither {INDEX_NAME} nor any .safetensors file')
      weight_map = None
    self.folder, self._file, self._shape, self._dtype = folder, {}, {}, {}
    for name in files:
      path = os.path.join(folder, name)
      if not os.path.exists(path):
        raise FormatError(f'{index_path}: lists {name}, which is not in {folder}')
      file = _open(path)
      for key in file.keys():
        if key in self._file:
          raise FormatError(f'{folder}: tensor {key!r} is in both {self._file[key]} and {name}')
        tensor = file.get_slice(key)
        self._file[key] = name
        self._shape[key], self._dtype[key] = tuple(tensor.get_shape()), tensor.get_dtype()
    if weight_map is not None:
      wrong = sorted(k for k, f in weight_map.items() if self._file.get(k) != f)
      if wrong:
        raise FormatError(f'{index_path}: {len(wrong)} tensors are not where the index says, '
                          f'first: {wrong[:5]}')

  def keys(self) -> list[str]:
    return sorted(self._file)

  def path(self, key: str) -> str:
    return os.path.join(self.folder, self._file[key])

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shape[key]

  def dtype(self, key: str) -> np.dtype:
    if self._dtype[key] not in DTYPES:
      raise FormatError(f'{self.path(key)}: tensor {key!r} has dtype {self._dtype[key]}; '
                        f'expected one of {", ".join(DTYPES)}')
    return DTYPES[self._dtype[key]]

  # Each read opens the file afresh: the library maps the whole file while a handle lives, and
  # every page read stays resident until it is unmapped (benchmarks/convert_memory.py: import's
  # peak RSS was 6.18 GiB with one handle per file kept open, 2.9-3.7 GiB this way, as before).
  def slice(self, key: str):
    """The tensor unread: indexing it with slices reads only that part."""
    return _open(self.path(key)).get_slice(key)

  def array(self, key: str) -> np.ndarray:
    """The whole tensor, read into memory."""
    return _open(self.path(key)).get_tensor(key)


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
  time), and the index. Returns the index dict.

  Hand-written because the library's `save_file` takes a whole shard's tensors at once, so export
  would hold a shard (5 GiB by default) in memory instead of one parameter: with it,
  benchmarks/convert_memory.py's export peaked at 5.88 GiB RSS, against 2.74 GiB streaming.
  """
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
