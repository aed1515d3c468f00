"""Full-duplex timelines synthesised from half-duplex spoken conversations (the OmniFlatten
recipe: real turns laid on one clock, then overlaps simulated), and their training batches.

A timeline is one session of `steps` 5 Hz steps: the user's line (16 kHz audio: questions,
backchannels in the voice of the question they follow, a little line noise) and the assistant's
channel (per step its phase, text token and code group; fac_jax.duplex.stream describes the
phases). Questions and answers come from the conversations of a manifest that end with a spoken
question and a spoken answer (the demo corpus's spoken_qa); their order, timing and overlaps are
drawn from a seeded generator. The rules, with the defaults of TimelineConfig (200 ms steps; user
speech is the chunk voice activity of fac_jax.duplex.features):

  endpoint    the assistant starts (its <|audio_bos|> step) right after `endpoint_steps` (3)
              silent chunks that follow the last speech chunk of a user turn, and at no other time
  pause       `pause_rate` (30 %) of the questions that do not interrupt get `pause_seconds`
              (0.3-0.6 s) of silence at their quietest point between 30 % and 70 % of their
              length, holding 1 to endpoint_steps - 1 silent chunks (up to PAUSE_TRIES lengths
              are drawn); the assistant keeps listening
  interrupt   the user's next question interrupts `interruption_rate` (25 %) of the replies: its
              first speech chunk falls in the reply's audible part (after the two delay groups),
              and the assistant stops (its <|audio_eos|> step) `stop_steps` (3) steps after that
              onset, once it has heard three chunks of it; then it listens and answers
  backchannel `backchannel_rate` (35 %) of the other replies hear a short acknowledgement (yeah,
              okay, ...: at most `backchannel_max_steps` (2) speech chunks) in their audible part,
              ending at least stop_steps steps before the reply does; the assistant goes on
  gaps        a session starts with 1-4 silent steps; the next question follows the end of a
              reply after 1-8 steps

A rule that cannot be met where it was drawn (an overlap in a reply too short for it, a last
question whose answer would not fit the session) is skipped. Realised on the default demo corpus
(200 train exchanges) over 300 timelines of 150 steps: 5.9 questions a timeline, 23 % of replies
interrupted, 31 % of the others backchannelled, 28 % of the questions that do not interrupt
paused.

The timeline's events (turns, pauses, backchannels, interruptions, in steps) are what the metrics
of fac_jax.duplex.metrics are scored against.
"""

import dataclasses
import math
import os

import librosa
import ml_collections
import numpy as np

from fac_jax import audio
from fac_jax.batch import IGNORE_ID
from fac_jax.data import conversation, manifest, synth
from fac_jax.duplex import features
from fac_jax.duplex.model import USER_FIELDS
from fac_jax.duplex.stream import BOS, END, EOS, LISTEN, SPEAK

VAD_THRESHOLD = 0.01  # chunk RMS above which the user speaks (about -40 dBFS)
BACKCHANNELS = ('yeah', 'okay', 'uh huh', 'right', 'sure', 'mm hmm', 'i see')
BACKCHANNEL_SPEED = 220  # espeak-ng words a minute: backchannels are quick
TRIM_TOP_DB = 40  # silence trimmed off the ends of questions and backchannels
PAUSE_TRIES = 3  # pause lengths drawn for a question before it is asked without one


@dataclasses.dataclass(frozen=True)
class TimelineConfig:
  steps: int = 150
  endpoint_steps: int = 3
  stop_steps: int = 3
  backchannel_max_steps: int = 2
  interruption_rate: float = 0.25
  backchannel_rate: float = 0.35
  pause_rate: float = 0.3
  pause_seconds: tuple[float, float] = (0.3, 0.6)
  gap_steps: tuple[int, int] = (1, 8)
  lead_in_steps: tuple[int, int] = (1, 4)
  noise_rms: float = 0.001
  vad_threshold: float = VAD_THRESHOLD


@dataclasses.dataclass
class Exchange:
  """One half-duplex exchange: a spoken question and its spoken answer."""
  question: np.ndarray  # 16 kHz, end silences trimmed
  question_text: str
  answer: str
  answer_ids: list[int]  # text tokens of the answer
  answer_codes: np.ndarray  # 25 Hz speech codes of the answer
  voice: str  # the user's voice (manifest meta), for backchannels in the same voice
  engine: str  # its synthesiser (manifest meta), when the corpus was synthesised


@dataclasses.dataclass
class Timeline:
  user_audio: np.ndarray  # (steps * 3200,) the user's line
  user_speech: np.ndarray  # (steps,) bool, its chunk voice activity
  phase: np.ndarray  # (steps,) the assistant's phase at each step
  text: np.ndarray  # (steps,) its text input
  codes: np.ndarray  # (steps, 5) its code group input
  events: dict  # 'turns', 'pauses', 'backchannels', 'interruptions': lists of dicts (steps)


def load_exchanges(manifest_path: str, text_tokenizer, codes_tokenizer) -> list[Exchange]:
  """Every conversation of the manifest that ends with a spoken question and a spoken answer."""
  exchanges = []
  for _, conv in manifest.read(manifest_path):
    if isinstance(conv, manifest.ManifestError):
      raise conv
    if len(conv.turns) < 2:
      continue
    question, answer = conv.turns[-2:]
    if question.role != 'user' or not question.audio or not answer.audio:
      continue
    waveform, _ = librosa.effects.trim(audio.load(question.audio), top_db=TRIM_TOP_DB)
    exchanges.append(Exchange(
        question=waveform, question_text=question.text or '', answer=answer.text,
        answer_ids=text_tokenizer.encode(answer.text, add_special_tokens=False).ids,
        answer_codes=codes_tokenizer.encode(audio.load(answer.audio)),
        voice=conv.meta.get('voice', ''), engine=conv.meta.get('engine', '')))
  if not exchanges:
    raise ValueError(f'{manifest_path} holds no conversation that ends with a spoken question '
                     'and a spoken answer')
  return exchanges


def backchannel_clips(corpus_dir: str, exchanges: list[Exchange],
                      max_steps: int) -> dict[str, list[np.ndarray]]:
  """Backchannels in the espeak-ng voice of each exchange that has one, synthesised into
  corpus_dir/audio (cached by name), end silences trimmed; clips longer than `max_steps` chunks
  are left out. Questions in other voices are followed by backchannels of these."""
  voices = sorted({e.voice for e in exchanges if e.engine == synth.ESPEAK})
  speeches = {voice: [synth.Speech(synth.ESPEAK, voice, BACKCHANNEL_SPEED, 50, f'{word}.')
                      for word in BACKCHANNELS] for voice in voices}
  synth.synthesise_missing(corpus_dir, [s for per_voice in speeches.values() for s in per_voice],
                            None)
  clips = {}
  for voice, per_voice in speeches.items():
    trimmed = [librosa.effects.trim(audio.load(os.path.join(corpus_dir, s.path)),
                                    top_db=TRIM_TOP_DB)[0] for s in per_voice]
    clips[voice] = [c for c in trimmed if len(c) <= max_steps * features.CHUNK_SAMPLES]
  return clips


def _with_pause(question: np.ndarray, seconds: float) -> np.ndarray:
  """The question with `seconds` of silence inserted at its quietest 10 ms between 30 % and 70 %
  of its length."""
  hop = audio.SAMPLE_RATE // 100
  frames = len(question) // hop
  energy = np.mean(question[:frames * hop].reshape(frames, hop) ** 2, axis=1)
  low, high = int(0.3 * frames), max(int(0.7 * frames), int(0.3 * frames) + 1)
  cut = (low + int(np.argmin(energy[low:high]))) * hop + hop // 2
  return np.concatenate([question[:cut], np.zeros(int(seconds * audio.SAMPLE_RATE)),
                         question[cut:]])


def _speech_runs(speech: np.ndarray, start: int, stop: int) -> list[tuple[int, int]]:
  """[first, last] of each run of True in speech[start:stop]."""
  runs, first = [], None
  for p in range(start, stop):
    if speech[p] and first is None:
      first = p
    if not speech[p] and first is not None:
      runs.append((first, p - 1))
      first = None
  if first is not None:
    runs.append((first, stop - 1))
  return runs


class _Builder:
  """Lays out one timeline (see the module docstring)."""

  def __init__(self, rng, exchanges, clips, prompt_cfg: ml_collections.ConfigDict,
               tcfg: TimelineConfig):
    self.rng, self.tcfg, self.cfg = rng, tcfg, prompt_cfg
    self.exchanges, self.clips = exchanges, clips
    self.all_clips = [clip for voice in sorted(clips) for clip in clips[voice]]
    steps = tcfg.steps
    self.user = rng.normal(scale=tcfg.noise_rms, size=steps * features.CHUNK_SAMPLES)
    self.phase = np.full(steps, LISTEN, np.int32)
    self.text = np.full(steps, prompt_cfg.tokens.sil, np.int32)
    self.codes = np.full((steps, prompt_cfg.speech.group_size), prompt_cfg.speech.pad_id, np.int32)
    self.events = {'turns': [], 'pauses': [], 'backchannels': [], 'interruptions': []}

  def speech_of(self, clip: np.ndarray, start: int) -> np.ndarray:
    """Chunk voice activity of the line with `clip` added at sample `start` (not kept)."""
    line = self.user.copy()
    line[start:start + len(clip)] += clip
    return features.voice_activity(line, self.tcfg.vad_threshold)

  def reply_groups(self, exchange: Exchange) -> tuple[np.ndarray, np.ndarray]:
    """(groups (n, 5), text (n,)) of a whole reply: the positions fac_jax.data.conversation
    gives an assistant answer (two bos delay groups, codes padded with pad, one text token a
    group, <|sil|> after the text)."""
    positions = conversation.format_conversation(
        [conversation.assistant_audio(exchange.answer_codes, exchange.answer_ids, self.cfg)],
        self.cfg)
    return positions['speech_codes'], positions['input_ids']

  def place_question(self, exchange: Exchange, start: int, pause: bool):
    """(audio, first speech chunk, last speech chunk, speech) of a question at sample `start`,
    or None when it does not fit, or a pause is as long as an endpoint or holds no silent chunk."""
    tcfg = self.tcfg
    clip = exchange.question
    if pause:
      clip = _with_pause(clip, self.rng.uniform(*tcfg.pause_seconds))
    if start + len(clip) > len(self.user):
      return None
    speech = self.speech_of(clip, start)
    runs = _speech_runs(speech, start // features.CHUNK_SAMPLES,
                        math.ceil((start + len(clip)) / features.CHUNK_SAMPLES))
    if not runs:
      return None
    gaps = [b[0] - a[1] - 1 for a, b in zip(runs, runs[1:])]
    if any(gap >= tcfg.endpoint_steps for gap in gaps) or (pause and not gaps):
      return None
    return clip, runs[0][0], runs[-1][1], speech

  def write_reply(self, bos: int, groups: np.ndarray, text: np.ndarray, spoken: int) -> int:
    """The assistant's reply from step `bos`, its first `spoken` groups; returns its END step."""
    tokens = self.cfg.tokens
    self.phase[bos], self.text[bos] = BOS, tokens.audio_bos
    speak = slice(bos + 1, bos + 1 + spoken)
    self.phase[speak], self.text[speak], self.codes[speak] = SPEAK, text[:spoken], groups[:spoken]
    eos = bos + 1 + spoken
    self.phase[eos], self.text[eos] = EOS, tokens.audio_eos
    self.phase[eos + 1], self.text[eos + 1] = END, tokens.im_end
    return eos + 1

  def build(self) -> Timeline:
    rng, tcfg, chunk = self.rng, self.tcfg, features.CHUNK_SAMPLES
    pick = lambda: self.exchanges[rng.integers(len(self.exchanges))]
    start = int(rng.integers(*tcfg.lead_in_steps, endpoint=True)) * chunk + int(
        rng.integers(chunk))
    exchange, placed = pick(), None  # placed: a question an interruption has already placed
    while True:
      interrupting = placed is not None
      if not interrupting:
        tries = PAUSE_TRIES if rng.random() < tcfg.pause_rate else 0
        placed = next(filter(None, (self.place_question(exchange, start, pause=True)
                                    for _ in range(tries))), None)
        placed = placed or self.place_question(exchange, start, pause=False)
        if placed is None or self.reply_fits(placed, exchange) is None:
          break
      clip, first, last, speech = placed
      self.user[start:start + len(clip)] += clip
      groups, text = self.reply_groups(exchange)
      bos = last + tcfg.endpoint_steps + 1
      turn = len(self.events['turns'])
      runs = _speech_runs(speech, first, last + 1)
      for (_, before), (after, _) in zip(runs, runs[1:]):
        self.events['pauses'].append({'start': before + 1, 'end': after - 1, 'turn': turn})
      record = {'start': first, 'end': last, 'bos': bos, 'question': exchange.question_text,
                'answer': exchange.answer, 'interrupting': interrupting, 'interrupted': False}
      self.events['turns'].append(record)
      placed = None
      audible = (bos + 3, bos + len(groups))  # after the two delay groups
      draw = rng.random()
      if draw < tcfg.interruption_rate:
        interruption = self.try_interruption(record, groups, text, audible, pick())
        if interruption is not None:
          exchange, start, placed = interruption
          continue
      elif draw < tcfg.interruption_rate + (1 - tcfg.interruption_rate) * tcfg.backchannel_rate:
        self.try_backchannel(record, audible, self.clips.get(exchange.voice) or self.all_clips)
      record['stop'] = self.write_reply(bos, groups, text, len(groups)) - 1
      start = (record['stop'] + 1 + int(rng.integers(*tcfg.gap_steps, endpoint=True))) * chunk \
          + int(rng.integers(chunk))
      exchange = pick()
    return Timeline(self.user.astype(np.float32),
                    features.voice_activity(self.user, tcfg.vad_threshold), self.phase,
                    self.text, self.codes, self.events)

  def reply_fits(self, placed, exchange: Exchange):
    """The placed question's reply ends (END step) inside the timeline: its BOS step, else None."""
    bos = placed[2] + self.tcfg.endpoint_steps + 1
    return bos if bos + len(self.reply_groups(exchange)[0]) + 2 < self.tcfg.steps else None

  def try_interruption(self, record, groups, text, audible, exchange):
    """Places `exchange`'s question so that its first speech chunk falls in the audible part of
    the reply, and truncates the reply `stop_steps` after that onset. Returns (exchange, start
    sample, placed question) or None when it cannot be placed."""
    tcfg, chunk = self.tcfg, features.CHUNK_SAMPLES
    latest = audible[1] - tcfg.stop_steps
    if latest < audible[0]:
      return None
    onset = int(self.rng.integers(audible[0], latest + 1))
    start = onset * chunk + int(self.rng.integers(chunk // 2))
    placed = self.place_question(exchange, start, pause=False)
    if placed is None or placed[1] != onset:
      return None
    stop = onset + tcfg.stop_steps  # the assistant's <|audio_eos|> step
    next_bos = self.reply_fits(placed, exchange)
    if next_bos is None or next_bos <= stop + 1:
      return None  # its reply does not fit, or would start before this one has closed
    self.write_reply(record['bos'], groups, text, stop - record['bos'] - 1)
    record.update(stop=stop, interrupted=True)
    self.events['interruptions'].append({'onset': onset, 'stop': stop,
                                         'turn': len(self.events['turns']) - 1})
    return exchange, start, placed

  def try_backchannel(self, record, audible, clips) -> None:
    tcfg, chunk = self.tcfg, features.CHUNK_SAMPLES
    if not clips:
      return
    clip = clips[self.rng.integers(len(clips))]
    latest = audible[1] - tcfg.stop_steps - tcfg.backchannel_max_steps + 1
    if latest < audible[0]:
      return
    onset = int(self.rng.integers(audible[0], latest + 1))
    start = onset * chunk + int(self.rng.integers(
        max(1, tcfg.backchannel_max_steps * chunk - len(clip))))
    speech = self.speech_of(clip, start)
    runs = _speech_runs(speech, onset, onset + tcfg.backchannel_max_steps + 1)
    if len(runs) != 1 or runs[0][1] - runs[0][0] + 1 > tcfg.backchannel_max_steps:
      return
    self.user[start:start + len(clip)] += clip
    self.events['backchannels'].append({'start': runs[0][0], 'end': runs[0][1],
                                        'turn': len(self.events['turns']) - 1})


def synthesise(seed, exchanges: list[Exchange], clips: dict, cfg: ml_collections.ConfigDict,
               tcfg: TimelineConfig) -> Timeline:
  """One timeline; it depends only on `seed` (an int or a sequence of ints) and the inputs."""
  return _Builder(np.random.default_rng(seed), exchanges, clips, cfg, tcfg).build()


def format_timeline(timeline: Timeline, prompt_ids: list[int],
                    cfg: ml_collections.ConfigDict) -> dict:
  """A timeline after its system prompt as the duplex model's per-position arrays (the fields of
  fac_jax.batch plus user_speech and user_silent) and the encoder windows of its speech chunks.

  Session step p sits at position len(prompt_ids) + p and predicts step p + 1's text token and,
  when step p + 1 speaks, its code group (pad codes of a last partial group ignored), or 5 x eos
  when the assistant stops at p + 1; the prompt has no targets."""
  speech = cfg.speech
  group, window_frames = speech.group_size, cfg.encoder.window_frames
  pooled = window_frames // 4
  prompt = len(prompt_ids)
  steps = len(timeline.phase)
  length = prompt + steps
  mel = features.causal_log_mel(timeline.user_audio, cfg.encoder.num_mel_bins)
  windows, window_lengths = [], []
  frames = np.full((length, group), -1, np.int32)
  for p in np.flatnonzero(timeline.user_speech):
    window, valid, first = features.chunk_window(mel, int(p), window_frames)
    frames[prompt + p] = len(windows) * pooled + first + np.arange(group)
    windows.append(window)
    window_lengths.append(valid)

  phase = timeline.phase
  mixed = (phase == LISTEN) | (phase == SPEAK)
  text_targets = np.full(length, IGNORE_ID, np.int32)
  text_targets[prompt:length - 1] = timeline.text[1:]
  speech_targets = np.full((length, group), IGNORE_ID, np.int32)
  speaks_next = phase[1:] == SPEAK
  next_codes = np.where(timeline.codes[1:] == speech.pad_id, IGNORE_ID, timeline.codes[1:])
  speech_targets[prompt:length - 1][speaks_next] = next_codes[speaks_next]
  stops_next = (phase[:-1] == SPEAK) & (phase[1:] == EOS)
  speech_targets[prompt:length - 1][stops_next] = speech.eos_id
  session = np.arange(length) >= prompt
  return {
      'input_ids': np.concatenate([prompt_ids, timeline.text]).astype(np.int32),
      'positions': np.arange(length, dtype=np.int32),
      'segment_ids': np.ones(length, np.int32),
      'audio_mask': np.concatenate([np.zeros(prompt, bool), mixed]),
      'continuous_mask': np.zeros(length, bool),
      'text_mask': np.concatenate([np.zeros(prompt, bool), mixed]),
      'speech_codes': np.concatenate([np.full((prompt, group), speech.pad_id, np.int32),
                                      timeline.codes]),
      'mel': np.asarray(windows, np.float32).reshape(-1, window_frames, mel.shape[1]),
      'mel_lengths': np.asarray(window_lengths, np.int32),
      'continuous_frames': frames,
      'text_targets': text_targets,
      'speech_targets': speech_targets,
      'user_speech': np.concatenate([np.zeros(prompt, bool), timeline.user_speech]),
      'user_silent': session & ~np.concatenate([np.zeros(prompt, bool), timeline.user_speech]),
  }


def batch(rows: list[dict], seq_len: int, num_windows: int,
          cfg: ml_collections.ConfigDict) -> dict:
  """Formatted timelines, one a row, padded to `seq_len` positions and `num_windows` windows."""
  packed = conversation.pack([[row] for row in rows], seq_len, num_windows, cfg)
  for name in USER_FIELDS:
    packed[name] = np.stack([np.pad(row[name], (0, seq_len - len(row[name]))) for row in rows])
  return packed


def chunked_user_audio(timeline: Timeline, num_mel_bins: int) -> tuple[np.ndarray, np.ndarray]:
  """What the streaming loop hears: (mel chunks (steps, 20, mels), voice activity (steps,))."""
  mel = features.causal_log_mel(timeline.user_audio, num_mel_bins)
  return mel.reshape(-1, features.CHUNK_MEL_FRAMES, num_mel_bins), timeline.user_speech
