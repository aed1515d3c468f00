"""A manifest from a folder of spoken questions and answers, for fine-tuning on your own recordings:

  python -m fac_jax.data.from_folder --folder=DIR --out=manifest.jsonl [--system="..."]
      [--task=spoken_qa] [--text_answers]

DIR holds, for each conversation NAME, NAME.question.wav (any audio librosa reads: .wav, .flac,
.mp3, .ogg), NAME.answer.txt (what the assistant says) and, unless --text_answers, NAME.answer.wav
(how it says it: its speech codes are trained); NAME.question.txt, a transcript, is optional and
kept for evaluation. One single-turn conversation a NAME, in sorted order; paths in the manifest
are relative to it.
"""

import json
import os
import sys

from absl import app, flags

from fac_jax import cli
from fac_jax.data import manifest

AUDIO_SUFFIXES = ('.wav', '.flac', '.mp3', '.ogg')


class FolderError(ValueError):
  """A folder that cannot become a manifest (the message names the file)."""


def _audio(folder: str, name: str, part: str) -> str | None:
  for suffix in AUDIO_SUFFIXES:
    path = os.path.join(folder, f'{name}.{part}{suffix}')
    if os.path.exists(path):
      return path
  return None


def _text(path: str) -> str | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    text = ' '.join(f.read().split())
  if not text:
    raise FolderError(f'{path}: empty; expected the words spoken')
  return text


def records(folder: str, out: str, system: str | None = None, task: str | None = None,
            spoken_answers: bool = True) -> list[dict]:
  """The manifest records of `folder` (see the module docstring), with paths relative to `out`'s
  folder; refuses a conversation that lacks a part, naming the file expected."""
  if not os.path.isdir(folder):
    raise FolderError(f'--folder={folder}: not a folder')
  names = sorted({entry.split('.')[0] for entry in os.listdir(folder)
                  if '.question.' in entry or '.answer.' in entry})
  if not names:
    raise FolderError(f'{folder} holds no NAME.question.wav / NAME.answer.txt files')
  relative = lambda path: os.path.relpath(path, os.path.dirname(os.path.abspath(out)))
  found = []
  for name in names:
    question = _audio(folder, name, 'question')
    if question is None:
      raise FolderError(f'{os.path.join(folder, name)}.question.wav: missing (the spoken '
                        'question of this conversation)')
    answer_text = _text(os.path.join(folder, f'{name}.answer.txt'))
    if answer_text is None:
      raise FolderError(f'{os.path.join(folder, name)}.answer.txt: missing (the answer\'s words)')
    user = {'role': 'user', 'audio': relative(question)}
    transcript = _text(os.path.join(folder, f'{name}.question.txt'))
    if transcript:
      user['text'] = transcript
    assistant = {'role': 'assistant', 'text': answer_text}
    if spoken_answers:
      answer_audio = _audio(folder, name, 'answer')
      if answer_audio is None:
        raise FolderError(f'{os.path.join(folder, name)}.answer.wav: missing (the spoken answer; '
                          'pass --text_answers to train text answers only)')
      assistant['audio'] = relative(answer_audio)
    record = {'id': name, 'turns': [user, assistant]}
    if task:
      record['task'] = task
    if system:
      record['system'] = system
    found.append(record)
  return found


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program."""
  flags.DEFINE_string('folder', None, 'Folder of NAME.question.wav, NAME.answer.txt, '
                      'NAME.answer.wav files.', required=True)
  flags.DEFINE_string('out', None, 'Manifest to write (JSONL).', required=True)
  flags.DEFINE_string('system', None, 'System prompt of every conversation.')
  flags.DEFINE_string('task', None, 'Task name of every conversation (e.g. spoken_qa).')
  flags.DEFINE_bool('text_answers', False, 'Answers in text only (no NAME.answer.wav).')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  try:
    found = records(FLAGS.folder, FLAGS.out, FLAGS.system, FLAGS.task, not FLAGS.text_answers)
    for number, record in enumerate(found, start=1):  # as prepare will read them
      manifest.parse_line(json.dumps(record), FLAGS.out, number)
  except (FolderError, manifest.ManifestError) as e:
    sys.exit(f'error: {e}')
  manifest.write(FLAGS.out, found)
  print(f'wrote {FLAGS.out}: {len(found)} conversations from {FLAGS.folder}')


def run():
  """Console-script entry point."""
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
