"""The logical-axis table, and sharded train steps on 8 host devices against one device: the dense
tiny model on (data, fsdp, tensor), the MoE one with its experts over the expert axis."""

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P
import ml_collections

from fac_jax import sharding
from conftest import run_on_host_devices

MESH = AbstractMesh((2, 2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def test_logical_axes_resolve_through_the_table():
  # A mesh axis is used once: activations split batch over fsdp, so not their embed axis.
  assert sharding.logical_to_spec(('batch', 'length', 'embed')) == \
      P(('data', 'fsdp', 'expert'), None, None)
  assert sharding.logical_to_spec(('embed', 'mlp')) == P('fsdp', 'tensor')
  assert sharding.logical_to_spec(('experts', 'embed', 'expert_mlp')) == \
      P('expert', 'fsdp', 'tensor')
  # With shapes, only where it divides the dimension.
  assert sharding.logical_to_spec(('vocab', 'embed'), (264, 48), MESH) == P('tensor', 'fsdp')
  assert sharding.logical_to_spec(('vocab', 'embed'), (263, 48), MESH) == P(None, 'fsdp')
  assert sharding.logical_to_spec(('batch', None), (2, 3), MESH) == P('data', None)
  assert sharding.logical_to_spec(('experts', 'embed', 'expert_mlp'), (8, 48, 28), MESH) == \
      P('expert', 'fsdp', 'tensor')
  assert sharding.logical_to_spec(('experts', 'embed', 'expert_mlp'), (7, 48, 28), MESH) == \
      P(None, 'fsdp', 'tensor')
  with pytest.raises(KeyError, match='no rule'):
    sharding.logical_to_spec(('embedding_dim',))


def test_mesh_from_config_fills_and_refuses():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}  # expert left out
  with pytest.raises(ValueError, match='needs 4 devices'):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=1)), devices)
  with pytest.raises(ValueError, match='at most one axis'):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=-1, tensor=1)), devices)


def test_sharded_train_step_matches_single_device():
  result = run_on_host_devices('sharded_step_check.py')
  assert result['devices'] == 8
  assert result['mesh'] == {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2}
  assert result['init_max_rel_err'] == 0.0  # same seed, same values, whatever the layout
  for sharded, single in zip(result['losses_sharded'], result['losses_single']):
    assert abs(sharded - single) <= 1e-5 * abs(single)
  assert result['params_max_rel_err'] < 1e-4
  specs = result['specs']
  assert specs['llm']['embed_tokens']['embedding'] == "P('tensor', 'fsdp')"
  assert specs['llm']['decoder']['layers']['mlp']['gate_proj']['kernel'] == \
      "P(None, 'fsdp', 'tensor')"
  assert specs['speech_refined_head']['split_projection']['kernel'] == "P('fsdp', 'tensor')"


def test_expert_parallel_moe_step_matches_single_device():
  """One SGD step of the tiny MoE model on (fsdp=2, expert=2, tensor=2), its experts reached by
  all-to-all, equals one device's: loss within 1e-5 relative, parameters 1e-4; a one-row
  forward (replicated over the expert axis) within 1e-4."""
  result = run_on_host_devices('moe_sharded_step_check.py')
  assert result['mesh'] == {'data': 1, 'fsdp': 2, 'expert': 2, 'tensor': 2}
  assert result['all_to_all_in_step']
  assert result['init_max_rel_err'] == 0.0
  assert abs(result['loss_sharded'] - result['loss_single']) <= 1e-5 * result['loss_single']
  assert result['router_aux_loss_sharded'] == pytest.approx(result['router_aux_loss_single'],
                                                            rel=1e-5)
  assert result['params_max_rel_err'] < 1e-4
  assert result['one_row_max_rel_err'] < 1e-4
  specs = result['moe_specs']
  assert specs['gate_proj'] == "P(None, 'expert', 'fsdp', 'tensor')"
  assert specs['down_proj'] == "P(None, 'expert', 'tensor', 'fsdp')"
  assert specs['router']['kernel'] == "P(None, 'fsdp', 'expert')"
