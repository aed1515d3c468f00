"""Streaming: the host-driven steps give exactly the while_loop's output; the chunker hands audio
out every 15 codes once the look-ahead has arrived, dropping delay and eos codes."""

import jax
import numpy as np
from flax import nnx

from fac_jax.inference import generate, streaming
from official_tiny import KEY, greedy


def test_stream_equals_batch_generation(golden_generation):
  cfg, model, prompt, reference = golden_generation
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  gen = greedy(8)
  whole = jax.device_get(generate.make_generate_fn(graphdef, cfg, gen)(params, prompt, KEY))
  steps = list(streaming.stream(graphdef, params, prompt, cfg, gen, KEY))
  assert steps[-1].done and not any(s.done for s in steps[:-1])
  text = [int(s.text[0]) for s in steps]
  assert text == whole['text'][0, :whole['num_text'][0]].tolist()
  codes = [s.codes[0].tolist() for s in steps if (s.codes[0] >= 0).all()]
  assert codes == whole['speech'][0, :whole['num_speech_groups'][0]].tolist()


class RampDetokenizer:
  """Each code becomes `samples` samples equal to the code; it reads `lookahead` codes ahead."""
  sample_rate, lookahead = 250, 3  # 10 samples per 25 Hz code

  def __init__(self):
    self.calls = []

  def decode(self, codes):
    self.calls.append(list(codes))
    return np.repeat(np.asarray(codes, np.float32), 10)


def test_chunker_hops_waits_for_lookahead_and_drops_special_codes():
  detokenizer = RampDetokenizer()
  chunker = streaming.SpeechChunker(detokenizer, num_codes=50, hop=4)
  bos, eos = 50, 51
  assert chunker.push([bos] * 5) == []  # delay groups are not speech
  assert chunker.push([1, 2, 3, 4, 5, 6]) == []  # 6 codes < hop 4 + look-ahead 3
  first = chunker.push([7, 8, 9, 10, 11])  # 11 codes: two hops are ready (8 + 3 <= 11)
  assert [len(c) for c in first] == [40, 40]
  np.testing.assert_array_equal(np.concatenate(first), np.repeat(np.arange(1, 9), 10))
  assert detokenizer.calls[0] == [1, 2, 3, 4, 5, 6, 7]  # the hop plus its look-ahead
  rest = chunker.push([12, eos, eos, eos, eos]) + chunker.finish()
  np.testing.assert_array_equal(np.concatenate(rest), np.repeat(np.arange(9, 13), 10))
  assert chunker.finish() == []
