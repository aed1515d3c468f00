"""Fingerprints of what made a result: its settings (the part of the resolved config a stage reads,
and the fingerprints of its inputs) and a stable hash of them, recorded with the result so that a
rerun reuses it only when the same settings would make it again. On a mismatch a rerun redoes the
result or refuses, naming the settings that differ (`on_mismatch`: 'redo' or 'refuse')."""

import hashlib
import json
import os
import subprocess

import jax
import ml_collections

from fac_jax import files

FILE = 'fingerprint.json'  # a folder's record (a checkpoint, a trainer workdir)
ON_MISMATCH = ('redo', 'refuse')
_UNSET = '<unset>'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mismatch(ValueError):
  """A result was made with other settings and on_mismatch is 'refuse'; the message names them."""


def plain(value):
  """Settings as JSON values: ConfigDicts as dicts, tuples as lists."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  return value


def digest(value) -> str:
  """A stable hash of settings (the order of dict keys does not count)."""
  text = json.dumps(plain(value), sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def of_files(paths) -> str:
  """A hash of the files' contents, in the given order."""
  hasher = hashlib.sha256()
  for path in paths:
    with open(path, 'rb') as f:
      hasher.update(hashlib.sha256(f.read()).digest())
  return hasher.hexdigest()[:16]


def of_folder(folder: str) -> str:
  """The fingerprint a folder made here records; for one made elsewhere (an imported
  checkpoint), a hash of its file names, sizes and modification times."""
  record = os.path.join(folder, FILE)
  if os.path.exists(record):
    with open(record, encoding='utf-8') as f:
      return json.load(f)['fingerprint']
  listing = []
  for root, _, names in os.walk(folder):
    for name in names:
      stat = os.stat(os.path.join(root, name))
      listing.append((os.path.relpath(os.path.join(root, name), folder), stat.st_size,
                      stat.st_mtime_ns))
  return digest(sorted(listing))


def _flatten(value, prefix: str = '') -> dict:
  if isinstance(value, dict) and value:
    flat = {}
    for key, item in value.items():
      flat.update(_flatten(item, f'{prefix}.{key}' if prefix else key))
    return flat
  return {prefix: value}


def _shown(value) -> str:
  text = value if value == _UNSET else json.dumps(value)
  return text if len(text) <= 40 else text[:37] + '...'


def differences(recorded: dict | None, settings: dict) -> list[str]:
  """'key: recorded -> now' for every setting that differs from those a result was made with
  (`recorded`; None when the result records none)."""
  if recorded is None:
    return ['no settings recorded']
  before, now = _flatten(plain(recorded)), _flatten(plain(settings))
  return [f'{key}: {_shown(before.get(key, _UNSET))} -> {_shown(now.get(key, _UNSET))}'
          for key in sorted(before.keys() | now.keys())
          if before.get(key, _UNSET) != now.get(key, _UNSET)]


def decide(found: list[str], on_mismatch: str, what: str) -> bool:
  """True when nothing differs (the result can be reused). Otherwise 'redo' says what differs and
  returns False (the caller remakes the result); 'refuse' raises Mismatch naming it."""
  if on_mismatch not in ON_MISMATCH:
    raise ValueError(f'on_mismatch={on_mismatch!r}; expected one of {list(ON_MISMATCH)}')
  if not found:
    return True
  shown = '; '.join(found[:6]) + (f'; and {len(found) - 6} more' if len(found) > 6 else '')
  if on_mismatch == 'refuse':
    raise Mismatch(f'{what} was made with other settings ({shown}); --on_mismatch=redo remakes it')
  if jax.process_index() == 0:
    print(f'{what} was made with other settings ({shown}): remaking it', flush=True)
  return False


def reuse(recorded: dict | None, settings: dict, on_mismatch: str, what: str) -> bool:
  """decide() on the differences between `recorded` and `settings`."""
  return decide(differences(recorded, settings), on_mismatch, what)


def read(path: str) -> dict | None:
  """The settings recorded in a fingerprint file, None when there is none."""
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)['settings']


def write(path: str, settings: dict) -> None:
  files.write_atomically(path, json.dumps({'fingerprint': digest(settings),
                                           'settings': plain(settings)}, indent=1, sort_keys=True))


def git_state(repo: str = REPO) -> dict:
  """{'commit': HEAD's hash, 'dirty': whether tracked or untracked files differ from it}; both None
  outside a git checkout."""
  git = lambda *args: subprocess.run(['git', '-C', repo, *args], capture_output=True, text=True)
  head = git('rev-parse', 'HEAD')
  if head.returncode:
    return {'commit': None, 'dirty': None}
  return {'commit': head.stdout.strip(), 'dirty': bool(git('status', '--porcelain').stdout)}
