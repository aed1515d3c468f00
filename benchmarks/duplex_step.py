"""Benchmark: per-step time of the duplex streaming loop (fac_jax.duplex.stream) against the 200 ms
real-time budget of one 5 Hz step, on a config with random weights, printed as a table.

Rows: the jitted step while the assistant listens to silence (the encoder is skipped), listens to
speech (the encoder runs on the chunk's window), speaks while the user is silent, and speaks while
the user talks over it; a step that also evicts the oldest cache steps (the caches are kept small
here so that evictions happen); the host's share (causal log-mel and voice activity of a chunk);
and the Griffin-Lim detokenizer's share per step (a 15-code hop every 3 steps). CPU times are only
relative (a loaded 2-core machine is slower than anyone's laptop); on an accelerator run with the
8B config to see the real margin.

  python benchmarks/duplex_step.py [--config=configs/tiny.py] [--steps=60] [--window_steps=48]
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import config as config_lib  # noqa: E402
from fac_jax.data import synthetic  # noqa: E402
from fac_jax.duplex import features, model as duplex_model, stream  # noqa: E402
from fac_jax.speech import speech_tokenizer  # noqa: E402

BUDGET_MS = 1000 * features.STEP_SECONDS


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--config', default=os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                       'tiny.py'))
  parser.add_argument('--steps', type=int, default=60, help='timed steps per row')
  parser.add_argument('--window_steps', type=int, default=48)
  parser.add_argument('--prompt_tokens', type=int, default=20)
  args = parser.parse_args()
  cfg = config_lib.load(args.config).model
  rng = np.random.default_rng(0)
  loop = stream.LoopConfig(window_steps=args.window_steps,
                           evict_steps=max(1, args.window_steps // 4))
  graphdef, state = nnx.split(duplex_model.create(cfg))
  params = nnx.to_pure_dict(state)
  step = jax.jit(lambda p, s, mel, speech: stream.step(nnx.merge(graphdef, p), s, mel, speech, cfg,
                                                       loop), donate_argnums=1)
  prefill = jax.jit(lambda p, ids, k: stream.prefill(nnx.merge(graphdef, p), ids, cfg, loop, k))
  prompt = jnp.asarray(rng.integers(0, cfg.tokens.audio, size=(1, args.prompt_tokens)), jnp.int32)

  speech_audio = synthetic.tone_speech(rng, args.steps * features.STEP_SECONDS)
  speech_mel = features.causal_log_mel(speech_audio[:args.steps * features.CHUNK_SAMPLES],
                                       cfg.encoder.num_mel_bins)
  speech_mel = speech_mel.reshape(args.steps, features.CHUNK_MEL_FRAMES, -1)
  silent_mel = np.full_like(speech_mel, -1.5)

  def timed_steps(speaking: bool, user_speaks: bool) -> tuple[np.ndarray, np.ndarray]:
    """Step times (ms) of one session and which steps evicted."""
    s = prefill(params, prompt, jax.random.key(0))
    times, evicted = [], []
    mel = speech_mel if user_speaks else silent_mel
    for p in range(args.steps + 2):  # two warm-up steps (compilation)
      if speaking:  # a random model rarely decides to speak: hold it in SPEAK
        s['phase'] = jnp.full_like(s['phase'], stream.SPEAK)
      full = int(s['llm_cache']['index']) >= s['llm_valid'].shape[1]
      start = time.perf_counter()
      s, out = step(params, s, jnp.asarray(mel[p % args.steps][None]), jnp.asarray([user_speaks]))
      jax.block_until_ready(out)
      if p >= 2:
        times.append(1000 * (time.perf_counter() - start))
        evicted.append(full)
    return np.asarray(times), np.asarray(evicted)

  rows = []
  for name, speaking, user_speaks in (('listen, user silent', False, False),
                                      ('listen, user speaking', False, True),
                                      ('speak, user silent', True, False),
                                      ('speak, user talking over', True, True)):
    times, evicted = timed_steps(speaking, user_speaks)
    rows.append((name, times[~evicted]))
    if name == 'speak, user talking over' and evicted.any():
      rows.append(('  ... a step that evicts', times[evicted]))

  featurizer = features.CausalLogMel(cfg.encoder.num_mel_bins)
  host = []
  for p in range(args.steps):
    piece = speech_audio[p * features.CHUNK_SAMPLES:(p + 1) * features.CHUNK_SAMPLES]
    start = time.perf_counter()
    featurizer(piece)
    features.voice_activity(piece, 0.01)
    host.append(1000 * (time.perf_counter() - start))
  rows.append(('host: log-mel + voice activity', np.asarray(host)))

  tokenizer = speech_tokenizer.KMeansSpeechTokenizer.train(
      [synthetic.tone_speech(rng, 2.0) for _ in range(4)], cfg.speech.bos_id, seed=0)
  detokenizer = speech_tokenizer.GriffinLimDetokenizer(tokenizer)
  hop = 15  # codes per detokenizer chunk (DESIGN.md section 3): 3 steps
  detok = []
  for _ in range(5):
    start = time.perf_counter()
    detokenizer.decode(rng.integers(0, cfg.speech.bos_id, size=hop))
    detok.append(1000 * (time.perf_counter() - start) * cfg.speech.group_size / hop)
  rows.append(('detokenizer share (Griffin-Lim)', np.asarray(detok)))

  print(f'{jax.device_count()} x {jax.devices()[0].platform}; config {args.config}; caches: '
        f'prompt + {loop.window_steps} steps, {loop.evict_steps} evicted when full')
  print(f'{"per 5 Hz step":<34}{"mean ms":>10}{"p95 ms":>10}{"max ms":>10}{"% of 200 ms":>14}')
  for name, times in rows:
    print(f'{name:<34}{times.mean():>10.2f}{np.percentile(times, 95):>10.2f}'
          f'{times.max():>10.2f}{100 * times.mean() / BUDGET_MS:>13.1f}%')
  worst = max(times.mean() for name, times in rows[:4])
  total = worst + rows[-2][1].mean() + rows[-1][1].mean()
  print(f'worst loop step + host + detokenizer: {total:.2f} ms of the {BUDGET_MS:.0f} ms budget '
        '(CPU times are relative)')


if __name__ == '__main__':
  main()
