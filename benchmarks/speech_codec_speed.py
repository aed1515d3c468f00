"""Benchmark: speech codec speed. Prints the S3Tokenizer v3 throughput (audio seconds tokenized per
second of compute) and the CosyVoice 3 detokenizer's real-time factor (compute seconds per second
of audio, flow + HiFT; under 1 is faster than real time): offline as Fun-Audio-Chat decodes
(full attention), offline with the chunk mask, and streamed (chunk mask, real caches, codes pushed
in the model's 5-code groups), with the streamed time to the first audio. All after a warm-up
call of the same shapes, so compilation is excluded.

Default: tiny sizes with the golden fixture weights (tests/testdata/cosyvoice3_tiny, converted on
the fly; needs torch for the .pt files). --released: the released sizes (S3Tokenizer 242 M
parameters, flow 332 M, HiFT 21 M) with random weights, for an accelerator; on a CPU use a short
--seconds (and --segment_tokens to size the stream's caches).

  python benchmarks/speech_codec_speed.py [--seconds=10] [--released] [--repeats=3]
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax.data import synthetic  # noqa: E402
from fac_jax.speech import (convert_cosyvoice, convert_s3, detokenizer, flow, hift,  # noqa: E402
                            s3tokenizer)

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests',
                       'testdata', 'cosyvoice3_tiny')
GROUP = 5  # codes per 5 Hz step of the model


def tiny_codec(folder: str, segment_tokens: int):
  """The fixture's tokenizer, flow and HiFT, converted into `folder`, and its speaker."""
  convert_s3.convert(os.path.join(FIXTURE, 'tokenizer', 'speech_tokenizer_v3_tiny.onnx'),
                     os.path.join(folder, 's3'))
  flow_config = os.path.join(FIXTURE, 'flow', 'config.json')
  convert_cosyvoice.convert_flow(os.path.join(FIXTURE, 'flow', 'flow.pt'),
                                 os.path.join(folder, 'flow'), flow_config)
  convert_cosyvoice.convert_hift(os.path.join(FIXTURE, 'hift', 'hift.pt'),
                                 os.path.join(folder, 'hift'),
                                 os.path.join(FIXTURE, 'hift', 'config.json'), flow_config)
  embedding = np.load(os.path.join(FIXTURE, 'flow', 'reference.npz'))['embedding'][0]
  return (s3tokenizer.S3Tokenizer.from_converted(os.path.join(folder, 's3')),
          detokenizer.CosyVoiceDetokenizer(flow.load(os.path.join(folder, 'flow')),
                                           hift.load(os.path.join(folder, 'hift')), embedding,
                                           segment_tokens=segment_tokens))


def released_codec(segment_tokens: int):
  """The released sizes with random weights."""
  cfg = s3tokenizer.S3Config()
  tokenizer = s3tokenizer.S3Tokenizer(cfg, s3tokenizer.S3TokenizerModel(cfg, rngs=nnx.Rngs(0)))
  embedding = np.random.default_rng(0).normal(size=192).astype(np.float32)
  return tokenizer, detokenizer.CosyVoiceDetokenizer(
      flow.create(flow.FlowConfig()), hift.create(hift.HiftConfig()), embedding,
      segment_tokens=segment_tokens)


def timed(fn, repeats: int) -> float:
  """Seconds per call after a warm-up call."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return (time.perf_counter() - start) / repeats


def streamed(detok: detokenizer.CosyVoiceDetokenizer, codes: np.ndarray) -> tuple[float, float]:
  """(total seconds, seconds to the first audio) of one stream fed GROUP codes at a time, as
  fast as it takes them."""
  start = time.perf_counter()
  session, first = detok.stream(), None
  for begin in range(0, len(codes), GROUP):
    if len(session.push(codes[begin:begin + GROUP])) and first is None:
      first = time.perf_counter() - start
  session.finish()
  total = time.perf_counter() - start
  return total, first if first is not None else total


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--seconds', type=float, default=10.0, help='audio length')
  parser.add_argument('--released', action='store_true',
                      help='released sizes, random weights (for an accelerator)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--segment_tokens', type=int, default=detokenizer.SEGMENT_TOKENS,
                      help='codes per detokenizer segment (750: 30 s, as Fun-Audio-Chat)')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as folder:
    tokenizer, detok = (released_codec(args.segment_tokens) if args.released
                        else tiny_codec(folder, args.segment_tokens))
  rng = np.random.default_rng(0)
  waveform = synthetic.tone_speech(rng, args.seconds).astype(np.float32)
  codes = rng.integers(0, detok.vocab_size, int(args.seconds * s3tokenizer.CODE_RATE))
  audio_seconds = len(codes) * detok.samples_per_code / detok.sample_rate

  tokenize_s = timed(lambda: tokenizer.encode(waveform), args.repeats)
  offline_s = timed(lambda: detok.decode(codes), args.repeats)
  chunked_s = timed(lambda: detok.decode(codes, chunk_mask=True), args.repeats)
  streamed(detok, codes)  # compiles every shape a stream of these codes meets
  runs = [streamed(detok, codes) for _ in range(args.repeats)]
  stream_s, first_s = (float(np.mean(values)) for values in zip(*runs))

  device = jax.devices()[0]
  print(f'device: {device.platform} ({device.device_kind}); '
        f'{"released sizes, random weights" if args.released else "tiny fixture weights"}; '
        f'{args.seconds:g} s of audio ({len(codes)} codes); mean of {args.repeats} warm runs')
  rows = [
      ('S3Tokenizer v3: 16 kHz audio -> codes', tokenize_s, f'{args.seconds / tokenize_s:.1f} '
       'audio s/s', f'{tokenize_s / args.seconds:.4f}'),
      ('detokenizer offline (full attention, as Fun-Audio-Chat)', offline_s, '',
       f'{offline_s / audio_seconds:.4f}'),
      ('detokenizer offline, chunk mask', chunked_s, '', f'{chunked_s / audio_seconds:.4f}'),
      ('detokenizer streamed (chunk mask, caches, 5-code pushes)', stream_s,
       f'first audio after {first_s * 1e3:.0f} ms', f'{stream_s / audio_seconds:.4f}'),
  ]
  width = max(len(r[0]) for r in rows)
  print(f'| {"what".ljust(width)} | compute s | throughput | real-time factor |')
  print(f'|{"-" * (width + 2)}|-----------|------------|------------------|')
  for name, seconds, note, factor in rows:
    print(f'| {name.ljust(width)} | {seconds:.3f} | {note} | {factor} |')


if __name__ == '__main__':
  main()
