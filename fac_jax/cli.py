"""What the command-line tools share: logs at WARNING unless --verbosity asks for more (orbax logs
every checkpoint read and write at INFO), and a full disk said in one last line, not a traceback.

  def run():
    cli.run(main)   # instead of absl's app.run(main)
"""

import errno
import os
import re
import sys

from absl import app, flags, logging


def disk_full(error: BaseException | None) -> str | None:
  """'no space left on device writing PATH' if `error`, or one it was raised from or while
  handling, is a full disk: an OSError with ENOSPC, or tensorstore's RESOURCE_EXHAUSTED as orbax
  raises it; else None."""
  full, path, seen = False, None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error)
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or \
        'No space left on device' in text:
      # tensorstore quotes the database folder, then the file it failed to write
      full, path = True, path or getattr(error, 'filename', None) or (
          [None] + re.findall(r'"(/[^"]*)"', text))[-1]
    error = error.__cause__ or error.__context__
  return ('no space left on device' + (f' writing {path}' if path else '')) if full else None


def run(main) -> None:
  """app.run(main), with logs at WARNING unless --verbosity is given and a full disk reported as
  the one last line."""

  def quiet_main(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except Exception as e:
      message = disk_full(e)
      if message is None:
        raise
      print(f'error: {message}; free some space and run it again', file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(1)  # now: exit handlers and writer threads would fail on the full disk after it

  app.run(quiet_main)
