"""Device mesh and the one table that maps logical array axes to mesh axes (data, fsdp, expert,
tensor)."""

from collections.abc import Sequence
import math
from typing import NamedTuple

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from flax import nnx
import ml_collections

# Ordered outermost first: jax.make_mesh puts the last axes on the closest devices, so tensor's
# per-layer collectives and then the experts' all-to-all travel the shortest links.
MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')

# Logical axis -> mesh axes. Modules name logical axes only; nothing else names a mesh axis.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    # The expert axis splits the batch too: outside the MoE blocks it is one more data axis.
    'batch': ('data', 'fsdp', 'expert'),
    'length': (),
    'embed': ('fsdp',),
    'mlp': ('tensor',),
    'experts': ('expert',),  # expert weights also split 'embed' over fsdp, as dense ones do
    'expert_mlp': ('tensor',),
    'heads': ('tensor',),
    'kv_heads': ('tensor',),
    'vocab': ('tensor',),
    'speech_vocab': (),  # 6565 codes: no mesh axis divides it.
    'group_embed': ('tensor',),
    'encoder_embed': ('fsdp',),
    'encoder_mlp': ('tensor',),
    'encoder_heads': ('tensor',),
    'mel': (),
    'conv_kernel': (),
    'layers': (),
    'norm': (),
}

LogicalAxes = Sequence[str | None]


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """A mesh over MESH_AXES; one size may be -1 to take the remaining devices, an axis the config
  leaves out has size 1."""
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_config.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh config {dict(mesh_config)}: at most one axis may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh config {dict(mesh_config)}: {len(devices)} devices are not a '
                       f'multiple of the fixed axes product {known}')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh config {dict(mesh_config)} needs {math.prod(sizes)} devices, '
                     f'{len(devices)} are available')
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_from_flag(spec: str) -> jax.sharding.Mesh:
  """A mesh from a command-line spec such as 'data:1,fsdp:-1,tensor:1' (expert: 1 unless named)."""
  return make_mesh(ml_collections.ConfigDict(
      {name: int(size) for name, size in (part.split(':') for part in spec.split(','))}))


def mesh_in_scope() -> jax.sharding.Mesh:
  """The mesh set by `jax.set_mesh`, or a one-device mesh when none is."""
  mesh = jax.sharding.get_mesh()
  if mesh is None or mesh.empty:
    mesh = make_mesh(ml_collections.ConfigDict(), jax.devices()[:1])
  return mesh


def logical_to_spec(logical_axes: LogicalAxes, shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> PartitionSpec:
  """PartitionSpec for an array with these logical axes.

  Given a shape and mesh, a mesh axis that does not divide its dimension is left out (the
  dimension is replicated over it), and no mesh axis is used twice.
  """
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in LOGICAL_AXIS_RULES:
      raise KeyError(f'logical axis {name!r} has no rule in LOGICAL_AXIS_RULES')
    chosen = []
    for axis in LOGICAL_AXIS_RULES[name]:
      if axis in used:
        continue
      if mesh is not None and shape is not None:
        size = math.prod(mesh.shape[a] for a in chosen + [axis])
        if shape[i] % size:
          continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return PartitionSpec(*spec)


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
  axes = variable.get_metadata().get('logical_axes')
  if axes is None:
    raise ValueError(f'parameter of shape {variable.shape} has no logical_axes metadata')
  if len(axes) != len(variable.shape):
    raise ValueError(f'logical_axes {axes} do not match parameter shape {variable.shape}')
  return tuple(axes)


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> dict:
  """NamedShardings, as a plain dict, for an nnx.State (concrete or abstract) of the model.

  Each parameter is laid out by its `logical_axes` metadata through LOGICAL_AXIS_RULES.
  """
  def sharding(variable):
    spec = logical_to_spec(variable_logical_axes(variable), variable.shape, mesh)
    return NamedSharding(mesh, spec)
  shardings = jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
  """Sharding constraint on an activation, when a mesh is set; a no-op otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def mesh_is_set() -> bool:
  """Whether a mesh is in scope (jax.set_mesh), so that constraints and shard_map can use it."""
  return not jax.sharding.get_abstract_mesh().empty


def platform() -> str:
  """The platform ('cpu', 'gpu', 'tpu') of the mesh in scope's devices, else the default
  backend's: a program compiled ahead of time for a TPU slice on this CPU machine is for TPU."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return jax.default_backend() if device is None else device.platform


def attention_specs(q_shape: Sequence[int], kv_shape: Sequence[int]
                    ) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None:
  """shard_map specs, over the mesh in scope, of an attention kernel run per shard: q and the
  output (B, T, N, H), k and v (B, S, K, H), and (B, T) segment ids. Rows are split as the batch
  is and heads as 'heads' are when that splits query and key heads alike (each shard keeps whole
  GQA groups); sequences never. None when no mesh is set."""
  if not mesh_is_set():
    return None
  mesh = jax.sharding.get_abstract_mesh()
  q = logical_to_spec(('batch', None, 'heads', None), q_shape, mesh)
  kv = logical_to_spec(('batch', None, 'kv_heads', None), kv_shape, mesh)
  if q[2] != kv[2]:
    q, kv = PartitionSpec(q[0], None, None, None), PartitionSpec(kv[0], None, None, None)
  return q, kv, PartitionSpec(q[0], None)


class ExpertSpecs(NamedTuple):
  """How the MoE experts run per shard (fac_jax.model.moe): shard_map specs of the tokens
  (B, T, D), which also serves their routes (B, T, k), split as the batch is; of gate and up
  (E, D, F) and down (E, F, D), split over 'experts' and 'expert_mlp' only (fsdp's split of
  'embed' is gathered first, as for any layer); and the mesh axes that split the experts, the
  tokens and F. Axes of size 1 are left out: they split nothing, and shard_map would take values
  as varying over them."""
  tokens: PartitionSpec
  gate_up: PartitionSpec
  down: PartitionSpec
  expert_axes: tuple[str, ...]
  token_axes: tuple[str, ...]
  mlp_axes: tuple[str, ...]


def _split_axes(entry, mesh) -> tuple[str, ...]:
  """The mesh axes of size > 1 in one PartitionSpec entry."""
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return tuple(axis for axis in axes if mesh.shape[axis] > 1)


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def expert_specs(tokens_shape: Sequence[int], gate_shape: Sequence[int]) -> ExpertSpecs | None:
  """ExpertSpecs over the mesh in scope for tokens (B, T, D) and gate weights (E, D, F); None
  when no mesh is set."""
  if not mesh_is_set():
    return None
  mesh = jax.sharding.get_abstract_mesh()
  token_axes = _split_axes(logical_to_spec(('batch',), tokens_shape[:1], mesh)[0], mesh)
  gate_up = logical_to_spec(('experts', None, 'expert_mlp'), gate_shape, mesh)
  expert_axes, mlp_axes = _split_axes(gate_up[0], mesh), _split_axes(gate_up[2], mesh)
  tokens, experts, mlp = (_spec_entry(axes) for axes in (token_axes, expert_axes, mlp_axes))
  return ExpertSpecs(PartitionSpec(tokens, None, None), PartitionSpec(experts, None, mlp),
                     PartitionSpec(experts, mlp, None), expert_axes, token_axes, mlp_axes)


def batch_shards(mesh) -> int:
  """How many ways the mesh splits a batch (the product of the axes 'batch' maps to)."""
  return math.prod(mesh.shape[axis] for axis in LOGICAL_AXIS_RULES['batch'])


def batch_shardings(batch, mesh: jax.sharding.Mesh):
  """Batch arrays (any pytree of them) are split over (data, fsdp, expert) along their first
  axis, replicated otherwise."""
  return jax.tree.map(lambda value: NamedSharding(mesh, logical_to_spec(
      ('batch',) + (None,) * (value.ndim - 1), value.shape, mesh)), batch)
