"""The server tests' checkpoint: a tiny trained one (tests/chat_checkpoint.py), made once, with
its spoken questions."""

import os

import pytest

import chat_checkpoint

from fac_jax import audio


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
  """(checkpoint, [question waveforms])."""
  ckpt, question = chat_checkpoint.write(str(tmp_path_factory.mktemp('serve_ckpt')))
  folder = os.path.dirname(question)
  return ckpt, [audio.load(os.path.join(folder, f'q{i}.wav')) for i in (0, 1, 3, 4)]
