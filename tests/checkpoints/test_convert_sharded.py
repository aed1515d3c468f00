"""Import straight onto a device mesh (8 host devices) gives the single-device parameters, laid out
as the logical-axis table says."""

from conftest import run_on_host_devices


def test_import_onto_mesh_matches_single_device():
  result = run_on_host_devices('sharded_import_check.py')
  assert result['devices'] == 8
  assert result['all_placed_as_table_says']
  assert result['all_equal_to_single_device_import']
  assert result['leaves_split_across_devices'] >= result['leaves'] // 2
