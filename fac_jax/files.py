"""Small files written so that an interrupted write never leaves a partial one behind."""

import os


def write_atomically(path: str, data: str | bytes) -> None:
  """Writes `data` to a temporary name beside `path`, then renames it over `path`."""
  tmp = f'{path}.tmp'
  with open(tmp, 'wb' if isinstance(data, bytes) else 'w',
            **({} if isinstance(data, bytes) else {'encoding': 'utf-8'})) as f:
    f.write(data)
  os.replace(tmp, path)
