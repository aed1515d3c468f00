"""Qwen3 decoder stack: one implementation serves the shared LLM and the speech refined head.

A stack is dense (Qwen3) or, with its config's moe.num_experts > 0, sparse (Qwen3-MoE: a
fac_jax.model.moe.SparseMoe block named `moe` in place of `mlp`); either way one scan runs its
layers, so a stack that would mix the two kinds is refused (fac_jax.model.moe.is_sparse_stack).
"""

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from fac_jax import sharding
from fac_jax.model import attention, layers, moe


class Attention(nnx.Module):
  """Grouped-query attention with per-head RMSNorm on q and k before RoPE."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.rope_theta = cfg.rope_theta
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.hidden_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    self.q_proj = layers.linear(d, q_dim, ('embed', 'heads'), **kw)
    self.k_proj = layers.linear(d, kv_dim, ('embed', 'kv_heads'), **kw)
    self.v_proj = layers.linear(d, kv_dim, ('embed', 'kv_heads'), **kw)
    self.o_proj = layers.linear(q_dim, d, ('heads', 'embed'), **kw)
    self.q_norm = layers.rms_norm(cfg.head_dim, cfg.norm_eps, **kw)
    self.k_norm = layers.rms_norm(cfg.head_dim, cfg.norm_eps, **kw)

  def __call__(self, x, positions, mask, cache=None):
    """Without `cache`, attends over x itself (mask: an attention.Packed, or a (B, 1, T, T)
    boolean array for XLA). With cache = {'k', 'v': (B, slots, K, H), 'index': first slot to
    write}, writes this step's keys and values there and returns (out, updated cache): it
    attends over all slots by XLA given a (B, 1, T, slots) mask, or, given a Packed mask (the
    prefill of an empty cache), over this step's keys alone by the mask's kernel."""
    batch, length, _ = x.shape
    q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    q = layers.apply_rope(self.q_norm(q), positions, self.rope_theta)
    k = layers.apply_rope(self.k_norm(k), positions, self.rope_theta)
    q = sharding.constrain(q, ('batch', 'length', 'heads', None))
    if cache is not None:
      start = (0, cache['index'], 0, 0)
      cache = dict(cache, k=jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype),
                                                         start),
                   v=jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), start))
      if not isinstance(mask, attention.Packed):
        k, v = cache['k'], cache['v']
    out = attention.attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    out = self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))
    return out if cache is None else (out, cache)


class Mlp(nnx.Module):
  """SwiGLU feed-forward block."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = layers.linear(cfg.hidden_size, cfg.mlp_dim, ('embed', 'mlp'), **kw)
    self.up_proj = layers.linear(cfg.hidden_size, cfg.mlp_dim, ('embed', 'mlp'), **kw)
    self.down_proj = layers.linear(cfg.mlp_dim, cfg.hidden_size, ('mlp', 'embed'), **kw)

  def __call__(self, x):
    hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(sharding.constrain(hidden, ('batch', 'length', 'mlp')))


class DecoderLayer(nnx.Module):
  """Attention and a feed-forward block: dense (`mlp`) or, with `sparse`, MoE (`moe`)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, sparse: bool = False, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.sparse = sparse
    self.input_norm = layers.rms_norm(cfg.hidden_size, cfg.norm_eps, **kw)
    self.attention = Attention(cfg, **kw)
    self.post_attention_norm = layers.rms_norm(cfg.hidden_size, cfg.norm_eps, **kw)
    if sparse:
      self.moe = moe.SparseMoe(cfg, **kw)
    else:
      self.mlp = Mlp(cfg, **kw)

  def __call__(self, x, positions, mask, cache=None):
    """-> x; with a cache (x, cache); a sparse layer without a cache: (x, its router logits
    (B, T, E))."""
    attended = self.attention(self.input_norm(x), positions, mask, cache)
    if cache is not None:
      attended, cache = attended
    x = x + attended
    normed = self.post_attention_norm(x)
    router_logits = None
    if self.sparse:
      feed_forward, router_logits = self.moe(normed)
    else:
      feed_forward = self.mlp(normed)
    x = sharding.constrain(x + feed_forward, ('batch', 'length', 'embed'))
    if cache is not None:
      return x, cache
    return x if router_logits is None else (x, router_logits)


class DecoderStack(nnx.Module):
  """Scanned Qwen3 decoder layers and the final RMSNorm (no token embedding, no head).

  `attention` (model.attention) picks the kernel of the full forward; decode uses XLA's with
  its slot mask.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype,
               remat_policy: str = 'none', attention: str = 'auto', rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.remat_policy = remat_policy
    self.attention = attention
    self.sparse = moe.is_sparse_stack(cfg)
    self.layers = layers.stacked_layers(
        lambda r: DecoderLayer(cfg, sparse=self.sparse, rngs=r, **kw), cfg.num_layers, rngs)
    self.final_norm = layers.rms_norm(cfg.hidden_size, cfg.norm_eps, rngs=rngs, **kw)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """x: (B, T, D) inputs; positions, segment_ids: (B, T). Causal within each segment."""
    return self.forward(x, positions, segment_ids)[0]

  def forward(self, x: jax.Array, positions: jax.Array,
              segment_ids: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """__call__'s final-normed states, and every layer's router logits (L, B, T, E) float32
    for a sparse stack (None for a dense one)."""
    mask = attention.Packed(segment_ids, self.attention)
    x = sharding.constrain(x, ('batch', 'length', 'embed'))
    x = layers.scan_layers(self.layers, x, positions, mask, remat_policy=self.remat_policy)
    x, router_logits = x if self.sparse else (x, None)
    return self.final_norm(x), router_logits

  def prefill(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: dict):
    """decode's first call, over an empty cache, attending by the kernel model.attention picks
    rather than a (B, 1, T, slots) score matrix: x (B, T, D) fills slots [0, T); segment_ids
    (B, T) are 0 on a left-padded prompt's padding and 1 on its positions. Returns what decode
    returns."""
    per_layer = {'k': cache['k'], 'v': cache['v'],
                 'index': jnp.zeros((cache['k'].shape[0],), jnp.int32)}  # one a layer
    x, written = layers.scan_layers(self.layers, x, positions,
                                    attention.Packed(segment_ids, self.attention),
                                    per_layer=per_layer, in_place=True)
    return self.final_norm(x), {'k': written['k'], 'v': written['v'],
                                'index': jnp.asarray(x.shape[1], jnp.int32)}

  def decode(self, x: jax.Array, positions: jax.Array, cache: dict, valid_slots: jax.Array):
    """Incremental forward over a KV cache.

    x: (B, T, D), the inputs for cache slots [cache['index'], cache['index'] + T); positions:
    (B, T); valid_slots: (B, slots) bool, the slots a row may attend to (its earlier inputs and
    these). Returns (final-normed hidden (B, T, D), cache with these slots written and the
    index advanced by T).
    """
    slots = cache['k'].shape[2]
    query_slots = cache['index'] + jnp.arange(x.shape[1])
    mask = valid_slots[:, None, None, :] & (jnp.arange(slots)[None, :] <= query_slots[:, None])
    per_layer = {'k': cache['k'], 'v': cache['v'],
                 'index': jnp.broadcast_to(cache['index'], (cache['k'].shape[0],))}
    x, written = layers.scan_layers(self.layers, x, positions, mask, per_layer=per_layer,
                                    in_place=True)
    return self.final_norm(x), {'k': written['k'], 'v': written['v'],
                                'index': cache['index'] + x.shape[1]}


def init_cache(cfg: ml_collections.ConfigDict, batch: int, slots: int, dtype=jnp.float32) -> dict:
  """An empty KV cache for a decoder stack: keys and values per layer, and the next slot."""
  shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
          'index': jnp.zeros((), jnp.int32)}


class CausalLM(nnx.Module):
  """Token embedding, decoder stack and an untied lm_head: the shared LLM."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype,
               remat_policy: str = 'none', attention: str = 'auto', rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed_tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, ('vocab', 'embed'), **kw)
    self.decoder = DecoderStack(cfg, remat_policy=remat_policy, attention=attention, **kw)
    self.lm_head = layers.linear(cfg.hidden_size, cfg.vocab_size, ('embed', 'vocab'), **kw)

  def __call__(self, input_ids, positions=None, segment_ids=None):
    """Text-only forward: logits (B, T, vocab). Positions default to 0..T-1, one segment."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(input_ids)
    hidden = self.decoder(self.embed_tokens(input_ids), positions, segment_ids)
    return self.lm_head(hidden)
