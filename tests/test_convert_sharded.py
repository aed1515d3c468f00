"""Import straight onto a device mesh (8 host devices) gives the single-device parameters, laid out
as the logical-axis table says."""

import json
import os
import subprocess
import sys


def test_import_onto_mesh_matches_single_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8 '
                                   '--xla_backend_optimization_level=0')
  script = os.path.join(os.path.dirname(__file__), 'sharded_import_check.py')
  out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['devices'] == 8
  assert result['all_placed_as_table_says']
  assert result['all_equal_to_single_device_import']
  assert result['leaves_split_across_devices'] >= result['leaves'] // 2
