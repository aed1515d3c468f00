"""The sparse mixture-of-experts block of Qwen3-MoE (the LLM of Fun-Audio-Chat-30B-A3B), with its
load-balancing loss and router metrics.

Routing is transformers' Qwen3MoeSparseMoeBlock: a bias-free router gives E logits a token (in
float32), softmax over all E, the k largest probabilities chosen (divided by their sum when
moe.norm_topk_prob), and the block's output is the sum over the k chosen SwiGLU experts of
weight x expert(x).

Dropless: every token reaches all its k experts. Its k slots are sorted by expert, the experts run
as grouped matmuls over the sorted rows (jax.lax.ragged_dot with the routing's group sizes; on
TPU megablox's gmm kernel), and the results are unsorted and combined.

With a mesh in scope (jax.set_mesh) the experts run per shard (shard_map), every device routing
its own tokens. When the mesh splits the experts (the 'experts' logical axis: the expert mesh
axis), a device holds E / ep of them. If the tokens are split over the same axis (the batch is),
each slot goes to the device of its expert by all-to-all and its result comes back by another;
the buffers are sized for the worst case (every slot of a device to one device), so no token is
ever dropped, at ep times the traffic of a ragged all-to-all (which XLA:CPU, where the tests
run, does not have). If the tokens are replicated over it (a batch too small to split, as in
decoding), each device runs its own experts on every token and the outputs are summed. A split
of the expert width (tensor) leaves partial sums, summed last.

A decoder stack is scanned as one (fac_jax.model.qwen3), so its layers are all dense or all
sparse: a config that mixes them (moe.decoder_sparse_step > 1, or moe.mlp_only_layers) is
refused with a ValueError naming those fields.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
from flax import nnx
import ml_collections

from fac_jax import sharding
from fac_jax.model import layers


def is_sparse_layer(moe_cfg: ml_collections.ConfigDict, index: int) -> bool:
  """transformers' rule: layer `index` is MoE when there are experts, it is not one of
  mlp_only_layers, and (index + 1) is a multiple of decoder_sparse_step."""
  return (moe_cfg.num_experts > 0 and index not in tuple(moe_cfg.mlp_only_layers)
          and (index + 1) % moe_cfg.decoder_sparse_step == 0)


def is_sparse_stack(cfg: ml_collections.ConfigDict) -> bool:
  """Whether every layer of the decoder stack `cfg` is MoE (False: every layer is dense)."""
  moe_cfg = cfg.get('moe')
  if moe_cfg is None:  # configs written before the field: dense
    return False
  kinds = {is_sparse_layer(moe_cfg, i) for i in range(cfg.num_layers)}
  if len(kinds) > 1:
    raise ValueError(
        f'moe.decoder_sparse_step={moe_cfg.decoder_sparse_step} with moe.mlp_only_layers='
        f'{tuple(moe_cfg.mlp_only_layers)} mixes dense and MoE layers in one scanned stack; '
        'use decoder_sparse_step=1 and mlp_only_layers=() (every layer MoE)')
  return kinds == {True}


def route(router_logits: jax.Array, experts_per_token: int,
          norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
  """(..., E) logits -> the chosen experts' float32 weights and their ids, both (..., k)."""
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, experts_per_token)
  if norm_topk_prob:
    weights = weights / weights.sum(axis=-1, keepdims=True)
  return weights, experts


def _megablox_matmul(rows, weights, group_sizes, *, interpret: bool):
  tile = 128  # gmm needs a row count that its row tile divides
  padded = jnp.pad(rows, ((0, -rows.shape[0] % tile), (0, 0)))
  out = megablox.gmm(padded, weights, group_sizes, rows.dtype, (tile, tile, tile), None, None,
                     False, interpret)
  return out[:rows.shape[0]]


def grouped_matmul(kernel: str):
  """(rows (R, K), weights (G, K, N), group_sizes (G,)) -> (R, N): consecutive rows by group,
  rows past the groups undefined. kernel: 'ragged_dot' (XLA), 'megablox' (the TPU kernel;
  Pallas interpret mode off TPU), 'auto' (megablox on TPU, else ragged_dot)."""
  if kernel == 'auto':
    kernel = 'megablox' if sharding.platform() == 'tpu' else 'ragged_dot'
  if kernel == 'ragged_dot':
    return jax.lax.ragged_dot
  if kernel == 'megablox':
    return functools.partial(_megablox_matmul, interpret=sharding.platform() != 'tpu')
  raise ValueError(f'grouped matmul kernel {kernel!r}: expected auto, ragged_dot or megablox')


def grouped_ffn(rows: jax.Array, expert_ids: jax.Array, gate: jax.Array, up: jax.Array,
                down: jax.Array, kernel: str = 'auto') -> jax.Array:
  """SwiGLU experts: row r (of (R, D)) through expert expert_ids[r] of gate and up (G, D, F)
  and down (G, F, D); a row whose id is G or more comes out 0. Rows are sorted by expert, run as
  grouped matmuls and unsorted."""
  num_experts = gate.shape[0]
  matmul = grouped_matmul(kernel)
  order = jnp.argsort(expert_ids, stable=True)
  group_sizes = jnp.bincount(expert_ids, length=num_experts).astype(jnp.int32)
  # Rows past the groups are not computed (garbage from gmm): zero them on the way in, so that
  # no gradient leaves them, and on the way out.
  computed = (expert_ids[order] < num_experts)[:, None]
  x = jnp.where(computed, rows[order], 0)
  hidden = jax.nn.silu(matmul(x, gate, group_sizes)) * matmul(x, up, group_sizes)
  out = jnp.where(computed, matmul(hidden, down, group_sizes), 0)
  return jnp.zeros_like(out).at[order].set(out)


def _combine(slot_outputs: jax.Array, weights: jax.Array) -> jax.Array:
  """(n * k, D) outputs of each token's k slots, (n, k) weights -> (n, D)."""
  n, k = weights.shape
  return jnp.einsum('nkd,nk->nd', slot_outputs.reshape(n, k, -1),
                    weights.astype(slot_outputs.dtype))


def _all_experts_here(tokens, weights, experts, gate, up, down, kernel):
  """Every expert on this device: tokens (n, D), routes (n, k) -> (n, D)."""
  slots = jnp.repeat(tokens, experts.shape[1], axis=0)
  return _combine(grouped_ffn(slots, experts.reshape(-1), gate, up, down, kernel), weights)


def _own_experts(tokens, weights, experts, gate, up, down, kernel, expert_axes):
  """This device's experts (E / ep of them, the expert axes' index-th block) on every token;
  the slots of other devices' experts give 0."""
  local = gate.shape[0]
  ids = experts - jax.lax.axis_index(expert_axes) * local
  ids = jnp.where((ids >= 0) & (ids < local), ids, local)
  slots = jnp.repeat(tokens, experts.shape[1], axis=0)
  return _combine(grouped_ffn(slots, ids.reshape(-1), gate, up, down, kernel), weights)


def _dispatched(tokens, weights, experts, gate, up, down, kernel, expert_axes):
  """Expert parallelism by all-to-all: each of this device's slots goes to the device holding
  its expert (expert e on device e // (E / ep)), which runs its experts on what it receives and
  sends the results back. Buffers hold every slot for every destination: dropless."""
  n, k = experts.shape
  local = gate.shape[0]
  devices = jax.lax.axis_size(expert_axes)
  flat = experts.reshape(-1)
  destination = flat // local
  order = jnp.argsort(destination, stable=True)
  counts = jnp.bincount(destination, length=devices)
  sorted_destination = destination[order]
  place = jnp.arange(n * k) - (jnp.cumsum(counts) - counts)[sorted_destination]
  send = jnp.zeros((devices, n * k, tokens.shape[1]), tokens.dtype)
  send = send.at[sorted_destination, place].set(tokens[order // k])
  send_ids = jnp.full((devices, n * k), local, flat.dtype)
  send_ids = send_ids.at[sorted_destination, place].set(flat[order] % local)
  exchange = functools.partial(jax.lax.all_to_all, axis_name=expert_axes, split_axis=0,
                               concat_axis=0)
  received, received_ids = exchange(send), exchange(send_ids)
  outputs = grouped_ffn(received.reshape(devices * n * k, -1), received_ids.reshape(-1), gate,
                        up, down, kernel)
  returned = exchange(outputs.reshape(devices, n * k, -1))
  slot_outputs = jnp.zeros((n * k, tokens.shape[1]), returned.dtype)
  slot_outputs = slot_outputs.at[order].set(returned[sorted_destination, place])
  return _combine(slot_outputs, weights)


def experts_forward(x: jax.Array, weights: jax.Array, experts: jax.Array, gate: jax.Array,
                    up: jax.Array, down: jax.Array, kernel: str = 'auto') -> jax.Array:
  """x (B, T, D) through the routed experts: weights and expert ids (B, T, k), gate and up
  (E, D, F), down (E, F, D) -> (B, T, D). Per shard under a mesh (module docstring)."""
  def run(x, weights, experts, gate, up, down, specs=None):
    batch, length, d = x.shape
    routes = (x.reshape(batch * length, d), weights.reshape(batch * length, -1),
              experts.reshape(batch * length, -1), gate, up, down, kernel)
    if specs is None or not specs.expert_axes:
      out = _all_experts_here(*routes)
    elif set(specs.expert_axes) <= set(specs.token_axes):
      out = _dispatched(*routes, specs.expert_axes)
    else:
      out = jax.lax.psum(_own_experts(*routes, specs.expert_axes), specs.expert_axes)
    if specs is not None and specs.mlp_axes:
      out = jax.lax.psum(out, specs.mlp_axes)
    return out.reshape(batch, length, d)

  specs = sharding.expert_specs(x.shape, gate.shape)
  if specs is None:
    return run(x, weights, experts, gate, up, down)
  # check_vma=False: the megablox Pallas call declares no varying mesh axes for its output.
  return jax.shard_map(functools.partial(run, specs=specs),
                       in_specs=(specs.tokens, specs.tokens, specs.tokens, specs.gate_up,
                                 specs.gate_up, specs.down),
                       out_specs=specs.tokens, check_vma=False)(x, weights, experts, gate, up,
                                                                down)


class SparseMoe(nnx.Module):
  """Router and SwiGLU experts (module docstring). Parameters: router/kernel (D, E), gate_proj
  and up_proj (E, D, F), down_proj (E, F, D)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    moe_cfg = cfg.moe
    self.experts_per_token, self.norm_topk_prob = moe_cfg.experts_per_token, moe_cfg.norm_topk_prob
    self.dtype = dtype
    d, e, f = cfg.hidden_size, moe_cfg.num_experts, moe_cfg.moe_mlp_dim
    # Routing in float32 at any compute dtype: in bfloat16 near-equal logits tie or swap, and
    # with them the chosen experts.
    self.router = layers.linear(d, e, ('embed', 'experts'), dtype=jnp.float32,
                                param_dtype=param_dtype, rngs=rngs)
    init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.gate_proj = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                               logical_axes=('experts', 'embed', 'expert_mlp'))
    self.up_proj = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                             logical_axes=('experts', 'embed', 'expert_mlp'))
    self.down_proj = nnx.Param(init(rngs.params(), (e, f, d), param_dtype),
                               logical_axes=('experts', 'expert_mlp', 'embed'))

  def __call__(self, x: jax.Array, kernel: str = 'auto') -> tuple[jax.Array, jax.Array]:
    """x (B, T, D) -> (output (B, T, D), router logits (B, T, E) float32)."""
    router_logits = sharding.constrain(self.router(x), ('batch', 'length', None))
    weights, experts = route(router_logits, self.experts_per_token, self.norm_topk_prob)
    cast = lambda p: p[...].astype(self.dtype)
    out = experts_forward(x, weights, experts, cast(self.gate_proj),
                          cast(self.up_proj), cast(self.down_proj), kernel)
    return out, router_logits


def router_metrics(router_logits: jax.Array, valid: jax.Array, experts_per_token: int,
                   router_aux_loss_coef: float) -> dict:
  """The load-balancing loss and per-layer router metrics of one stack's forward.

  router_logits (L, B, T, E), valid (B, T) (False at padding). Over the valid tokens of all
  layers together, f_e is the share of tokens routed to expert e counting all k slots (so the
  f_e sum to k) and P_e its mean router probability; `router_aux_loss` = E * sum_e f_e P_e,
  transformers' load_balancing_loss_func (k at a perfect balance), and `router_loss` =
  router_aux_loss_coef x that, the term added to the training loss. Per layer (L,) or (L, E):
  `router/expert_share`, each expert's share of the layer's routed slots; `router/load_max_over_mean`,
  the busiest expert's share over the mean share (1: balanced, E: one expert takes all);
  `router/entropy`, the mean entropy (nats) of the router's distribution.
  """
  num_layers, num_experts = router_logits.shape[0], router_logits.shape[-1]
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  chosen = jax.lax.top_k(probs, experts_per_token)[1]
  mask = valid.astype(jnp.float32)
  slot_mask = jnp.repeat(mask.reshape(-1), experts_per_token)
  counts = jax.vmap(lambda ids: jnp.bincount(ids.reshape(-1), slot_mask, length=num_experts))(
      chosen)  # (L, E) routed valid slots
  prob_sums = jnp.einsum('lbte,bt->le', probs, mask)
  tokens = jnp.maximum(mask.sum(), 1.0)
  f = counts.sum(axis=0) / (num_layers * tokens)
  p = prob_sums.sum(axis=0) / (num_layers * tokens)
  aux_loss = num_experts * jnp.sum(f * p)
  share = counts / jnp.maximum(counts.sum(axis=-1, keepdims=True), 1.0)
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  return {'router_aux_loss': aux_loss, 'router_loss': router_aux_loss_coef * aux_loss,
          'router/expert_share': share,
          'router/load_max_over_mean': share.max(axis=-1) * num_experts,
          'router/entropy': jnp.einsum('lbt,bt->l', entropy, mask) / tokens}
