"""The chat command end to end on an imported tiny checkpoint: text printed, the spoken answer
written (batch and streamed), and bad input refused with a message naming the file; on a
checkpoint the trainer wrote, what it needs read from the checkpoint: tokenizers and the system
prompts of its training tasks."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile

import chat_checkpoint
import paths

from fac_jax.checkpoints import checkpoint, convert
from fac_jax.data import synthetic, tools
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
  return subprocess.run([sys.executable, '-m', 'fac_jax.inference.chat', *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


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


def test_an_imported_moe_checkpoint_answers_through_the_same_command(setup, tmp_path):
  _, _, detokenizer, question = setup
  reference = official_checkpoint.write_official_checkpoint(str(tmp_path / 'hf'), seed=8, moe=True)
  ckpt = convert.import_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))
  experts = reference['config']['text_config'].get('num_experts') or \
      reference['config']['text_config']['num_local_experts']
  assert checkpoint.load_config(ckpt).llm.moe.num_experts == experts > 0
  out = tmp_path / 'answer.wav'
  result = chat(f'--ckpt={ckpt}', f'--audio={question}', f'--out={out}',
                f'--detokenizer={detokenizer}', '--max_new_tokens=12', '--greedy')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1].startswith(f'wrote {out}')
  waveform, rate = soundfile.read(out)
  assert rate == 16000 and np.isfinite(waveform).all()


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


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  return chat_checkpoint.write(str(tmp_path_factory.mktemp('trained')))


def last_line(result) -> str:
  assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  return result.stderr.strip().splitlines()[-1]


def test_trained_checkpoint_speaks_with_its_own_prompts_and_voice(trained, tmp_path):
  ckpt, question = trained
  settings = checkpoint.chat_settings(ckpt)
  assert settings['tasks'] == {
      'spoken_qa': {'system': 'Answer briefly.', 'question': 'speech', 'answer': 'speech',
                    'conversations': 11},
      'text_qa': {'system': None, 'question': 'text', 'answer': 'text', 'conversations': 5}}
  assert settings['speech_tokenizer']['file'] == checkpoint.SPEECH_TOKENIZER_FILE
  out = tmp_path / 'answer.wav'
  result = chat(f'--ckpt={ckpt}', f'--audio={question}', f'--out={out}', '--max_new_tokens=6',
                '--greedy')
  assert result.returncode == 0, result.stderr[-2000:]
  assert "system prompt (task spoken_qa): 'Answer briefly.'" in result.stderr
  assert not re.search(r'^I\d{4} ', result.stderr, re.M)  # no INFO logs without --verbosity
  assert result.stdout.strip().splitlines()[-1].startswith(f'wrote {out}')
  assert soundfile.read(out)[1] == 16000  # the data's k-means tokenizer, Griffin-Lim
  result = chat(f'--ckpt={ckpt}', '--text=say one', '--mode=s2t', '--max_new_tokens=4')
  assert result.returncode == 0, result.stderr[-2000:]
  assert "system prompt (task text_qa): ''" in result.stderr
  result = chat(f'--ckpt={ckpt}', '--text=say one', '--mode=s2t', '--max_new_tokens=4',
                '--system=spoken_qa')
  assert "system prompt (task spoken_qa): 'Answer briefly.'" in result.stderr


def test_refusals_come_before_generating_in_one_line(trained, tmp_path):
  ckpt, question = trained
  result = chat(f'--ckpt={ckpt}', f'--audio={question}', '--mode=s2t', f'--out={tmp_path}/a.wav')
  assert last_line(result) == ('error: --out writes a spoken answer, but --mode=s2t answers in '
                               'text only: drop --out, or use --mode=s2s')
  out = tmp_path / 'missing' / 'a.wav'
  result = chat(f'--ckpt={ckpt}', f'--audio={question}', f'--out={out}')
  assert last_line(result) == f'error: --out={out}: folder {out.parent} does not exist'
  assert not result.stdout  # nothing generated
  truncated = tmp_path / 'truncated'
  shutil.copytree(ckpt, truncated)
  data = max((os.path.join(folder, name) for folder, _, names in os.walk(truncated / 'params')
              for name in names), key=os.path.getsize)
  os.truncate(data, os.path.getsize(data) // 2)
  result = chat(f'--ckpt={truncated}', f'--audio={question}', '--mode=s2t')
  assert last_line(result).startswith(f'error: {truncated}: cannot read its parameters '
                                      '(truncated or corrupt files?): ')
  assert 'TensorStore' not in result.stderr


def test_tools_run_through_the_command_and_bad_tool_input_is_refused(setup, tmp_path):
  """--tools answers with the official function-calling prompt around the declarations (the
  loop itself: tests/inference/test_tool_calling.py); a bad tools file, functions module or a tool
  without a callable is refused in one line naming it."""
  _, ckpt, _, question = setup
  declared = tmp_path / 'tools.json'
  declared.write_text(json.dumps(tools.DEMO_TOOLS))
  result = chat(f'--ckpt={ckpt}', f'--audio={question}', f'--tools={declared}', '--mode=s2t',
                '--max_new_tokens=6', '--greedy')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'system prompt (the official function-calling prompt)' in result.stderr
  assert result.stdout.strip()
  bad = tmp_path / 'bad.json'
  bad.write_text(json.dumps([{'name': 'set_timer', 'parameters': {'type': 'array'}}]))
  for flags, message in (
      ([f'--tools={bad}'], f"error: {bad}: tools[0]: tool 'set_timer': \"parameters\" must be a "
                           'JSON schema of type object with "properties"'),
      ([f'--tools={tmp_path}/none.json'], f'error: cannot read tools file {tmp_path}/none.json'),
      ([f'--tools={declared}', '--functions=json:loads'],
       'error: --functions=json:loads: expected a dict of tool name -> callable'),
      ([f'--tools={declared}', '--functions=no_such_module'],
       'error: --functions=no_such_module: expected an importable module'),
      ([f'--tools={declared}', '--functions=fac_jax.data.tools:OPERATIONS'],
       "error: no callable for the declared tools ['calculate', 'convert_units', 'get_weather', "
       "'set_timer']"),
      ([f'--tools={declared}', '--stream'],
       'error: --stream does not run tools: drop --stream or --tools')):
    result = chat(f'--ckpt={ckpt}', f'--audio={question}', '--mode=s2t', *flags)
    assert last_line(result).startswith(message), result.stderr[-1000:]
