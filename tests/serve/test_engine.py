"""The slot engine against the one-session generate path: conversations that join and leave at
different steps, over more turns than slots, answer exactly as each would alone (same seed,
sampled text and speech), and the step over the slots compiles once."""

import queue

import numpy as np

from serve_setup import load, reference
from fac_jax.serve import conversation, engine as engine_lib


def run_turn(engine, conv, question) -> tuple[engine_lib.Turn, queue.Queue]:
  events = queue.Queue()
  turn = engine_lib.Turn(conv.prompt(question), conv.key(), events.put)
  engine.submit(turn)
  return turn, events


def collect(events: queue.Queue) -> dict:
  text, codes = [], []
  while True:
    event = events.get(timeout=120)
    text.append(event.text)
    if event.codes is not None:
      codes += event.codes.tolist()
    if event.done:
      return {'text': text, 'codes': codes}


def test_sessions_joining_and_leaving_answer_as_alone(trained):
  ckpt, questions = trained
  assets = load(ckpt)
  engine = engine_lib.Engine(assets.graphdef, assets.params, assets.cfg, assets.gen,
                             num_slots=3).start()
  try:
    # Five conversations on three slots: two more wait for a slot; each has two turns, the
    # second with the first as history, submitted when the first has ended.
    conversations = [conversation.Conversation(assets, seed) for seed in range(5)]
    answers = {}
    for turn_index in range(2):
      started = []
      for i, conv in enumerate(conversations):
        question = questions[(i + turn_index) % len(questions)]
        started.append((conv, question, run_turn(engine, conv, question)[1]))
      for conv, question, events in started:
        answer = collect(events)
        expected = reference(assets, conv.history, question, conv.seed)
        answers[conv.seed, turn_index] = answer
        assert answer == expected, (conv.seed, turn_index)
        conv.add(question, 'hm')
    assert engine.busy_slots() == 0
    assert engine.compiled() == {'prefill': 1, 'insert': 1, 'step': 1}
    # The turns really ran at the same time and differ: 10 turns of up to 12 steps each, on
    # 3 slots, took fewer engine steps than one after another would.
    assert engine.steps < sum(len(a['text']) - 1 for a in answers.values())
    assert len({tuple(a['codes']) for a in answers.values()}) > 1
  finally:
    engine.stop()


def test_a_cancelled_turn_frees_its_slot(trained):
  ckpt, questions = trained
  assets = load(ckpt)
  engine = engine_lib.Engine(assets.graphdef, assets.params, assets.cfg, assets.gen,
                             num_slots=1).start()
  try:
    conv = conversation.Conversation(assets, 0)
    turn, events = run_turn(engine, conv, questions[0])
    events.get(timeout=120)
    engine.cancel(turn)
    other = conversation.Conversation(assets, 1)
    _, events = run_turn(engine, other, questions[1])
    assert collect(events) == reference(assets, [], questions[1], 1)
  finally:
    engine.stop()
