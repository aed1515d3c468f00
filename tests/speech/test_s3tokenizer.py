"""S3Tokenizer v3 against the golden reference of the PyPI s3tokenizer 0.3.0 and onnxruntime at
tiny size (tests/testdata/cosyvoice3_tiny/tokenizer), the ONNX converter's refusals, and the
Fun-Audio-Chat cut of long audio against a NumPy re-derivation of its loop."""

import json
import os
import re

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import onnx
from onnx import numpy_helper
import pytest
from flax import nnx

import paths

from fac_jax import audio
from fac_jax.model import layers
from fac_jax.speech import convert_s3, s3tokenizer

FIXTURE = os.path.join(paths.TESTDATA, 'cosyvoice3_tiny', 'tokenizer')
ONNX_PATH = os.path.join(FIXTURE, 'speech_tokenizer_v3_tiny.onnx')


@pytest.fixture(scope='module')
def ref():
  with np.load(os.path.join(FIXTURE, 'reference.npz')) as stored:
    return {name: stored[name] for name in stored.files}


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('s3') / 'converted')
  convert_s3.convert(ONNX_PATH, out)
  return s3tokenizer.S3Tokenizer.from_converted(out)


@pytest.fixture(scope='module')
def model(tokenizer):
  graphdef, _ = nnx.split(s3tokenizer.abstract_model(tokenizer.cfg))
  return nnx.merge(graphdef, tokenizer.params)


@pytest.fixture(scope='module')
def batch(ref):
  """The reference's padded batch: (2, 309, 128) log-mel, lengths [309, 176]."""
  lengths = ref['feats_length']
  feats = np.zeros((2, lengths.max(), 128), np.float32)
  for row in range(2):
    feats[row, :lengths[row]] = ref[f'logmel_{row}'].T
  return feats, lengths


def test_log_mel_matches_whisper_front_end(ref):
  np.testing.assert_array_equal(
      librosa.filters.mel(sr=16000, n_fft=400, n_mels=128).astype(np.float32), ref['mel_filters'])
  for wav, key in [('wav_0', 'logmel_0'), ('wav_1', 'logmel_1'),
                   ('wav_0', 'logmel_0_first_second')]:
    waveform = ref[wav][:16000] if key.endswith('first_second') else ref[wav]
    mel = audio.log_mel(waveform, 128).T
    assert mel.shape == ref[key].shape
    np.testing.assert_allclose(mel, ref[key], rtol=0, atol=1e-4, err_msg=key)
  # The max - 8 floor is per call: the first second alone is not a slice of the whole.
  assert np.abs(ref['logmel_0_first_second'] - ref['logmel_0'][:, :100]).max() > 0.1


def test_hidden_states_and_codes_match_reference(model, batch, ref):
  feats, lengths = batch
  x, code_len = model.stem(jnp.asarray(feats), jnp.asarray(lengths))
  np.testing.assert_allclose(x, ref['hidden_stem'], rtol=0, atol=5e-5)
  valid = s3tokenizer.frame_mask(code_len, x.shape[1])
  for index, block in enumerate(model.blocks):
    x = block(x, valid)
    np.testing.assert_allclose(x, ref[f'hidden_after_block_{index}'], rtol=0, atol=5e-5,
                               err_msg=f'block {index}')
  np.testing.assert_allclose(model.project_down(x), ref['fsq_pre_tanh'], rtol=0, atol=5e-5)
  codes, code_len = model(jnp.asarray(feats), jnp.asarray(lengths))
  np.testing.assert_array_equal(code_len, ref['code_len'])
  for row, length in enumerate(ref['code_len']):
    np.testing.assert_array_equal(codes[row, :length], ref['codes'][row, :length])


def test_tokenize_matches_single_utterance_codes(tokenizer, ref):
  both = tokenizer.tokenize([ref['wav_0'], ref['wav_1']])  # one padded batch
  for index in range(2):
    np.testing.assert_array_equal(both[index], ref[f'codes_single_{index}'])
    np.testing.assert_array_equal(both[index], ref[f'onnxruntime_codes_{index}'])
    alone = tokenizer.encode(ref[f'wav_{index}'])
    assert alone.dtype == np.int32
    np.testing.assert_array_equal(alone, ref[f'codes_single_{index}'])


def _interleaved_rope(x, positions, theta):
  """The other rotary convention: pairs (2i, 2i + 1) instead of (i, i + half)."""
  inv_freq = 1.0 / theta ** (jnp.arange(x.shape[-1] // 2, dtype=jnp.float32) * 2 / x.shape[-1])
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq
  even, odd = x[..., 0::2], x[..., 1::2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  return jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(x.shape)


def test_interleaved_rope_fails_the_reference(model, batch, ref, monkeypatch):
  feats, lengths = batch
  monkeypatch.setattr(layers, 'apply_rope', _interleaved_rope)
  hidden, _ = model.encode(jnp.asarray(feats), jnp.asarray(lengths))  # eager: traced afresh
  codes, _ = model(jnp.asarray(feats), jnp.asarray(lengths))
  assert np.abs(hidden[0] - ref['hidden_after_block_1'][0]).max() > 0.5
  assert np.mean(np.asarray(codes[0]) != ref['codes_single_0']) > 0.2


def _numpy_pieces(waveform: np.ndarray) -> list[np.ndarray]:
  """Fun-Audio-Chat's loop (utils/cosyvoice_tokenizer.py), re-derived on arrays."""
  segments, second = [], 0
  while second * 16000 < len(waveform):
    segments.append(waveform[second * 16000:min((second + 30) * 16000, len(waveform))])
    second += 30
  if len(segments) > 1 and len(segments[-1]) < 16000:
    merged = np.concatenate([segments[-2], segments[-1]])
    segments[-2:] = [merged[:len(merged) // 2], merged[len(merged) // 2:]]
  return segments


@pytest.mark.parametrize('seconds', [0.5, 29.99, 30, 30.5, 31, 59.99, 60.01, 61, 90.3, 121])
def test_pieces_follow_fun_audio_chat(seconds):
  waveform = np.arange(int(seconds * 16000))
  ours = [waveform[start:end] for start, end in s3tokenizer.pieces(len(waveform))]
  theirs = _numpy_pieces(waveform)
  assert [len(p) for p in ours] == [len(p) for p in theirs]
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)


def test_long_audio_is_cut_with_a_log_mel_per_piece(tokenizer, model, ref):
  rng = np.random.default_rng(0)
  # 60.5 s: pieces of 30 s, 15.25 s and 15.25 s; speech loud in the first piece only, so a log-mel
  # floor taken over the whole audio would differ from the per-piece ones.
  waveform = np.concatenate([np.tile(ref['wav_0'], 10), 0.05 * np.tile(ref['wav_1'], 20)])
  waveform = waveform[:int(60.5 * 16000)] + 1e-3 * rng.standard_normal(int(60.5 * 16000))
  expected = []
  for piece in _numpy_pieces(waveform.astype(np.float32)):
    mel = audio.log_mel(piece, 128)
    codes, length = jax.jit(lambda m, n: model(m, n))(mel[None], np.array([len(mel)], np.int32))
    expected.append(np.asarray(codes[0, :int(length[0])]))
  assert [len(c) for c in expected] == [750, 382, 382]
  np.testing.assert_array_equal(tokenizer.encode(waveform.astype(np.float32)),
                                np.concatenate(expected))


def test_converter_maps_every_tensor(ref):
  cfg, params = convert_s3.read_onnx(ONNX_PATH)
  assert cfg == s3tokenizer.S3Config(num_mel_bins=128, dim=128, num_layers=2)
  assert cfg.num_heads == 2
  assert len(params) == 4 + 16 * 2 + 2
  graph = onnx.load(ONNX_PATH).graph
  stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  np.testing.assert_array_equal(params['blocks.1.attn.fsmn.kernel'],
                                stored['blocks.1.attn.fsmn_block.weight'].transpose(2, 1, 0))
  np.testing.assert_array_equal(params['project_down.bias'], stored['quantizer.project_in.bias'])


def test_loading_refuses_sizes_that_do_not_match_the_tensors(tmp_path):
  out = tmp_path / 'converted'
  convert_s3.convert(ONNX_PATH, str(out))
  config = json.loads((out / 'config.json').read_text())
  (out / 'config.json').write_text(json.dumps({**config, 'num_layers': 1}))
  with pytest.raises(ValueError, match=r"unexpected tensor 'blocks\.1\.attn\.fsmn\.kernel'"):
    s3tokenizer.S3Tokenizer.from_converted(str(out))
  (out / 'config.json').write_text(json.dumps({**config, 'dim': 192}))
  with pytest.raises(ValueError, match=r"tensor 'blocks\.0\.attn\.fsmn\.kernel' has shape "
                                       r"\(31, 1, 128\), the sizes in .* need \(31, 1, 192\)"):
    s3tokenizer.S3Tokenizer.from_converted(str(out))


def _stored_input(model: onnx.ModelProto, node_name: str) -> onnx.TensorProto:
  """The initializer a named node consumes."""
  node = next(n for n in model.graph.node if n.name == node_name)
  return next(t for t in model.graph.initializer if t.name in node.input)


def _drop_fsmn(model):
  model.graph.initializer.remove(
      next(t for t in model.graph.initializer if t.name == 'blocks.1.attn.fsmn_block.weight'))


def _drop_key_kernel(model):
  model.graph.initializer.remove(_stored_input(model, '/blocks.0/attn/key/MatMul'))


def _add_third_fsmn(model):
  model.graph.initializer.append(numpy_helper.from_array(
      np.zeros((128, 1, 31), np.float32), 'blocks.2.attn.fsmn_block.weight'))


def _add_unused(model):
  model.graph.initializer.append(numpy_helper.from_array(np.zeros(128, np.float32), 'extra.bias'))


def _shrink_query_bias(model):
  tensor = _stored_input(model, '/blocks.1/attn/query/Add')
  tensor.CopyFrom(numpy_helper.from_array(np.zeros(127, np.float32), tensor.name))


def _float16_kernel(model):
  tensor = _stored_input(model, '/blocks.0/mlp/mlp.2/MatMul')
  tensor.CopyFrom(numpy_helper.from_array(np.zeros((512, 128), np.float16), tensor.name))


@pytest.mark.parametrize('edit, pattern', [
    (_drop_fsmn, r'missing blocks\.1\.attn\.fsmn\.kernel '),
    (_drop_key_kernel, r'missing blocks\.0\.attn\.key\.kernel '),
    (_add_third_fsmn, r"unexpected tensor blocks\.2\.attn\.fsmn\.kernel \(initializer "
                      r"'blocks\.2\.attn\.fsmn_block\.weight'\)"),
    (_add_unused, r"unexpected initializer 'extra\.bias'"),
    (_shrink_query_bias, r"blocks\.1\.attn\.query\.bias \(input '[^']+' of node "
                         r"/blocks\.1/attn/query/Add\) has shape \(127,\); expected \(128,\)"),
    (_float16_kernel, r'blocks\.0\.mlp_down\.kernel \(.+\) is float16; expected float32'),
])
def test_converter_refuses(tmp_path, edit, pattern):
  model = onnx.load(ONNX_PATH)
  edit(model)
  path = str(tmp_path / 'edited.onnx')
  onnx.save(model, path)
  with pytest.raises(convert_s3.ConversionError) as error:
    convert_s3.convert(path, str(tmp_path / 'out'))
  assert str(error.value).startswith(f'{path}: ')
  assert re.search(pattern, str(error.value)), str(error.value)
  assert not os.path.exists(tmp_path / 'out')
