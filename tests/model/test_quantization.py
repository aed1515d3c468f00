"""int8 serving weights (fac_jax.model.quantization) against a NumPy re-derivation: absmax int8
per stacked layer and output channel, an int8 x int8 product with per-token input scales; only
the LLM's and refined head's kernels change; a quantised tiny model decodes close to the stored
one and its memory is a quarter's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from fac_jax.inference import generate, sampling
from fac_jax.model import fun_audio_chat, quantization


def numpy_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric absmax int8 of w with one scale per index of every axis but `axis`: absmax maps
  to 127.5 (qwix's bound, so the top bucket is a whole one), rounded and clipped to int8."""
  scale = np.abs(w).max(axis=axis, keepdims=True) / 127.5
  return np.clip(np.round(w / scale), -128, 127).astype(np.int8), scale


def test_kernels_are_absmax_int8_per_layer_and_output_channel(tiny_config):
  params = nnx.state(fun_audio_chat.create(tiny_config.model, seed=3), nnx.Param).to_pure_dict()
  quantized = quantization.quantize_params(params, 'int8')
  w = np.asarray(params['llm']['decoder']['layers']['mlp']['up_proj']['kernel'])  # (L, in, out)
  q = quantized['llm']['decoder']['layers']['mlp']['up_proj']['kernel']
  want, scale = numpy_int8(w, axis=1)
  assert isinstance(q, qwix.QArray) and q.qvalue.dtype == jnp.int8
  np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
  # Equal but where w / scale sits on a rounding tie or in the top bucket (float rounding of the
  # reciprocal decides those); there it may be one off.
  x = np.abs(w / scale)
  settled = (np.abs(x % 1 - 0.5) > 1e-4) & (x < 127)
  np.testing.assert_array_equal(np.asarray(q.qvalue)[settled], want[settled])
  assert settled.mean() > 0.95 and np.abs(np.asarray(q.qvalue, int) - want).max() <= 1
  assert isinstance(quantized['speech_refined_head']['split_projection']['kernel'], qwix.QArray)
  # Embeddings, norms, biases, the encoder and adapters stay as stored.
  for path in (('llm', 'embed_tokens', 'embedding'), ('speech_refined_head', 'split_projection',
                                                      'bias'), ('adapters', 'code_projection',
                                                                'kernel')):
    kept = quantized
    for key in path:
      kept = kept[key]
    assert not isinstance(kept, qwix.QArray)
  sizes = quantization.nbytes(quantized)
  stored = quantization.nbytes(params)
  assert sizes['rest'] == stored['rest']
  kernels = [x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if path[0].key in quantization.QUANTIZED and path[-1].key == 'kernel']
  # Each float32 kernel becomes int8 values and a float32 scale per (layer, output channel).
  assert sizes['quantized_parts'] == stored['quantized_parts'] - sum(
      3 * k.size - 4 * k.size // k.shape[-2] for k in kernels)
  assert sizes['quantized_parts'] < 0.35 * stored['quantized_parts']
  with pytest.raises(ValueError, match="quantize='int4': expected one of none, int8, w8a8"):
    quantization.quantize_params(params, 'int4')


def test_w8a8_product_is_int8_by_int8_with_per_token_scales():
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(3, 7, 11)).astype(np.float32), rng.normal(size=(11, 5)).astype(np.float32)
  # Each row's and column's absmax sits on the rounding tie at 127.5: put it on a sentinel that
  # meets a zero on the other side, so that how the tie rounds changes nothing.
  x = np.concatenate([x, np.full((3, 7, 1), 9.0, np.float32), np.zeros((3, 7, 1), np.float32)], 2)
  w = np.concatenate([w, np.zeros((1, 5), np.float32), np.full((1, 5), 9.0, np.float32)], 0)
  qx, sx = numpy_int8(x, axis=2)
  qw, sw = numpy_int8(w, axis=0)
  want = (qx.astype(np.int32) @ qw.astype(np.int32)) * sx * sw
  got = quantization._int8_dot_general(jnp.asarray(x), jnp.asarray(w), (((2,), (0,)), ((), ())))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert np.abs(want - x @ w).max() > 1e-3  # it is not the float product


@pytest.mark.parametrize('mode', ['int8', 'w8a8'])
def test_a_quantised_model_decodes_close_to_the_stored_one(tiny_config, mode):
  cfg = tiny_config.model
  model = fun_audio_chat.create(cfg, seed=5)
  graphdef, params = nnx.split(model)
  params = params.to_pure_dict()
  gen = generate.GenerationConfig(6, text=sampling.Sampling(greedy=True),
                                  speech=sampling.Sampling(greedy=True), return_logits=True)
  prompt = {'input_ids': jnp.asarray([[cfg.tokens.im_start, 5, 9, 11, cfg.tokens.im_end]]),
            'positions': jnp.arange(5)[None], 'segment_ids': jnp.ones((1, 5), jnp.int32),
            'speech_codes': jnp.full((1, 5, cfg.speech.group_size), cfg.speech.pad_id),
            'text_mask': jnp.ones((1, 5), bool), 'audio_mask': jnp.zeros((1, 5), bool),
            'continuous_mask': jnp.zeros((1, 5), bool),
            'continuous_frames': jnp.full((1, 5), -1),
            'mel': jnp.zeros((1, 0, cfg.encoder.window_frames, cfg.encoder.num_mel_bins)),
            'mel_lengths': jnp.zeros((1, 0), jnp.int32)}
  run = lambda g, p: jax.jit(lambda p: generate.generate(quantization.merge(g, p), prompt, cfg,
                                                         gen, jax.random.key(0)))(p)
  stored = run(graphdef, params)
  q_graphdef, q_params = quantization.quantize(fun_audio_chat.abstract_model(cfg), params, mode)
  quantized = run(q_graphdef, q_params)
  first = stored['text_logits'][0, 1]  # the first decode step's (prefill records none)
  error = np.abs(np.asarray(quantized['text_logits'][0, 1] - first)).max()
  assert 0 < error < 0.05 * np.abs(np.asarray(first)).max()
