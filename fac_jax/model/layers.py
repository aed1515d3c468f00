"""Building blocks shared by the model's towers: annotated layers, RoPE, scanned stacks."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def linear(in_features, out_features, axes, *, use_bias=False, dtype, param_dtype, rngs):
  """nnx.Linear with logical axes on its kernel (and bias)."""
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                    kernel_metadata={'logical_axes': tuple(axes)},
                    bias_metadata={'logical_axes': (axes[-1],)})


def rms_norm(features, eps, *, dtype, param_dtype, rngs):
  return nnx.RMSNorm(features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                     scale_metadata={'logical_axes': ('norm',)})


def layer_norm(features, eps, *, dtype, param_dtype, rngs):
  return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                       scale_metadata={'logical_axes': ('norm',)},
                       bias_metadata={'logical_axes': ('norm',)})


def embed(num_embeddings, features, axes, *, dtype, param_dtype, rngs):
  return nnx.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                   embedding_init=nnx.initializers.normal(0.02),
                   embedding_metadata={'logical_axes': tuple(axes)})


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the rotate-half layout. x: (B, T, N, H); positions: (B, T)."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def stacked_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                   rngs: nnx.Rngs) -> nnx.Module:
  """`num_layers` copies of a layer with their parameters stacked on a leading 'layers' axis."""
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=0, out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: None, 'logical_axes': 'layers'})
  def make(rngs):
    return make_layer(rngs)
  return make(rngs)


def scan_layers(layers: nnx.Module, x: jax.Array, *args, per_layer=None,
                remat_policy: str = 'none', in_place: bool = False):
  """Applies stacked layers in order with one lax.scan.

  Each call is layer(x, *args), or with `per_layer` (a pytree whose leaves have a leading layer
  axis, e.g. a KV cache) layer(x, *args, that_layer's_slice). A layer returns x, or (x, y): then
  the y of every layer, stacked (a cache's new slices, a router's logits), are returned with x.
  With `in_place`, y is that layer's new slice of per_layer, written back into per_layer as it
  travels in the scan's carry: XLA updates the (donated) buffer in place rather than stacking a
  second copy of the whole cache.
  """
  graphdef, params = nnx.split(layers)

  def body(carry, xs):
    layer_params, layer_extra = xs
    layer = nnx.merge(graphdef, layer_params)
    out = layer(carry, *args) if per_layer is None else layer(carry, *args, layer_extra)
    return out if isinstance(out, tuple) else (out, None)

  if in_place:
    def in_place_body(carry, layer_params):
      x, stacked, index = carry
      take = lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False)
      x, written = body(x, (layer_params, jax.tree.map(take, stacked)))
      put = lambda a, new: jax.lax.dynamic_update_index_in_dim(a, new.astype(a.dtype), index, 0)
      return (x, jax.tree.map(put, stacked, written), index + 1), None

    start = (x, per_layer, jnp.zeros((), jnp.int32))
    (x, per_layer_out, _), _ = jax.lax.scan(in_place_body, start, params)
    return x, per_layer_out

  if remat_policy != 'none':
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy {remat_policy!r}: expected none or one of '
                       f'{sorted(REMAT_POLICIES)}')
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
  x, per_layer_out = jax.lax.scan(body, x, (params, per_layer))
  return x if per_layer_out is None else (x, per_layer_out)
