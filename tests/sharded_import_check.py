"""Run by test_convert_sharded.py with 8 host devices: import an official-layout checkpoint onto a
(data=2, fsdp=2, tensor=2) mesh and onto one device, restore both, print a JSON summary."""

import json
import os
import sys
import tempfile

import jax
import ml_collections
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import official_checkpoint  # noqa: E402
from fac_jax import sharding  # noqa: E402
from fac_jax.checkpoints import checkpoint, convert  # noqa: E402
from fac_jax.model import fun_audio_chat  # noqa: E402
def main():
  root = tempfile.mkdtemp()
  hf_dir = os.path.join(root, 'hf')
  official_checkpoint.write_official_checkpoint(hf_dir, seed=11)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  with jax.set_mesh(mesh):  # the importer places parameters on the mesh in scope
    sharded_ckpt = convert.import_checkpoint(hf_dir, os.path.join(root, 'sharded'))
  single_ckpt = convert.import_checkpoint(hf_dir, os.path.join(root, 'single'))

  reader = checkpoint.Reader(sharded_ckpt, mesh)
  on_mesh = reader.load()
  single = checkpoint.Reader(single_ckpt).load()
  _, state = nnx.split(fun_audio_chat.abstract_model(reader.config))
  expected = sharding.param_shardings(state, mesh)
  placed = jax.tree.map(lambda a, s: a.sharding == s, on_mesh, expected)
  equal = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                       on_mesh, single)
  split_over_devices = jax.tree.map(lambda a: len({d for d in a.sharding.device_set}) == 8
                                    and a.addressable_shards[0].data.size < a.size, on_mesh)
  print(json.dumps({
      'devices': jax.device_count(),
      'all_placed_as_table_says': all(jax.tree.leaves(placed)),
      'all_equal_to_single_device_import': all(jax.tree.leaves(equal)),
      'leaves': len(jax.tree.leaves(on_mesh)),
      'leaves_split_across_devices': sum(jax.tree.leaves(split_over_devices)),
  }))


if __name__ == '__main__':
  main()
