"""Every notebook's code cells run top to bottom (shell and magic lines skipped)."""

import glob
import json
import os

import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'notebooks', '*.ipynb')))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
  monkeypatch.chdir(os.path.dirname(path))
  with open(path) as f:
    cells = [c for c in json.load(f)['cells'] if c['cell_type'] == 'code']
  assert cells, f'{path} has no code cells'
  namespace = {}
  for i, cell in enumerate(cells):
    source = ''.join(line for line in cell['source'] if not line.lstrip().startswith(('!', '%')))
    exec(compile(source, f'{os.path.basename(path)} cell {i}', 'exec'), namespace)
