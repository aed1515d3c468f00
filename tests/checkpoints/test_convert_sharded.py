"""Import straight onto a device mesh (8 host devices) gives the single-device parameters, each on
the mesh, with the PartitionSpecs worked out by hand from the logical-axis table
(sharded_import_check.EXPECTED_SPECS)."""

from conftest import run_on_host_devices


def test_import_onto_mesh_matches_single_device():
  result = run_on_host_devices('sharded_import_check.py')
  assert result['devices'] == 8
  assert result['leaves_off_the_mesh'] == []
  assert result['wrong_specs'] == {}
  assert result['all_equal_to_single_device_import']
  assert result['leaves_split_across_devices'] >= result['leaves'] // 2
