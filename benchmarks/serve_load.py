"""Benchmark: the speech server under load on loopback. 1, 4 and 8 simulated clients at once
(push-to-talk, as fac_jax.serve.client speaks), each asking --turns spoken questions of the main
job's held-out split in one conversation, against one server with 8 slots; side by side: time to
the first text and to the first audio chunk (p50, p95, from the end of the turn as the client
sees it), the real-time factor per session (answer time / answer speech), and how many answers
came back and equal the one-session generate path's for the same seed (greedy text as the
pipeline evaluates; the first turn of each conversation is checked).

  python benchmarks/serve_load.py [--ckpt=/tmp/fac_jax_pipeline/dpo/final]
      [--corpus=/tmp/fac_jax_pipeline/corpus] [--turns=3] [--report=reports/serve_load]

Writes <report>/report.md and report.json (command, commit, machine, wall time).
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

from absl import app, flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import audio  # noqa: E402
from fac_jax.inference import chat, generate  # noqa: E402
from fac_jax.pipeline import reports  # noqa: E402
from fac_jax.serve import client as client_lib, conversation  # noqa: E402
from fac_jax.serve import __main__ as serve_main  # noqa: E402  (its flags: --ckpt and others)

flags.DEFINE_string('corpus', '/tmp/fac_jax_pipeline/corpus', "The main job's corpus.")
flags.DEFINE_integer('turns', 3, 'Questions a conversation asks.')
flags.FLAGS.set_default('max_new_tokens', 64)  # the chat command's flag, as the server's
flags.DEFINE_string('report', os.path.join(reports.REPORTS, 'serve_load'), 'Report folder.')
LEVELS = (1, 4, 8)


def held_out_questions(corpus: str) -> list[np.ndarray]:
  with open(os.path.join(corpus, 'validation.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [audio.load(os.path.join(corpus, row['turns'][0]['audio'])) for row in rows
          if row['turns'][0].get('audio')]


def start_server(ckpt: str) -> tuple[subprocess.Popen, str]:
  process = subprocess.Popen(
      [sys.executable, '-m', 'fac_jax.serve', f'--ckpt={ckpt}', '--port=0', '--greedy',
       '--max_sessions=8', f'--max_new_tokens={flags.FLAGS.max_new_tokens}'],
      stdout=subprocess.PIPE, text=True)
  for line in process.stdout:
    if line.startswith('serving on '):
      return process, line.split()[-1].replace('http', 'ws') + 'ws'
  raise SystemExit('the server did not start')


def converse(url: str, questions: list[np.ndarray], seed: int) -> list[client_lib.TurnRecord]:
  with client_lib.Client(url, seed=seed, timeout=600) as client:
    return [client.ask(question) for question in questions]


def one_session_answer(assets, generate_fn, question: np.ndarray, seed: int) -> list[int]:
  prompt = chat.build_prompt(assets.tokenizer, assets.cfg, assets.system, [], question)
  out = jax.device_get(generate_fn(assets.params, prompt,
                                   jax.random.fold_in(jax.random.key(seed), 0)))
  return out['text'][0, :out['num_text'][0]].tolist()


def percentiles(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return '–'
  return f'{1000 * np.percentile(values, 50):.0f} / {1000 * np.percentile(values, 95):.0f}'


def main(argv):
  del argv
  start = time.time()
  FLAGS = flags.FLAGS
  questions = held_out_questions(FLAGS.corpus)
  process, url = start_server(FLAGS.ckpt)
  results = {}
  try:
    for level in LEVELS:
      with concurrent.futures.ThreadPoolExecutor(level) as pool:
        jobs = [pool.submit(converse, url, [questions[(c * FLAGS.turns + t) % len(questions)]
                                            for t in range(FLAGS.turns)], c)
                for c in range(level)]
        results[level] = [job.result() for job in jobs]
  finally:
    process.terminate()
    process.wait()
  assets = conversation.load_assets(FLAGS.ckpt, None, 's2s', FLAGS.max_new_tokens, True, 512, 16)
  generate_fn = generate.make_generate_fn(assets.graphdef, assets.cfg, assets.gen)
  rows, table = [], {}
  for level, conversations in results.items():
    records = [r for turns in conversations for r in turns]
    matches = sum(turns[0].done['text_ids'] == one_session_answer(
        assets, generate_fn, client_lib.spoken(questions[c * FLAGS.turns % len(questions)]), c)
        for c, turns in enumerate(conversations))
    rtf = [r.answer_s / r.done['audio_seconds'] for r in records if r.done['audio_seconds']]
    table[level] = {
        'answers': len(records), 'asked': level * FLAGS.turns,
        'first_text_p50_p95_ms': percentiles(r.first_text_s for r in records),
        'first_audio_p50_p95_ms': percentiles(r.first_audio_s for r in records),
        'rtf_p50': float(np.median(rtf)) if rtf else None,
        'first_turns_equal_one_session': f'{matches}/{level}'}
  header = ('sessions', 'answers / asked', 'first text p50 / p95 (ms)',
            'first audio p50 / p95 (ms)', 'real-time factor per session (p50)',
            'first answers equal to one session')
  rows = [(level, f"{t['answers']}/{t['asked']}", t['first_text_p50_p95_ms'],
           t['first_audio_p50_p95_ms'], '–' if t['rtf_p50'] is None else f"{t['rtf_p50']:.2f}",
           t['first_turns_equal_one_session']) for level, t in table.items()]
  lines = ['# The speech server under load', '',
           f'`{FLAGS.ckpt}`, one server with 8 slots, greedy text, at most '
           f'{FLAGS.max_new_tokens} text tokens an answer; {FLAGS.turns} held-out spoken '
           'questions a conversation; times from the end of the turn, as the client sees them.', '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(map(str, row)) + ' |' for row in rows]
  reports.write_benchmark_report(FLAGS.report, lines, table, start)


if __name__ == '__main__':
  app.run(main)
