"""CosyVoice 3's CausalHiFT vocoder against the tiny golden fixture (the official PyTorch code at
tiny size, tests/testdata/cosyvoice3_tiny/hift): stage by stage with teacher forcing, end to end,
finalize True and False, negative controls, streaming with caches, and the hift.pt converter
(weight-norm fold, replay of the fixed tables, refusals). Tolerances are the fixture README's."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import paths

from fac_jax.speech import convert_cosyvoice, hift

FIXTURE = os.path.join(paths.TESTDATA, 'cosyvoice3_tiny')
HIFT_PT = os.path.join(FIXTURE, 'hift', 'hift.pt')
HIFT_CONFIG = os.path.join(FIXTURE, 'hift', 'config.json')
FLOW_CONFIG = os.path.join(FIXTURE, 'flow', 'config.json')
MODES = [(True, 'finalize_true'), (False, 'finalize_false')]


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(os.path.join(FIXTURE, 'hift', 'reference.npz')))


@pytest.fixture(scope='module')
def state_dict():
  return torch.load(HIFT_PT, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('converted') / 'hift')
  convert_cosyvoice.convert_hift(HIFT_PT, out, HIFT_CONFIG, FLOW_CONFIG)
  return hift.load(out)


def max_diff(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max(initial=0.0))


def numpy_source(f0, state_dict, table, phase_upsampling='nearest'):
  """The causal SineGen2 + SourceModuleHnNSF re-derived in NumPy for one row f0 (T,): the cumsum
  in float64 rounded to float32 (torch's CPU cumsum), the rest in float32. 'linear' upsamples the
  phase as the non-causal CosyVoice 2 path does (F.interpolate, align_corners=False)."""
  f0 = np.asarray(f0, np.float32)
  scale, frames = 480, f0.shape[0]
  rad = (f0[:, None] * np.arange(1, 10, dtype=np.float32) / np.float32(24000)) % np.float32(1)
  phase = np.cumsum(rad.astype(np.float64), axis=0).astype(np.float32)
  phase = phase * np.float32(2) * np.float32(np.pi) * np.float32(scale)
  if phase_upsampling == 'nearest':
    phase = np.repeat(phase, scale, axis=0)
  else:
    position = np.maximum((np.arange(frames * scale) + 0.5) / scale - 0.5, 0)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, frames - 1)
    weight = (position - low).astype(np.float32)[:, None]
    phase = (1 - weight) * phase[low] + weight * phase[high]
  sines = np.sin(phase) * np.float32(0.1)
  voiced = np.repeat(f0 > 10, scale)[:, None].astype(np.float32)
  amp = voiced * np.float32(0.003) + (1 - voiced) * np.float32(0.1) / np.float32(3)
  excitation = sines * voiced + amp * table[:frames * scale]
  weight = state_dict['m_source.l_linear.weight'].numpy()
  bias = state_dict['m_source.l_linear.bias'].numpy()
  return np.tanh(excitation @ weight.T + bias)[:, 0]


def test_converter_replays_the_fixed_tables(model, ref):
  """The replayed draw (after the flow at the fixture's sizes) is the reference's, bit for bit."""
  sine_waves = np.asarray(model.m_source.sine_waves[...])
  assert sine_waves.shape == (300 * 24000, 9)
  np.testing.assert_array_equal(sine_waves[:ref['sine_waves'].shape[1]], ref['sine_waves'][0])
  np.testing.assert_array_equal(np.asarray(model.m_source.rand_ini[...]), ref['rand_ini'][0])


def test_weight_norm_fold_matches_torch_parametrization(model, state_dict):
  """Every weight-normed conv: our fold equals torch's own weight_norm parametrization, and the
  converted kernel is that weight in (taps, in, out) layout."""
  pairs = [k.removesuffix('.parametrizations.weight.original0') for k in state_dict
           if k.endswith('original0')]
  assert len(pairs) == 82 and len(state_dict) == 328  # 328 - 82 = 246 tensors once folded
  worst = 0.0
  for stem in pairs:
    g = state_dict[f'{stem}.parametrizations.weight.original0']
    v = state_dict[f'{stem}.parametrizations.weight.original1']
    conv = torch.nn.utils.parametrizations.weight_norm(
        torch.nn.Conv1d(v.shape[1], v.shape[0], v.shape[2]))
    with torch.no_grad():
      conv.parametrizations.weight.original0.copy_(g)
      conv.parametrizations.weight.original1.copy_(v)
      expected = conv.weight.numpy()
    folded = convert_cosyvoice.fold_weight_norm(g.numpy(), v.numpy())
    worst = max(worst, max_diff(folded, expected) / np.abs(expected).max())
  assert worst < 1e-6, worst
  np.testing.assert_array_equal(np.asarray(model.conv_post.kernel[...]),
                                convert_cosyvoice.fold_weight_norm(
                                    state_dict['conv_post.parametrizations.weight.original0'].numpy(),
                                    state_dict['conv_post.parametrizations.weight.original1'].numpy()).T)


@pytest.mark.parametrize('finalize,mode', MODES)
def test_f0(model, ref, finalize, mode):
  want = ref[f'{mode}.f0']
  assert max_diff(hift.f0(model, ref['mel'], finalize), want) <= 1e-5 * want.max()


@pytest.mark.parametrize('finalize,mode', MODES)
def test_source_given_reference_f0(model, ref, finalize, mode):
  """The README allows 1e-4; with torch's roundings kept (float64-accumulated cumsum, no folded
  constants) the phase is the reference's and the source agrees to float32 rounding (6e-8)."""
  got = hift.source(model, jnp.asarray(ref[f'{mode}.f0']))
  assert max_diff(got, ref[f'{mode}.source'][:, 0]) <= 1e-6


@pytest.mark.parametrize('finalize,mode', MODES)
def test_decode_given_reference_source(model, ref, finalize, mode):
  mel = ref['mel'] if finalize else ref['mel'][:, :, :-hift.F0_LOOKAHEAD]
  out = hift.decode(model, mel, jnp.asarray(ref[f'{mode}.source'][:, 0]), finalize)
  assert max_diff(out['wav'], ref[f'{mode}.wav']) <= 2e-4
  if finalize:
    assert max_diff(out['conv_post'], ref[f'{mode}.conv_post']) <= 2e-4


@pytest.mark.parametrize('finalize,mode', MODES)
def test_end_to_end(model, ref, finalize, mode):
  """f0 -> phase integration amplifies float32 rounding (fixture README): ~5e-3 end to end."""
  assert max_diff(hift.inference(model, ref['mel'], finalize), ref[f'{mode}.wav']) <= 5e-3


def test_negative_controls(model, ref, state_dict):
  """The same comparisons fail when the noise table is zeroed or the phase is upsampled linearly,
  while the NumPy re-derivation of the right source passes them."""
  f0, table = ref['finalize_true.f0'][0], ref['sine_waves'][0]
  want_source, want_wav = ref['finalize_true.source'][0, 0], ref['finalize_true.wav']
  assert max_diff(numpy_source(f0, state_dict, table), want_source) <= 1e-4
  linear = numpy_source(f0, state_dict, table, phase_upsampling='linear')
  assert max_diff(linear, want_source) > 1e-2
  assert max_diff(hift.decode(model, ref['mel'], jnp.asarray(linear)[None])['wav'], want_wav) > 0.1

  table_before = model.m_source.sine_waves.get_value()
  model.m_source.sine_waves.set_value(jnp.zeros_like(table_before))
  try:
    assert max_diff(hift.inference(model, ref['mel']), want_wav) > 0.1
  finally:
    model.m_source.sine_waves.set_value(table_before)


def test_rand_ini_never_reaches_the_phase(ref):
  """Upstream adds rand_ini to the first sample's rad only; torch's linear downsampling by 480
  never reads that sample and returns each frame's rad exactly, as the JAX source assumes."""
  f0 = torch.from_numpy(ref['finalize_true.f0'])  # (1, T)
  per_sample = torch.repeat_interleave(f0, 480, dim=1)[..., None]  # (1, 480 T, 1)
  rad = (per_sample * torch.arange(1, 10, dtype=torch.float32) / 24000) % 1
  frame_rad = rad[:, ::480].clone()
  rad[:, 0, :] += torch.from_numpy(ref['rand_ini'])[0]
  down = torch.nn.functional.interpolate(rad.transpose(1, 2), scale_factor=1 / 480,
                                         mode='linear').transpose(1, 2)
  assert torch.equal(down, frame_rad)


def test_streaming_is_a_prefix_of_offline(model, ref):
  """HiftStream over chunks of 3 (held back), 6, 8, 8, 8 and a final 7 frames. After N frames it
  has emitted 480 (N - 4) - 4 samples, a prefix of the offline output; in all, the offline output.
  End to end they agree to float32 rounding amplified by the f0 -> phase integral (measured
  5.2e-4 here); stage by stage with the same inputs, the cached F0 predictor is within 1e-6 x its
  maximum (measured 9e-8), the source and the decoder within 1e-6 (0 and 1.5e-8)."""
  mel, chunks = ref['mel'], [3, 6, 8, 8, 8, 7]
  offline = np.asarray(hift.inference(model, mel))
  stream = hift.HiftStream(model)
  pieces, frames = [], 0
  for i, size in enumerate(chunks):
    final = i == len(chunks) - 1
    pieces.append(np.asarray(stream.push(mel[:, :, frames:frames + size], finalize=final)))
    frames += size
    so_far = np.concatenate(pieces, axis=1)
    expected = 480 * frames if final else max(480 * (frames - 4) - 4, 0)
    assert so_far.shape == (1, expected)
    assert max_diff(so_far, offline[:, :expected]) <= 1e-3
  assert max_diff(so_far, ref['finalize_true.wav']) <= 5e-3
  with pytest.raises(ValueError, match='finalized'):
    stream.push(mel[:, :, :1])

  # The same chunks, stage by stage, from the same inputs (the steps HiftStream fuses).
  state = model.start(1)
  f0_pieces, source_pieces, wav_pieces = [], [], []
  want_f0, want_source = ref['finalize_true.f0'], ref['finalize_true.source'][:, 0]
  mel_chunks = [(0, 9), (9, 17), (17, 25), (25, 33), (33, 40)]
  f0_done = 0
  for i, (begin, end) in enumerate(mel_chunks):
    first, final = i == 0, i == len(mel_chunks) - 1
    f0_chunk, state['f0'] = hift.f0_step(model, mel[:, :, begin:end], state['f0'], final)
    f0_pieces.append(f0_chunk)
    teacher_f0 = jnp.asarray(want_f0[:, f0_done:f0_done + f0_chunk.shape[1]])
    source_chunk, state['source'] = hift.source_step(model, teacher_f0, state['source'])
    source_pieces.append(source_chunk)
    teacher_source = jnp.asarray(want_source[:, 480 * f0_done:480 * (f0_done + f0_chunk.shape[1])])
    out, state['decode'] = hift.decode_step(model, mel[:, :, begin:end], teacher_source,
                                            state['decode'], first, final)
    wav_pieces.append(out['wav'])
    f0_done += f0_chunk.shape[1]
  offline_f0 = np.asarray(hift.f0(model, mel))
  assert max_diff(np.concatenate(f0_pieces, axis=1), offline_f0) <= 1e-6 * offline_f0.max()
  assert max_diff(np.concatenate(source_pieces, axis=1),
                  hift.source(model, jnp.asarray(want_f0))) <= 1e-6
  assert max_diff(np.concatenate(wav_pieces, axis=1),
                  hift.decode(model, mel, jnp.asarray(want_source))['wav']) <= 1e-6


def _save_variant(tmp_path, state_dict, change) -> str:
  variant = dict(state_dict)
  change(variant)
  path = str(tmp_path / 'variant.pt')
  torch.save(variant, path)
  return path


@pytest.mark.parametrize('change,named', [
    (lambda sd: sd.pop('resblocks.4.convs2.1.parametrizations.weight.original1'),
     'missing tensor .resblocks.4.convs2.1.parametrizations.weight.original1.'),
    (lambda sd: sd.__setitem__('resblocks.9.convs1.0.bias', torch.zeros(4)),
     'unexpected tensor .resblocks.9.convs1.0.bias.'),
    (lambda sd: sd.__setitem__('conv_post.bias', torch.zeros(17)),
     "tensor 'conv_post.bias' has shape \\(17,\\), expected \\(18,\\)"),
])
def test_converter_refuses_by_name(tmp_path, state_dict, change, named):
  path = _save_variant(tmp_path, state_dict, change)
  out = str(tmp_path / 'out')
  with pytest.raises(convert_cosyvoice.ConversionError, match=named) as error:
    convert_cosyvoice.convert_hift(path, out, HIFT_CONFIG, FLOW_CONFIG)
  assert path in str(error.value)
  assert not os.path.exists(out)


def test_converter_strips_the_generator_prefix(tmp_path, state_dict):
  path = _save_variant(tmp_path, {f'generator.{k}': v for k, v in state_dict.items()},
                       lambda sd: None)
  cfg = convert_cosyvoice.read_hift_config(HIFT_CONFIG)
  prefixed = convert_cosyvoice.hift_weights(path, cfg)
  plain = convert_cosyvoice.hift_weights(HIFT_PT, cfg)
  assert len(plain) == 246 and prefixed.keys() == plain.keys()
  for name, value in plain.items():
    np.testing.assert_array_equal(prefixed[name], value)


def test_config_reads_the_fixture_and_refuses_what_it_does_not_implement():
  with open(HIFT_CONFIG) as f:
    section = json.load(f)
  cfg = hift.HiftConfig.from_cosyvoice(section, HIFT_CONFIG)
  assert (cfg.base_channels, cfg.f0_cond_channels, cfg.upsample_scale) == (32, 32, 480)
  assert hift.HiftConfig.from_json(cfg.to_json(), 'roundtrip') == cfg
  with pytest.raises(ValueError, match='22050'):
    hift.HiftConfig.from_cosyvoice(dict(section, sampling_rate=22050), HIFT_CONFIG)
