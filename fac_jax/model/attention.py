"""Attention over (B, T, N, H) queries by the implementation `model.attention` names.

  xla     jax.nn.dot_product_attention given a dense (B, 1, T, S) boolean mask.
  splash  Pallas splash attention for TPU (in Pallas interpret mode when the platform is CPU):
          causal and packed segments without a T x T mask. Mosaic kernels are not partitioned
          automatically: a program over several devices must be traced with its mesh in scope
          (jax.set_mesh), and the kernel then runs per shard (shard_map).
  cudnn   cuDNN flash attention through jax.nn.dot_product_attention (16-bit inputs only).
  auto    splash on TPU (when it can run: a mesh in scope, or one device), cudnn on GPU for
          16-bit inputs, xla otherwise; by the platform of the mesh in scope, else of the default
          backend (fac_jax.sharding.platform).

What a query sees is a `Packed` (the Qwen3 stacks: causal inside packed segments) or a `Windows`
(the encoder: one mel window a row, its valid frames), or a dense boolean mask, which always goes
to XLA (the KV-cache decode path's slot mask).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from fac_jax import sharding

IMPLEMENTATIONS = ('auto', 'xla', 'splash', 'cudnn')
# Splash tiles: the largest that divides the length padded to a multiple of 128 (a TPU lane row;
# the kernel's segment-id masking needs tiles of whole rows).
SPLASH_LANES = 128
SPLASH_BLOCKS = (512, 256, 128)


def _check(implementation: str) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention={implementation!r}: expected one of {IMPLEMENTATIONS}')


@functools.partial(jax.tree_util.register_dataclass, data_fields=['segment_ids'],
                   meta_fields=['implementation'])
@dataclasses.dataclass(frozen=True)
class Packed:
  """Causal attention inside packed segments: a position sees itself and the earlier positions
  with its segment id (B, T)."""
  segment_ids: jax.Array
  implementation: str = 'auto'

  def __post_init__(self):
    _check(self.implementation)


@functools.partial(jax.tree_util.register_dataclass, data_fields=['valid'],
                   meta_fields=['implementation'])
@dataclasses.dataclass(frozen=True)
class Windows:
  """Non-causal attention inside each row: its valid frames (B, T), a prefix, see each other;
  a padding frame sees itself alone (its output is never read)."""
  valid: jax.Array
  implementation: str = 'auto'

  def __post_init__(self):
    _check(self.implementation)


def segment_mask(segment_ids: jax.Array, causal: bool) -> jax.Array:
  """(B, 1, T, T) attention mask: same packed segment, and not the future when causal."""
  mask = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    length = segment_ids.shape[1]
    mask &= jnp.tril(jnp.ones((length, length), dtype=bool))
  return mask[:, None]


def dense_mask(mask: Packed | Windows) -> jax.Array:
  """The (B, 1, T, T) boolean mask the XLA path is given."""
  if isinstance(mask, Packed):
    return segment_mask(mask.segment_ids, causal=True)
  valid = mask.valid
  return (valid[:, None, :, None] & valid[:, None, None, :]) | jnp.eye(valid.shape[1], dtype=bool)


def resolve(implementation: str, dtype) -> str:
  """The implementation 'auto' stands for here, for inputs of this dtype."""
  _check(implementation)
  if implementation != 'auto':
    return implementation
  platform = sharding.platform()
  if platform == 'tpu':
    return 'splash' if sharding.mesh_is_set() or jax.device_count() == 1 else 'xla'
  if platform == 'gpu' and jnp.dtype(dtype).itemsize == 2:
    return 'cudnn'
  return 'xla'


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask) -> jax.Array:
  """Attention of q (B, T, N, H) over k, v (B, S, K, H), K dividing N (GQA) -> (B, T, N, H).

  `mask`: a Packed or Windows (self-attention, S = T), by its implementation; or a (B, 1, T, S)
  boolean array, by XLA.
  """
  if not isinstance(mask, (Packed, Windows)):
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  implementation = resolve(mask.implementation, q.dtype)
  if implementation == 'xla':
    return jax.nn.dot_product_attention(q, k, v, mask=dense_mask(mask))
  if implementation == 'cudnn':
    return _cudnn(q, k, v, mask)
  return _splash(q, k, v, mask)


def _cudnn(q, k, v, mask: Packed | Windows) -> jax.Array:
  """cuDNN partitions itself over a mesh (custom partitioning): no shard_map."""
  if isinstance(mask, Windows):
    # Padding frames come out zero rather than attending to themselves; no valid frame reads
    # them. An empty window keeps one frame so that no row is empty.
    lengths = jnp.maximum(mask.valid.sum(axis=1), 1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation='cudnn')
  # jax.nn.dot_product_attention takes no segment ids (cuDNN's packed layout is reachable only
  # through a private JAX API, on Hopper and later): packed segments go in as a mask, which
  # cuDNN turns into a (B, 1, T, T) bias; causality stays cuDNN's own, skipping future blocks.
  same_segment = segment_mask(mask.segment_ids, causal=False)
  return jax.nn.dot_product_attention(q, k, v, mask=same_segment, is_causal=True,
                                      implementation='cudnn')


def _splash(q, k, v, mask: Packed | Windows) -> jax.Array:
  """Splash attention per row and per shard, on lengths padded to a multiple of the lane row."""
  length = q.shape[1]
  padded = -(-length // SPLASH_LANES) * SPLASH_LANES
  if isinstance(mask, Packed):
    # Padding goes after every real position, so causality alone keeps real queries off it.
    segment_ids = jnp.pad(mask.segment_ids, ((0, 0), (0, padded - length)))
  else:
    # Valid frames share segment 0; every padding frame is a segment of its own.
    index = jnp.arange(padded)
    segment_ids = jnp.where(index < mask.valid.sum(axis=1, keepdims=True), 0, index + 1)
  run = functools.partial(_splash_rows, causal=isinstance(mask, Packed),
                          interpret=sharding.platform() == 'cpu')
  specs = sharding.attention_specs(q.shape, k.shape)
  if specs is not None:
    q_spec, kv_spec, ids_spec = specs
    run = jax.shard_map(run, in_specs=(q_spec, kv_spec, kv_spec, ids_spec), out_specs=q_spec,
                        check_vma=False)
  return run(q, k, v, segment_ids.astype(jnp.int32))


def _splash_rows(q, k, v, segment_ids, *, causal: bool, interpret: bool) -> jax.Array:
  """q (B, T, N, H), k, v (B, T, K, H), segment ids (B, T') with T' padded -> (B, T, N, H)."""
  length, heads, head_dim = q.shape[1:]
  padded = segment_ids.shape[1]
  block = next(b for b in SPLASH_BLOCKS if padded % b == 0)
  head_mask = (splash.CausalMask if causal else splash.FullMask)((padded, padded))
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask([head_mask] * heads), head_shards=1, q_seq_shards=1,
      block_sizes=splash.BlockSizes(
          block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
      interpret=interpret)
  # Splash takes heads first and leaves the 1 / sqrt(H) logit scale to its caller.
  to_kernel = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2),
                                ((0, 0), (0, 0), (0, padded - length), (0, 0)))
  q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
  out = jax.vmap(kernel)(to_kernel(q), to_kernel(k), to_kernel(v),
                         splash.SegmentIds(segment_ids, segment_ids))
  return jnp.swapaxes(out[:, :, :length], 1, 2)
