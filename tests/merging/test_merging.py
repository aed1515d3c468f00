"""Model merging: each method against an independent NumPy reference on random trees, exact
endpoints, selection; the streaming merge of tiny checkpoints against the in-memory merge bit for
bit; refusals that leave nothing on disk; a Hugging Face Qwen3 base mapped onto our llm/ leaves.

Tolerance: float32 merges against float64 references, rtol 1e-5 and atol 1e-6.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from fac_jax import sharding
from fac_jax.checkpoints import checkpoint
from fac_jax.merging import merge, methods
from fac_jax.model import fun_audio_chat
from conftest import REPO

SHAPES = {'llm': {'embed': (11, 6), 'layers': {'kernel': (2, 6, 7), 'scale': (2, 6)}},
          'adapters': {'kernel': (5, 4)}}
CLOSE = dict(rtol=1e-5, atol=1e-6)


def random_tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda shape: (scale * rng.standard_normal(shape)).astype(np.float32),
                      SHAPES, is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope='module')
def trees():
  """A base and three fine-tunes near it (as fine-tunes are)."""
  base = random_tree(0)
  return base, [jax.tree.map(np.add, base, random_tree(seed, 0.1)) for seed in (1, 2, 3)]


def leaves_with_names(tree):
  return [('/'.join(k.key for k in path), np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def numpy_ties(base, finetuned, density, scale):
  trimmed = []
  for model in finetuned:
    task = model - base  # float32, as the merge computes it
    k = max(1, math.ceil(density * task.size))
    threshold = np.sort(np.abs(task).ravel())[-k]
    trimmed.append(np.where(np.abs(task) >= threshold, task, 0).astype(np.float64))
  elected = np.sign(sum(trimmed))
  agree = [(np.sign(t) == elected) & (t != 0) for t in trimmed]
  count = sum(a.astype(np.float64) for a in agree)
  agreeing_sum = sum(np.where(a, t, 0) for a, t in zip(agree, trimmed))
  return base + scale * agreeing_sum / np.maximum(count, 1)


def numpy_slerp(base, model, t):
  v0, v1 = base.astype(np.float64).ravel(), model.astype(np.float64).ravel()
  theta = np.arccos(np.dot(v0, v1) / (np.linalg.norm(v0) * np.linalg.norm(v1)))
  return ((np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)).reshape(
      base.shape)


def numpy_reference(method, name, base, finetuned, args):
  base64 = base.astype(np.float64)
  if method == 'linear':
    return (1 - sum(args['alpha'])) * base64 + sum(a * m for a, m in zip(args['alpha'], finetuned))
  if method == 'task_arithmetic':
    return base64 + args['scale'] * sum(m - base for m in finetuned)
  if method == 'ties':
    return numpy_ties(base, finetuned, args['density'], args['scale'])
  if method == 'dare':
    p = args['drop_rate']
    masks = [np.asarray(methods.dare_keep_mask(args['seed'], name, i, base.shape, p))
             for i in range(len(finetuned))]
    return base64 + args['scale'] * sum(np.where(keep, (m - base) / (1 - p), 0)
                                        for keep, m in zip(masks, finetuned))
  return numpy_slerp(base, finetuned[0], args['alpha'])


METHOD_CASES = [
    ('linear', 3, dict(alpha=[0.2, 0.3, 0.1])),
    ('task_arithmetic', 3, dict(scale=0.7)),
    ('ties', 3, dict(density=0.4, scale=1.3)),
    ('dare', 3, dict(drop_rate=0.6, scale=0.9, seed=5)),
    ('slerp', 1, dict(alpha=0.35)),
]


@pytest.mark.parametrize('method,count,args', METHOD_CASES, ids=[c[0] for c in METHOD_CASES])
def test_methods_match_numpy_references(trees, method, count, args):
  base, finetuned = trees
  merged = methods.merge_trees(method, base, finetuned[:count], **args)
  for (name, ours), (_, b), *models in zip(leaves_with_names(merged), leaves_with_names(base),
                                           *[leaves_with_names(m) for m in finetuned[:count]]):
    expected = numpy_reference(method, name, b, [m for _, m in models], args)
    np.testing.assert_allclose(ours, expected, **CLOSE, err_msg=name)


def test_ties_trims_elects_and_averages_disjointly():
  base = np.zeros(4, np.float32)
  finetuned = [np.array([3, -1, 2, 0.5], np.float32), np.array([-1, -2, 4, 0.1], np.float32)]
  merged = methods.ties(base, finetuned, density=0.5)
  # Kept: [3, 2] and [-2, 4]; elected signs +, -, +, 0; entry 0 keeps only 3 (-1 was trimmed).
  np.testing.assert_allclose(merged, [3, -2, 3, 0])


@pytest.mark.parametrize('method', ['linear', 'slerp'])
def test_alpha_endpoints_reproduce_the_inputs_exactly(trees, method):
  base, finetuned = trees
  bf16_base = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), base)
  bf16_model = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), finetuned[0])
  for b, m in [(base, finetuned[0]), (bf16_base, bf16_model)]:
    for alpha, expected in [(0.0, b), (1.0, m)]:
      merged = methods.merge_trees(method, b, [m], alpha=alpha)
      for (name, ours), (_, want) in zip(leaves_with_names(merged), leaves_with_names(expected)):
        assert ours.dtype == want.dtype and np.array_equal(ours, want), (method, alpha, name)


def test_slerp_falls_back_to_linear_when_colinear():
  base = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
  for model in (2.5 * base, np.zeros_like(base)):
    np.testing.assert_allclose(methods.slerp(base, [model], alpha=0.3),
                               0.7 * base + 0.3 * model, rtol=1e-6)


def test_dare_drops_at_the_rate_and_rescales_the_kept():
  p, shape = 0.3, (400, 500)
  base = np.zeros(shape, np.float32)
  task = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  merged = np.asarray(methods.merge_leaf('dare', 'llm/w', base, [task], drop_rate=p, seed=1))
  keep = np.asarray(methods.dare_keep_mask(1, 'llm/w', 0, shape, p))
  sigma = math.sqrt(p * (1 - p) / keep.size)
  assert abs((1 - keep.mean()) - p) < 5 * sigma
  np.testing.assert_allclose(merged[keep], task[keep] / (1 - p), rtol=1e-6)
  assert not merged[~keep].any()
  other_leaf = np.asarray(methods.dare_keep_mask(1, 'llm/v', 0, shape, p))
  other_model = np.asarray(methods.dare_keep_mask(1, 'llm/w', 1, shape, p))
  other_seed = np.asarray(methods.dare_keep_mask(2, 'llm/w', 0, shape, p))
  assert all((keep != m).mean() > 0.3 for m in (other_leaf, other_model, other_seed))


def test_include_exclude_select_leaves(trees):
  base, finetuned = trees
  merged = methods.merge_trees('linear', base, finetuned[:1], alpha=0.5, include='^llm/',
                               exclude='scale$')
  for (name, ours), (_, b), (_, m) in zip(*map(leaves_with_names, (merged, base, finetuned[0]))):
    if name in ('llm/embed', 'llm/layers/kernel'):
      np.testing.assert_allclose(ours, 0.5 * b + 0.5 * m, **CLOSE)
    else:
      assert np.array_equal(ours, m), name
  llm_only = {'llm': base['llm']}
  with pytest.raises(KeyError, match='adapters/kernel'):
    methods.merge_trees('linear', llm_only, finetuned[:1], alpha=0.5)


@pytest.mark.parametrize('method,count,args,match', [
    ('average', 1, {}, 'unknown merge method'),
    ('ties', 2, dict(scale=1.0), r"needs \['density'\]"),
    ('ties', 2, dict(density=0.0), 'density'),
    ('dare', 1, dict(drop_rate=1.0), 'drop_rate'),
    ('slerp', 2, dict(alpha=0.5), 'one fine-tuned model'),
    ('linear', 2, dict(alpha=[0.5]), '1 alpha weights for 2'),
    ('linear', 1, dict(alpha=0.5, density=0.1), 'not'),
])
def test_method_arguments_are_checked(method, count, args, match):
  with pytest.raises(ValueError, match=match):
    methods.method_args(method, count, **args)


def write_tree(path, tree, model_config):
  return checkpoint.save_params(path, model_config, jax.tree.map(jnp.asarray, tree))


@pytest.fixture(scope='module')
def tiny_checkpoints(tmp_path_factory):
  """Checkpoints of the tiny model: a base and two fine-tunes near it, and their trees."""
  from fac_jax import config as config_lib
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'tiny.py')).model
  root = tmp_path_factory.mktemp('merge')
  base = nnx.to_pure_dict(nnx.split(fun_audio_chat.create(cfg, seed=0))[1])
  rng = np.random.default_rng(0)
  finetuned = [jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), base)
               for _ in range(2)]
  paths = [write_tree(str(root / name), tree, cfg)
           for name, tree in [('base', base), ('ft1', finetuned[0]), ('ft2', finetuned[1])]]
  with open(os.path.join(paths[1], checkpoint.OFFICIAL, 'config.json'), 'w') as f:
    f.write('{"model_type": "funaudiochat"}')
  return root, cfg, paths, base, finetuned


def assert_trees_equal(ours, expected):
  for (name, a), (_, b) in zip(leaves_with_names(ours), leaves_with_names(expected)):
    assert a.dtype == b.dtype and np.array_equal(a, b), name


STREAMING_CASES = [
    ('linear', 2, dict(alpha=[0.3, 0.4]), None, None),
    ('task_arithmetic', 2, dict(scale=0.7), '^llm/', None),
    ('ties', 2, dict(density=0.3), '^llm/', 'embed'),
    ('dare', 2, dict(drop_rate=0.5, seed=3), '^llm/', None),
    ('slerp', 1, dict(alpha=0.3), '^llm/', None),
]


@pytest.mark.parametrize('method,count,args,include,exclude', STREAMING_CASES,
                         ids=[c[0] for c in STREAMING_CASES])
def test_streaming_merge_equals_in_memory_merge(tiny_checkpoints, method, count, args, include,
                                                exclude):
  root, _, (base_path, *finetuned_paths), *_ = tiny_checkpoints
  loaded = {path: checkpoint.Reader(path).load() for path in [base_path] + finetuned_paths}
  # The streaming merge reads leaves replicated on the mesh in scope: same inputs, same programs.
  replicated = jax.sharding.NamedSharding(sharding.mesh_in_scope(), jax.sharding.PartitionSpec())
  base, *finetuned = [jax.device_put(loaded[p], replicated)
                      for p in [base_path] + finetuned_paths[:count]]
  expected = methods.merge_trees(method, base, finetuned, include=include, exclude=exclude, **args)
  summary = merge.merge_checkpoints(method, base_path, finetuned_paths[:count],
                                    str(root / f'merged_{method}'), include=include,
                                    exclude=exclude, **args)
  assert_trees_equal(checkpoint.Reader(summary.path).load(), expected)
  assert checkpoint.load_config(summary.path) == checkpoint.load_config(finetuned_paths[0])
  assert os.listdir(os.path.join(summary.path, checkpoint.OFFICIAL)) == ['config.json']


def test_cli_merges_on_a_mesh_like_one_device(tiny_checkpoints):
  root, _, (base_path, ft1, _), *_ = tiny_checkpoints
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4 '
                                   '--xla_backend_optimization_level=0')
  out = str(root / 'merged_cli')
  result = subprocess.run(
      [sys.executable, '-m', 'fac_jax.merging.merge', '--method=linear', '--alpha=0.5',
       f'--base={base_path}', f'--finetuned={ft1}', f'--out={out}', '--include=^llm/',
       '--mesh=data:1,fsdp:2,tensor:2'], env=env, capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'merge (linear): 14 of 56 leaves merged' in result.stdout
  one_device = merge.merge_checkpoints('linear', base_path, [ft1], str(root / 'merged_one'),
                                       include='^llm/', alpha=0.5)
  assert_trees_equal(checkpoint.Reader(out).load(), checkpoint.Reader(one_device.path).load())


def small_tree(**changes):
  """A three-leaf tree; `changes` maps group__leaf to a new leaf, or to None to remove it."""
  tree = {'llm': {'w': np.ones((3, 4), np.float32), 'norm': np.ones(4, np.float32)},
          'adapters': {'w': np.ones((2, 5), np.float32)}}
  for name, value in changes.items():
    group, leaf = name.split('__')
    if value is None:
      del tree[group][leaf]
    else:
      tree[group][leaf] = value
  return tree


@pytest.fixture(scope='module')
def small_checkpoints(tmp_path_factory, tiny_checkpoints):
  cfg = tiny_checkpoints[1]
  root = tmp_path_factory.mktemp('refusals')
  variants = {
      'reference': small_tree(), 'extra': small_tree(adapters__b=np.ones(2, np.float32)),
      'missing': small_tree(llm__norm=None),
      'shape': small_tree(llm__w=np.ones((4, 3), np.float32)),
      'dtype': small_tree(llm__w=np.ones((3, 4), ml_dtypes.bfloat16)),
      'llm_only': {'llm': jax.tree.map(lambda x: 3 * x, small_tree()['llm'])}}
  return root, {name: write_tree(str(root / name), tree, cfg) for name, tree in variants.items()}


@pytest.mark.parametrize('base,finetuned,match', [
    ('reference', 'extra', 'extra has leaf adapters/b, which .*reference lacks'),
    ('reference', 'missing', r'missing lacks leaf llm/norm \(\[4\] float32 in .*reference\)'),
    ('reference', 'shape', r'leaf llm/w: \[4, 3\] float32 in .*shape, \[3, 4\] float32 in'),
    ('reference', 'dtype', r'leaf llm/w: \[3, 4\] bfloat16 in .*dtype, \[3, 4\] float32 in'),
    ('shape', 'reference', r'leaf llm/w: \[4, 3\] float32 in base .*shape, \[3, 4\] float32'),
    ('llm_only', 'reference', r"lacks 1 leaves that --include/--exclude select .*\['adapters/w'\]"),
])
def test_refusals_leave_nothing_on_disk(small_checkpoints, base, finetuned, match):
  root, paths = small_checkpoints
  out = str(root / 'out')
  with pytest.raises(merge.MergeError, match=match):
    merge.merge_checkpoints('linear', paths[base], [paths['reference'], paths[finetuned]], out,
                            alpha=[0.3, 0.3])
  assert not os.path.exists(out) and not os.path.exists(out + '.incomplete')


def merge_command(*args, program=('-m',)):
  return subprocess.run([sys.executable, *program, 'fac_jax.merging.merge', '--method=linear',
                         '--alpha=0.5', *args], capture_output=True, text=True, cwd=REPO,
                        timeout=300)


def test_corrupt_input_and_full_disk_are_said_in_one_line(tiny_checkpoints, tmp_path):
  _, _, (base_path, ft1, _), *_ = tiny_checkpoints
  corrupt = tmp_path / 'corrupt'
  shutil.copytree(ft1, corrupt)
  data = max((os.path.join(folder, name) for folder, _, names in os.walk(corrupt / 'params')
              for name in names), key=os.path.getsize)
  os.truncate(data, os.path.getsize(data) // 2)
  out = tmp_path / 'out'
  result = merge_command(f'--base={base_path}', f'--finetuned={corrupt}', f'--out={out}')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert 'TensorStore' not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'merge: {corrupt}: cannot read its parameters (truncated or corrupt files?): ')
  result = merge_command(f'--base={base_path}', f'--finetuned={ft1}', f'--out={out}',
                         program=(os.path.join(REPO, 'tests', 'disk_full.py'),))
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: no space left on device writing {out}.incomplete/params/d/0; free some space and '
      'run it again')
  assert not out.exists() and not (tmp_path / 'out.incomplete').exists()


def test_base_with_only_the_llm_merges_the_llm_and_existing_out_is_refused(small_checkpoints):
  root, paths = small_checkpoints
  out = str(root / 'llm_merged')
  merge.merge_checkpoints('linear', paths['llm_only'], [paths['reference']], out,
                          include='^llm/', alpha=0.25)
  with pytest.raises(merge.MergeError, match='exists; refusing to overwrite'):
    merge.merge_checkpoints('linear', paths['llm_only'], [paths['reference']], out,
                            include='^llm/', alpha=0.25)
  assert not os.path.exists(out + '.incomplete')
  leaves = merge.CheckpointLeaves(out)
  merged = leaves.read(sorted(leaves.shapes), merge.leaf_shardings(None, leaves.shapes, None))
  for path, leaf in merged.items():  # base llm leaves hold 3, the fine-tune's 1
    assert np.all(np.asarray(leaf) == (2.5 if path[0] == 'llm' else 1)), path


@pytest.fixture(scope='module')
def qwen3_base(tiny_checkpoints):
  """A random Hugging Face Qwen3ForCausalLM of the tiny LLM's sizes, saved with save_pretrained,
  and its state dict."""
  import torch
  import transformers
  root, cfg, *_ = tiny_checkpoints
  llm = cfg.llm
  torch.manual_seed(0)
  model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
      vocab_size=llm.vocab_size, num_hidden_layers=llm.num_layers, hidden_size=llm.hidden_size,
      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
      head_dim=llm.head_dim, intermediate_size=llm.mlp_dim, rope_theta=llm.rope_theta,
      tie_word_embeddings=False))
  folder = str(root / 'qwen3')
  model.save_pretrained(folder)
  return folder, {k: v.numpy() for k, v in model.state_dict().items()}


def hf_llm_leaves(state, num_layers):
  """Our llm/ leaves from a Qwen3ForCausalLM state dict, written out here by hand."""
  def stack(key, transpose):
    return np.stack([state[f'model.layers.{i}.{key}'].T if transpose
                     else state[f'model.layers.{i}.{key}'] for i in range(num_layers)])
  layers = {'attention': {name: {'kernel': stack(f'self_attn.{name}.weight', True)}
                          for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj')},
            'mlp': {name: {'kernel': stack(f'mlp.{name}.weight', True)}
                    for name in ('gate_proj', 'up_proj', 'down_proj')},
            'input_norm': {'scale': stack('input_layernorm.weight', False)},
            'post_attention_norm': {'scale': stack('post_attention_layernorm.weight', False)}}
  layers['attention']['q_norm'] = {'scale': stack('self_attn.q_norm.weight', False)}
  layers['attention']['k_norm'] = {'scale': stack('self_attn.k_norm.weight', False)}
  return {'embed_tokens': {'embedding': state['model.embed_tokens.weight']},
          'decoder': {'layers': layers, 'final_norm': {'scale': state['model.norm.weight']}},
          'lm_head': {'kernel': state['lm_head.weight'].T}}


def test_qwen3_base_is_mapped_onto_our_llm(tiny_checkpoints, qwen3_base):
  root, cfg, (_, ft1, _), _, finetuned = tiny_checkpoints
  folder, state = qwen3_base
  summary = merge.merge_checkpoints('linear', folder, [ft1], str(root / 'merged_qwen3'),
                                    include='^llm/', alpha=0.5)
  merged = checkpoint.Reader(summary.path).load()
  hf_llm = hf_llm_leaves(state, cfg.llm.num_layers)
  assert sum(x.size for x in jax.tree.leaves(hf_llm)) == sum(v.size for v in state.values())
  expected = dict(finetuned[0], llm=jax.tree.map(
      lambda hf, ft: np.float32(0.5) * hf + np.float32(0.5) * np.asarray(ft), hf_llm,
      finetuned[0]['llm']))
  for (name, ours), (_, want) in zip(leaves_with_names(merged), leaves_with_names(expected)):
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=0, err_msg=name)


def test_qwen3_base_refusals(tiny_checkpoints, qwen3_base):
  root, cfg, (_, ft1, _), *_ = tiny_checkpoints
  folder, _ = qwen3_base
  out = str(root / 'never')
  with pytest.raises(merge.MergeError, match="lacks 42 leaves .*'adapters/code_embedding"):
    merge.merge_checkpoints('linear', folder, [ft1], out, alpha=0.5)
  wrong = str(root / 'qwen3_wrong')
  shutil.copytree(folder, wrong)
  with open(os.path.join(wrong, 'config.json')) as f:
    hf_config = json.load(f)
  hf_config['intermediate_size'] += 1
  with open(os.path.join(wrong, 'config.json'), 'w') as f:
    json.dump(hf_config, f)
  ours = cfg.llm.mlp_dim
  with pytest.raises(merge.MergeError, match=f'intermediate_size is {ours + 1}, ours {ours}'):
    merge.merge_checkpoints('linear', wrong, [ft1], out, include='^llm/', alpha=0.5)
  assert not os.path.exists(out) and not os.path.exists(out + '.incomplete')
