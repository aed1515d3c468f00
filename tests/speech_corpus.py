"""Writes a small spoken-conversation corpus (tone speech, manifests) for the data tests, with
one line for every kind of bad input the preparation must report and skip; and a preference-pair
manifest of the same kind for the DPO tests."""

import json
import os

import numpy as np
import soundfile

from fac_jax.data import synthetic

ANSWERS = ['One.', 'Two.', 'Three.', 'Four.', 'Five.', 'Six.', 'Seven.', 'Eight.']


def _question_in(file: str) -> dict:
  """A conversation whose user audio is audio/<file>, answered in text."""
  return {'turns': [{'role': 'user', 'audio': f'audio/{file}'},
                    {'role': 'assistant', 'text': 'Hm.'}]}


# Bad lines appended to the train manifest: (reason the report must give, manifest line).
BAD_LINES = [
    ('missing', _question_in('missing.wav')),
    ('too_short', _question_in('empty.wav')),
    ('unreadable', _question_in('corrupt.wav')),
    ('silent', _question_in('silent.wav')),
    ('overlong', _question_in('long.wav')),
    ('non_finite', _question_in('nan.wav')),
    ('low_sample_rate', _question_in('8k.wav')),
    ('malformed_line', '{"turns": [{"role": "user", "audio": "audio/q0.wav"}'),
    ('malformed_line', {'turns': [{'role': 'user', 'audio': 'audio/q0.wav'}]}),
    ('malformed_line', {'turns': [{'role': 'robot', 'text': 'beep'},
                                  {'role': 'assistant', 'text': 'Hm.'}]}),
]


def write(root: str, num_train: int = 12, num_validation: int = 4, bad_lines: bool = True,
          seed: int = 0) -> dict[str, str]:
  """Manifests {split: path} under `root`; assistant audio is stored at 22.05 kHz (resampled on
  load), the rest at 16 kHz."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'audio'), exist_ok=True)
  wav = lambda name, data, rate=16000, **kw: soundfile.write(
      os.path.join(root, 'audio', name), data, rate, **kw)

  def conversation(i: int) -> dict:
    wav(f'q{i}.wav', synthetic.tone_speech(rng, rng.uniform(0.8, 2.5)))
    wav(f'a{i}.wav', synthetic.tone_speech(rng, rng.uniform(0.8, 1.6)), 22050)
    answer = ANSWERS[i % len(ANSWERS)]
    if i % 3 == 2:  # a text question answered in text only
      return {'id': f'c{i}', 'task': 'text_qa',
              'turns': [{'role': 'user', 'text': f'Say {answer.lower()}'},
                        {'role': 'assistant', 'text': answer}]}
    return {'id': f'c{i}', 'task': 'spoken_qa', 'system': 'Answer briefly.',
            'turns': [{'role': 'user', 'audio': f'audio/q{i}.wav', 'text': 'a question'},
                      {'role': 'assistant', 'text': answer, 'audio': f'audio/a{i}.wav'}]}

  lines = {'train': [json.dumps(conversation(i)) for i in range(num_train)],
           'validation': [json.dumps(conversation(num_train + i)) for i in range(num_validation)]}
  if bad_lines:
    wav('empty.wav', np.zeros(0, np.float32))
    with open(os.path.join(root, 'audio', 'corrupt.wav'), 'wb') as f:
      f.write(b'RIFF\x00\x00\x00\x00WAVEnot really audio')
    wav('silent.wav', np.zeros(16000, np.float32))
    wav('long.wav', synthetic.tone_speech(rng, 31.0))
    wav('nan.wav', np.full(16000, np.nan, np.float32), subtype='FLOAT')
    wav('8k.wav', synthetic.tone_speech(rng, 1.0)[::2], 8000)
    lines['train'] += [line if isinstance(line, str) else json.dumps(line)
                       for _, line in BAD_LINES]
  paths = {}
  for split, split_lines in lines.items():
    paths[split] = os.path.join(root, f'{split}.jsonl')
    with open(paths[split], 'w') as f:
      f.write('\n'.join(split_lines) + '\n')
  return paths


# Bad preference lines appended to the pairs manifest: (field the error must name, manifest line).
BAD_PAIR_LINES = [
    ('rejected', {'turns': [{'role': 'user', 'text': 'Say one'}], 'chosen': {'text': 'One.'}}),
    ('chosen', {'turns': [{'role': 'user', 'text': 'Say one'}], 'chosen': {'audio': 'a.wav'},
                'rejected': {'text': 'Two.'}}),
    ('turns', {'turns': [{'role': 'user', 'text': 'Hi'}, {'role': 'assistant', 'text': 'Hi.'}],
               'chosen': {'text': 'One.'}, 'rejected': {'text': 'Two.'}}),
    ('turns[0]', {'turns': [{'role': 'robot', 'text': 'beep'}], 'chosen': {'text': 'One.'},
                  'rejected': {'text': 'Two.'}}),
    ('score', {'turns': [{'role': 'user', 'text': 'Hi'}], 'chosen': {'text': 'One.'},
               'rejected': {'text': 'Two.'}, 'score': 3}),
]


def write_preferences(root: str, tasks: tuple[str, ...], num_pairs: int = 8,
                      bad_lines: bool = True, seed: int = 1) -> str:
  """A preference manifest under `root` (tone speech), returning its path. Pairs cycle through
  `tasks` and through four shapes: spoken question with spoken answers, a text question with text
  answers, a two-turn prompt (an earlier assistant turn) with spoken answers, and a spoken question
  with one spoken and one text answer. The last pair has 8 s of user audio."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'audio'), exist_ok=True)

  def wav(name: str, seconds: float) -> str:
    soundfile.write(os.path.join(root, 'audio', name), synthetic.tone_speech(rng, seconds), 16000)
    return f'audio/{name}'

  lines = []
  for i in range(num_pairs):
    good, bad = ANSWERS[i % len(ANSWERS)], ANSWERS[(i + 1) % len(ANSWERS)]
    question = wav(f'pq{i}.wav', 8.0 if i == num_pairs - 1 else rng.uniform(0.8, 2.0))
    shape = i % 4
    pair = {'id': f'p{i}', 'task': tasks[i % len(tasks)], 'system': 'Answer briefly.',
            'turns': [{'role': 'user', 'audio': question}],
            'chosen': {'text': good, 'audio': wav(f'pc{i}.wav', rng.uniform(0.8, 1.4))},
            'rejected': {'text': bad, 'audio': wav(f'pr{i}.wav', rng.uniform(0.8, 1.4))}}
    if shape == 1:
      pair['turns'] = [{'role': 'user', 'text': 'Say a number'}]
      pair['chosen'], pair['rejected'] = {'text': good}, {'text': bad}
    elif shape == 2:
      pair['turns'] = [{'role': 'user', 'text': 'Hello'}, {'role': 'assistant', 'text': 'Hi.'},
                       {'role': 'user', 'audio': question}]
    elif shape == 3:
      pair['rejected'] = {'text': bad}
    lines.append(json.dumps(pair))
  if bad_lines:
    lines += [json.dumps(line) for _, line in BAD_PAIR_LINES]
  path = os.path.join(root, 'prefs.jsonl')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path
