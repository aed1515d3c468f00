"""Runs `python -m MODULE ARGS...` as on a full disk: every checkpoint write fails as tensorstore
fails then (for the tests that a command says so in one last line).

  python tests/disk_full.py fac_jax.checkpoints.convert import --hf_dir=... --out=...
"""

import runpy
import sys

import orbax.checkpoint.experimental.v1 as ocp


def save(path, tree):
  del tree
  raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{path}/d/0": Failed to write 9 bytes to '
                   "file 7: No space left on device [os_error_code='28']")


if __name__ == '__main__':
  ocp.partial.save = save
  sys.argv = sys.argv[1:]
  runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
