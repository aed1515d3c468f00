"""The chat command end to end on an imported tiny checkpoint: text printed, the spoken answer
written (batch and streamed), and bad input refused with a message naming the file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

import paths

from fac_jax.checkpoints import convert
from fac_jax.data import synthetic
from fac_jax.speech import speech_tokenizer
import official_checkpoint

REPO = paths.REPO


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('chat')
  reference = official_checkpoint.write_official_checkpoint(str(root / 'hf'), seed=8)
  ckpt = convert.import_checkpoint(str(root / 'hf'), str(root / 'ckpt'))
  rng = np.random.default_rng(0)
  num_codes = reference['config']['audio_config']['bos_token_id']
  tokenizer = speech_tokenizer.KMeansSpeechTokenizer.train(
      [synthetic.tone_speech(rng, 2.0) for _ in range(4)], num_codes, seed=0, iterations=5)
  tokenizer.save(str(root / 'speech_tokenizer.npz'))
  question = root / 'question.wav'
  soundfile.write(question, synthetic.tone_speech(rng, 1.5), 16000)
  return root, ckpt, str(root / 'speech_tokenizer.npz'), str(question)


def chat(*args):
  return subprocess.run([sys.executable, '-m', 'fac_jax.inference.chat', *args], capture_output=True,
                        text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize('stream', [False, True])
def test_spoken_answer_is_written(setup, stream):
  root, ckpt, detokenizer, question = setup
  out = root / f'answer_{stream}.wav'
  result = chat(f'--ckpt={ckpt}', f'--audio={question}', f'--out={out}',
                f'--detokenizer={detokenizer}', '--max_new_tokens=12', '--greedy',
                *(['--stream'] if stream else []))
  assert result.returncode == 0, result.stderr[-2000:]
  waveform, rate = soundfile.read(out)
  assert rate == 16000
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith(f'wrote {out}')
  codes = int(last.split(' from ')[1].split()[0])
  # At most 11 speaking steps of 5 codes; bos delay and eos codes make no audio.
  assert 0 < codes <= 55
  assert 0 < len(waveform) <= codes * 640 and np.isfinite(waveform).all()


def test_bad_audio_is_refused(setup, tmp_path):
  _, ckpt, _, question = setup
  empty = tmp_path / 'empty.wav'
  soundfile.write(empty, np.zeros(0, np.float32), 16000)
  not_audio = tmp_path / 'notes.wav'
  not_audio.write_text('this is not audio')
  for path, message in [(empty, 'too short'), (not_audio, 'cannot read audio file'),
                        (tmp_path / 'missing.wav', 'does not exist')]:
    result = chat(f'--ckpt={ckpt}', f'--audio={path}', '--mode=s2t')
    assert result.returncode != 0
    assert message in result.stderr and str(path) in result.stderr
  result = chat(f'--ckpt={ckpt}', f'--audio={question}', '--mode=s2t', '--max_audio_seconds=1')
  assert result.returncode != 0 and 'the limit is 1 s' in result.stderr
  result = chat(f'--ckpt={tmp_path}', f'--audio={question}')
  assert result.returncode != 0 and 'not a complete fac_jax checkpoint' in result.stderr


def test_typed_question_with_spoken_and_typed_history(setup, tmp_path):
  _, ckpt, _, question = setup
  history = tmp_path / 'history.json'
  history.write_text(json.dumps([{'user': {'audio': question}, 'assistant': 'hello there'},
                                 {'user': 'and then?', 'assistant': 'the end'}]))
  result = chat(f'--ckpt={ckpt}', '--text=what next', f'--history={history}', '--mode=s2t',
                '--max_new_tokens=6', '--greedy')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip()  # the answer's text
  broken = tmp_path / 'broken.json'
  broken.write_text(json.dumps([{'user': 'hi'}]))
  result = chat(f'--ckpt={ckpt}', '--text=hi', f'--history={broken}', '--mode=s2t')
  assert result.returncode != 0 and f'{broken}: turn 0 must be' in result.stderr
