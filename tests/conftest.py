"""Shared test setup: offline Hugging Face, float32 matmuls, the tiny config."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
# With libtpu installed (requirements-tpu.txt) every JAX process would try the TPU backend first
# and take its lockfile: the tests mean CPU; the ahead-of-time ones load libtpu's compiler anyway.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# Halves XLA:CPU compile time of the tiny model; numerics stay within the stated tolerances.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')

import jax  # noqa: E402
import pytest  # noqa: E402

from fac_jax import config as config_lib  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_host_devices(script_name: str, devices: int = 8, args: tuple = ()) -> dict:
  """Runs tests/<script_name> in a process that sees `devices` host devices; its JSON summary."""
  import json
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                                   '--xla_backend_optimization_level=0')
  script = os.path.join(os.path.dirname(__file__), script_name)
  out = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def run_notebook(path: str) -> dict:
  """Runs a notebook's code cells top to bottom in its folder (shell and magic lines skipped);
  returns the namespace they ran in."""
  import json
  with open(path) as f:
    cells = [c for c in json.load(f)['cells'] if c['cell_type'] == 'code']
  assert cells, f'{path} has no code cells'
  namespace = {}
  cwd = os.getcwd()
  os.chdir(os.path.dirname(path))
  try:
    for i, cell in enumerate(cells):
      source = ''.join(line for line in cell['source']
                       if not line.lstrip().startswith(('!', '%')))
      exec(compile(source, f'{os.path.basename(path)} cell {i}', 'exec'), namespace)
  finally:
    os.chdir(cwd)
  return namespace


@pytest.fixture
def tiny_config():
  return config_lib.load(os.path.join(REPO, 'configs', 'tiny.py'))


@pytest.fixture(scope='module')
def golden_generation(tmp_path_factory):
  """The imported golden checkpoint with its generation prompt and reference outputs."""
  import official_tiny
  return official_tiny.generation_setup(str(tmp_path_factory.mktemp('gen') / 'ckpt'))
