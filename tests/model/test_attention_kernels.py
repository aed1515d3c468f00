"""model.attention: the Pallas splash kernel (in interpret mode on CPU) equals XLA's attention,
values and gradients, on packed causal segments with GQA and on the encoder's mel windows; so do
the tiny model's loss and gradient; decoding and generation work with it; cuDNN's arguments mean
the same attention (run by XLA here: no GPU).

Tolerances, float32 at 'highest' matmul precision: kernels max abs 1e-5 on values and gradients
(measured: values 5e-7, gradients 3e-6, also on a 4-device mesh); tiny model loss rtol 1e-6
(measured 1e-7), gradients max abs 5e-5 (measured 2e-6 to 5e-6, gradients up to 4.4); generated
tokens and codes exactly equal. Compiled for a TPU slice by libtpu's compiler.
"""

import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fac_jax import sharding
from fac_jax.data import synthetic
from fac_jax.inference import generate
from fac_jax.model import attention, fun_audio_chat
from fac_jax.train import steps
from official_tiny import KEY, greedy, prompt_of

ATOL = 1e-5


def random_qkv(rng, batch, length, heads, kv_heads, head_dim=16):
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return (normal(batch, length, heads, head_dim), normal(batch, length, kv_heads, head_dim),
          normal(batch, length, kv_heads, head_dim), normal(batch, length, heads, head_dim))


def packed_segment_ids(length):
  """Row 0: three packed segments then padding (segment 0); row 1: one segment, no padding."""
  row = np.repeat([1, 2, 3, 0], [120, 100, 50, length - 270])
  return jnp.asarray(np.stack([row, np.full(length, 5)]), jnp.int32)


def values_and_grads(mask, q, k, v, cotangent):
  """attend's output and the gradient of <output, cotangent> w.r.t. q, k, v."""
  loss = lambda q, k, v: (attention.attend(q, k, v, mask) * cotangent).sum()
  return jax.jit(lambda q, k, v: (attention.attend(q, k, v, mask),
                                  jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def assert_same(got, want, atol=ATOL):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=0, atol=atol), got, want)


def test_splash_equals_xla_on_packed_causal_segments_with_gqa():
  """300 positions pad to 384: three 128-blocks a side, so causal block skipping runs too."""
  q, k, v, cotangent = random_qkv(np.random.default_rng(0), 2, 300, heads=4, kv_heads=2)
  ids = packed_segment_ids(300)
  assert_same(values_and_grads(attention.Packed(ids, 'splash'), q, k, v, cotangent),
              values_and_grads(attention.Packed(ids, 'xla'), q, k, v, cotangent))


def test_splash_equals_xla_on_encoder_windows():
  """One window a row: full, partly padded, empty. Padding frames attend to themselves in both,
  so every frame agrees, not only the valid ones."""
  q, k, v, cotangent = random_qkv(np.random.default_rng(1), 3, 50, heads=4, kv_heads=4)
  valid = jnp.arange(50)[None, :] < jnp.asarray([50, 17, 0])[:, None]
  assert_same(values_and_grads(attention.Windows(valid, 'splash'), q, k, v, cotangent),
              values_and_grads(attention.Windows(valid, 'xla'), q, k, v, cotangent))


def test_cudnn_arguments_mean_the_same_attention(monkeypatch):
  """What the cudnn path passes (causal flag plus a segment mask; sequence lengths) gives XLA's
  attention when XLA's implementation runs it: equal on every position that is read."""
  original = jax.nn.dot_product_attention
  implementations = []

  def as_xla(*args, implementation=None, **kwargs):
    implementations.append(implementation)
    return original(*args, **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', as_xla)
  rng = np.random.default_rng(2)
  q, k, v, _ = random_qkv(rng, 2, 300, heads=4, kv_heads=2)
  ids = packed_segment_ids(300)
  assert_same(attention.attend(q, k, v, attention.Packed(ids, 'cudnn')),
              attention.attend(q, k, v, attention.Packed(ids, 'xla')))
  q, k, v, _ = random_qkv(rng, 2, 50, heads=4, kv_heads=4)
  valid = jnp.arange(50)[None, :] < jnp.asarray([50, 17])[:, None]
  got = attention.attend(q, k, v, attention.Windows(valid, 'cudnn'))
  want = attention.attend(q, k, v, attention.Windows(valid, 'xla'))
  assert_same(jnp.where(valid[..., None, None], got, 0), jnp.where(valid[..., None, None], want, 0))
  assert implementations == ['cudnn', None, 'cudnn', None]


def test_auto_picks_by_platform_and_unknown_names_are_refused(monkeypatch):
  assert attention.resolve('auto', jnp.float32) == 'xla'  # CPU
  for platform, dtype, want in [('tpu', jnp.float32, 'splash'), ('gpu', jnp.bfloat16, 'cudnn'),
                                ('gpu', jnp.float32, 'xla')]:
    monkeypatch.setattr(sharding, 'platform', lambda p=platform: p)
    assert attention.resolve('auto', dtype) == want
  # Several TPU chips and no mesh in scope: splash could not be partitioned, so XLA's.
  monkeypatch.setattr(sharding, 'platform', lambda: 'tpu')
  monkeypatch.setattr(jax, 'device_count', lambda: 4)
  assert attention.resolve('auto', jnp.bfloat16) == 'xla'
  with pytest.raises(ValueError, match='model.attention'):
    attention.Packed(jnp.ones((1, 4), jnp.int32), 'flash')


def mesh_check() -> dict:
  """Run on 4 host devices: splash on a (data 2, tensor 2) mesh against XLA without one."""
  jax.config.update('jax_default_matmul_precision', 'highest')
  q, k, v, cotangent = random_qkv(np.random.default_rng(3), 2, 300, heads=4, kv_heads=2)
  ids = packed_segment_ids(300)
  want = values_and_grads(attention.Packed(ids, 'xla'), q, k, v, cotangent)
  with jax.set_mesh(sharding.mesh_from_flag('data:2,fsdp:1,tensor:2')):
    got = values_and_grads(attention.Packed(ids, 'splash'), q, k, v, cotangent)
  diffs = jax.tree.map(lambda g, w: float(jnp.abs(g - w).max()), got, want)
  return {'max_diff': max(jax.tree.leaves(diffs)), 'out_spec': str(got[0].sharding.spec)}


def run_self(check: str, **env) -> dict:
  """This file run as a script, `check` its argument, in a process with these variables."""
  env = dict(os.environ, **env)
  tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join([tests, env.get('PYTHONPATH', '')])
  out = subprocess.run([sys.executable, os.path.abspath(__file__), check], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_splash_runs_per_shard_on_a_mesh():
  """Rows split over data, heads (query and key alike) over tensor: the output stays split so."""
  result = run_self('mesh', XLA_FLAGS='--xla_force_host_platform_device_count=4 '
                                      '--xla_backend_optimization_level=0')
  assert result['max_diff'] <= ATOL
  assert "'data'" in result['out_spec'] and "'tensor'" in result['out_spec']


def tpu_check() -> dict:
  """Run with libtpu: 'auto' on a 4-chip v5p slice's mesh, traced here and compiled by the TPU
  compiler, forward and backward; how many Mosaic (Pallas) calls each program has."""
  from fac_jax.scale import aot
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=2)),
                            aot.topology_devices('v5p', (2, 2, 1)))
  packed = random_qkv(np.random.default_rng(6), 2, 300, heads=4, kv_heads=2)[:3]
  windows = random_qkv(np.random.default_rng(7), 4, 50, heads=4, kv_heads=4)[:3]
  valid = jnp.arange(50)[None] < jnp.asarray([[50], [17], [0], [9]])
  cases = {'packed': (attention.Packed, packed_segment_ids(300), packed),
           'windows': (attention.Windows, valid, [x.astype(jnp.bfloat16) for x in windows])}
  calls = {}
  for name, (kind, mask, qkv) in cases.items():
    loss = lambda q, k, v, m, kind=kind: attention.attend(q, k, v, kind(m)).astype(
        jnp.float32).sum()
    with jax.set_mesh(mesh):
      lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
          *[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (*qkv, mask)])
      lowered.compile()
    calls[name] = lowered.as_text().count('tpu_custom_call')
  return calls


def test_splash_compiles_for_a_tpu_slice():
  """'auto' picks splash under a TPU mesh; the TPU compiler (libtpu, requirements-tpu.txt, which
  the tests install) builds its kernels without interpret mode: forward, and dq and dk/dv in the
  backward."""
  calls = run_self('tpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1', JAX_PLATFORMS='cpu')
  assert calls['packed'] >= 3 and calls['windows'] >= 3


def with_attention(cfg, implementation):
  cfg = copy.deepcopy(cfg)
  cfg.attention = implementation
  return cfg


def test_tiny_model_loss_and_gradients_with_splash_equal_xla(tiny_config):
  """All three stacks: LLM (6 heads, 2 kv), refined head at 25 Hz (3 heads, 1 kv), encoder."""
  cfg = tiny_config.model
  params = nnx.to_pure_dict(nnx.split(fun_audio_chat.create(cfg, seed=0))[1])
  batch = synthetic.batch(np.random.default_rng(4), cfg, batch_size=1, seq_len=48, num_windows=4)
  assert (batch['segment_ids'] == 0).any() and (batch['mel_lengths'] < 100).any()

  def loss_and_grads(implementation):
    graphdef = nnx.split(fun_audio_chat.abstract_model(with_attention(cfg, implementation)))[0]
    loss = lambda p: steps.loss_fn(graphdef, p, batch)[0]
    return jax.jit(jax.value_and_grad(loss))(params)

  (splash_loss, splash_grads), (xla_loss, xla_grads) = map(loss_and_grads, ('splash', 'xla'))
  np.testing.assert_allclose(splash_loss, xla_loss, rtol=1e-6)
  assert_same(splash_grads, xla_grads, atol=5e-5)


def test_generation_with_splash_equals_xla(tiny_config):
  """The prompt's audio goes through the encoder by splash; prefill and decode steps attend over
  the KV cache by XLA's path whatever model.attention says."""
  cfg = tiny_config.model
  params = nnx.to_pure_dict(nnx.split(fun_audio_chat.create(cfg, seed=5))[1])
  prompt = prompt_of(synthetic.batch(np.random.default_rng(5), cfg, 1, 48, 4))

  def run(implementation):
    model_cfg = with_attention(cfg, implementation)
    graphdef = nnx.split(fun_audio_chat.abstract_model(model_cfg))[0]
    return jax.device_get(generate.make_generate_fn(graphdef, model_cfg, greedy(4))(
        params, prompt, KEY))

  splash, xla = run('splash'), run('xla')
  assert splash['num_text'][0] > 0
  jax.tree.map(np.testing.assert_array_equal, splash, xla)


if __name__ == '__main__':
  print(json.dumps({'mesh': mesh_check, 'tpu': tpu_check}[sys.argv[1]]()))
