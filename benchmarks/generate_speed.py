"""Benchmark: generation speed on a config with random weights; prints prefill time, 5 Hz steps
per second, the real-time factor (time per 5 Hz step, detokenizer share included, over 200 ms)
and the time to the first audio chunk of a streamed answer. On an accelerator, also the
memory-bandwidth floor of one step (weight bytes read per step / bandwidth).

  python benchmarks/generate_speed.py [--config=configs/tiny.py] [--steps=64] [--bandwidth_gbps=3350]
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import config as config_lib  # noqa: E402
from fac_jax.data import conversation, synthetic  # noqa: E402
from fac_jax.inference import streaming  # noqa: E402
from fac_jax.inference import generate  # noqa: E402
from fac_jax.model import fun_audio_chat  # noqa: E402
from fac_jax.speech import speech_tokenizer  # noqa: E402

STEP_SECONDS = 0.2  # one 5 Hz step of speech


def timed(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    out = jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats, out


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--config', default=os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                       'tiny.py'))
  parser.add_argument('--steps', type=int, default=64)
  parser.add_argument('--prompt_seconds', type=float, default=3.0)
  parser.add_argument('--bandwidth_gbps', type=float, default=0.0,
                      help='memory bandwidth of the accelerator, for the floor (H100: 3350)')
  args = parser.parse_args()
  cfg = config_lib.load(args.config).model
  rng = np.random.default_rng(0)

  pieces = synthetic.conversation_pieces(rng, cfg)[:3]  # system, user speech, assistant header
  pieces[1] = conversation.user_audio(
      synthetic.audio.log_mel(synthetic.tone_speech(rng, args.prompt_seconds),
                              cfg.encoder.num_mel_bins), int(args.prompt_seconds * 25), cfg)
  example = conversation.format_conversation(pieces, cfg)
  prompt = conversation.pack([[example]], len(example['input_ids']),
                             len(example['mel_lengths']), cfg)
  prompt = {k: v for k, v in prompt.items() if not k.endswith('targets')}

  graphdef, state = nnx.split(fun_audio_chat.create(cfg))
  params = nnx.to_pure_dict(state)
  gen = generate.GenerationConfig(max_new_tokens=args.steps)
  key = jax.random.key(0)
  prefill = jax.jit(lambda p, x, k: generate.prefill(nnx.merge(graphdef, p), x, cfg, gen, k))
  prefill_s, _ = timed(prefill, params, prompt, key)
  whole_s, out = timed(generate.make_generate_fn(graphdef, cfg, gen), params, prompt, key)
  steps_done = int(out['num_text'][0]) - 1
  step_s = (whole_s - prefill_s) / max(steps_done, 1)

  # The embedded detokenizer, trained on synthetic speech, for the audio share and first chunk.
  waveforms = [synthetic.tone_speech(rng, 2.0) for _ in range(8)]
  tokenizer = speech_tokenizer.KMeansSpeechTokenizer.train(waveforms, cfg.speech.bos_id, seed=0)
  detokenizer = speech_tokenizer.GriffinLimDetokenizer(tokenizer)
  codes = rng.integers(0, cfg.speech.bos_id, size=60)
  detokenizer.decode(codes[:15])
  start = time.perf_counter()
  detokenizer.decode(codes)
  detok_per_step = (time.perf_counter() - start) / len(codes) * cfg.speech.group_size

  start = time.perf_counter()
  chunker = streaming.SpeechChunker(detokenizer, cfg.speech.bos_id)
  first_audio = None
  for step in streaming.stream(graphdef, params, prompt, cfg, gen, key):
    if chunker.push(step.codes[0]) and first_audio is None:
      first_audio = time.perf_counter() - start
      break
  # The streamed run includes its own compilation: report it apart from the steady state.
  device = jax.devices()[0]
  rows = [('device', f'{device.platform} ({device.device_kind})'), ('config', args.config),
          ('prompt', f'{args.prompt_seconds:.1f} s of speech, {len(example["input_ids"])} '
                     'LLM positions'),
          ('prefill', f'{prefill_s * 1e3:.1f} ms'),
          ('5 Hz steps per second', f'{1 / step_s:.1f} ({steps_done} steps)'),
          ('time per step: model', f'{step_s * 1e3:.2f} ms'),
          ('time per step: detokenizer share', f'{detok_per_step * 1e3:.2f} ms'),
          ('real-time factor (per step / 200 ms)',
           f'{(step_s + detok_per_step) / STEP_SECONDS:.3f}'),
          ('first audio chunk, streamed (incl. compile)',
           f'{first_audio:.2f} s' if first_audio else 'no chunk (speech ended early)'),
          # 2 delay groups, then 3 groups = 15 codes, as a trained model speaks.
          ('first audio chunk, steady state (prefill + 5 steps + 15 codes decoded)',
           f'{(prefill_s + 5 * step_s + 3 * detok_per_step) * 1e3:.1f} ms')]
  if args.bandwidth_gbps:
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    encoder_bytes = sum(x.nbytes for x in jax.tree.leaves(params['continuous_encoder']))
    floor = (weight_bytes - encoder_bytes) / (args.bandwidth_gbps * 1e9)
    rows.append(('bandwidth floor per step (weights read / bandwidth)', f'{floor * 1e3:.2f} ms'))
  width = max(len(r[0]) for r in rows)
  print(f'| {"what".ljust(width)} | value |\n|{"-" * (width + 2)}|-------|')
  for name, value in rows:
    print(f'| {name.ljust(width)} | {value} |')


if __name__ == '__main__':
  main()
