"""Pure training steps over plain parameter pytrees, jitted with explicit shardings on a mesh."""

from collections.abc import Callable

import jax
from flax import nnx
import ml_collections
import optax

from fac_jax import batch as batch_lib
from fac_jax import sharding
from fac_jax.model import fun_audio_chat


def loss_fn(graphdef: nnx.GraphDef, params: dict, batch: dict) -> tuple[jax.Array, dict]:
  metrics = fun_audio_chat.compute_losses(nnx.merge(graphdef, params)(batch), batch)
  return metrics['loss'], metrics


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation) -> Callable:
  """(params, opt_state, batch) -> (params, opt_state, metrics); pure, no Python side effects."""
  def train_step(params, opt_state, batch):
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
    (_, metrics), grads = grad_fn(graphdef, params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    return params, opt_state, metrics
  return train_step


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
  # Optimizer moments follow their parameter's sharding; scalars are replicated.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: replicated)
  params, opt_state = jax.jit(init, out_shardings=(param_shardings, opt_shardings))()
  return graphdef, params, opt_state, param_shardings, opt_shardings


def jit_train_step(cfg: ml_collections.ConfigDict, graphdef, optimizer, mesh, param_shardings,
                   opt_shardings, batch_example):
  """The train step jitted with explicit in/out shardings; params and optimizer state donated.

  `batch_example` fixes the batch layout; it is checked against fac_jax.batch first.
  """
  batch_lib.check(batch_example, cfg)
  batch_shardings = sharding.batch_shardings(batch_example, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(make_train_step(graphdef, optimizer),
                 in_shardings=(param_shardings, opt_shardings, batch_shardings),
                 out_shardings=(param_shardings, opt_shardings, replicated),
                 donate_argnums=(0, 1)), batch_shardings
