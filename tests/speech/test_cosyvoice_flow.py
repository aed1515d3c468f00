"""CosyVoice 3 flow against the golden fixture of the PyTorch reference (tiny size, random weights):
converter (CLI, noise table, refusals), every intermediate in all five modes, the DiT alone, the
rotary convention (negative controls) and streaming as a prefix of the offline output."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import paths

from fac_jax.speech import convert_cosyvoice, flow

FIXTURE = os.path.join(paths.TESTDATA, 'cosyvoice3_tiny', 'flow')
FLOW_PT = os.path.join(FIXTURE, 'flow.pt')
FLOW_CONFIG = os.path.join(FIXTURE, 'config.json')
TOLERANCE = 5e-5  # the fixture README's suggestion for mel, Euler states and DiT velocities
MODES = {  # mode: (finalize, streaming, prompt), as the fixture's config.json lists them
    'offline': (True, False, False), 'offline_nonfinal': (False, False, False),
    'chunk_nonfinal': (False, True, False), 'chunk': (True, True, False),
    'prompt': (True, False, True),
}


@pytest.fixture(scope='module')
def reference():
  return dict(np.load(os.path.join(FIXTURE, 'reference.npz')))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """The fixture's flow.pt through the command-line converter, loaded back."""
  out = tmp_path_factory.mktemp('converted')
  result = subprocess.run(
      [sys.executable, '-m', 'fac_jax.speech.convert_cosyvoice', f'--flow={FLOW_PT}',
       f'--flow_config={FLOW_CONFIG}', f'--out={out}'], capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return flow.load(os.path.join(out, 'flow'))


def run_mode(model, reference, mode, inference=flow.inference):
  finalize, streaming, prompt = MODES[mode]
  prompt_args = (jnp.asarray(reference['prompt_token']), jnp.asarray(reference['prompt_feat'])
                 ) if prompt else ()
  return inference(model, jnp.asarray(reference['token']), jnp.asarray(reference['embedding']),
                   *prompt_args, finalize=finalize, streaming=streaming)


def max_diff(a, b):
  assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_converter_writes_the_reference_noise_table(model, reference):
  noise = np.asarray(model.rand_noise[...])
  assert noise.shape == (15000, 80)
  np.testing.assert_array_equal(noise[:52].T[None], reference['rand_noise'])


def test_euler_schedule_accumulates_t(reference):
  t, dt = flow.euler_schedule(10)
  assert max_diff(t, reference['euler_t']) < 1e-6
  assert max_diff(dt, reference['euler_dt']) < 1e-6


@pytest.mark.parametrize('mode', MODES)
def test_every_intermediate_matches_the_reference(model, reference, mode):
  out = run_mode(model, reference, mode)
  for key in ('spks', 'mu', 'cond', 'euler_states', 'mel'):
    diff = max_diff(out[key], reference[f'{mode}.{key}'])
    assert diff < TOLERANCE, (mode, key, diff)
  assert int(out['num_frames'][0]) == reference[f'{mode}.mel'].shape[-1]


def step0_velocities(model, reference, mode):
  """The DiT alone on the stored step-0 CFG batch: row 0 conditional, row 1 with mu, spks and
  cond zeroed; x, the all-ones mask and t = euler_t[0] shared."""
  streaming = MODES[mode][1]
  time_major = lambda a: jnp.swapaxes(jnp.asarray(a), 1, 2)  # noqa: E731
  mu, cond = time_major(reference[f'{mode}.mu']), time_major(reference[f'{mode}.cond'])
  spks = jnp.asarray(reference[f'{mode}.spks'])
  x = time_major(reference[f'{mode}.euler_states'][0])
  length = x.shape[1]
  valid = jnp.ones((2, length), bool)
  mask = flow.attention_mask(valid, model.config.static_chunk_size if streaming else 0)
  rows = lambda a: jnp.concatenate([a, jnp.zeros_like(a)])  # noqa: E731
  estimate = nnx.jit(lambda m, *a: m.estimator(*a))
  velocity = estimate(model, jnp.concatenate([x, x]), rows(mu), rows(cond), rows(spks),
                      jnp.full((2,), reference['euler_t'][0]), mask, valid)
  return jnp.swapaxes(velocity, 1, 2)


@pytest.mark.parametrize('mode', ['offline', 'chunk_nonfinal', 'prompt'])
def test_dit_from_the_stored_inputs(model, reference, mode):
  velocity = step0_velocities(model, reference, mode)
  assert max_diff(velocity[:1], reference[f'{mode}.step0_v_cond']) < TOLERANCE
  assert max_diff(velocity[1:], reference[f'{mode}.step0_v_uncond']) < TOLERANCE


def rotary_on_every_head(x, angles):
  """Wrong: the interleaved rotation applied to each head after the split."""
  head = 2 * angles.shape[-1]
  per_head = x.reshape(*x.shape[:-1], x.shape[-1] // head, head)
  pairs = per_head.reshape(*per_head.shape[:-1], head // 2, 2)
  cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
  rotated = jnp.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                       pairs[..., 1] * cos + pairs[..., 0] * sin], axis=-1)
  return rotated.reshape(x.shape)


def rotary_half_split(x, angles):
  """Wrong: NeoX half-split pairs (i, i + dim_head/2) on head 0."""
  half = angles.shape[-1]
  first, second = x[..., :half], x[..., half:2 * half]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin,
                          x[..., 2 * half:]], axis=-1)


@pytest.mark.parametrize('wrong_rotary', [rotary_on_every_head, rotary_half_split])
def test_wrong_rotary_convention_fails_the_same_checks(model, reference, monkeypatch,
                                                       wrong_rotary):
  monkeypatch.setattr(flow, 'apply_rotary', wrong_rotary)
  fresh = nnx.jit(flow.inference.__wrapped__, static_argnames=('finalize', 'streaming'))
  mel_diff = max_diff(run_mode(model, reference, 'offline', fresh)['mel'],
                      reference['offline.mel'])
  velocity_diff = max_diff(step0_velocities(model, reference, 'offline')[:1],
                           reference['offline.step0_v_cond'])
  assert mel_diff > 100 * TOLERANCE, mel_diff
  assert velocity_diff > 100 * TOLERANCE, velocity_diff


def test_stream_is_the_prefix_of_the_offline_chunk_mode(model, reference):
  """Pushed piece by piece, the stream returns each block of 8 frames once its 4 tokens and their
  3 look-ahead tokens are in. Before the final push it has returned the complete blocks of the
  reference's chunk_nonfinal output on all 20 tokens (32 of its 34 frames: the last 2 are a
  partial block, which the final output recomputes with more frames of that block in view); after
  it, the reference's chunk output."""
  tokens = reference['token'][0]
  stream = flow.FlowStream(model, reference['embedding'][0], max_frames=64)
  pieces, returned = [(0, 3), (3, 9), (9, 14), (14, 20)], []
  for (start, end), frames in zip(pieces, [0, 8, 16, 32]):
    returned.append(np.asarray(stream.push(tokens[start:end])))
    assert sum(piece.shape[-1] for piece in returned) == frames
  before_final = np.concatenate(returned, axis=-1)
  assert max_diff(before_final, reference['chunk_nonfinal.mel'][..., :32]) < TOLERANCE
  np.testing.assert_array_equal(reference['chunk_nonfinal.mel'][..., :32],
                                reference['chunk.mel'][..., :32])  # the reference's own prefix
  final = np.asarray(stream.push([], finalize=True))
  assert final.shape[-1] == 8
  assert max_diff(np.concatenate([before_final, final], -1), reference['chunk.mel']) < TOLERANCE
  with pytest.raises(ValueError, match='finalized'):
    stream.push(tokens[:1])


def test_stream_with_a_prompt_matches_the_offline_chunk_mode(model, reference):
  stream = flow.FlowStream(model, reference['embedding'][0], reference['prompt_token'][0],
                           reference['prompt_feat'][0], max_frames=64)
  tokens = reference['token'][0]
  first = stream.push(tokens[:11])  # 17 tokens with the prompt: 3 blocks, 12 frames past it
  assert first.shape[-1] == 12
  streamed = np.concatenate([first, stream.push(tokens[11:], finalize=True)], -1)
  offline = flow.inference(model, jnp.asarray(reference['token']),
                           jnp.asarray(reference['embedding']),
                           jnp.asarray(reference['prompt_token']),
                           jnp.asarray(reference['prompt_feat']), streaming=True)
  assert max_diff(streamed, offline['mel']) < TOLERANCE


def _edited(tmp_path, edit):
  state = torch.load(FLOW_PT, map_location='cpu', weights_only=True)
  edit(state)
  path = os.path.join(tmp_path, 'edited_flow.pt')
  torch.save(state, path)
  return path


@pytest.mark.parametrize('edit, tensor', [
    (lambda s: s.pop('decoder.estimator.transformer_blocks.1.attn.to_k.bias'),
     'decoder.estimator.transformer_blocks.1.attn.to_k.bias'),
    (lambda s: s.__setitem__('decoder.estimator.transformer_blocks.2.attn.to_q.weight',
                             torch.zeros(64, 64)),
     'decoder.estimator.transformer_blocks.2.attn.to_q.weight'),
    (lambda s: s.__setitem__('decoder.estimator.rotary_embed.inv_freq', torch.zeros(32)),
     'decoder.estimator.rotary_embed.inv_freq'),
], ids=['missing', 'extra', 'misshapen'])
def test_converter_refuses_a_wrong_tensor_by_name(tmp_path, edit, tensor):
  path = _edited(tmp_path, edit)
  out = os.path.join(tmp_path, 'out')
  with pytest.raises(convert_cosyvoice.ConversionError, match=tensor.replace('.', r'\.')) as error:
    convert_cosyvoice.convert_flow(path, out, FLOW_CONFIG)
  assert path in str(error.value)
  assert not os.path.exists(out) and not os.path.exists(out + '.incomplete')


def test_released_config_shapes_refuse_the_tiny_file():
  """Without --flow_config the released sizes are expected; the tiny file is refused by name."""
  with pytest.raises(convert_cosyvoice.ConversionError, match='expected shape|has shape'):
    convert_cosyvoice.flow_arrays(FLOW_PT, flow.FlowConfig())


def test_released_size_builds():
  """The released sizes (332 M parameters, 330 tensors in flow.pt) from the config defaults."""
  cfg = flow.FlowConfig()
  abstract = nnx.eval_shape(lambda: flow.create(cfg))
  sizes = [v.get_value().size for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
  assert sum(sizes) == 332_257_088
  assert len(convert_cosyvoice.flow_tensor_names(cfg)) == 330
  out = jax.eval_shape(lambda m, t, e: flow.inference(m, t, e)['mel'], abstract,
                       jax.ShapeDtypeStruct((1, 25), jnp.int32),
                       jax.ShapeDtypeStruct((1, 192), jnp.float32))
  assert out.shape == (1, 80, 50)
