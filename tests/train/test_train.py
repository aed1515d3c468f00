"""The trainer end to end, in subprocesses as users run it: exact resumption after SIGKILL, a
(2, 2, 2) mesh against one device, restoring onto another mesh, two processes with
jax.distributed, freezing, the non-finite guard, checkpoint retention and the logs it writes;
reruns with more steps or other settings (fingerprints), data that disagrees with the config, and
a torn metrics log."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import speech_corpus
from conftest import REPO
import paths

from fac_jax import config as config_lib, fingerprint
from fac_jax.checkpoints import checkpoint
from fac_jax.data import prepare
from fac_jax.train import steps, trainer

STEPS = 6
# Every run: 6 steps of stage 1 (the schedule depends on the step count), a checkpoint every 3.
COMMON = ['--config.train.steps=6', '--config.train.checkpoint_every=3',
          '--config.train.log_every=1', '--config.train.eval_every=6',
          '--config.train.eval_batches=1', '--config.train.keep_checkpoints=1',
          '--config.data.batch_size=4', '--config.data.seq_len=96',
          '--config.data.num_windows=16']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'tiny.py'))
  root = str(tmp_path_factory.mktemp('corpus'))
  splits = speech_corpus.write(root, num_train=40, num_validation=6, bad_lines=False)
  prepare.prepare(os.path.join(root, 'prepared'), splits, cfg.model)
  return os.path.join(root, 'prepared')


def train_command(workdir, data_dir, *extra, stage='stage1'):
  return [sys.executable, '-m', 'fac_jax.train.trainer', f'--config={REPO}/configs/tiny.py:{stage}',
          f'--workdir={workdir}', f'--config.data.dir={data_dir}', *COMMON, *extra]


def env_with(devices: int = 1) -> dict:
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                                    '--xla_backend_optimization_level=0', JAX_PLATFORMS='cpu')


def run_training(*args, devices: int = 1, **kwargs):
  result = subprocess.run(train_command(*args, **kwargs), env=env_with(devices),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def train_losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {e['step']: e['train/loss'] for e in map(json.loads, f) if 'train/loss' in e}


def final_params(workdir) -> dict:
  return jax.device_get(checkpoint.Reader(os.path.join(workdir, 'final')).load())


def max_relative_difference(a: dict, b: dict) -> float:
  diffs = jax.tree.map(lambda x, y: float(np.abs(x - y).max() / (np.abs(y).max() + 1e-12)), a, b)
  return max(jax.tree.leaves(diffs))


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  result = run_training(workdir, data_dir)
  return workdir, result.stdout


def test_uninterrupted_run_writes_logs_checkpoints_and_plots(uninterrupted):
  workdir, stdout = uninterrupted
  assert 'step 6/6' in stdout and 'ETA' in stdout and 'positions/s' in stdout
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert all(np.isfinite(list(losses.values())))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    entries = list(map(json.loads, f))
  # Conversations that fit no row are counted at every logged step and in the summary.
  dropped = [e['train/dropped'] for e in entries if 'train/loss' in e]
  assert len(dropped) == STEPS and dropped == sorted(dropped)
  assert (f'finished at step 6 in {workdir}; {dropped[-1]:g} conversations read fit no row of '
          'data.seq_len=96 positions and data.num_windows=16 mel windows') in stdout
  evals = [e for e in entries if 'eval/loss' in e]
  assert [e['step'] for e in evals] == [6] and 0 <= evals[0]['eval/text_accuracy'] <= 1
  assert any(name.startswith('events.out.tfevents')
             for name in os.listdir(os.path.join(workdir, 'tensorboard')))
  with open(os.path.join(workdir, 'loss_curves.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # keep_checkpoints=1 plus the best by eval loss (step 6 is both): only step 6 is left.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['6']


def test_sigkill_then_resume_repeats_the_trajectory_exactly(uninterrupted, data_dir, tmp_path):
  reference, _ = uninterrupted
  workdir = str(tmp_path / 'killed')
  process = subprocess.Popen(train_command(workdir, data_dir), env=env_with(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
  committed = os.path.join(workdir, 'checkpoints', '3')
  deadline = time.time() + 300
  while not os.path.exists(committed) and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert os.path.exists(committed) and not os.path.exists(os.path.join(workdir, 'final'))
  result = run_training(workdir, data_dir)
  assert 'resumed from step 3' in result.stdout
  assert train_losses(workdir) == train_losses(reference)  # step for step, bit for bit
  assert max_relative_difference(final_params(workdir), final_params(reference)) == 0.0


def test_2x2x2_mesh_matches_one_device_and_resumes_on_another_mesh(uninterrupted, data_dir,
                                                                   tmp_path):
  reference, _ = uninterrupted
  workdir = str(tmp_path / 'sharded')
  run_training(workdir, data_dir, '--config.mesh.data=2', '--config.mesh.fsdp=2',
               '--config.mesh.tensor=2', '--config.train.run_steps=3', devices=8)
  assert not os.path.exists(os.path.join(workdir, 'final'))
  result = run_training(workdir, data_dir)  # steps 4-6 on one device from the 8-device save
  assert 'resumed from step 3' in result.stdout
  losses, expected = train_losses(workdir), train_losses(reference)
  for step in range(1, STEPS + 1):
    assert losses[step] == pytest.approx(expected[step], rel=1e-5), step
  assert max_relative_difference(final_params(workdir), final_params(reference)) < 1e-4


def test_two_processes_with_jax_distributed_match_one_process(data_dir, tmp_path):
  workdir = str(tmp_path / 'two_processes')
  port = 20000 + os.getpid() % 20000
  processes = [subprocess.Popen(
      train_command(workdir, data_dir, '--multihost', f'--coordinator_address=127.0.0.1:{port}',
                    '--num_processes=2', f'--process_id={i}', '--config.train.steps=2'),
      env=env_with(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  assert 'in 2 process(es)' in outputs[0][0] and 'step 2/2' in outputs[0][0]
  assert 'step' not in outputs[1][0]  # only process 0 prints progress
  reference = str(tmp_path / 'reference.npz')
  summary = json.loads(subprocess.run(
      [sys.executable, os.path.join(paths.TESTS, 'two_process_reference.py'),
       f'--config={REPO}/configs/tiny.py:stage1', f'--config.data.dir={data_dir}', *COMMON,
       '--config.train.steps=2', f'--out={reference}'], env=env_with(), capture_output=True,
      text=True, timeout=600, check=True, cwd=REPO).stdout.strip().splitlines()[-1])
  losses = train_losses(workdir)
  assert [losses[1], losses[2]] == pytest.approx(summary['losses'], rel=1e-5)
  trained = {trainer.optim.path_name(path): leaf for path, leaf in
             jax.tree_util.tree_flatten_with_path(final_params(workdir))[0]}
  with np.load(reference) as expected:
    assert sorted(expected.files) == sorted(trained)
    assert max_relative_difference(trained, dict(expected)) < 1e-4


def test_prealign_leaves_the_llm_bit_identical(data_dir, tmp_path, tiny_config):
  workdir = str(tmp_path / 'prealign')
  run_training(workdir, data_dir, '--config.train.steps=2', stage='prealign')
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'tiny.py:prealign'))
  trained = final_params(workdir)
  # The trainer's random start: the same seed through the same initialiser.
  optimizer = trainer.optim.make_optimizer(cfg.train, trained)
  _, initial, _, _, _ = steps.init_sharded(cfg.model, optimizer,
                                           trainer.sharding.make_mesh(cfg.mesh), cfg.seed)
  initial = jax.device_get(initial)
  for part in initial:
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), initial[part],
                                        trained[part]))
    if part == 'llm':
      assert all(same)
    else:
      assert not any(same), part  # every trained leaf moved


def test_non_finite_steps_are_skipped_then_training_stops(data_dir, tmp_path, tiny_config,
                                                          monkeypatch):
  tiny_config.data.update(dir=data_dir, batch_size=4, seq_len=96, num_windows=16)
  tiny_config.train.update(steps=10, max_skipped_in_row=3, log_every=1)
  original = steps.jit_train_step

  def poisoned(*args, **kwargs):
    step, batch_shardings = original(*args, **kwargs)
    return lambda params, opt_state, batch: step(
        params, opt_state, dict(batch, mel=batch['mel'] * np.nan)), batch_shardings

  monkeypatch.setattr(steps, 'jit_train_step', poisoned)
  run = trainer.Trainer(tiny_config, str(tmp_path))
  with pytest.raises(trainer.TrainingError, match='3 steps in a row had a non-finite loss'):
    run.run()


def test_dpo_stage_trains_against_its_frozen_reference(uninterrupted, data_dir, tmp_path,
                                                       tiny_config):
  root = str(tmp_path / 'prefs')
  prefs = speech_corpus.write_preferences(root, tuple(tiny_config.dpo.tasks), num_pairs=8,
                                          bad_lines=False)
  prepared = os.path.join(root, 'prepared')
  prepare.prepare(prepared, {'prefs': prefs}, tiny_config.model,
                  tokenizer_folder=os.path.join(data_dir, prepare.TOKENIZER_FOLDER),
                  speech_tokenizer_file=os.path.join(data_dir, prepare.SPEECH_TOKENIZER_FILE))
  reference = os.path.join(uninterrupted[0], 'final')
  workdir = str(tmp_path / 'dpo')
  result = run_training(workdir, prepared, '--config.data.train_split=prefs',
                        '--config.data.eval_split=prefs', '--config.data.seq_len=160',
                        f'--config.train.init_checkpoint={reference}',
                        '--config.train.steps=4', '--config.train.eval_every=4',
                        '--config.train.learning_rate=1e-3', stage='dpo')
  assert 'step 4/4' in result.stdout and 'accuracy' in result.stdout
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    entries = list(map(json.loads, f))
  first_eval = [e for e in entries if 'eval/dpo_loss' in e][-1]
  assert 0 < first_eval['eval/dpo_loss'] < np.log(2)  # trained away from the reference
  assert first_eval['eval/accuracy'] > 0.5
  assert max_relative_difference(final_params(workdir), final_params(uninterrupted[0])) > 0
  # For chat: the pairs' tasks (as many pairs each: in manifest order), then its init's.
  tasks = list(checkpoint.chat_settings(os.path.join(workdir, 'final'))['tasks'])
  assert tasks == [*tiny_config.dpo.tasks, 'spoken_qa', 'text_qa']


def recorded_steps(final: str) -> int:
  with open(os.path.join(final, fingerprint.FILE)) as f:
    return json.load(f)['settings']['config']['train']['steps']


def test_more_steps_continue_the_run_and_final_holds_the_last_step(uninterrupted, data_dir,
                                                                    tmp_path):
  reference, _ = uninterrupted
  workdir = str(tmp_path / 'longer')
  shutil.copytree(reference, workdir)
  result = run_training(workdir, data_dir, '--config.train.steps=8')
  assert 'resumed from step 6' in result.stdout and 'step 8/8' in result.stdout
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 9))
  assert {step: losses[step] for step in range(1, 7)} == train_losses(reference)
  assert recorded_steps(os.path.join(workdir, 'final')) == 8
  assert max_relative_difference(final_params(workdir), final_params(reference)) > 0


def test_other_settings_are_refused_naming_them_or_trained_anew_with_redo(uninterrupted,
                                                                           data_dir, tmp_path):
  reference, _ = uninterrupted
  workdir = str(tmp_path / 'changed')
  shutil.copytree(reference, workdir)
  command = train_command(workdir, data_dir, '--config.model.llm.num_layers=2')
  refused = subprocess.run(command, env=env_with(), capture_output=True, text=True, timeout=600,
                           cwd=REPO)
  assert refused.returncode != 0
  assert refused.stderr.strip().splitlines()[-1].startswith(
      f'error: {workdir} was made with other settings (config.model.llm.num_layers: 3 -> 2); '
      '--on_mismatch=redo remakes it')
  assert max_relative_difference(final_params(workdir), final_params(reference)) == 0.0
  result = run_training(workdir, data_dir, '--config.model.llm.num_layers=2', '--on_mismatch=redo')
  assert 'resumed' not in result.stdout and 'remaking it' in result.stdout
  assert checkpoint.load_config(os.path.join(workdir, 'final')).llm.num_layers == 2
  assert sorted(train_losses(workdir)) == list(range(1, STEPS + 1))


@pytest.mark.parametrize('field, value, message', [
    ('encoder.num_mel_bins', 80, 'num_mel_bins is 40, but model.encoder.num_mel_bins has 80'),
    ('tokens.sil', 249, "special_token_ids is {'sil': 259}, but model.tokens has {'sil': 249}"),
    ('speech.bos_id', 50, 'speech_codebook_size is 73, but model.speech.bos_id has room for 50'),
    ('llm.vocab_size', 200, 'text_vocab_size is 260, but model.llm.vocab_size has room for 200'),
])
def test_data_that_disagrees_with_the_config_is_refused_before_training(
    data_dir, tiny_config, tmp_path, field, value, message):
  tiny_config.data.dir = data_dir
  part, name = field.split('.')
  tiny_config.model[part][name] = value
  report = os.path.join(data_dir, prepare.REPORT_FILE)
  with pytest.raises(prepare.DatasetError, match=f'^{report}: {message}$'):
    trainer.Trainer(tiny_config, str(tmp_path))


def test_a_tokenizer_changed_after_preparation_is_refused(data_dir, tiny_config, tmp_path):
  copied = str(tmp_path / 'data')
  shutil.copytree(data_dir, copied)
  with open(os.path.join(copied, prepare.TOKENIZER_FOLDER, 'tokenizer.json'), 'a') as f:
    f.write('\n')
  tiny_config.data.dir = copied
  with pytest.raises(prepare.DatasetError, match=rf'prepare_report.json: text_tokenizer is \w+, '
                                                 rf'but {copied}/tokenizer has \w+$'):
    trainer.Trainer(tiny_config, str(tmp_path / 'run'))


def test_a_torn_last_metrics_line_is_left_out_and_any_other_bad_line_named(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train/loss": 2.5}\n{"step": 2, "train/loss": 2.0}\n{"step": 3, "tr')
  log = trainer.MetricsLog(str(tmp_path), resume_step=3)
  log.close()
  assert [e['step'] for e in log.entries] == [1, 2]
  assert path.read_text().splitlines() == ['{"step": 1, "train/loss": 2.5}',
                                           '{"step": 2, "train/loss": 2.0}']
  path.write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
  with pytest.raises(trainer.TrainingError, match=rf'^{path}:2: not a metrics entry'):
    trainer.MetricsLog(str(tmp_path), resume_step=3)
