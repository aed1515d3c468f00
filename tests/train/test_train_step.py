"""The jitted forward and gradient step on the tiny config: it runs, learns, and its numbers do not
depend on packing or on the rematerialisation policy."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fac_jax.data import conversation, synthetic
from fac_jax.model import fun_audio_chat
from fac_jax.train import optim, steps


def split_params(cfg, seed=0):
  graphdef, state = nnx.split(fun_audio_chat.create(cfg, seed))
  return graphdef, nnx.to_pure_dict(state)


def test_jitted_steps_reduce_the_loss(tiny_config):
  cfg = tiny_config.model
  graphdef, params = split_params(cfg)
  batch = synthetic.batch(np.random.default_rng(0), cfg, batch_size=2, seq_len=96, num_windows=16)
  optimizer = optax.adam(3e-3)
  train_step = jax.jit(steps.make_train_step(graphdef, optimizer))
  opt_state = optimizer.init(params)
  history = []
  for _ in range(8):
    params, opt_state, metrics = train_step(params, opt_state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
  for m in history:
    assert np.isfinite([m['loss'], m['grad_norm']]).all()
  assert history[-1]['text_loss'] < 0.8 * history[0]['text_loss']
  assert history[-1]['speech_loss'] < history[0]['speech_loss']


def test_packed_rows_equal_separate_rows(tiny_config):
  cfg = tiny_config.model
  rng = np.random.default_rng(4)
  examples = [conversation.format_conversation(synthetic.conversation_pieces(rng, cfg), cfg)
              for _ in range(2)]
  total = sum(len(e['input_ids']) for e in examples)
  windows = sum(len(e['mel_lengths']) for e in examples)
  packed = conversation.pack([examples], total + 3, windows + 1, cfg)
  separate = conversation.pack([[e] for e in examples], total + 3, windows + 1, cfg)
  graphdef, params = split_params(cfg, seed=1)
  forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))
  out_packed = forward(params, packed)
  out_separate = forward(params, separate)
  group = cfg.speech.group_size
  offset = 0
  for row, example in enumerate(examples):
    n = len(example['input_ids'])
    np.testing.assert_allclose(out_packed['text_logits'][0, offset:offset + n],
                               out_separate['text_logits'][row, :n], atol=2e-5)
    np.testing.assert_allclose(
        out_packed['speech_logits'][0, offset * group:(offset + n) * group],
        out_separate['speech_logits'][row, :n * group], atol=2e-5)
    offset += n
  losses_packed = fun_audio_chat.compute_losses(out_packed, packed)
  losses_separate = fun_audio_chat.compute_losses(out_separate, separate)
  for name in ('text_loss', 'speech_loss'):
    np.testing.assert_allclose(float(losses_packed[name]), float(losses_separate[name]),
                               rtol=1e-5)


def gradients_with_remat(cfg, remat_policy, batch):
  cfg = copy.deepcopy(cfg)
  cfg.remat_policy = remat_policy
  graphdef, params = split_params(cfg)
  return jax.jit(jax.grad(lambda p: steps.loss_fn(graphdef, p, batch)[0]))(params)


def test_remat_policies_keep_gradients(tiny_config):
  cfg = tiny_config.model
  batch = synthetic.batch(np.random.default_rng(5), cfg, batch_size=2, seq_len=96, num_windows=16)
  reference = gradients_with_remat(cfg, 'none', batch)
  for policy in ('full', 'dots', 'dots_no_batch'):
    grads = gradients_with_remat(cfg, policy, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, reference)


def test_unknown_remat_policy_is_refused(tiny_config):
  cfg = copy.deepcopy(tiny_config.model)
  cfg.remat_policy = 'sometimes'
  batch = synthetic.batch(np.random.default_rng(5), cfg, batch_size=1, seq_len=96, num_windows=16)
  model = fun_audio_chat.create(cfg)
  with pytest.raises(ValueError, match='remat_policy'):
    model(jax.tree.map(jnp.asarray, batch))


def test_bfloat16_compute_tracks_float32(tiny_config):
  cfg = tiny_config.model
  batch = synthetic.batch(np.random.default_rng(6), cfg, batch_size=2, seq_len=96, num_windows=16)
  graphdef32, params = split_params(cfg)
  bf16 = copy.deepcopy(cfg)
  bf16.dtype = 'bfloat16'
  graphdef16, _ = split_params(bf16)
  out32 = jax.jit(lambda p: steps.loss_fn(graphdef32, p, batch)[1])(params)
  out16, logits16 = jax.jit(lambda p: (steps.loss_fn(graphdef16, p, batch)[1],
                                       nnx.merge(graphdef16, p)(batch)))(params)
  assert logits16['text_logits'].dtype == jnp.bfloat16
  for name in ('text_loss', 'speech_loss'):
    np.testing.assert_allclose(float(out16[name]), float(out32[name]), rtol=2e-2)


def test_gradient_accumulation_equals_the_whole_batch(tiny_config):
  """Rows with different numbers of targets: each slice is weighted by its share of targets."""
  cfg = tiny_config.model
  graphdef, params = split_params(cfg)
  batch = synthetic.batch(np.random.default_rng(3), cfg, batch_size=4, seq_len=96, num_windows=16)
  optimizer = optax.sgd(0.1)
  results = {}
  for slices in (1, 4):
    step = jax.jit(steps.make_train_step(graphdef, optimizer, grad_accum_steps=slices))
    new_params, _, metrics = step(params, optimizer.init(params), batch)
    results[slices] = jax.device_get((new_params, metrics))
  (whole_params, whole), (sliced_params, sliced) = results[1], results[4]
  for name in ('loss', 'text_loss', 'speech_loss', 'text_accuracy', 'grad_norm'):
    assert sliced[name] == pytest.approx(whole[name], rel=1e-5), name
  diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), sliced_params, whole_params)
  assert max(jax.tree.leaves(diffs)) < 1e-6


def test_a_non_finite_step_changes_nothing_and_is_counted(tiny_config):
  cfg = tiny_config.model
  graphdef, params = split_params(cfg)
  batch = synthetic.batch(np.random.default_rng(0), cfg, batch_size=2, seq_len=96, num_windows=16)
  optimizer = optax.adam(1e-3)
  step = jax.jit(steps.make_train_step(graphdef, optimizer))
  opt_state = optimizer.init(params)
  _, _, metrics = step(params, opt_state, batch)
  assert int(metrics['skipped']) == 0
  poisoned = dict(batch, mel=np.full_like(batch['mel'], np.nan))
  new_params, new_opt_state, metrics = step(params, opt_state, poisoned)
  assert int(metrics['skipped']) == 1 and not np.isfinite(float(metrics['loss']))
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), (new_params, new_opt_state),
                      (params, opt_state))
  assert all(jax.tree.leaves(same))


def test_frozen_leaves_are_not_differentiated(tiny_config):
  """With the LLM frozen (prealign), the gradient of every other leaf is the full gradient's and
  the LLM's is zero; with all but the text head frozen, no backward pass is left to compute but
  the head's (XLA counts under 60 % of the full gradient's FLOPs, the forward pass included)."""
  cfg = tiny_config.model
  graphdef, params = split_params(cfg)
  batch = synthetic.batch(np.random.default_rng(7), cfg, batch_size=2, seq_len=96, num_windows=16)
  frozen = ('^llm/',)
  loss = lambda p: steps.loss_fn(graphdef, p, batch)[0]
  frozen_loss = lambda p: steps.loss_fn(graphdef, optim.stop_frozen_gradients(p, frozen), batch)[0]
  full, partial = (jax.jit(jax.grad(f))(params) for f in (loss, frozen_loss))
  assert all(np.all(g == 0) for g in jax.tree.leaves(partial['llm']))
  assert any(np.any(g != 0) for g in jax.tree.leaves(full['llm']))
  for part in ('continuous_encoder', 'adapters', 'speech_refined_head'):
    for a, b in zip(jax.tree.leaves(full[part]), jax.tree.leaves(partial[part])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  head_only = lambda p: steps.loss_fn(
      graphdef, optim.stop_frozen_gradients(p, ('^(?!llm/lm_head/)',)), batch)[0]
  flops = lambda f: jax.jit(jax.grad(f)).lower(params).compile().cost_analysis()['flops']
  assert flops(head_only) < 0.6 * flops(loss)
