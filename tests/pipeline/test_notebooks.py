"""Every notebook's code cells run top to bottom (shell and magic lines skipped). The quick start
runs the whole pipeline; test_pipeline runs it on the pipeline it has just built. The fine-tuning
notebook is run, and its outputs checked, by tests/train/test_fine_tune_workflow.py."""

import glob
import os

import pytest

from conftest import REPO, run_notebook

NOTEBOOKS = sorted(p for p in glob.glob(os.path.join(REPO, 'notebooks', '*.ipynb'))
                   if os.path.basename(p) not in ('quick_start.ipynb', 'fine_tune.ipynb'))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
  run_notebook(path)
