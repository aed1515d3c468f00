"""Optimizer of a training stage: warm-up then cosine to a floor, AdamW, global-norm clipping, and
freezing by parameter-path patterns (frozen leaves get no update and no optimizer moments; with
LoRA every leaf but the adapters and train.lora.train_fully's)."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate` over `warmup_fraction` of the steps, then cosine
  decay to `end_learning_rate` at `steps` (constant after that)."""
  warmup_steps = max(1, round(train.warmup_fraction * train.steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(train.steps, warmup_steps + 1), end_value=train.end_learning_rate)


def path_name(path) -> str:
  """'llm/decoder/layers/mlp/up_proj/kernel' for a pytree key path."""
  return '/'.join(str(getattr(key, 'key', key)) for key in path)


def trainable_mask(params: dict, frozen_patterns) -> dict:
  """True for leaves to train: those whose path name matches none of `frozen_patterns`."""
  compiled = [re.compile(p) for p in frozen_patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.search(path_name(path)) for p in compiled), params)


def stop_frozen_gradients(params: dict, frozen_patterns) -> dict:
  """params with the leaves matching `frozen_patterns` behind stop_gradient: their gradient is
  zero without being computed, and so is the backward pass below them when nothing there trains
  (a frozen encoder costs its forward pass only)."""
  if not frozen_patterns:
    return params
  return jax.tree.map(lambda p, trains: p if trains else jax.lax.stop_gradient(p), params,
                      trainable_mask(params, frozen_patterns))


def frozen_patterns(train: ml_collections.ConfigDict) -> tuple[str, ...]:
  """train.frozen and, with LoRA (train.lora.rank > 0), one more pattern that freezes every leaf
  but the adapters and those train.lora.train_fully names. A lookahead `(?!.*(?:P))` at the start
  of a pattern is `not re.search(P, path)`."""
  if not train.lora.rank:
    return tuple(train.frozen)
  kept = ''.join(f'(?!.*(?:{p}))' for p in ('/kernel_lora_[ab]$', *train.lora.train_fully))
  return (*train.frozen, '^' + kept)


def value_and_grad(fun):
  """jax.value_and_grad(fun, has_aux=True) over a parameter tree (the first argument) that may
  hold integer leaves (QLoRA's quantised base, always frozen): their gradient is zeros of their
  own dtype rather than float0, so every optimizer and tree operation takes it as any other."""
  def value_and_grads(params, *args):
    out, grads = jax.value_and_grad(fun, has_aux=True, allow_int=True)(params, *args)
    return out, jax.tree.map(
        lambda g, p: jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g, grads, params)
  return value_and_grads


def make_optimizer(train: ml_collections.ConfigDict, params: dict) -> optax.GradientTransformation:
  """The stage's optimizer for a parameter tree (concrete or abstract): moments only for the
  leaves that train."""
  mask = trainable_mask(params, frozen_patterns(train))
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f'train.frozen={list(train.frozen)} freezes every parameter')
  adamw = optax.chain(
      optax.clip_by_global_norm(train.grad_clip_norm),
      optax.adamw(learning_rate_schedule(train), b1=train.adam_b1, b2=train.adam_b2,
                  eps=train.adam_eps, weight_decay=train.weight_decay))
  return optax.multi_transform({'train': adamw, 'frozen': optax.set_to_zero()},
                               jax.tree.map(lambda t: 'train' if t else 'frozen', mask))


def select(tree: dict, mask: dict) -> dict:
  """The subtree of `tree`'s leaves whose `mask` leaf is True (empty branches left out)."""
  out = {}
  for name, node in tree.items():
    if isinstance(node, dict):
      inner = select(node, mask[name])
      if inner:
        out[name] = inner
    elif mask[name]:
      out[name] = node
  return out
