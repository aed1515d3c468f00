"""LoRA and QLoRA through qwix: the adapted model starts as its base, folding reproduces the adapted
forward, optimizer state exists only for what trains, QLoRA's base is qwix's quantisation, and a
LoRA run of the trainer writes an adapter checkpoint that changes only the adapted weights."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import qwix
from flax import nnx

import speech_corpus
from conftest import REPO

from fac_jax import config as config_lib
from fac_jax.checkpoints import adapters, checkpoint
from fac_jax.data import prepare, synthetic
from fac_jax.model import fun_audio_chat, lora
from fac_jax.train import optim

RANK = 4
ADAPTED = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')


def lora_settings(**changes) -> ml_collections.ConfigDict:
  settings = config_lib.lora_config()
  settings.update(rank=RANK, alpha=8.0, **changes)
  return settings


@pytest.fixture(scope='module')
def tiny():
  return config_lib.load(os.path.join(REPO, 'configs', 'tiny.py')).model


@pytest.fixture(scope='module')
def batch(tiny):
  return jax.tree.map(jnp.asarray, synthetic.batch(np.random.default_rng(0), tiny, 2, 128, 8))


def params_of(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model))


def forward(graphdef, params, batch) -> dict:
  return jax.jit(lambda p, b: nnx.merge(graphdef, p).target_nll(b))(params, batch)


def leaves_by_path(tree: dict) -> dict:
  return {optim.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def stored_names(ckpt: str) -> list[str]:
  return [optim.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      checkpoint.saved_shapes(ckpt), is_leaf=lambda x: isinstance(x, tuple))[0]]


def test_adapters_sit_on_the_targets_and_start_equal_to_the_base(tiny, batch):
  base = fun_audio_chat.create(tiny, 0)
  adapted = lora.add_adapters(fun_audio_chat.create(tiny, 0), lora_settings())
  base_leaves, adapted_leaves = leaves_by_path(params_of(base)), leaves_by_path(params_of(adapted))
  added = sorted(set(adapted_leaves) - set(base_leaves))
  # Every attention and MLP projection of the LLM's stack, A and B, nothing else.
  block = lambda p: 'attention' if p in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'
  assert added == sorted(f'llm/decoder/layers/{block(p)}/{p}/kernel_lora_{ab}'
                         for p in ADAPTED for ab in 'ab')
  for name in added:
    kernel = base_leaves[name.rsplit('/', 1)[0] + '/kernel']
    layers, fan_in, fan_out = kernel.shape
    want = (layers, fan_in, RANK) if name.endswith('_a') else (layers, RANK, fan_out)
    assert adapted_leaves[name].shape == want
    assert np.any(adapted_leaves[name] != 0) == name.endswith('_a')  # B starts at zero
  graphdef, _ = nnx.split(adapted)
  base_out = forward(nnx.split(base)[0], params_of(base), batch)
  adapted_out = forward(graphdef, params_of(adapted), batch)
  for channel in base_out:
    np.testing.assert_array_equal(adapted_out[channel][0], base_out[channel][0])


def test_folded_weights_compute_what_the_adapted_model_computes(tiny, batch):
  settings = lora_settings(targets=r'llm/decoder/layers/(attention/[qv]_proj|mlp/down_proj)|'
                                   r'speech_refined_head/decoder/layers/mlp/up_proj')
  adapted = lora.add_adapters(fun_audio_chat.create(tiny, 0), settings)
  graphdef, _ = nnx.split(adapted)
  params = params_of(adapted)
  key = iter(jax.random.split(jax.random.key(1), 64))
  params = jax.tree_util.tree_map_with_path(  # trained-looking adapters: B no longer zero
      lambda p, x: 0.05 * jax.random.normal(next(key), x.shape) if lora.is_adapter(
          tuple(k.key for k in p)) else x, params)
  adapted_out = forward(graphdef, params, batch)
  folded = lora.fold(params, settings)
  plain_graphdef = nnx.split(fun_audio_chat.abstract_model(tiny))[0]
  folded_out = forward(plain_graphdef, folded, batch)
  base_out = forward(plain_graphdef, lora.fold(jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if lora.is_adapter(tuple(k.key for k in p)) else x,
      params), settings), batch)
  for channel in adapted_out:
    nll, folded_nll = adapted_out[channel][0], folded_out[channel][0]
    np.testing.assert_allclose(folded_nll, nll, rtol=2e-5, atol=2e-5)  # fp32 tolerance
    assert np.abs(nll - base_out[channel][0]).max() > 1e-3  # the adapters do change the model
  assert set(leaves_by_path(folded)) == set(leaves_by_path(params_of(
      fun_audio_chat.abstract_model(tiny))))


def test_optimizer_state_exists_only_for_adapters_and_fully_trained_leaves(tiny):
  train = config_lib.train_config('stage1')
  train.lora = lora_settings(train_fully=('^adapters/',))
  params = nnx.to_pure_dict(nnx.state(lora.abstract_model(tiny, train.lora)))
  optimizer = optim.make_optimizer(train, params)
  state = jax.eval_shape(optimizer.init, params)
  trained = leaves_by_path(optim.select(params, optim.trainable_mask(
      params, optim.frozen_patterns(train))))
  assert all(lora.is_adapter(tuple(n.split('/'))) or n.startswith('adapters/') for n in trained)
  assert sum(n.startswith('adapters/') for n in trained) == len(leaves_by_path(params['adapters']))
  moment_leaves = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  assert len(moment_leaves) == 2 * len(trained)  # mu and nu of each trained leaf, nothing else
  trained_bytes = sum(x.size * x.dtype.itemsize for x in trained.values())
  assert sum(x.size * x.dtype.itemsize for x in moment_leaves) == 2 * trained_bytes
  all_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  assert trained_bytes < 0.2 * all_bytes


@pytest.mark.parametrize('qtype', ['int8', 'int4'])
def test_qlora_base_is_stored_as_qwix_quantisation_of_the_targets(tiny, batch, qtype):
  targets = r'llm/decoder/layers/mlp/(gate|up)_proj'
  adapted = lora.add_adapters(fun_audio_chat.create(tiny, 0),
                              lora_settings(targets=targets, base_quantization=qtype))
  graphdef, params = nnx.split(adapted)
  stored = leaves_by_path(params_of(adapted))
  kernels = [n for n in stored if n.endswith('/kernel/array/qvalue')]
  assert len(kernels) == 2 and all(stored[n].dtype == jnp.dtype(qtype) for n in kernels)
  assert not any(re.fullmatch(r'llm/.*(gate|up)_proj/kernel', n) for n in stored)
  qlora_out = forward(graphdef, params_of(adapted), batch)
  # Reference: the plain model with each target kernel replaced by qwix's own quantise then
  # dequantise of it, channelwise over the output as qwix's PTQ does for a matmul's weight.
  plain = fun_audio_chat.create(tiny, 0)
  for name, module in lora.adapted_modules(plain, targets):
    kernel = module.kernel.value
    module.kernel.value = jnp.stack([qwix.dequantize(qwix.quantize(
        layer, qtype, channelwise_axes=(1,))) for layer in kernel])
  reference_out = forward(nnx.split(plain)[0], params_of(plain), batch)
  float_out = forward(nnx.split(plain)[0], params_of(fun_audio_chat.create(tiny, 0)), batch)
  for channel in qlora_out:
    np.testing.assert_allclose(qlora_out[channel][0], reference_out[channel][0], rtol=1e-4,
                               atol=1e-4)
    assert np.abs(qlora_out[channel][0] - float_out[channel][0]).max() > 1e-5  # it is quantised


def test_bad_settings_are_refused_naming_the_field(tiny):
  with pytest.raises(ValueError, match='train.lora.targets=.*matches no projection'):
    lora.add_adapters(fun_audio_chat.create(tiny, 0), lora_settings(targets='nothing/here'))
  with pytest.raises(ValueError, match='train.lora.base_quantization'):
    lora.check(lora_settings(base_quantization='fp4'))
  with pytest.raises(ValueError, match='train.lora.dropout'):
    lora.check(lora_settings(dropout=0.1))


def train_lora(workdir: str, data: str, base: str, *extra: str) -> None:
  """8 steps of stage 1 with rank-RANK adapters over `base`, as a user runs the trainer."""
  command = [sys.executable, '-m', 'fac_jax.train.trainer', f'--config={REPO}/configs/tiny.py',
             f'--workdir={workdir}', f'--config.data.dir={data}', '--config.train.steps=8',
             '--config.train.log_every=1', '--config.data.batch_size=4',
             '--config.data.seq_len=96', '--config.data.num_windows=16',
             f'--config.train.init_checkpoint={base}', f'--config.train.lora.rank={RANK}',
             '--config.train.lora.alpha=8', *extra]
  env = dict(os.environ, XLA_FLAGS='--xla_backend_optimization_level=0', JAX_PLATFORMS='cpu')
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory, tiny):
  """A base checkpoint, and 8 LoRA steps of stage 1 on it with the grouping adapters trained
  fully."""
  root = str(tmp_path_factory.mktemp('lora'))
  splits = speech_corpus.write(root, num_train=40, num_validation=6, bad_lines=False)
  data = os.path.join(root, 'prepared')
  prepare.prepare(data, splits, tiny)
  base = checkpoint.save_params(os.path.join(root, 'base'), tiny,
                                params_of(fun_audio_chat.create(tiny, 3)))
  workdir = os.path.join(root, 'run')
  train_lora(workdir, data, base, '--config.train.checkpoint_every=4',
             '--config.train.eval_every=8', '--config.train.eval_batches=1',
             "--config.train.lora.train_fully=('^adapters/',)")
  return base, workdir


def test_lora_run_writes_adapters_apart_that_change_only_adapted_weights(lora_run, tiny):
  base, workdir = lora_run
  final = os.path.join(workdir, 'final')
  with open(os.path.join(final, adapters.FILE)) as f:
    settings = json.load(f)
  assert settings['base'] == os.path.abspath(base) and settings['lora']['rank'] == RANK
  stored = stored_names(final)
  assert stored and all(lora.is_adapter(tuple(n.split('/'))) or n.startswith('adapters/')
                        for n in stored)
  base_params = jax.device_get(checkpoint.Reader(base).load())
  folded = jax.device_get(adapters.load_params(final))
  changed = {n for n, (x, y) in zip(leaves_by_path(base_params), zip(
      leaves_by_path(base_params).values(), leaves_by_path(folded).values())) if
             not np.array_equal(x, y)}
  adapted_kernels = {f'llm/decoder/layers/{part}/{p}/kernel' for p in ADAPTED
                     for part in ('attention', 'mlp')} & set(leaves_by_path(base_params))
  fully = {n for n in leaves_by_path(base_params) if n.startswith('adapters/')}
  assert changed <= adapted_kernels | fully
  assert adapted_kernels <= changed  # every adapter learned something in 8 steps
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    losses = [e['train/loss'] for e in map(json.loads, f) if 'train/loss' in e]
  assert losses[-1] < losses[0]


def test_a_mismatched_base_is_refused_with_both_fingerprints(lora_run, tiny, tmp_path):
  base, workdir = lora_run
  other = checkpoint.save_params(str(tmp_path / 'other'), tiny,
                                 params_of(fun_audio_chat.create(tiny, 4)))
  final = os.path.join(workdir, 'final')
  recorded = adapters.read_settings(final)['base_fingerprint']
  with pytest.raises(adapters.AdapterError, match=recorded) as refused:
    adapters.load_params(final, base=other)
  from fac_jax import fingerprint
  assert fingerprint.of_folder(other) in str(refused.value)


def test_merge_folds_the_trained_adapters_and_takes_them_as_task_vectors(lora_run, tiny, batch,
                                                                         tmp_path):
  base, workdir = lora_run
  final = os.path.join(workdir, 'final')
  folded_dir = str(tmp_path / 'folded')
  result = subprocess.run(
      [sys.executable, '-m', 'fac_jax.merging.merge', '--method=lora', f'--base={base}',
       f'--adapters={final}', f'--out={folded_dir}'],
      env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True, timeout=600,
      cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  folded = jax.device_get(checkpoint.Reader(folded_dir).load())
  # The adapted model (qwix's LoraProvider over base + trained leaves) against the folded one.
  settings = lora_settings(train_fully=('^adapters/',))
  adapted = lora.abstract_model(tiny, settings)
  trained = adapters.trained_leaves(final, tiny, settings)
  adapted_params = lora.insert(jax.device_get(checkpoint.Reader(base).load()), trained)
  adapted_out = forward(nnx.split(adapted)[0], adapted_params, batch)
  folded_out = forward(nnx.split(fun_audio_chat.abstract_model(tiny))[0], folded, batch)
  for channel in adapted_out:
    np.testing.assert_allclose(folded_out[channel][0], adapted_out[channel][0], rtol=2e-5,
                               atol=2e-5)
  assert os.path.exists(os.path.join(folded_dir, 'chat', 'settings.json'))

  # As a task vector: base + 0.5 (folded - base) on the LLM leaves.
  half_dir = str(tmp_path / 'half')
  from fac_jax.merging import merge
  merge.merge_checkpoints('task_arithmetic', base, [final], half_dir, include='^llm/', scale=0.5)
  half = leaves_by_path(jax.device_get(checkpoint.Reader(half_dir).load()))
  base_leaves = leaves_by_path(jax.device_get(checkpoint.Reader(base).load()))
  for name, value in leaves_by_path(folded).items():
    expected = base_leaves[name] + 0.5 * (value - base_leaves[name]) if name.startswith(
        'llm/') else value
    np.testing.assert_allclose(half[name], expected, rtol=1e-6, atol=1e-6)


def test_qlora_run_lowers_held_out_loss_with_an_int8_base(lora_run, tiny, tmp_path):
  base, workdir = lora_run
  data = os.path.join(os.path.dirname(workdir), 'prepared')
  qlora = str(tmp_path / 'qlora')
  train_lora(qlora, data, base, '--config.train.checkpoint_every=8',
             '--config.train.eval_every=2', '--config.train.eval_batches=2',
             '--config.train.lora.base_quantization=int8')
  with open(os.path.join(qlora, 'metrics.jsonl')) as f:
    held_out = [e['eval/loss'] for e in map(json.loads, f) if 'eval/loss' in e]
  assert len(held_out) == 4 and held_out[-1] < held_out[0]
  stored = stored_names(os.path.join(qlora, 'final'))
  # The quantised base is not saved with the adapters.
  assert stored and all(lora.is_adapter(tuple(n.split('/'))) for n in stored)
