"""The main job end to end at a reduced size: every stage runs, every output exists and its metrics
are finite and in range; chat talks to its model; a rerun resumes without redoing anything, and
one with other settings refuses, naming them, or redoes what they change; a held-out question set
checks the scoring against hand-built answers."""

import copy
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

import paths

from fac_jax import fingerprint
from fac_jax.checkpoints import checkpoint, whisper
from fac_jax.data import synth
from fac_jax.evaluation import spoken_eval
from fac_jax.pipeline import main_job
from fac_jax.speech import speech_tokenizer
from conftest import run_notebook

REPO = paths.REPO


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  from fac_jax import config as config_lib
  cfg = main_job.smoke(config_lib.load(os.path.join(REPO, 'configs', 'tiny.py')))
  workdir = str(tmp_path_factory.mktemp('pipeline'))
  return cfg, workdir, main_job.run_pipeline(cfg, workdir)


def test_every_stage_leaves_its_outputs(finished):
  cfg, workdir, out = finished
  for name, path in main_job.MODELS.items():
    assert os.path.exists(os.path.join(workdir, path, 'config.json')), name
  for stage in ('base', 'prealign', 'cocktail/stage1', 'cocktail/stage2', 'dpo'):
    assert os.path.getsize(os.path.join(workdir, stage, 'loss_curves.png')) > 1000, stage
  for name in ('stages.png', 'merge_sweep/merge_study.png', 'merge_sweep/merge_study.csv'):
    assert os.path.getsize(os.path.join(workdir, name)) > 100, name
  report = open(os.path.join(workdir, 'report.md')).read()
  assert report == out['report']
  assert all(f'| {name} |' in report for name in main_job.MODELS)
  samples = sorted(os.listdir(os.path.join(workdir, 'samples')))
  assert len(samples) == 2 * cfg.pipeline.samples
  for name in samples:
    waveform, rate = sf.read(os.path.join(workdir, 'samples', name))
    assert rate == 16000 and len(waveform) > 0 and np.isfinite(waveform).all(), name


def test_every_model_keeps_whisper_in_its_encoder_and_trains_its_projection(finished):
  """The pipeline's encoder starts from Whisper tiny.en and stays frozen through every stage (the
  merge included); its projection to the LLM width trains."""
  cfg, workdir, _ = finished
  assert cfg.pipeline.encoder.pretrained == 'whisper_tiny_en'
  trunk = whisper.trunk_from_whisper(whisper.read_weights(
      os.path.join(whisper.default_model_dir(), 'model.bin')))
  encoders = {name: checkpoint.Reader(os.path.join(workdir, path)).load()['continuous_encoder']
              for name, path in main_job.MODELS.items()}
  for name, encoder in encoders.items():
    for (key, expected), got in zip(jax.tree_util.tree_flatten_with_path(trunk)[0],
                                    jax.tree.leaves({k: encoder[k] for k in trunk})):
      np.testing.assert_array_equal(np.asarray(got), expected, err_msg=f'{name} {key}')
  assert not np.array_equal(encoders['M_0']['proj']['kernel'], encoders['dpo']['proj']['kernel'])


def test_stage_data_sizes_apply_to_their_stage_alone(tiny_config):
  cfg = main_job.pipeline_model(tiny_config)
  dpo = main_job.stage_config(cfg, 'dpo', 'data', 'prefs_train', 'prefs_validation')
  stage1 = main_job.stage_config(cfg, 'stage1', 'data', 'train', 'validation')
  assert (dpo.data.seq_len, dpo.data.num_windows) == (cfg.pipeline.stage_data.dpo.seq_len,
                                                      cfg.pipeline.stage_data.dpo.num_windows)
  assert (stage1.data.seq_len, stage1.data.num_windows) == (cfg.data.seq_len,
                                                            cfg.pipeline.data.num_windows)
  assert stage1.model.encoder.window_frames == cfg.pipeline.encoder.window_frames


def test_metrics_are_finite_and_in_range(finished):
  cfg, _, out = finished
  for name, result in out['results'].items():
    metrics = result['metrics']
    for key in ('transcription/wer', 'spoken_qa/accuracy', 'spoken_qa/taught_accuracy',
                'spoken_qa/text_only_accuracy', 'spoken_qa/speech_accuracy',
                'spoken_qa/speech_ceiling', 'correct_answer/accuracy', 'text_qa/accuracy',
                'speech_eval/loss', 'facts_eval/text_loss', 'preference/accuracy',
                'preference/text_likelihood_accuracy'):
      assert math.isfinite(metrics[key]), (name, key)
    for key, value in metrics.items():
      if key.endswith('accuracy') or key.endswith('ceiling'):
        assert 0 <= value <= 1, (name, key)
    assert metrics['transcription/wer'] >= 0 and metrics['speech_eval/loss'] > 0
    assert metrics['spoken_qa/questions'] == cfg.pipeline.eval_questions
    assert len(result['answers']) == 4 * cfg.pipeline.eval_questions
    spoken = [r for r in result['answers'] if r['task'] == 'spoken_qa']
    assert sum(r['taught'] for r in spoken) == -(-cfg.pipeline.eval_questions // 2), name
  # Against itself, the reference's DPO margins are exactly zero.
  assert out['results']['stage2']['metrics']['preference/margin'] == 0
  assert out['results']['stage2']['metrics']['preference/accuracy'] == 0


def test_a_rerun_resumes_without_redoing_anything(finished, capsys):
  cfg, workdir, out = finished
  before = {path: os.path.getmtime(os.path.join(workdir, path, 'config.json'))
            for path in main_job.MODELS.values()}
  again = main_job.run_pipeline(cfg, workdir)
  printed = capsys.readouterr().out
  assert 'step ' not in printed  # no training step ran
  assert before == {path: os.path.getmtime(os.path.join(workdir, path, 'config.json'))
                    for path in main_job.MODELS.values()}
  assert again['results'] == out['results']


def test_chat_talks_to_the_main_jobs_model(finished, tmp_path):
  """README's command on the job's output: the model's own prompt and voice, from its folder."""
  _, workdir, _ = finished
  question = sorted(glob.glob(os.path.join(workdir, 'samples', '*_question.wav')))[0]
  out = tmp_path / 'answer.wav'
  result = subprocess.run(
      [sys.executable, '-m', 'fac_jax.inference.chat', f'--ckpt={workdir}/dpo/final',
       f'--audio={question}', f'--out={out}', '--max_new_tokens=8'], capture_output=True,
      text=True, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"system prompt (task correct_answer): {synth.SYSTEM_PROMPTS['spoken_qa']!r}"
          in result.stderr)
  assert sf.read(out)[1] == 16000 and result.stdout.strip().splitlines()[-1].startswith('wrote')


def test_quick_start_notebook_shows_the_report_and_samples(finished, monkeypatch, capsys):
  _, workdir, out = finished
  monkeypatch.setenv('FAC_JAX_SMOKE', '1')
  monkeypatch.setenv('FAC_JAX_WORKDIR', workdir)
  namespace = run_notebook(os.path.join(REPO, 'notebooks', 'quick_start.ipynb'))
  assert 'step ' not in capsys.readouterr().out  # it resumed the finished run
  assert namespace['result']['results'] == out['results']
  assert len(namespace['samples']) == 4


def test_scoring_against_hand_built_answers(finished):
  _, workdir, _ = finished
  data_dir = os.path.join(workdir, 'prepared')
  tokenizer_file = os.path.join(data_dir, 'speech_tokenizer.npz')
  detokenizer = speech_tokenizer.GriffinLimDetokenizer.load(tokenizer_file)
  asked = [spoken_eval.Question('a', 'spoken_qa', {}, 'twenty one', None, 'm:1', taught=True),
           spoken_eval.Question('b', 'spoken_qa', {}, 'paris', None, 'm:2', taught=False),
           spoken_eval.Question('e', 'spoken_qa', {}, 'paris', None, 'm:5', taught=False),
           spoken_eval.Question('c', 'transcription', {}, 'the cat sat', None, 'm:3'),
           spoken_eval.Question('d', 'transcription', {}, 'a dog ran far', None, 'm:4')]
  empty = np.zeros(0, np.int64)
  answers = [{'text': 'Twenty-one.', 'codes': empty}, {'text': 'london', 'codes': empty},
             {'text': 'Paris!', 'codes': empty},
             {'text': 'the cat sat', 'codes': empty}, {'text': 'a dog far away', 'codes': empty}]
  result = spoken_eval.score(asked, answers, None, detokenizer)
  metrics = result['metrics']
  assert metrics['spoken_qa/accuracy'] == pytest.approx(2 / 3)
  assert (metrics['spoken_qa/taught_accuracy'], metrics['spoken_qa/text_only_accuracy']) == (1, 0.5)
  # 'a dog ran far' -> 'a dog far away': one deletion and one insertion over 7 reference words.
  assert metrics['transcription/wer'] == pytest.approx(2 / 7)
  assert [r['right'] for r in result['answers']] == [True, False, True, True, False]
  baseline = spoken_eval.majority_baseline(asked)
  assert baseline['spoken_qa/accuracy'] == pytest.approx(2 / 3)
  assert (baseline['spoken_qa/taught_accuracy'], baseline['spoken_qa/text_only_accuracy']) == (1, 1)
  json.dumps(result)


def test_questions_take_half_of_each_part_and_fill_in_where_one_runs_short():
  def asked(taught, count):
    return [spoken_eval.Question(f'{taught}{i}', 'spoken_qa', {}, 'x', None, 'm', taught=taught)
            for i in range(count)]
  by_part = {True: asked(True, 5), False: asked(False, 5)}
  assert [q.taught for q in spoken_eval._balanced(by_part, 5)] == [True] * 3 + [False] * 2
  by_part = {True: asked(True, 5), False: asked(False, 1)}
  assert [q.taught for q in spoken_eval._balanced(by_part, 5)] == [True] * 4 + [False]
  by_part = {True: asked(True, 1), False: asked(False, 5)}
  assert [q.taught for q in spoken_eval._balanced(by_part, 5)] == [True] + [False] * 4
  assert len(spoken_eval._balanced({None: asked(None, 7)}, 5)) == 5


def test_a_smoke_run_has_its_own_default_workdir():
  assert main_job.default_workdir(True) != main_job.default_workdir(False)


def test_changed_settings_are_refused_naming_them_or_redo_only_what_they_change(
    finished, tmp_path, capsys):
  """A changed model config is refused with --on_mismatch=refuse, naming it; more DPO steps
  continue that stage alone, and its evaluation and the report are made again, the other models'
  evaluations kept."""
  cfg, workdir, out = finished
  copied = str(tmp_path / 'pipeline')
  shutil.copytree(workdir, copied)
  changed = copy.deepcopy(cfg)
  changed.model.llm.num_layers = 2
  with pytest.raises(fingerprint.Mismatch, match=rf'^{copied}/base was made with other settings '
                                                 r'\(config\.model\.llm\.num_layers: 3 -> 2\)'):
    main_job.run_pipeline(changed, copied, on_mismatch='refuse')
  longer = copy.deepcopy(cfg)
  longer.pipeline.stages.dpo.steps += 2
  evaluated = {name: os.path.getmtime(os.path.join(copied, 'eval', f'{name}.json'))
               for name in main_job.MODELS}
  capsys.readouterr()
  again = main_job.run_pipeline(longer, copied)
  printed = capsys.readouterr().out
  assert 'resumed from step 4' in printed
  assert [line.split()[1] for line in printed.splitlines() if line.startswith('step ')] == ['6/6']
  with open(os.path.join(copied, 'dpo', 'final', fingerprint.FILE)) as f:
    assert json.load(f)['settings']['config']['train']['steps'] == 6
  for name in main_job.MODELS:
    kept = os.path.getmtime(os.path.join(copied, 'eval', f'{name}.json')) == evaluated[name]
    assert kept == (name != 'dpo'), name
    assert (again['results'][name] == out['results'][name]) == (name != 'dpo'), name
  with open(os.path.join(copied, 'report.md')) as f:
    report = f.read()
  assert report == again['report'] != out['report']
  metrics = again['results']['dpo']['metrics']
  assert ('| dpo | ' + ' | '.join(main_job._cell(metrics, key, fmt) for key, _, fmt in
                                  main_job.REPORT_COLUMNS) + ' |') in report.splitlines()
