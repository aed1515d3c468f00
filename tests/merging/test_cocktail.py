"""Core-Cocktail as one resumable job, and the merge study: the merged model is the stated mix of
stage 1 and the base, a rerun redoes nothing, and the sweep's ends are the models it mixes; a
rerun with other settings or models refuses, naming them, or makes the parts they change again."""

import copy
import csv
import os
import shutil

import jax
import numpy as np
import pytest

import speech_corpus
from flax import nnx
from fac_jax import fingerprint, sharding
from fac_jax.checkpoints import checkpoint
from fac_jax.data import prepare
from fac_jax.merging import cocktail, merge_study, methods
from fac_jax.model import fun_audio_chat


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  from fac_jax import config as config_lib
  from conftest import REPO
  root = tmp_path_factory.mktemp('cocktail')
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'tiny.py'))
  splits = speech_corpus.write(str(root), num_train=16, num_validation=4, bad_lines=False)
  cfg.data.dir = str(root / 'prepared')
  prepare.prepare(cfg.data.dir, splits, cfg.model)
  cfg.data.update(batch_size=4, seq_len=96, num_windows=16)
  for stage in (cfg.train, cfg.cocktail.stage2):
    stage.update(steps=2, log_every=1, eval_every=2, eval_batches=1, checkpoint_every=2,
                 async_checkpointing=False)
  # M_0: another random model, standing in for the original LLM.
  base = str(root / 'base')
  model_params = nnx.to_pure_dict(nnx.split(fun_audio_chat.create(cfg.model, seed=7))[1])
  checkpoint.save_params(base, cfg.model, model_params)
  cfg.cocktail.base_checkpoint = base
  workdir = str(root / 'run')
  final = cocktail.run_cocktail(cfg, workdir)
  return cfg, base, workdir, final


def load(path):
  return jax.device_get(checkpoint.Reader(path).load())


def test_merge_mixes_stage1_with_the_base_only_where_the_base_counts(setup):
  _, base, workdir, final = setup
  m0, m1 = load(base), load(os.path.join(workdir, 'stage1', 'final'))
  merged = load(os.path.join(workdir, 'merged'))
  for part in merged:
    expected = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, m1[part], m0[part]) \
        if part == 'llm' else m1[part]
    for got, want in zip(jax.tree.leaves(merged[part]), jax.tree.leaves(expected)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert os.path.exists(final)
  assert os.path.exists(os.path.join(workdir, 'stage2', 'loss_curves.png'))


def test_a_rerun_skips_every_finished_part(setup, capsys, monkeypatch):
  cfg, _, workdir, final = setup
  monkeypatch.setattr(methods, 'merge_trees', None)  # a merge would fail
  capsys.readouterr()
  assert cocktail.run_cocktail(cfg, workdir) == final
  assert 'step 1/' not in capsys.readouterr().out


def test_merge_study_sweeps_caches_and_reports(setup, tmp_path, monkeypatch):
  cfg, base, workdir, _ = setup
  finetuned = os.path.join(workdir, 'stage1', 'final')
  args = (cfg, base, finetuned, str(tmp_path), cfg.data.dir, cfg.data.dir, [0.0, 0.5, 1.0],
          ['linear', 'slerp'], '^llm/', None, 2)
  rows = merge_study.sweep(*args)
  assert [(r['method'], r['alpha']) for r in rows] == [
      (m, a) for m in ('linear', 'slerp') for a in (0.0, 0.5, 1.0)]
  evaluate = merge_study.Evaluator(cfg, sharding.make_mesh(cfg.mesh), 2)
  alone = evaluate(checkpoint.Reader(finetuned).load(), cfg.data.dir + '@validation')
  for row in rows:
    if row['alpha'] == 1.0:  # the fine-tune itself
      assert row['task_speech_loss'] == pytest.approx(alone['speech_loss'], rel=1e-6)
      assert row['knowledge_text_loss'] == pytest.approx(alone['text_loss'], rel=1e-6)
  linear_half, slerp_half = rows[1], rows[4]
  assert linear_half['task_text_loss'] != slerp_half['task_text_loss']

  monkeypatch.setattr(methods, 'merge_trees', None)  # cached: nothing is merged again
  assert merge_study.sweep(*args) == rows
  merge_study.write_reports(rows, str(tmp_path))
  with open(tmp_path / 'merge_study.csv') as f:
    assert len(list(csv.DictReader(f))) == 6
  assert (tmp_path / 'merge_study.md').read_text().count('\n') == 8
  assert (tmp_path / 'merge_study.png').read_bytes()[:4] == b'\x89PNG'


def test_another_merge_weight_is_refused_or_remakes_the_merge_and_stage2(setup, tmp_path):
  cfg, base, workdir, _ = setup
  copied = str(tmp_path / 'run')
  shutil.copytree(workdir, copied)
  changed = copy.deepcopy(cfg)
  changed.cocktail.alpha = 0.25
  merged = os.path.join(copied, 'merged')
  with pytest.raises(fingerprint.Mismatch, match=rf'^{merged} was made with other settings '
                                                 r'\(config\.cocktail\.alpha: 0\.5 -> 0\.25\)'):
    cocktail.run_cocktail(changed, copied)
  before = load(os.path.join(copied, 'stage2', 'final'))
  final = cocktail.run_cocktail(changed, copied, on_mismatch='redo')
  m0, m1 = load(base), load(os.path.join(copied, 'stage1', 'final'))
  for got, a, b in zip(*(jax.tree.leaves(tree['llm']) for tree in (load(merged), m1, m0))):
    np.testing.assert_allclose(got, 0.25 * a + 0.75 * b, rtol=1e-6, atol=1e-7)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(load(final)),
                                                      jax.tree.leaves(before)))


def test_merge_study_measures_again_when_a_model_changes(setup, tmp_path):
  cfg, base, workdir, _ = setup
  args = dict(workdir=str(tmp_path), knowledge_data=cfg.data.dir, task_data=cfg.data.dir,
              alphas=[1.0], methods=['linear'], include='^llm/', eval_batches=1)
  stage1, merged = os.path.join(workdir, 'stage1', 'final'), os.path.join(workdir, 'merged')
  first = merge_study.sweep(cfg, base, stage1, **args)
  with pytest.raises(fingerprint.Mismatch, match=r'results\.json was made with other settings '
                                                 r'\(inputs\.finetuned: '):
    merge_study.sweep(cfg, base, merged, on_mismatch='refuse', **args)
  again = merge_study.sweep(cfg, base, merged, **args)
  assert again[0]['task_speech_loss'] != first[0]['task_speech_loss']
