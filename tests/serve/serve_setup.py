"""Helpers of the server tests: a tiny trained checkpoint with its spoken questions (the `trained`
fixture), the checkpoint's assets as the server loads them, the one-session answers of the
existing generate path to compare with, and a server in a process of its own."""

import json
import subprocess
import sys
import time
import urllib.request

import os

import jax
import numpy as np
import pytest

import chat_checkpoint
import paths

from fac_jax import audio
from fac_jax.inference import chat, generate
from fac_jax.serve import conversation


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
  """(checkpoint, [question waveforms]); a conftest.py here would shadow tests/conftest.py, which
  the other test modules import as `conftest`."""
  ckpt, question = chat_checkpoint.write(str(tmp_path_factory.mktemp('serve_ckpt')))
  folder = os.path.dirname(question)
  return ckpt, [audio.load(os.path.join(folder, f'q{i}.wav')) for i in (0, 1, 3, 4)]


def load(ckpt: str, **overrides) -> conversation.Assets:
  settings = dict(detokenizer=None, mode='s2s', max_new_tokens=12, greedy=False,
                  max_prompt_tokens=96, max_windows=12)
  return conversation.load_assets(ckpt, **(settings | overrides))


def reference(assets: conversation.Assets, history: list[dict], question: np.ndarray,
              seed: int) -> dict:
  """One session's answer by the existing path: chat.build_prompt unpadded, generate over it with
  the turn's key (Conversation.key); text ids and spoken codes."""
  prompt = chat.build_prompt(assets.tokenizer, assets.cfg, assets.system, history, question)
  key = jax.random.fold_in(jax.random.key(seed), len(history))
  out = jax.device_get(generate.make_generate_fn(assets.graphdef, assets.cfg, assets.gen)(
      assets.params, prompt, key))
  return {'text': out['text'][0, :out['num_text'][0]].tolist(),
          'codes': out['speech'][0, :out['num_speech_groups'][0]].reshape(-1).tolist()}


# The server the tests start: the settings `load` uses, so its answers can be compared.
SERVER_FLAGS = ('--max_new_tokens=12', '--max_prompt_tokens=96', '--prefill_chunk=32',
                '--max_windows=12', '--port=0')


def start_server(ckpt: str, *flags: str, timeout: float = 300.0):
  """`python -m fac_jax.serve` in a process of its own; (process, http URL) once it listens."""
  process = subprocess.Popen([sys.executable, '-m', 'fac_jax.serve', f'--ckpt={ckpt}',
                              *SERVER_FLAGS, *flags], cwd=paths.REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = process.stdout.readline()
    if line.startswith('serving on '):
      return process, line.split()[-1]
    if not line and process.poll() is not None:
      break
  process.kill()
  raise AssertionError(f'the server did not start: {process.stderr.read()[-3000:]}')


def stop_server(process) -> str:
  """Stops it; its stderr (nothing there but the compile line means no traceback)."""
  process.terminate()
  try:
    return process.communicate(timeout=30)[1]
  except subprocess.TimeoutExpired:
    process.kill()
    return process.communicate()[1]


def status(url: str) -> dict:
  with urllib.request.urlopen(url + 'status', timeout=30) as response:
    return json.loads(response.read())
