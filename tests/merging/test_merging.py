"""Model merging: each method against an independent NumPy reference on random trees (dense, and
an MoE LLM's), exact endpoints, selection (an MoE LLM's router and experts named by
include/exclude); the streaming merge of tiny checkpoints against the in-memory merge bit for bit;
refusals that leave nothing on disk; Hugging Face Qwen3 and Qwen3-MoE bases mapped onto our llm/
leaves.

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
# An MoE LLM's leaves as the model names them (2 layers, width 6, 7 experts of width 3).
MOE_SHAPES = {'llm': {'embed_tokens': {'embedding': (11, 6)}, 'decoder': {'layers': {
    'attention': {'q_proj': {'kernel': (2, 6, 4)}}, 'input_norm': {'scale': (2, 6)},
    'moe': {'router': {'kernel': (2, 6, 7)}, 'gate_proj': (2, 7, 6, 3), 'up_proj': (2, 7, 6, 3),
            'down_proj': (2, 7, 3, 6)}}}}}
ROUTER = 'llm/decoder/layers/moe/router/kernel'
EXPERTS = {f'llm/decoder/layers/moe/{name}' for name in ('gate_proj', 'up_proj', 'down_proj')}
MOE_NAMES = {'/'.join(key.key for key in path) for path, _ in jax.tree_util.tree_flatten_with_path(
    MOE_SHAPES, is_leaf=lambda x: isinstance(x, tuple))[0]}
CLOSE = dict(rtol=1e-5, atol=1e-6)


def random_tree(seed, scale=1.0, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda shape: (scale * rng.standard_normal(shape)).astype(np.float32),
                      shapes, is_leaf=lambda x: isinstance(x, tuple))


def near_trees(shapes):
  """A base and three fine-tunes near it (as fine-tunes are)."""
  base = random_tree(0, shapes=shapes)
  return base, [jax.tree.map(np.add, base, random_tree(seed, 0.1, shapes)) for seed in (1, 2, 3)]


@pytest.fixture(scope='module')
def trees():
  return near_trees(SHAPES)


@pytest.fixture(scope='module')
def moe_trees():
  return near_trees(MOE_SHAPES)


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


@pytest.mark.parametrize('kind', ['trees', 'moe_trees'])
@pytest.mark.parametrize('method,count,args', METHOD_CASES, ids=[c[0] for c in METHOD_CASES])
def test_methods_match_numpy_references(request, kind, method, count, args):
  base, finetuned = request.getfixturevalue(kind)
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


@pytest.mark.parametrize('include,exclude,selected', [
    (None, 'moe/router', MOE_NAMES - {ROUTER}),
    ('moe/router', None, {ROUTER}),
    ('moe/(gate|up|down)_proj', None, EXPERTS),
    ('/moe/', 'router', EXPERTS),
])
def test_include_exclude_name_the_router_and_the_experts(moe_trees, include, exclude, selected):
  base, finetuned = moe_trees
  merged = methods.merge_trees('linear', base, finetuned[:1], alpha=0.5, include=include,
                               exclude=exclude)
  changed = set()
  for (name, ours), (_, b), (_, m) in zip(*map(leaves_with_names, (merged, base, finetuned[0]))):
    if name in selected:
      np.testing.assert_allclose(ours, 0.5 * b + 0.5 * m, **CLOSE, err_msg=name)
    if not np.array_equal(ours, m):
      changed.add(name)
  assert changed == selected


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


def hf_llm_leaves(state, num_layers, num_experts=0):
  """Our llm/ leaves from a Qwen3ForCausalLM state dict (with `num_experts`, a Qwen3-MoE one with
  per-expert tensors, as its files hold them), written out here by hand."""
  def stack(key, transpose):
    return np.stack([state[f'model.layers.{i}.{key}'].T if transpose
                     else state[f'model.layers.{i}.{key}'] for i in range(num_layers)])
  projections = ('gate_proj', 'up_proj', 'down_proj')
  if num_experts:
    feed_forward = {'moe': {'router': {'kernel': stack('mlp.gate.weight', True)}} | {
        name: np.stack([stack(f'mlp.experts.{e}.{name}.weight', True)
                        for e in range(num_experts)], axis=1) for name in projections}}
  else:
    feed_forward = {'mlp': {name: {'kernel': stack(f'mlp.{name}.weight', True)}
                            for name in projections}}
  layers = {'attention': {name: {'kernel': stack(f'self_attn.{name}.weight', True)}
                          for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj')},
            **feed_forward,
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


def moe_model_config(**llm):
  """The default model config with an MoE LLM of these sizes (transformers' names where they
  differ: num_experts_per_tok, moe_intermediate_size)."""
  from fac_jax import config as config_lib
  cfg = config_lib.default_config().model
  moe = {ours: llm.pop(theirs) for theirs, ours in (
      ('num_experts', 'num_experts'), ('num_experts_per_tok', 'experts_per_token'),
      ('moe_intermediate_size', 'moe_mlp_dim'))}
  cfg.llm.update(llm)
  cfg.llm.moe.update(moe, norm_topk_prob=True)
  return cfg


def read_checkpoint(path):
  """A checkpoint's leaves as a nested tree, read without building the model it holds."""
  leaves = merge.CheckpointLeaves(path)
  return merge.nest(leaves.read(sorted(leaves.shapes),
                                merge.leaf_shardings(None, leaves.shapes, None)))


def test_streaming_merge_of_moe_checkpoints_keeps_the_router_when_told(moe_trees, tmp_path):
  base, finetuned = moe_trees
  cfg = moe_model_config(vocab_size=11, num_layers=2, hidden_size=6, num_experts=7,
                         num_experts_per_tok=2, moe_intermediate_size=3)
  paths = [write_tree(str(tmp_path / name), tree, cfg)
           for name, tree in [('base', base), ('ft1', finetuned[0]), ('ft2', finetuned[1])]]
  replicated = jax.sharding.NamedSharding(sharding.mesh_in_scope(), jax.sharding.PartitionSpec())
  expected = methods.merge_trees('ties', jax.device_put(base, replicated),
                                 [jax.device_put(t, replicated) for t in finetuned[:2]],
                                 exclude='moe/router', density=0.4)
  summary = merge.merge_checkpoints('ties', paths[0], paths[1:], str(tmp_path / 'merged'),
                                    exclude='moe/router', density=0.4)
  assert (summary.leaves, summary.merged_leaves) == (len(MOE_NAMES), len(MOE_NAMES) - 1)
  merged = read_checkpoint(summary.path)
  assert_trees_equal(merged, expected)
  assert np.array_equal(merged['llm']['decoder']['layers']['moe']['router']['kernel'],
                        finetuned[0]['llm']['decoder']['layers']['moe']['router']['kernel'])


MOE_BASE_SIZES = dict(vocab_size=29, num_layers=2, hidden_size=12, num_heads=3, num_kv_heads=1,
                      head_dim=4, mlp_dim=20, num_experts=5, num_experts_per_tok=2,
                      moe_intermediate_size=6)


@pytest.fixture(scope='module')
def qwen3_moe_base(tmp_path_factory):
  """A random Hugging Face Qwen3MoeForCausalLM saved with save_pretrained (per-expert tensors,
  transformers 5's config names), the tensors it wrote, and an MoE model config of its sizes."""
  import torch
  import transformers
  from safetensors.numpy import load_file
  sizes = MOE_BASE_SIZES
  torch.manual_seed(1)
  model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
      vocab_size=sizes['vocab_size'], num_hidden_layers=sizes['num_layers'],
      hidden_size=sizes['hidden_size'], num_attention_heads=sizes['num_heads'],
      num_key_value_heads=sizes['num_kv_heads'], head_dim=sizes['head_dim'],
      intermediate_size=sizes['mlp_dim'], num_experts=sizes['num_experts'],
      num_experts_per_tok=sizes['num_experts_per_tok'],
      moe_intermediate_size=sizes['moe_intermediate_size'], norm_topk_prob=True,
      rope_theta=1e6, tie_word_embeddings=False))
  folder = str(tmp_path_factory.mktemp('qwen3_moe') / 'hf')
  model.save_pretrained(folder)
  return folder, load_file(os.path.join(folder, 'model.safetensors')), moe_model_config(**sizes)


def test_qwen3_moe_base_is_mapped_onto_our_llm(qwen3_moe_base, tmp_path):
  folder, state, cfg = qwen3_moe_base
  hf_llm = hf_llm_leaves(state, cfg.llm.num_layers, cfg.llm.moe.num_experts)
  assert sum(x.size for x in jax.tree.leaves(hf_llm)) == sum(v.size for v in state.values())
  rng = np.random.default_rng(4)
  finetuned = {'llm': jax.tree.map(
      lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), hf_llm)}
  ft = write_tree(str(tmp_path / 'ft'), finetuned, cfg)
  summary = merge.merge_checkpoints('linear', folder, [ft], str(tmp_path / 'merged'),
                                    exclude='moe/router', alpha=0.5)
  merged = read_checkpoint(summary.path)
  expected = jax.tree.map(lambda hf, ft: np.float32(0.5) * hf + np.float32(0.5) * ft,
                          {'llm': hf_llm}, finetuned)
  expected['llm']['decoder']['layers']['moe']['router'] = (
      finetuned['llm']['decoder']['layers']['moe']['router'])
  for (name, ours), (_, want) in zip(leaves_with_names(merged), leaves_with_names(expected)):
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=0, err_msg=name)


def test_qwen3_moe_base_refusals(qwen3_moe_base, tmp_path):
  folder, _, cfg = qwen3_moe_base
  ft = write_tree(str(tmp_path / 'ft'), {'llm': {'lm_head': {'kernel': np.zeros((12, 29),
                                                                             np.float32)}}}, cfg)
  for edit, match in [
      (dict(num_local_experts=6), 'sizes differ from the fine-tuned LLM: num_experts is 6, ours 5'),
      (dict(model_type='qwen3'), "model_type is 'qwen3'; a base folder for this LLM must be a "
                                 "Hugging Face 'qwen3_moe' causal LM")]:
    wrong = tmp_path / 'wrong'
    shutil.rmtree(wrong, ignore_errors=True)
    shutil.copytree(folder, wrong)
    hf_config = json.loads((wrong / 'config.json').read_text())
    (wrong / 'config.json').write_text(json.dumps(hf_config | edit))
    out = str(tmp_path / 'never')
    with pytest.raises(merge.MergeError, match=match):
      merge.merge_checkpoints('linear', str(wrong), [ft], out, include='^llm/', alpha=0.5)
    assert not os.path.exists(out) and not os.path.exists(out + '.incomplete')
