"""README's fine-tuning workflow end to end, as notebooks/fine_tune.ipynb runs it on the official
tiny checkpoint: import, a manifest from a folder of recordings, prepare, LoRA steps, chat, fold,
export. The export re-imports to the folded weights, and differs from the release only in the
tensors the adapters were applied to."""

import os
import re

import jax
import numpy as np

from conftest import REPO, run_notebook

from fac_jax.checkpoints import checkpoint, convert, safetensors_io

# The LLM projections configs/finetune.py adapts, as the official layout names them.
ADAPTED = re.compile(r'^language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|'
                     r'mlp\.(gate|up|down)_proj)\.weight$')


def test_notebook_imports_tunes_folds_and_exports(tmp_path, monkeypatch, capsys):
  work = str(tmp_path / 'work')
  monkeypatch.setenv('FAC_JAX_WORKDIR', work)
  run_notebook(os.path.join(REPO, 'notebooks', 'fine_tune.ipynb'))
  shown = capsys.readouterr().out
  assert 'wrote' in shown and 'conversations from' in shown  # the manifest step said what it did

  reimported = convert.import_checkpoint(os.path.join(work, 'exported'), str(tmp_path / 'again'))
  tuned = jax.device_get(checkpoint.Reader(os.path.join(work, 'tuned')).load())
  again = jax.device_get(checkpoint.Reader(reimported).load())
  for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)

  release = safetensors_io.Checkpoint(os.path.join(work, 'release'))
  exported = safetensors_io.Checkpoint(os.path.join(work, 'exported'))
  assert set(exported.keys()) == set(release.keys())
  changed = {key for key in release.keys()
             if not np.array_equal(release.array(key), exported.array(key))}
  adapted = {key for key in release.keys() if ADAPTED.match(key)}
  assert adapted and changed == adapted
