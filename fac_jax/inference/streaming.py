"""Streaming generation: each 5 Hz step's text token and speech codes as soon as they exist, and
audio from a detokenizer chunk by chunk, so the first audio comes out before the answer ends."""

from collections.abc import Iterator
import dataclasses

import jax
import ml_collections
import numpy as np
from flax import nnx

from fac_jax.inference import generate
from fac_jax.speech import speech_tokenizer


@dataclasses.dataclass
class StepOutput:
  text: np.ndarray  # (B,) this step's text token
  codes: np.ndarray  # (B, 5) this step's code group; rows not speaking hold -1
  done: bool  # no row will produce more


def stream(graphdef: nnx.GraphDef, params, prompt: dict, cfg: ml_collections.ConfigDict,
           gen: generate.GenerationConfig, key: jax.Array) -> Iterator[StepOutput]:
  """Yields the forced/first text token, then one StepOutput per decode step. The steps are the
  jitted `generate.decode_step`, driven from the host so that each result is seen at once."""
  prefill = jax.jit(lambda p, x, k: generate.prefill(nnx.merge(graphdef, p), x, cfg, gen, k))
  step = jax.jit(lambda p, s: generate.decode_step(nnx.merge(graphdef, p), s, cfg, gen),
                 donate_argnums=1)
  state = prefill(params, prompt, key)
  batch, group = state['speech'].shape[0], state['speech'].shape[2]
  yield StepOutput(np.asarray(state['text'][:, 0]), np.full((batch, group), -1),
                   not bool(generate.keep_going(state)))
  while bool(generate.keep_going(state)):
    spoken_before = np.asarray(state['num_speech'])
    state = step(params, state)
    t = int(state['step']) - 1
    spoken = np.asarray(state['num_speech'])
    rows = np.arange(batch)
    codes = np.where((spoken > spoken_before)[:, None],
                     np.asarray(state['speech'])[rows, np.maximum(spoken - 1, 0)], -1)
    yield StepOutput(np.asarray(state['text'][:, t]), codes,
                     not bool(generate.keep_going(state)))


class SpeechChunker:
  """Turns a stream of speech codes into audio chunks. A detokenizer with a streaming session of
  its own (speech_tokenizer.StreamingSpeechDetokenizer, e.g. CosyVoice's: caches, no re-decoding)
  gets the codes as they come and returns audio as it completes it; any other is asked to
  `decode` every `hop` codes once `lookahead` more have arrived (its right context), and the rest
  at `finish`. Codes outside [0, num_codes) (bos delay groups, eos) are dropped.
  """

  def __init__(self, detokenizer, num_codes: int, hop: int = 15, frame_rate: int = 25):
    self.detokenizer, self.num_codes, self.hop = detokenizer, num_codes, hop
    self.samples_per_code = detokenizer.sample_rate // frame_rate
    streams = isinstance(detokenizer, speech_tokenizer.StreamingSpeechDetokenizer)
    self.session = detokenizer.stream() if streams else None
    self.codes: list[int] = []
    self.emitted = 0  # codes already turned into audio

  def _chunk(self, end: int) -> np.ndarray:
    window = np.asarray(self.codes[self.emitted:end + self.detokenizer.lookahead], np.int64)
    audio = self.detokenizer.decode(window)[:(end - self.emitted) * self.samples_per_code]
    self.emitted = end
    return audio

  def push(self, codes) -> list[np.ndarray]:
    new = [int(c) for c in np.ravel(codes) if 0 <= c < self.num_codes]
    if self.session is not None:
      audio = self.session.push(np.asarray(new, np.int64))
      return [audio] if len(audio) else []
    self.codes += new
    chunks = []
    while len(self.codes) >= self.emitted + self.hop + self.detokenizer.lookahead:
      chunks.append(self._chunk(self.emitted + self.hop))
    return chunks

  def finish(self) -> list[np.ndarray]:
    if self.session is not None:
      audio = self.session.finish()
      return [audio] if len(audio) else []
    return [self._chunk(len(self.codes))] if len(self.codes) > self.emitted else []
