"""Small files written so that an interrupted write never leaves a partial one behind, the names
that may be given to them, and generated sections of hand-written pages."""

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


def replace_section(path: str, begin: str, end: str, section: str, write: bool = True) -> bool:
  """Replaces what lies between the `begin` and `end` marker lines of `path` (markers kept) with
  `section`; whether that changed the file. Raises ValueError unless each marker is there once,
  `begin` first."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  counts = {marker: text.count(marker) for marker in (begin, end)}
  if list(counts.values()) != [1, 1] or text.index(begin) > text.index(end):
    raise ValueError(f'{path} needs one {begin} line and one {end} line after it; found '
                     + ', '.join(f'{n} x {marker}' for marker, n in counts.items()))
  before, rest = text.split(begin)
  _, after = rest.split(end)
  updated = f'{before}{begin}\n{section}{end}{after}'
  if write and updated != text:
    write_atomically(path, updated)
  return updated != text
