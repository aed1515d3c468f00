"""Small files written so that an interrupted write never leaves a partial one behind, and the
names that may be given to them."""

import os


def write_atomically(path: str, data: str | bytes) -> None:
  """Writes `data` to a temporary name beside `path`, then renames it over `path`."""
  tmp = f'{path}.tmp'
  with open(tmp, 'wb' if isinstance(data, bytes) else 'w',
            **({} if isinstance(data, bytes) else {'encoding': 'utf-8'})) as f:
    f.write(data)
  os.replace(tmp, path)


def is_plain_name(name: str) -> bool:
  """Whether `name` names one entry inside a folder: not empty, '.' or '..', no path separator."""
  return bool(name) and name not in ('.', '..') and not any(c in name for c in '/\\\0')
