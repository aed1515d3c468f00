"""Run by test_convert_sharded.py with 8 host devices: import an official-layout checkpoint onto a
(data=2, fsdp=2, tensor=2) mesh and onto one device, restore both, print a JSON summary."""

import json
import os
import sys
import tempfile

import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import official_checkpoint  # noqa: E402
from fac_jax import sharding  # noqa: E402
from fac_jax.checkpoints import checkpoint, convert  # noqa: E402

# Layouts worked out by hand from sharding.LOGICAL_AXIS_RULES for official_checkpoint's sizes on
# this mesh (every axis 2): a mesh axis that does not divide its dimension, or is already used in
# the array, is left out. Comments: the leaf's logical axes and shape.
EXPECTED_SPECS = {
    # (vocab, embed) (311, 56): 2 does not divide 311, so vocab gets no tensor.
    'llm/embed_tokens/embedding': P(None, 'fsdp'),
    'llm/lm_head/kernel': P('fsdp', None),  # (embed, vocab) (56, 311)
    'llm/decoder/layers/attention/q_proj/kernel': P(None, 'fsdp', 'tensor'),  # heads: 72
    'llm/decoder/layers/attention/k_proj/kernel': P(None, 'fsdp', 'tensor'),  # kv_heads: 36
    'llm/decoder/layers/attention/o_proj/kernel': P(None, 'tensor', 'fsdp'),  # (.., heads, embed)
    'llm/decoder/layers/mlp/down_proj/kernel': P(None, 'tensor', 'fsdp'),  # (.., mlp 76, embed)
    'llm/decoder/layers/input_norm/scale': P(None, None),  # (layers, norm)
    'adapters/code_embedding/embedding': P(None, 'fsdp'),  # (speech_vocab 71, embed)
    'adapters/code_projection/kernel': P('fsdp', None),  # (embed, embed): fsdp once
    'continuous_encoder/conv1/kernel': P(None, None, 'fsdp'),  # (conv_kernel, mel, encoder_embed)
    'continuous_encoder/conv2/kernel': P(None, 'fsdp', None),  # encoder_embed twice: fsdp once
    'continuous_encoder/layers/fc1/kernel': P(None, 'fsdp', 'tensor'),  # encoder_mlp: 52
    'continuous_encoder/layers/out_proj/kernel': P(None, 'tensor', 'fsdp'),  # encoder_heads: 28
    'continuous_encoder/final_norm/bias': P(None),  # (norm,)
    'speech_refined_head/split_projection/kernel': P('fsdp', 'tensor'),  # group_embed: 280
    'speech_refined_head/split_projection/bias': P('tensor'),
}


def main():
  root = tempfile.mkdtemp()
  hf_dir = os.path.join(root, 'hf')
  official_checkpoint.write_official_checkpoint(hf_dir, seed=11)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  with jax.set_mesh(mesh):  # the importer places parameters on the mesh in scope
    sharded_ckpt = convert.import_checkpoint(hf_dir, os.path.join(root, 'sharded'))
  single_ckpt = convert.import_checkpoint(hf_dir, os.path.join(root, 'single'))

  on_mesh = checkpoint.Reader(sharded_ckpt, mesh).load()
  single = checkpoint.Reader(single_ckpt).load()
  placed = {'/'.join(k.key for k in path): (a.sharding.mesh == mesh, a.sharding.spec)
            for path, a in jax.tree_util.tree_flatten_with_path(on_mesh)[0]}
  equal = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                       on_mesh, single)
  split_over_devices = jax.tree.map(lambda a: len({d for d in a.sharding.device_set}) == 8
                                    and a.addressable_shards[0].data.size < a.size, on_mesh)
  print(json.dumps({
      'devices': jax.device_count(),
      'leaves_off_the_mesh': [name for name, (on, _) in placed.items() if not on],
      'wrong_specs': {name: f'{placed[name][1] if name in placed else "missing"}, not {spec}'
                      for name, spec in EXPECTED_SPECS.items()
                      if name not in placed or placed[name][1] != spec},
      'all_equal_to_single_device_import': all(jax.tree.leaves(equal)),
      'leaves': len(jax.tree.leaves(on_mesh)),
      'leaves_split_across_devices': sum(jax.tree.leaves(split_over_devices)),
  }))


if __name__ == '__main__':
  main()
