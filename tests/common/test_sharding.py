"""The logical-axis table, and a sharded train step on 8 host devices against one device."""

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P
import ml_collections

from fac_jax import sharding
from conftest import run_on_host_devices

MESH = AbstractMesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def test_logical_axes_resolve_through_the_table():
  # A mesh axis is used once: activations split batch over fsdp, so not their embed axis.
  assert sharding.logical_to_spec(('batch', 'length', 'embed')) == P(('data', 'fsdp'), None, None)
  assert sharding.logical_to_spec(('embed', 'mlp')) == P('fsdp', 'tensor')
  # With shapes, only where it divides the dimension.
  assert sharding.logical_to_spec(('vocab', 'embed'), (264, 48), MESH) == P('tensor', 'fsdp')
  assert sharding.logical_to_spec(('vocab', 'embed'), (263, 48), MESH) == P(None, 'fsdp')
  assert sharding.logical_to_spec(('batch', None), (2, 3), MESH) == P('data', None)
  with pytest.raises(KeyError, match='no rule'):
    sharding.logical_to_spec(('embedding_dim',))


def test_mesh_from_config_fills_and_refuses():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  with pytest.raises(ValueError, match='needs 4 devices'):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=1)), devices)
  with pytest.raises(ValueError, match='at most one axis'):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=-1, tensor=1)), devices)


def test_sharded_train_step_matches_single_device():
  result = run_on_host_devices('sharded_step_check.py')
  assert result['devices'] == 8 and result['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert result['init_max_rel_err'] == 0.0  # same seed, same values, whatever the layout
  for sharded, single in zip(result['losses_sharded'], result['losses_single']):
    assert abs(sharded - single) <= 1e-5 * abs(single)
  assert result['params_max_rel_err'] < 1e-4
  specs = result['specs']
  assert specs['llm']['embed_tokens']['embedding'] == "P('tensor', 'fsdp')"
  assert specs['llm']['decoder']['layers']['mlp']['gate_proj']['kernel'] == \
      "P(None, 'fsdp', 'tensor')"
  assert specs['speech_refined_head']['split_projection']['kernel'] == "P('fsdp', 'tensor')"
