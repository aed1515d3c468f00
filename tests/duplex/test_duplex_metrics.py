"""The duplex scorer (fac_jax.duplex.metrics.score) on hand-built sessions: turns answered (in time,
too early, too late, right or wrong), interruptions, backchannels and pauses, each count worked out
by hand from the rules in metrics' docstring; and the rates summarise makes of them."""

import math

import numpy as np
import pytest

from fac_jax.duplex import metrics
from fac_jax.duplex.stream import BOS, EOS, LISTEN, SPEAK

WORDS = ['', 'Paris', '!', 'blue']  # text token id -> word; 0 is the silent token
COUNTS = ('turns', 'answered', 'latency_steps', 'qa_questions', 'qa_correct', 'interruptions',
          'interruptions_stopped', 'interruptions_speaking', 'stop_latency_steps', 'backchannels',
          'backchannels_speaking', 'backchannel_false_stops', 'pauses', 'pause_false_takeovers')


def decode(ids) -> str:
  return ' '.join(WORDS[i] for i in ids)


def session(steps: int, replies: list[tuple[int, int, list[str]]]):
  """(phases, texts) of an assistant that replies at each (BOS step, EOS step, words): the words'
  tokens as text input from the step after BOS, silence elsewhere."""
  phases, texts = np.full(steps, LISTEN), np.zeros(steps, np.int64)
  for bos, eos, words in replies:
    phases[bos], phases[bos + 1:eos], phases[eos] = BOS, SPEAK, EOS
    texts[bos + 1:bos + 1 + len(words)] = [WORDS.index(w) for w in words]
  return phases, texts


def events(turns=(), interruptions=(), backchannels=(), pauses=()) -> dict:
  return {'turns': list(turns), 'interruptions': list(interruptions),
          'backchannels': list(backchannels), 'pauses': list(pauses)}


def turn(start: int, end: int, answer: str = 'blue', interrupted: bool = False) -> dict:
  return {'start': start, 'end': end, 'answer': answer, 'interrupted': interrupted}


def counts(**nonzero) -> dict:
  return dict.fromkeys(COUNTS, 0) | nonzero


def answered_session() -> dict:
  phases, texts = session(60, [(8, 12, ['Paris', '!']), (17, 21, ['blue']),
                               (36, 39, ['Paris']), (55, 58, ['blue'])])
  turns = [
      # Ends at 5; BOS at 8 in [6, 16): answered, latency 8 - 5 - 1 = 2. Reply texts 9..11
      # "Paris !" normalise to "paris", the answer "Paris.": correct.
      turn(2, 5, 'Paris.'),
      # BOS at 17 while the user still speaks (in (15, 18]): not answered.
      turn(15, 18),
      # Ends at 26; BOS at 36 = 26 + 10, the last step of [27, 37): answered, latency 9; "paris"
      # is not "blue".
      turn(24, 26),
      # Ends at 44; BOS at 55 = 44 + 11, after [45, 55): not answered.
      turn(42, 44),
  ]
  return metrics.score(events(turns), phases, texts, decode, stop_steps=3)


def interruption_session() -> dict:
  phases, texts = session(40, [(5, 12, []), (14, 23, []), (25, 30, ['blue'])])
  turns = [
      turn(1, 3, interrupted=True),  # BOS 5 in [4, 14): latency 1; interrupted: no QA
      turn(7, 10, interrupted=True),  # the interrupting question; BOS 14 in [11, 21): latency 3
      turn(17, 19),  # BOS 25 in [20, 30): latency 5; its reply "blue" is right
  ]
  interruptions = [
      {'onset': 7},  # speaking at 7; EOS at 12 = 7 + 5, the bound: stopped, latency 5
      {'onset': 17},  # speaking at 17; EOS at 23 = 17 + 6: too late
      {'onset': 33},  # listening at 33: nothing to stop
  ]
  return metrics.score(events(turns, interruptions), phases, texts, decode, stop_steps=3)


def test_turns_answered_in_time_and_right():
  assert answered_session() == counts(turns=4, answered=2, latency_steps=2 + 9, qa_questions=4,
                                      qa_correct=1)


def test_interruptions_stopped_within_the_bound():
  assert interruption_session() == counts(
      turns=3, answered=3, latency_steps=1 + 3 + 5, qa_questions=1, qa_correct=1,
      interruptions=3, interruptions_speaking=2, interruptions_stopped=1, stop_latency_steps=5)


@pytest.mark.parametrize('stop_steps, false_stops', [(3, 1), (4, 2)])
def test_backchannels_the_assistant_stopped_for(stop_steps, false_stops):
  phases, texts = session(40, [(2, 20, []), (25, 31, [])])
  backchannels = [
      {'start': 5, 'end': 6},  # window [5, 6 + stop_steps + 1) holds no EOS
      # Window [14, 20) with stop_steps 3: the EOS at 20 is just after it; with 4, [14, 21) has it.
      {'start': 14, 'end': 16},
      {'start': 27, 'end': 28},  # the EOS at 31 < 28 + 3 + 1: a false stop with either
      {'start': 36, 'end': 37},  # listening at 36: not counted as spoken over
  ]
  assert metrics.score(events(backchannels=backchannels), phases, texts, decode,
                       stop_steps) == counts(backchannels=4, backchannels_speaking=3,
                                             backchannel_false_stops=false_stops)


def test_pauses_the_assistant_took_over():
  phases, texts = session(40, [(8, 12, []), (22, 26, []), (30, 34, [])])
  pauses = [
      {'start': 5, 'end': 7},  # BOS 8 in [5, 9): decided at 7, the pause's last silent chunk
      {'start': 16, 'end': 20},  # BOS 22 = 20 + 2, after [16, 22): the user had resumed
      {'start': 30, 'end': 32},  # BOS 30, the pause's first step
  ]
  assert metrics.score(events(pauses=pauses), phases, texts, decode, stop_steps=3) == counts(
      pauses=3, pause_false_takeovers=2)


def test_summarise_rates_over_sessions():
  rates = metrics.summarise([answered_session(), interruption_session()])
  # Turns answered (2 + 3) / (4 + 3); latency (11 + 9) steps / 5 answered x 200 ms.
  assert rates['turn_taking_success'] == pytest.approx(5 / 7)
  assert rates['response_latency_ms'] == pytest.approx(800)
  # 1 of 3 interruptions stopped, after 5 steps; QA (1 + 1) / (4 + 1).
  assert rates['interruption_success'] == pytest.approx(1 / 3)
  assert rates['stop_latency_ms'] == pytest.approx(1000)
  assert rates['spoken_qa_accuracy'] == pytest.approx(2 / 5)
  # No backchannel spoken over, no pause: nothing to score.
  assert math.isnan(rates['backchannel_false_stop']) and math.isnan(rates['pause_false_takeover'])
