"""Benchmark: what int8 serving costs (fac_jax.model.quantization). The main job's final
checkpoint answers the held-out split's spoken questions greedily (text and speech) with weights
as stored, int8 weight-only and w8a8; side by side: the bytes of the LLM and refined head, the
questions whose greedy text (and speech codes) equal the unquantised answers, and the
teacher-forced held-out loss (text and speech) with its change.

  python benchmarks/quantization_agreement.py [--ckpt=/tmp/fac_jax_pipeline/dpo/final]
      [--workdir=/tmp/fac_jax_pipeline] [--questions=80] [--report=reports/quantization]

Writes <report>/report.md and report.json (command, commit, machine, wall time).
"""

import json
import os
import sys
import time

from absl import app, flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import audio, config as config_lib, sharding  # noqa: E402
from fac_jax.checkpoints import checkpoint  # noqa: E402
from fac_jax.data import input_pipeline  # noqa: E402
from fac_jax.inference import chat, generate, sampling  # noqa: E402
from fac_jax.model import fun_audio_chat, quantization  # noqa: E402
from fac_jax.pipeline import reports  # noqa: E402
from fac_jax.serve import conversation  # noqa: E402
from fac_jax.train import held_out, steps  # noqa: E402

flags.DEFINE_string('workdir', '/tmp/fac_jax_pipeline', "The main job's workdir.")
flags.DEFINE_integer('questions', 80, 'Held-out spoken questions answered.')
flags.DEFINE_string('report', os.path.join(reports.REPORTS, 'quantization'), 'Report folder.')
flags.FLAGS.set_default('ckpt', '/tmp/fac_jax_pipeline/dpo/final')
flags.FLAGS.set_default('max_new_tokens', 32)


def held_out_prompts(assets, corpus: str, count: int) -> list[dict]:
  """Spoken held-out questions as prompts, all of one shape (one compile per mode)."""
  with open(os.path.join(corpus, 'validation.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  questions = [audio.load(os.path.join(corpus, row['turns'][0]['audio'])) for row in rows
               if row['turns'][0].get('audio')][:count]
  return [chat.build_prompt(assets.tokenizer, assets.cfg, assets.system, [], question,
                            assets.max_prompt_tokens, assets.max_windows)
          for question in questions]


def main(argv):
  del argv
  start = time.time()
  FLAGS = flags.FLAGS
  greedy = sampling.Sampling(greedy=True)
  assets = conversation.load_assets(FLAGS.ckpt, None, 's2s', FLAGS.max_new_tokens, True, 96, 4)
  gen = generate.GenerationConfig(FLAGS.max_new_tokens, text=greedy, speech=greedy)
  prompts = held_out_prompts(assets, os.path.join(FLAGS.workdir, 'corpus'), FLAGS.questions)
  cfg = config_lib.load(os.path.join(reports.REPO, 'configs', 'tiny.py'))
  cfg.model = assets.cfg
  cfg.data.update(dir=os.path.join(FLAGS.workdir, 'prepared'), batch_size=8, seq_len=128,
                  num_windows=3)
  mesh = sharding.make_mesh(cfg.mesh)
  first = next(iter(input_pipeline.dataset(cfg, 'validation', num_epochs=1, shuffle=False)))
  batch_shardings = input_pipeline.global_batch_shardings(first, mesh)
  stored = checkpoint.Reader(FLAGS.ckpt).load()
  results = {}
  for mode in quantization.MODES:
    graphdef, params = quantization.quantize(fun_audio_chat.abstract_model(assets.cfg), stored,
                                             mode)
    answer = jax.jit(lambda p, prompt, key, graphdef=graphdef: generate.generate(
        quantization.merge(graphdef, p), prompt, assets.cfg, gen, key))
    outputs = [jax.device_get(answer(params, prompt, jax.random.key(0))) for prompt in prompts]
    eval_step = jax.jit(lambda p, batch, graphdef=graphdef: steps.loss_fn(
        graphdef, quantization.dequantize(p), batch)[1])
    losses = held_out.evaluate(cfg, params, lambda p, b: dict(
        eval_step(p, b), text_count=(b['text_targets'] >= 0).sum(),
        speech_count=(b['speech_targets'] >= 0).sum()), batch_shardings, 'validation')
    results[mode] = {
        'bytes': quantization.nbytes(params),
        'text': [o['text'][0, :o['num_text'][0]].tolist() for o in outputs],
        'codes': [o['speech'][0, :o['num_speech_groups'][0]].reshape(-1).tolist()
                  for o in outputs],
        'text_loss': losses['text_loss'], 'speech_loss': losses['speech_loss']}
  base = results['none']
  rows, summary = [], {}
  for mode, r in results.items():
    same_text = sum(a == b for a, b in zip(r['text'], base['text']))
    same_codes = sum(a == b for a, b in zip(r['codes'], base['codes']))
    summary[mode] = {
        'llm_and_head_mib': r['bytes']['quantized_parts'] / 2**20,
        'rest_mib': r['bytes']['rest'] / 2**20, 'same_text': same_text,
        'same_codes': same_codes, 'questions': len(prompts),
        'text_loss': r['text_loss'], 'speech_loss': r['speech_loss'],
        'text_loss_delta': r['text_loss'] - base['text_loss'],
        'speech_loss_delta': r['speech_loss'] - base['speech_loss']}
    s = summary[mode]
    rows.append(f"| {mode} | {s['llm_and_head_mib']:.2f} | {s['rest_mib']:.2f} | "
                f"{same_text}/{len(prompts)} ({100 * same_text / len(prompts):.0f} %) | "
                f"{same_codes}/{len(prompts)} | {s['text_loss']:.5f} ({s['text_loss_delta']:+.5f}) | "
                f"{s['speech_loss']:.5f} ({s['speech_loss_delta']:+.5f}) |")
  lines = ['# int8 serving: memory and agreement with the stored weights', '',
           f'`{FLAGS.ckpt}`; {len(prompts)} held-out spoken questions, greedy text and speech, at '
           f'most {FLAGS.max_new_tokens} text tokens; teacher-forced loss over the prepared '
           'validation split.', '',
           '| weights | LLM + refined head (MiB) | rest (MiB) | greedy text equal to stored '
           '| speech codes equal | held-out text loss (change) | held-out speech loss (change) |',
           '|---|---:|---:|---:|---:|---:|---:|'] + rows
  int8 = summary['int8']
  lines += ['', f"int8 weight-only keeps the greedy text answer of {int8['same_text']} of "
            f"{int8['questions']} questions ({100 * int8['same_text'] / int8['questions']:.0f} %; "
            'the bar is 90 %). The stored weights are float32: int8 takes '
            f"{int8['llm_and_head_mib'] / summary['none']['llm_and_head_mib']:.2f} of the LLM's "
            "and refined head's bytes (their embeddings and norms stay float)."]
  reports.write_benchmark_report(FLAGS.report, lines, summary, start)


if __name__ == '__main__':
  app.run(main)
