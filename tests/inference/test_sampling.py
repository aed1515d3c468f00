"""Sampling processors against a NumPy reference written from Hugging Face's definitions
(RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper).
Tolerance: 1e-6 relative on kept logits; the removed set exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fac_jax.inference import sampling


def numpy_process(logits, history, s):
  logits = logits.astype(np.float64).copy()
  for b in range(len(logits)):
    for token in set(int(t) for t in history[b] if t >= 0):
      value = logits[b, token]
      logits[b, token] = value / s.repetition_penalty if value > 0 else value * s.repetition_penalty
  if s.greedy:
    return logits
  logits /= s.temperature
  if s.top_k:
    for b in range(len(logits)):
      kth = np.sort(logits[b])[-s.top_k]
      logits[b, logits[b] < kth] = -np.inf
  if s.top_p < 1.0:
    for b in range(len(logits)):
      order = np.argsort(logits[b], kind='stable')
      probs = np.exp(logits[b, order] - logits[b, order].max())
      cumulative = np.cumsum(probs / probs.sum())
      remove = cumulative <= 1 - s.top_p
      remove[-1] = False
      logits[b, order[remove]] = -np.inf
  return logits


@pytest.mark.parametrize('s', [
    sampling.Sampling(greedy=True, repetition_penalty=1.2),
    sampling.Sampling(temperature=0.8, top_k=0, top_p=0.9, repetition_penalty=1.2),
    sampling.Sampling(temperature=1.3, top_k=7, top_p=1.0, repetition_penalty=1.0),
    sampling.Sampling(temperature=0.5, top_k=11, top_p=0.6, repetition_penalty=1.5),
])
def test_process_matches_numpy_reference(s):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 29)).astype(np.float32) * 3
  history = rng.integers(-1, 29, size=(3, 9))
  ours = np.asarray(sampling.process(jnp.asarray(logits), jnp.asarray(history), s))
  reference = numpy_process(logits, history, s)
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(reference))
  kept = ~np.isinf(reference)
  np.testing.assert_allclose(ours[kept], reference[kept], rtol=1e-6)


def test_draws_follow_the_processed_distribution():
  s = sampling.Sampling(temperature=0.7, top_k=4, top_p=1.0, repetition_penalty=1.0)
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0]])
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = jax.vmap(lambda k: sampling.select(k, logits, jnp.full((1, 1), -1), s))(keys)[:, 0]
  counts = np.bincount(np.asarray(draws), minlength=6) / len(keys)
  expected = np.exp(np.asarray(logits[0, :4]) / 0.7)
  expected /= expected.sum()
  np.testing.assert_allclose(counts[:4], expected, atol=0.015)
  assert counts[4:].sum() == 0
  greedy = sampling.Sampling(greedy=True, repetition_penalty=1.0)
  assert int(sampling.select(keys[0], logits, jnp.full((1, 1), -1), greedy)[0]) == 0
