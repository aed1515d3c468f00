"""The slot engine against the one-session generate path: conversations that join and leave at
different steps, over more turns than slots, answer exactly as each would alone (same seed,
sampled text and speech), a long prompt is prefilled in chunks with the others decoding between
them, and every program compiles once."""

import queue

import numpy as np

from serve_setup import load, reference, trained  # noqa: F401 (trained: a fixture)
from fac_jax.serve import conversation, engine as engine_lib

PREFILL_CHUNK = 16  # of load's 96 prompt positions
COMPILED_ONCE = {'begin': 1, 'chunk': 1, 'finish': 1, 'insert': 1, 'step': 1}


def start(assets, num_slots: int) -> engine_lib.Engine:
  return engine_lib.Engine(assets.graphdef, assets.params, assets.cfg, assets.gen, num_slots,
                           PREFILL_CHUNK).start()


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
  engine = start(assets, num_slots=3)
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
    assert engine.compiled() == COMPILED_ONCE
    # The turns really ran at the same time and differ: 10 turns of up to 12 steps each, on
    # 3 slots, took fewer engine steps than one after another would.
    assert engine.steps < sum(len(a['text']) - 1 for a in answers.values())
    assert len({tuple(a['codes']) for a in answers.values()}) > 1
  finally:
    engine.stop()


def test_a_cancelled_turn_frees_its_slot(trained):
  ckpt, questions = trained
  assets = load(ckpt)
  engine = start(assets, num_slots=1)
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


def test_a_long_prompt_is_prefilled_in_chunks_between_the_others_steps(trained):
  ckpt, questions = trained
  assets = load(ckpt, max_new_tokens=24)
  engine = start(assets, num_slots=2)
  try:
    talking = conversation.Conversation(assets, 3)
    chunks_at_step = []  # the engine's prefill chunk count at each of the talker's events
    events = queue.Queue()

    def emit(event):
      chunks_at_step.append(engine.chunks)
      events.put(event)

    engine.submit(engine_lib.Turn(talking.prompt(questions[0]), talking.key(), emit))
    first = events.get(timeout=120)
    # A turn whose prompt, with two earlier turns, fills two thirds of the 96 positions.
    joining = conversation.Conversation(assets, 4)
    for question in questions[1:3]:
      joining.add(question, 'hm')
    assert (joining.prompt(questions[3])['segment_ids'] > 0).sum() > 3 * PREFILL_CHUNK
    before = engine.chunks
    _, joined = run_turn(engine, joining, questions[3])
    joined_answer = collect(joined)
    chunks = range(before + 1, engine.chunks + 1)
    assert len(chunks) >= 4
    # The talker stepped after each of the joining turn's chunks but its last (whose turn then
    # steps with it).
    assert set(chunks[:-1]) <= set(chunks_at_step)
    talked = collect(events)
    talked['text'].insert(0, first.text)
    assert talked == reference(assets, [], questions[0], 3)
    assert joined_answer == reference(assets, joining.history, questions[3], 4)
    assert engine.compiled() == COMPILED_ONCE
  finally:
    engine.stop()
