"""The launchers run the same command on every worker: checked with stand-ins for gcloud and srun
that record how they were called."""

import os
import shlex
import subprocess

from conftest import REPO


def fake_tools(tmp_path, *names) -> dict:
  """PATH with scripts named `names` that append their arguments, one call a line, to calls.txt."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name in names:
    tool = bin_dir / name
    tool.write_text('#!/usr/bin/env bash\nprintf "%s" "$(basename "$0")" >> "$CALLS"\n'
                    'for a in "$@"; do printf " %q" "$a" >> "$CALLS"; done\necho >> "$CALLS"\n')
    tool.chmod(0o755)
  return dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', CALLS=str(tmp_path / 'calls.txt'))


def calls(tmp_path) -> list[list[str]]:
  return [shlex.split(line) for line in (tmp_path / 'calls.txt').read_text().splitlines()]


def test_tpu_pod_ships_installs_and_runs_on_every_worker(tmp_path):
  env = fake_tools(tmp_path, 'gcloud')
  result = subprocess.run(
      [os.path.join(REPO, 'launch', 'tpu_pod.sh'), 'my-pod', 'us-east5-a', 'fac_jax.train.trainer',
       '--config=configs/fac_8b.py:stage1', '--workdir=gs://bucket/run one'],
      env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  scp, ssh = calls(tmp_path)
  assert scp[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm'] and scp[4] == 'scp'
  assert 'my-pod:fac_jax.tgz' in scp and '--worker=all' in scp and '--zone=us-east5-a' in scp
  assert ssh[4:6] == ['ssh', 'my-pod'] and '--worker=all' in ssh
  command = next(a for a in ssh if a.startswith('--command='))[len('--command='):]
  assert "'jax[tpu]==0.10.2'" in command and 'pip install -q -r requirements.txt -e .' in command
  run = shlex.split(command.split('&& ')[-1])
  assert run == ['.venv/bin/python', '-m', 'fac_jax.train.trainer', '--multihost',
                 '--config=configs/fac_8b.py:stage1', '--workdir=gs://bucket/run one']


def test_tpu_pod_refuses_missing_arguments(tmp_path):
  result = subprocess.run([os.path.join(REPO, 'launch', 'tpu_pod.sh'), 'my-pod'],
                          env=fake_tools(tmp_path, 'gcloud'), capture_output=True, text=True)
  assert result.returncode == 2 and 'usage' in result.stderr


def test_slurm_runs_one_multihost_process_per_node(tmp_path):
  env = fake_tools(tmp_path, 'srun')
  env.update(SLURM_SUBMIT_DIR=REPO, PYTHON='python3')
  result = subprocess.run(
      ['bash', os.path.join(REPO, 'launch', 'slurm.sbatch'), 'fac_jax.train.trainer',
       '--config=configs/fac_8b.py:stage2', '--workdir=/shared/run'],
      env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  (srun,) = calls(tmp_path)
  assert srun == ['srun', '--ntasks-per-node=1', '--kill-on-bad-exit=1', 'python3', '-m',
                  'fac_jax.train.trainer', '--multihost', '--config=configs/fac_8b.py:stage2',
                  '--workdir=/shared/run']


def test_tpu_pod_refuses_a_module_name_that_would_run_a_command(tmp_path):
  module = 'fac_jax.train.trainer;touch${IFS}pwned'
  result = subprocess.run(
      [os.path.join(REPO, 'launch', 'tpu_pod.sh'), 'my-pod', 'us-east5-a', module],
      env=fake_tools(tmp_path, 'gcloud'), capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert f"module '{module}' is not a Python module name" in result.stderr
  assert not (tmp_path / 'calls.txt').exists()  # nothing shipped, nothing run
