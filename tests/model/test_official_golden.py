"""The whole model against golden outputs of the official PyTorch Fun-Audio-Chat (tiny, float32).

The official folder is imported by the converter and the batch read from the official format.
Tolerance: logits within max relative error 1e-4 (relative to the largest reference magnitude),
losses within 1e-5 relative, input embeddings within 1e-5 absolute, labels exactly; the gradient of
the total loss within 1e-5 absolute for every parameter, its global norm within 1e-5 relative.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from fac_jax.batch import IGNORE_ID
from fac_jax.checkpoints import official_layout
from fac_jax.data import official_batch
from fac_jax.model import fun_audio_chat
from fac_jax.train import steps
import official_tiny


def max_rel_err(ours, theirs):
  return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope='module')
def golden(tmp_path_factory):
  cfg, model = official_tiny.imported_model(str(tmp_path_factory.mktemp('golden') / 'ckpt'))
  reference = official_tiny.forward_reference()
  batch = official_batch.to_batch(official_tiny.forward_inputs(reference), cfg)
  return cfg, reference, batch, model


def test_losses_and_logits_match_official(golden):
  _, reference, batch, model = golden
  jbatch = jax.tree.map(jnp.asarray, batch)
  outputs = model(jbatch)
  losses = fun_audio_chat.compute_losses(outputs, jbatch)
  for name in ('loss', 'text_loss', 'speech_loss'):
    np.testing.assert_allclose(float(losses[name]), reference[f'out.{name}'], rtol=1e-5)

  valid = batch['segment_ids'] > 0
  assert max_rel_err(np.asarray(outputs['text_logits'])[valid],
                     reference['out.text_logits'][valid]) < 1e-4
  group = batch['speech_codes'].shape[-1]
  speech_valid = np.repeat(valid, group, axis=1)
  assert max_rel_err(np.asarray(outputs['speech_logits'])[speech_valid],
                     reference['out.speech_logits'][speech_valid]) < 1e-4


def test_gradient_matches_official_for_every_parameter(golden):
  """Every official gradient, the tied speech-code embedding's included: official lookups
  (nn.Embedding with padding_idx) send none to the pad row, only the refined head's output does."""
  cfg, _, batch, model = golden
  graphdef, state = nnx.split(model)
  jbatch = jax.tree.map(jnp.asarray, batch)
  grads = jax.grad(lambda p: steps.loss_fn(graphdef, p, jbatch)[0])(nnx.to_pure_dict(state))
  reference = official_tiny.grads_reference()
  errors, squares = {}, 0.0
  for m in official_layout.fun_audio_chat_maps(cfg):
    leaf = np.asarray(official_layout.at_path(grads, m.path), np.float64)
    squares += float(np.sum(leaf ** 2))
    for i, key in enumerate(m.keys):
      ours = official_layout.official_tensor(leaf, m, i)
      errors[key] = float(np.abs(ours - reference[key]).max())
  assert set(errors) == set(reference)
  worst = max(errors, key=errors.get)
  print(f'max gradient difference {errors[worst]:.3g} ({worst}); norm {np.sqrt(squares):.6f}')
  assert errors[worst] < 1e-5, worst
  official_norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in reference.values()))
  np.testing.assert_allclose(np.sqrt(squares), official_norm, rtol=1e-5)


def test_every_official_tensor_is_mapped(golden):
  cfg = golden[0]
  names = set(load_file(os.path.join(official_tiny.DIR, 'model.safetensors')))
  mapped = {key for m in official_layout.fun_audio_chat_maps(cfg) for key in m.keys}
  assert mapped <= names
  assert names - mapped <= set(official_layout.UNUSED_OFFICIAL_KEYS)


def test_batch_targets_are_the_official_labels_shifted(golden):
  _, reference, batch, _ = golden
  lm_labels = reference['internal.lm_labels']
  np.testing.assert_array_equal(batch['text_targets'][:, :-1], lm_labels[:, 1:])
  assert (batch['text_targets'][:, -1] == IGNORE_ID).all()
  group = batch['speech_codes'].shape[-1]
  flat_speech_targets = batch['speech_targets'].reshape(len(batch['speech_targets']), -1)
  np.testing.assert_array_equal(flat_speech_targets[:, :-group],
                                reference['internal.speech_labels'][:, group:])


def test_llm_and_refined_head_inputs_match_official(golden):
  _, reference, batch, model = golden
  jbatch = jax.tree.map(jnp.asarray, batch)
  valid = batch['segment_ids'] > 0
  inputs, head_text = model.embed_inputs(jbatch)
  np.testing.assert_allclose(np.asarray(inputs)[valid],
                             reference['internal.lm_inputs_embeds'][valid], atol=1e-5)

  hidden = model.llm.decoder(inputs, jbatch['positions'], jbatch['segment_ids'])
  assert max_rel_err(np.asarray(hidden + head_text)[valid],
                     reference['internal.speech_inputs_embeds'][valid]) < 1e-4

  # Previous-code embeddings: official rolls the label embeddings by -(group - 1) over the flat
  # 25 Hz axis; its last group - 1 slots wrap around, ours read padding, so compare the rest.
  group = batch['speech_codes'].shape[-1]
  head_inputs = model.speech_head_inputs(hidden, head_text, jbatch['speech_targets'])
  split = model.speech_refined_head.split(hidden + head_text)
  previous_code_embeds = np.asarray(head_inputs - split)
  rows, length = valid.shape
  official = reference['internal.crq_audio_embeds'].reshape(rows, length * group, -1)
  official = np.roll(official, -(group - 1), axis=1)[:, :-(group - 1)]
  ours = previous_code_embeds[:, :-(group - 1)]
  flat_valid = np.repeat(valid, group, axis=1)[:, :-(group - 1)]
  assert max_rel_err(ours[flat_valid], official[flat_valid]) < 1e-4
