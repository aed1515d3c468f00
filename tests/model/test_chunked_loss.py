"""The chunked cross-entropy (model.loss_chunk_positions) against the full logits: the same
per-target log-likelihoods, losses, accuracies and gradients, and a compiled gradient that holds
no (batch, positions, vocab) logits."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO

from fac_jax import config as config_lib
from fac_jax.batch import IGNORE_ID
from fac_jax.data import synthetic
from fac_jax.model import fun_audio_chat
from fac_jax.train import steps
from test_official_golden import max_rel_err

BATCH_SIZE, SEQ_LEN, NUM_WINDOWS = 2, 64, 8
# float32, matmuls at 'highest' (conftest): the chunks only reorder sums.
TOLERANCE = 1e-5


def graphdef_with(cfg, chunk: int) -> nnx.GraphDef:
  cfg = cfg.copy_and_resolve_references()
  cfg.loss_chunk_positions = chunk
  return nnx.split(fun_audio_chat.abstract_model(cfg))[0]


def loss_grad(graphdef):
  """(params, batch) -> ((loss, (metrics, per-target (nll, hits))), gradients), unjitted."""
  def loss(params, batch):
    metrics = steps.loss_fn(graphdef, params, batch)[1]
    return metrics['loss'], (metrics, nnx.merge(graphdef, params).target_nll(batch))
  return jax.value_and_grad(loss, has_aux=True)


@pytest.fixture(scope='module')
def full():
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'tiny.py')).model
  params = nnx.to_pure_dict(nnx.split(fun_audio_chat.create(cfg, seed=3))[1])
  batch = synthetic.batch(np.random.default_rng(5), cfg, BATCH_SIZE, SEQ_LEN, NUM_WINDOWS)
  graphdef = graphdef_with(cfg, 0)
  # Every other text target made the model's own prediction, so that the accuracies count hits.
  predicted = jax.jit(lambda p: nnx.merge(graphdef, p)(batch)['text_logits'].argmax(-1))(params)
  targets = batch['text_targets']
  batch['text_targets'] = np.where((targets != IGNORE_ID) & (np.arange(SEQ_LEN) % 2 == 0),
                                   predicted, targets)
  return cfg, params, batch, jax.jit(loss_grad(graphdef))(params, batch)


# 16 divides the 64 positions (and 80 the 320 sub-slots); 24 does not: the last chunk is padded.
@pytest.mark.parametrize('chunk', [16, 24])
def test_chunked_loss_equals_the_full_loss_and_gradients(full, chunk):
  cfg, params, batch, ((loss, (metrics, per_target)), grads) = full
  (chunked_loss, (chunked_metrics, chunked_per_target)), chunked_grads = jax.jit(
      loss_grad(graphdef_with(cfg, chunk)))(params, batch)
  assert np.isfinite(float(loss)) and 0.3 < float(metrics['text_accuracy']) < 1
  for name in ('text_loss', 'speech_loss', 'loss'):
    np.testing.assert_allclose(chunked_metrics[name], metrics[name], rtol=TOLERANCE, err_msg=name)
  for name in ('text_accuracy', 'speech_accuracy'):
    assert float(chunked_metrics[name]) == float(metrics[name]), name
  for channel, (nll, hits) in per_target.items():
    assert chunked_per_target[channel][0].shape == nll.shape
    np.testing.assert_allclose(chunked_per_target[channel][0], nll, rtol=TOLERANCE, atol=1e-6)
    np.testing.assert_array_equal(chunked_per_target[channel][1], hits)
  assert max(jax.tree.leaves(jax.tree.map(max_rel_err, chunked_grads, grads))) < TOLERANCE


def test_compiled_chunked_gradient_holds_no_full_logits(tiny_config):
  """Compiled, not run: with vocabularies this large the logits outweigh the rest of the tiny
  model. Measured (jax 0.10.2, XLA:CPU): 729 MB of temporaries with full logits, 331 MB in
  chunks of 16 positions; the float32 logits are 268 MB (text) + 42 MB (speech)."""
  cfg = tiny_config.model
  rows, length = 4, 128
  batch = synthetic.batch(np.random.default_rng(5), cfg, rows, length, num_windows=16)
  cfg.llm.vocab_size, cfg.speech.codebook_size = 131072, 4096
  params = nnx.to_pure_dict(nnx.split(fun_audio_chat.abstract_model(cfg))[1])
  temp = {}
  for chunk in (0, 16):
    grad = jax.jit(jax.grad(lambda p, b, g=graphdef_with(cfg, chunk): steps.loss_fn(g, p, b)[0]))
    temp[chunk] = grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
  logits_bytes = 4 * rows * length * (cfg.llm.vocab_size
                                      + cfg.speech.group_size * cfg.speech.codebook_size)
  print(f'temporaries: full {temp[0]} B, chunked {temp[16]} B; float32 logits {logits_bytes} B')
  assert temp[0] - temp[16] >= logits_bytes
