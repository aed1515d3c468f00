"""Pure training steps over plain parameter pytrees, jitted with explicit shardings on a mesh."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections
import optax

from fac_jax import batch as batch_lib, sharding
from fac_jax.model import fun_audio_chat
from fac_jax.train import optim


def loss_fn(graphdef: nnx.GraphDef, params: dict, batch: dict) -> tuple[jax.Array, dict]:
  """The loss and metrics of fun_audio_chat.losses, the logits chunked as the model's
  loss_chunk_positions says."""
  metrics = fun_audio_chat.losses(nnx.merge(graphdef, params).target_nll(batch), batch)
  return metrics['loss'], metrics


def _accumulated_grads(graphdef: nnx.GraphDef, params: dict, batch: dict, num_micro: int,
                       frozen=()):
  """Gradient and metrics of the whole batch, computed over `num_micro` row slices in sequence.

  Each slice's text and speech losses are weighted by its share of the batch's valid targets, so
  the sum equals the whole-batch loss (each channel a mean over its targets) exactly. An MoE
  LLM's router metrics are weighted by the slice's share of the batch's non-padding positions:
  the load-balancing loss, a product of two means, is then each slice's own (as where every
  micro-batch adds its own), not the whole batch's.
  """
  count = lambda targets: jnp.maximum((targets != batch_lib.IGNORE_ID).sum(), 1)
  text_total, speech_total = count(batch['text_targets']), count(batch['speech_targets'])
  positions_total = jnp.maximum((batch['segment_ids'] > 0).sum(), 1)

  def weighted_loss(params, micro):
    params = optim.stop_frozen_gradients(params, frozen)
    metrics = loss_fn(graphdef, params, micro)[1]
    shares = {'text': (micro['text_targets'] != batch_lib.IGNORE_ID).sum() / text_total,
              'speech': (micro['speech_targets'] != batch_lib.IGNORE_ID).sum() / speech_total,
              'router': (micro['segment_ids'] > 0).sum() / positions_total}
    weighted = {name: value * shares[name.split('_')[0].split('/')[0]]
                for name, value in metrics.items() if name != 'loss'}
    weighted['loss'] = weighted['text_loss'] + weighted['speech_loss'] + weighted.get(
        'router_loss', 0.0)
    return weighted['loss'], weighted

  def add_micro(carry, micro):
    (_, metrics), grads = optim.value_and_grad(weighted_loss)(params, micro)
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  rows = batch['input_ids'].shape[0]
  if rows % num_micro:
    raise ValueError(f'batch of {rows} rows does not split into {num_micro} micro-batches')
  micro_batches = jax.tree.map(lambda x: x.reshape((num_micro, rows // num_micro) + x.shape[1:]),
                               batch)
  zeros = jax.eval_shape(lambda: (params, weighted_loss(params, batch)[1]))
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), zeros)
  (grads, metrics), _ = jax.lax.scan(add_micro, zeros, micro_batches)
  return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), metrics


def guarded_update(optimizer: optax.GradientTransformation, params, opt_state, grads,
                   metrics: dict):
  """The optimizer update, unless the loss or the gradient is not finite: then nothing changes.
  Adds `grad_norm` and `skipped` (1 for a skipped step) to the metrics."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep_if_finite = lambda new, old: jnp.where(finite, new, old)
  params = jax.tree.map(keep_if_finite, new_params, params)
  opt_state = jax.tree.map(keep_if_finite, new_opt_state, opt_state)
  metrics.update(grad_norm=grad_norm, skipped=1 - finite.astype(jnp.int32))
  return params, opt_state, metrics


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    grad_accum_steps: int = 1, frozen=()) -> Callable:
  """(params, opt_state, batch) -> (params, opt_state, metrics); pure, no Python side effects.

  `frozen`: the stage's frozen path patterns (train.frozen), whose gradients are not computed.

  With grad_accum_steps > 1 the batch's rows are processed in that many slices, one after the
  other, and one update is made from their summed gradient (activation memory of one slice). A
  step whose loss or gradient is not finite changes nothing and reports `skipped` = 1.
  """
  def train_step(params, opt_state, batch):
    if grad_accum_steps == 1:
      frozen_loss = lambda p: loss_fn(graphdef, optim.stop_frozen_gradients(p, frozen), batch)
      (_, metrics), grads = optim.value_and_grad(frozen_loss)(params)
    else:
      grads, metrics = _accumulated_grads(graphdef, params, batch, grad_accum_steps, frozen)
    return guarded_update(optimizer, params, opt_state, grads, metrics)
  return train_step


def _dict_keys(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def optimizer_shardings(abstract_opt_state, param_shardings: dict, mesh: jax.sharding.Mesh):
  """Each optimizer-state leaf takes the sharding of the parameter whose path ends its own path
  (moments of any optax state, masked or partitioned); counts and other leaves are replicated."""
  by_path = {_dict_keys(path): s
             for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def leaf_sharding(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      if keys[start:] in by_path and leaf.ndim > 0:
        return by_path[keys[start:]]
    return replicated
  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def init_sharded(cfg: ml_collections.ConfigDict, optimizer: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh, seed: int = 0):
  """Model parameters and optimizer state created directly in their shardings on `mesh`.

  Returns (graphdef, params, opt_state, param_shardings, opt_shardings).
  """
  abstract = fun_audio_chat.abstract_model(cfg)
  graphdef, abstract_state = nnx.split(abstract)
  param_shardings = sharding.param_shardings(abstract_state, mesh)

  def init():
    params = nnx.to_pure_dict(nnx.split(fun_audio_chat.create(cfg, seed))[1])
    return params, optimizer.init(params)

  _, abstract_opt = jax.eval_shape(init)
  opt_shardings = optimizer_shardings(abstract_opt, param_shardings, mesh)
  params, opt_state = jax.jit(init, out_shardings=(param_shardings, opt_shardings))()
  return graphdef, params, opt_state, param_shardings, opt_shardings


def jit_train_step(cfg: ml_collections.ConfigDict, graphdef, optimizer, mesh, param_shardings,
                   opt_shardings, batch_example, grad_accum_steps: int = 1, frozen=()):
  """The train step jitted with explicit in/out shardings; params and optimizer state donated.

  `batch_example` fixes the batch layout; it is checked against fac_jax.batch first.
  """
  batch_lib.check(batch_example, cfg)
  batch_shardings = sharding.batch_shardings(batch_example, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(make_train_step(graphdef, optimizer, grad_accum_steps, frozen),
                 in_shardings=(param_shardings, opt_shardings, batch_shardings),
                 out_shardings=(param_shardings, opt_shardings, replicated),
                 donate_argnums=(0, 1)), batch_shardings
