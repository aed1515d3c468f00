"""Shared test setup: offline Hugging Face, float32 matmuls, the tiny config."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
# Halves XLA:CPU compile time of the tiny model; numerics stay within the stated tolerances.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')

import jax  # noqa: E402
import pytest  # noqa: E402

from fac_jax import config as config_lib  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
  return config_lib.load(os.path.join(REPO, 'configs', 'tiny.py'))
