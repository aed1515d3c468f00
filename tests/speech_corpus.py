"""Writes a small spoken-conversation corpus (tone speech, manifests) for the data tests, with
one line for every kind of bad input the preparation must report and skip."""

import json
import os

import numpy as np
import soundfile

from fac_jax.data import synthetic

ANSWERS = ['One.', 'Two.', 'Three.', 'Four.', 'Five.', 'Six.', 'Seven.', 'Eight.']

# Bad lines appended to the train manifest: (reason the report must give, manifest line).
BAD_LINES = [
    ('missing', {'turns': [{'role': 'user', 'audio': 'audio/missing.wav'},
                              {'role': 'assistant', 'text': 'Hm.'}]}),
    ('too_short', {'turns': [{'role': 'user', 'audio': 'audio/empty.wav'},
                             {'role': 'assistant', 'text': 'Hm.'}]}),
    ('unreadable', {'turns': [{'role': 'user', 'audio': 'audio/corrupt.wav'},
                              {'role': 'assistant', 'text': 'Hm.'}]}),
    ('silent', {'turns': [{'role': 'user', 'audio': 'audio/silent.wav'},
                          {'role': 'assistant', 'text': 'Hm.'}]}),
    ('overlong', {'turns': [{'role': 'user', 'audio': 'audio/long.wav'},
                            {'role': 'assistant', 'text': 'Hm.'}]}),
    ('non_finite', {'turns': [{'role': 'user', 'audio': 'audio/nan.wav'},
                              {'role': 'assistant', 'text': 'Hm.'}]}),
    ('low_sample_rate', {'turns': [{'role': 'user', 'audio': 'audio/8k.wav'},
                                   {'role': 'assistant', 'text': 'Hm.'}]}),
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
