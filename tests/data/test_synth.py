"""The offline demo corpus (fac_jax.data.synth): manifests that parse, real 16 kHz speech, the
held-out split, correct answers, answers that fit their audio steps, determinism and resuming."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import paths

from fac_jax import config as config_lib
from fac_jax.checkpoints import text_tokenizer
from fac_jax.data import conversation, manifest, synth

MANIFESTS = ('train', 'validation', 'text_facts')
NUM_TRAIN, NUM_EVAL = 12, 8
# An oracle independent of synth.number_words.
ONES = 'zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen ' \
       'fifteen sixteen seventeen eighteen nineteen'.split()
TENS = {'twenty': 20, 'thirty': 30, 'forty': 40, 'fifty': 50, 'sixty': 60, 'seventy': 70,
        'eighty': 80}


def _number(words: list[str]) -> int:
  value = 0
  for word in words:
    value += TENS[word] if word in TENS else ONES.index(word)
  return value


def _read(path: str) -> list[manifest.Conversation]:
  conversations = []
  for _, conv in manifest.read(path):
    assert not isinstance(conv, manifest.ManifestError), conv
    conversations.append(conv)
  return conversations


def _wavs(folder: str) -> dict[str, int]:
  audio_dir = os.path.join(folder, 'audio')
  return {name: os.stat(os.path.join(audio_dir, name)).st_mtime_ns
          for name in sorted(os.listdir(audio_dir))}


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """A small corpus with piper (installed wherever the tests run): (folder, summary, manifests)."""
  folder = str(tmp_path_factory.mktemp('synth'))
  summary = synth.synthesise(folder, NUM_TRAIN, NUM_EVAL, seed=0, use_piper='on')
  return folder, summary, {name: _read(os.path.join(folder, f'{name}.jsonl')) for name in MANIFESTS}


@pytest.fixture(scope='module')
def full_plan():
  """The main job's corpus (configs/tiny.py's sizes) without audio."""
  sizes = config_lib.load(paths.TINY_CONFIG).pipeline
  return synth.plan(sizes.num_train, sizes.num_eval, seed=0, with_piper=True,
                    num_pref_train=sizes.num_pref_train, num_pref_eval=sizes.num_pref_eval)


def test_manifests_parse_with_every_task(corpus):
  folder, summary, manifests = corpus
  assert [len(manifests[name]) for name in MANIFESTS] == [
      NUM_TRAIN, NUM_EVAL, len(synth.FACTS) + len(synth.arithmetic_items())]
  for split, count in (('train', NUM_TRAIN), ('validation', NUM_EVAL)):
    tasks = [conv.task for conv in manifests[split]]
    expected = {task: count * synth.TASK_CYCLE.count(task) // len(synth.TASK_CYCLE)
                for task in synth.TASKS}
    assert {task: tasks.count(task) for task in synth.TASKS} == expected
    assert summary['splits'][split]['tasks'] == expected
    for conv in manifests[split]:
      user, assistant = conv.turns
      assert conv.system == synth.SYSTEM_PROMPTS[conv.task]
      if conv.task == 'transcription':
        assert user.audio and assistant.audio is None and assistant.text == user.text
      elif conv.task == 'read_aloud':
        assert user.audio is None and user.text == synth.READ_ALOUD_PREFIX + assistant.text
        assert assistant.audio
      else:
        assert user.audio and assistant.audio and conv.meta['answer'] == assistant.text
        assert conv.meta['kind'] in ('arithmetic', 'fact')
  for conv in manifests['text_facts']:
    assert conv.task == 'text_qa' and all(turn.audio is None for turn in conv.turns)
  lines = open(os.path.join(folder, 'corpus.txt'), encoding='utf-8').read().splitlines()
  texts = [text for name in MANIFESTS for conv in manifests[name]
           for text in [conv.system] + [turn.text for turn in conv.turns]]
  assert lines == texts


def test_audio_is_16k_mono_speech_of_plausible_length(corpus):
  folder, summary, manifests = corpus
  turns = [turn for split in ('train', 'validation') for conv in manifests[split]
           for turn in conv.turns if turn.audio]
  assert len({turn.audio for turn in turns}) == summary['audio_files']
  for turn in turns:
    info = sf.info(turn.audio)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, 'PCM_16'), turn.audio
    waveform, _ = sf.read(turn.audio, dtype='float32')
    assert np.all(np.isfinite(waveform))
    assert np.abs(waveform).max() > 0.1 and np.sqrt(np.mean(waveform ** 2)) > 0.01, turn.audio
    words = len(turn.text.split())
    seconds = len(waveform) / 16000
    assert 0.1 * words + 0.2 < seconds < 0.6 * words + 1.5, (turn.text, seconds)
    if turn.role == 'assistant':
      padded_to = (synth.ASSISTANT_SECONDS_PER_CHAR * len(turn.text)
                   + synth.ASSISTANT_EXTRA_SECONDS)
      assert seconds >= padded_to - 1e-3, (turn.text, seconds)
  assert not [name for name in os.listdir(os.path.join(folder, 'audio'))
              if not name.endswith('.wav')]


def test_piper_voices_the_assistant(corpus):
  _, summary, manifests = corpus
  assert summary['piper_unavailable'] is None
  assert summary['engines_used'] == ['espeak-ng', 'piper']
  assert summary['assistant_voice'] == 'piper:joe'
  spoken_answers = [conv for split in ('train', 'validation') for conv in manifests[split]
                    if conv.turns[-1].audio]
  assert spoken_answers
  assert {(conv.meta['assistant_engine'], conv.meta['assistant_voice'])
          for conv in spoken_answers} == {('piper', 'joe')}


def test_held_out_voices_facts_and_arithmetic(corpus, full_plan):
  _, _, manifests = corpus
  text_facts = {conv.turns[0].text: (conv.turns[1].text, conv.meta['split'])
                for conv in manifests['text_facts']}
  assert len(text_facts) == len(manifests['text_facts'])
  splits = {'train': [r for r, _ in full_plan.conversations['train']],
            'validation': [r for r, _ in full_plan.conversations['validation']]}
  voices, questions = {}, {}
  for split, records in splits.items():
    voices[split] = {(r['meta']['engine'], r['meta']['voice']) for r in records
                     if 'voice' in r['meta']}
    for taught in (True, False):
      questions[split, taught] = {r['turns'][0]['text'] for r in records
                                  if r['task'] == 'spoken_qa' and r['meta']['taught'] is taught}
    for r in records:
      if r['task'] == 'spoken_qa':
        assert text_facts[r['turns'][0]['text']] == (
            r['meta']['answer'], 'train' if r['meta']['taught'] else split)
  assert len(voices['validation']) >= 5 and not voices['validation'] & voices['train']
  assert ('piper', 'joe') in voices['train']
  assert not questions['train', False]
  assert questions['validation', True] <= questions['train', True]
  text_only = questions['validation', False]
  assert not text_only & questions['train', True]
  transcribed = {r['turns'][0]['text'] for r in splits['train'] if r['task'] == 'transcription'}
  assert len(transcribed & questions['train', True]) >= 40  # train's questions, transcribed
  assert not transcribed & text_only
  facts = {question for question, _ in synth.FACTS}
  assert len(text_only & facts) == round(0.2 * len(synth.FACTS))  # every held-out fact
  assert len(text_only - facts) == len(splits['validation']) // 2 // 4  # arithmetic, no repeats
  for split in ('train', 'validation'):  # the small corpus is a prefix of the full one
    assert [c.turns[0].text for c in manifests[split]] == [
        r['turns'][0]['text'] for r in splits[split][:len(manifests[split])]]


def test_arithmetic_answers_are_right(corpus):
  _, _, manifests = corpus
  arithmetic = [conv for conv in manifests['text_facts'] if conv.meta['kind'] == 'arithmetic']
  assert len(arithmetic) == 100 + 55 + 100  # plus, minus without negatives, times
  operations = {'plus': lambda a, b: a + b, 'minus': lambda a, b: a - b,
                'times': lambda a, b: a * b}
  for conv in arithmetic:
    what, is_, a, op, b = conv.turns[0].text.split()
    assert (what, is_) == ('what', 'is')
    assert _number(conv.turns[1].text.split()) == operations[op](_number([a]), _number([b]))


def test_sentences_and_answers_are_short(full_plan):
  for split in synth.SPLITS:
    for record, _ in full_plan.conversations[split]:
      if record['task'] != 'spoken_qa':
        assert 3 <= len(record['turns'][-1]['text'].split()) <= 8, record
      else:
        assert len(record['turns'][-1]['text'].split()) <= 2, record


def test_answer_tokens_fit_their_audio_steps(full_plan, tiny_config, tmp_path):
  """The BPE that prepare trains on these manifests puts each spoken answer's tokens plus the
  end-of-turn token within one 200 ms step each of its (at least min_seconds long) audio."""
  records = [r for split in synth.SPLITS for r, _ in full_plan.conversations[split]]
  texts = list(conversation.CHAT_TEMPLATE_TEXTS) + [
      text for r in records + full_plan.text_facts
      for text in [r['system']] + [t['text'] for t in r['turns']]]
  tokenizer = text_tokenizer.train_bpe(texts, dict(tiny_config.model.tokens), str(tmp_path))
  spoken = [(r['turns'][-1]['text'], speeches[-1]) for split in synth.SPLITS
            for r, speeches in full_plan.conversations[split] if 'audio' in r['turns'][-1]]
  assert len(spoken) == 3 * len(records) // 4  # read_aloud and spoken_qa
  for text, speech in spoken:
    assert len(tokenizer.encode(text).ids) + 1 <= int(speech.min_seconds / 0.2), text


def test_same_seed_same_corpus_and_resume(tmp_path):
  first, second = str(tmp_path / 'first'), str(tmp_path / 'second')
  summary = synth.synthesise(first, 6, 3, seed=1, use_piper='off')
  synth.synthesise(second, 6, 3, seed=1, use_piper='off')
  assert summary['engines_used'] == ['espeak-ng'] and summary['piper_unavailable'] == 'turned off'
  for name in ('train.jsonl', 'validation.jsonl', 'text_facts.jsonl', 'corpus.txt'):
    assert open(os.path.join(first, name)).read() == open(os.path.join(second, name)).read()
  wavs = _wavs(first)
  assert wavs.keys() == _wavs(second).keys() and len(wavs) == summary['audio_files']
  for name in wavs:
    with open(os.path.join(first, 'audio', name), 'rb') as a, \
        open(os.path.join(second, 'audio', name), 'rb') as b:
      assert a.read() == b.read(), name

  deleted = sorted(wavs)[0]
  os.remove(os.path.join(first, 'audio', deleted))
  train = open(os.path.join(first, 'train.jsonl')).read()
  assert synth.synthesise(first, 6, 3, seed=1, use_piper='off')['audio_files_made'] == 1
  after = _wavs(first)
  assert after.keys() == wavs.keys()
  assert {n: t for n, t in after.items() if n != deleted} == {
      n: t for n, t in wavs.items() if n != deleted}
  assert open(os.path.join(first, 'train.jsonl')).read() == train

  synth.synthesise(str(tmp_path / 'other'), 6, 3, seed=2, use_piper='off')
  assert open(tmp_path / 'other' / 'train.jsonl').read() != train


def test_piper_changes_only_voices():
  """With or without piper the texts, the held-out voices and the other turns' voices agree."""
  with_piper, without = synth.plan(60, 12, 0, True), synth.plan(60, 12, 0, False)
  assert with_piper.user_voices == without.user_voices
  assert synth.ESPEAK_ASSISTANT_VOICE not in sum(without.user_voices.values(), [])
  user_keys = ('voice', 'engine', 'speed', 'pitch')
  engines = []
  for split in synth.SPLITS:
    for (a, _), (b, _) in zip(with_piper.conversations[split], without.conversations[split]):
      assert [(t['role'], t['text']) for t in a['turns']] == [
          (t['role'], t['text']) for t in b['turns']]
      if 'engine' in a['meta']:
        engines.append(a['meta']['engine'])
        if a['meta']['engine'] == 'espeak-ng':
          assert [a['meta'][k] for k in user_keys] == [b['meta'][k] for k in user_keys]
  assert 'piper' in engines and 'espeak-ng' in engines


def test_piper_auto_says_why_it_falls_back_to_espeak(monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, 'piper', None)  # `import piper` fails as if not installed
  voice, why = synth.open_piper('auto')
  assert voice is None and 'piper' in why
  assert f'piper=auto: every voice is espeak-ng, as piper could not be loaded ({why})' in \
      caplog.text


def test_missing_espeak_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path))
  with pytest.raises(RuntimeError, match='Debian package espeak-ng'):
    synth.synthesise(str(tmp_path / 'out'), 3, 3, use_piper='off')


def test_command_line(tmp_path):
  out = tmp_path / 'corpus'
  command = [sys.executable, '-m', 'fac_jax.data.synth', f'--out={out}', '--num_train=3',
             '--num_eval=3', '--piper=off']
  first = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert first.returncode == 0, first.stderr[-2000:]
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['splits']['validation']['conversations'] == 3
  assert summary['audio_files_made'] == summary['audio_files'] > 0
  again = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0 and f'0 of {summary["audio_files"]} wavs made' in again.stdout
