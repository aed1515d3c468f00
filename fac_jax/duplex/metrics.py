"""Full-duplex metrics in the style of Full-Duplex-Bench and the report's Table 7, scored from
what the assistant did at each step of a session against the timeline's events
(fac_jax.duplex.timeline). The user's line is played as recorded (the assistant cannot change
it), as in Full-Duplex-Bench. All times are 200 ms steps.

  turn-taking success     a user turn is answered: the assistant's first <|audio_bos|> step after
                          the turn's last speech chunk e comes within RESPONSE_WINDOW steps (by
                          e + 10, 2 s), and it did not start while the user was still in the turn
                          (no <|audio_bos|> in (first chunk, e]). Response latency: from the end
                          of chunk e to that step (the training data answers after 600 ms)
  interruption success    the assistant was speaking when the interrupting question began (its
                          onset chunk o) and stopped (its <|audio_eos|> step) by o + STOP_BOUND
                          (1 s; training data stops at o + 3). Stop latency: o to that step
  backchannel false stop  while speaking, the assistant stopped within a backchannel or the
                          stop_steps (3) after it, out of the backchannels it was speaking at
  pause false takeover    the assistant started (<|audio_bos|>) during a pause inside a user turn
                          or right after its last silent chunk (decided before the user resumed)
  spoken-QA accuracy      of the questions not interrupted, those answered in time whose reply
                          text, normalised (lower case, letters, digits and spaces), is the answer
"""

import re

import numpy as np

from fac_jax.duplex.features import STEP_SECONDS
from fac_jax.duplex.stream import BOS, EOS, LISTEN, SPEAK

RESPONSE_WINDOW = 10
STOP_BOUND = 5


def assistant_phases(step_phases: np.ndarray) -> np.ndarray:
  """Phase of the assistant's input at each step, from the loop's outputs (the next phase)."""
  return np.concatenate([[LISTEN], np.asarray(step_phases)[:-1]])


def normalise(text: str) -> str:
  return ' '.join(re.sub(r'[^a-z0-9 ]', ' ', text.lower()).split())


def _first(mask: np.ndarray, start: int, stop: int) -> int | None:
  """The first index in [start, stop) where mask holds, or None."""
  hits = np.flatnonzero(mask[max(start, 0):stop])
  return int(hits[0]) + max(start, 0) if len(hits) else None


def score(events: dict, phases: np.ndarray, texts: np.ndarray, decode, stop_steps: int) -> dict:
  """Counts of one session. phases, texts: (steps,) the assistant's phase and text input at each
  step; decode(token ids) -> str."""
  steps = len(phases)
  starts, stops = phases == BOS, phases == EOS
  counts = dict(turns=0, answered=0, latency_steps=0, qa_questions=0, qa_correct=0,
                interruptions=0, interruptions_stopped=0, interruptions_speaking=0,
                stop_latency_steps=0, backchannels=0, backchannels_speaking=0,
                backchannel_false_stops=0, pauses=0, pause_false_takeovers=0)
  for turn in events['turns']:
    counts['turns'] += 1
    early = _first(starts, turn['start'] + 1, turn['end'] + 1)
    response = _first(starts, turn['end'] + 1, min(turn['end'] + 1 + RESPONSE_WINDOW, steps))
    answered = early is None and response is not None
    if answered:
      counts['answered'] += 1
      counts['latency_steps'] += response - turn['end'] - 1
    if not turn['interrupted']:
      counts['qa_questions'] += 1
      if answered:
        end = _first(stops, response, steps)
        reply = texts[response + 1:end if end is not None else steps]
        counts['qa_correct'] += normalise(decode(reply)) == normalise(turn['answer'])
  for interruption in events['interruptions']:
    counts['interruptions'] += 1
    onset = interruption['onset']
    if phases[onset] != SPEAK:
      continue
    counts['interruptions_speaking'] += 1
    stop = _first(stops, onset, steps)
    if stop is not None and stop - onset <= STOP_BOUND:
      counts['interruptions_stopped'] += 1
      counts['stop_latency_steps'] += stop - onset
  for backchannel in events['backchannels']:
    counts['backchannels'] += 1
    if phases[backchannel['start']] != SPEAK:
      continue
    counts['backchannels_speaking'] += 1
    end = min(backchannel['end'] + stop_steps + 1, steps)
    counts['backchannel_false_stops'] += _first(stops, backchannel['start'], end) is not None
  for pause in events['pauses']:
    counts['pauses'] += 1
    counts['pause_false_takeovers'] += _first(starts, pause['start'],
                                              min(pause['end'] + 2, steps)) is not None
  return counts


def summarise(counts: list[dict]) -> dict:
  """Rates over sessions (NaN where nothing was there to score) and the raw totals."""
  total = {name: sum(c[name] for c in counts) for name in counts[0]}
  rate = lambda a, b: total[a] / total[b] if total[b] else float('nan')
  ms = 1000 * STEP_SECONDS
  return {
      'turn_taking_success': rate('answered', 'turns'),
      'response_latency_ms': ms * rate('latency_steps', 'answered'),
      'interruption_success': rate('interruptions_stopped', 'interruptions'),
      'stop_latency_ms': ms * rate('stop_latency_steps', 'interruptions_stopped'),
      'backchannel_false_stop': rate('backchannel_false_stops', 'backchannels_speaking'),
      'pause_false_takeover': rate('pause_false_takeovers', 'pauses'),
      'spoken_qa_accuracy': rate('qa_correct', 'qa_questions'),
      'totals': total,
  }
