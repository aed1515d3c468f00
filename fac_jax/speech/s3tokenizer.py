"""S3Tokenizer v3 in JAX: 16 kHz speech -> 128-bin Whisper log-mel -> 25 Hz codes in [0, 3^8).

The speech tokenizer of CosyVoice 3 and Fun-Audio-Chat. Two stride-2 convolutions with exact
GELU, then pre-LayerNorm blocks whose attention rotates every 64-wide head (NeoX half-split) and
adds a 31-tap FSMN memory of the values past the output projection, then FSQ: 8 projections,
tanh, rounded to {-1, 0, 1}, read as base-3 digits. Weights come from the released ONNX graph
through fac_jax.speech.convert_s3.

  python -m fac_jax.speech.s3tokenizer --model=CONVERTED_DIR --audio=speech.wav [--out=codes.npy]
"""

import dataclasses
import functools
import hashlib
import json

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fac_jax import audio
from fac_jax.model import layers
from fac_jax.speech import weights

HEAD_DIM = 64  # the reference hard-wires its rotary table to 64-wide heads
ROPE_THETA = 10000.0
FSMN_TAPS = 31
FSQ_DIGITS = 8
CODEBOOK_SIZE = 3 ** FSQ_DIGITS
FSQ_SCALE = 0.9990000128746033  # keeps tanh inside (-1, 1) before rounding, as trained
MASKED_SCORE = -1e10
CODE_RATE = 25
PIECE_SAMPLES = 30 * audio.SAMPLE_RATE
MIN_LAST_PIECE_SAMPLES = audio.SAMPLE_RATE
MIN_SAMPLES = audio.N_FFT // 2 + 1  # the centred STFT reflects 200 samples at each end
FORMAT = 'fac_jax.s3tokenizer_v3'
HIGHEST = jax.lax.Precision.HIGHEST  # FSQ rounding is sensitive; never let f32 matmuls drop bits


@dataclasses.dataclass(frozen=True)
class S3Config:
  """Sizes of the tokenizer; the released model is the default."""
  num_mel_bins: int = 128
  dim: int = 1280
  num_layers: int = 12

  def __post_init__(self):
    if self.dim <= 0 or self.dim % HEAD_DIM:
      raise ValueError(f'S3Config.dim={self.dim}: must be a positive multiple of the head width '
                       f'{HEAD_DIM}')

  @property
  def num_heads(self) -> int:
    return self.dim // HEAD_DIM


def _gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


def _strided_length(lengths: jax.Array) -> jax.Array:
  """Valid frames after a kernel-3, stride-2, pad-1 convolution."""
  return (lengths - 1) // 2 + 1


def frame_mask(lengths: jax.Array, length: int) -> jax.Array:
  """(B,) lengths -> (B, length) bool, True on valid frames."""
  return jnp.arange(length)[None, :] < lengths[:, None]


class FSMNAttention(nnx.Module):
  """Multi-head attention with rotary q and k on every head, plus a depthwise FSMN memory."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, dim, dim, precision=HIGHEST, rngs=rngs)
    self.query = linear()
    self.key = linear(use_bias=False)
    self.value = linear()
    self.out = linear()
    self.fsmn = nnx.Conv(dim, dim, kernel_size=FSMN_TAPS, padding=((FSMN_TAPS // 2,) * 2,),
                         feature_group_count=dim, use_bias=False, precision=HIGHEST, rngs=rngs)

  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    batch, length, dim = x.shape
    heads = lambda y: y.reshape(batch, length, dim // HEAD_DIM, HEAD_DIM)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    # q and k are each scaled by head_dim^-1/4, so their product gets the usual 1/sqrt(head_dim).
    scale = HEAD_DIM ** -0.25
    q = layers.apply_rope(heads(self.query(x)), positions, ROPE_THETA) * scale
    k = layers.apply_rope(heads(self.key(x)), positions, ROPE_THETA) * scale
    v = self.value(x)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=HIGHEST)
    weights = jax.nn.softmax(jnp.where(valid[:, None, None, :], scores, MASKED_SCORE), axis=-1)
    attended = jnp.einsum('bhqk,bkhd->bqhd', weights, heads(v), precision=HIGHEST)
    pad = valid[..., None].astype(x.dtype)
    memory = v * pad  # the unrotated values
    memory = (self.fsmn(memory) + memory) * pad
    return self.out(attended.reshape(batch, length, dim)) + memory


class ResidualBlock(nnx.Module):
  """x + attention(LN(x)), then x + MLP(LN(x)) with a 4x exact-GELU MLP."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    norm = functools.partial(nnx.LayerNorm, dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
    self.attn_ln = norm()
    self.attn = FSMNAttention(dim, rngs=rngs)
    self.mlp_ln = norm()
    self.mlp_up = nnx.Linear(dim, 4 * dim, precision=HIGHEST, rngs=rngs)
    self.mlp_down = nnx.Linear(4 * dim, dim, precision=HIGHEST, rngs=rngs)

  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_ln(x), valid)
    return x + self.mlp_down(_gelu(self.mlp_up(self.mlp_ln(x))))


def fsq_codes(projected: jax.Array) -> jax.Array:
  """(..., 8) FSQ projections -> (...) int32 codes: digit i = round(tanh(h_i)) + 1 in {0, 1, 2},
  code = sum_i digit_i 3^i. Rounding is half to even, as torch.round."""
  digits = jnp.round(jnp.tanh(projected) * FSQ_SCALE).astype(jnp.int32) + 1
  return digits @ (3 ** jnp.arange(FSQ_DIGITS, dtype=jnp.int32))


class S3TokenizerModel(nnx.Module):
  """Log-mel (B, T, num_mel_bins) with valid lengths -> codes (B, ceil(T / 4)) with lengths.

  Frames past a row's length are masked as the reference masks them (the convolutions' inputs,
  the attention keys and the FSMN memory), so padding never changes the valid codes; the codes of
  padded frames are meaningless.
  """

  def __init__(self, cfg: S3Config, *, rngs: nnx.Rngs):
    conv = functools.partial(nnx.Conv, kernel_size=3, strides=2, padding=((1, 1),),
                             precision=HIGHEST, rngs=rngs)
    self.conv1 = conv(cfg.num_mel_bins, cfg.dim)
    self.conv2 = conv(cfg.dim, cfg.dim)
    self.blocks = nnx.List([ResidualBlock(cfg.dim, rngs=rngs) for _ in range(cfg.num_layers)])
    self.project_down = nnx.Linear(cfg.dim, FSQ_DIGITS, precision=HIGHEST, rngs=rngs)

  def stem(self, mel: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two stride-2 convolutions: (B, T, num_mel_bins) -> (B, T', dim), T' = ceil(T / 4)."""
    x = _gelu(self.conv1(mel * frame_mask(lengths, mel.shape[1])[..., None]))
    lengths = _strided_length(lengths)
    x = _gelu(self.conv2(x * frame_mask(lengths, x.shape[1])[..., None]))
    return x, _strided_length(lengths)

  def encode(self, mel: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The encoder output (B, T', dim) before the quantizer, and its valid lengths."""
    x, lengths = self.stem(mel, lengths)
    valid = frame_mask(lengths, x.shape[1])
    for block in self.blocks:
      x = block(x, valid)
    return x, lengths

  def __call__(self, mel: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    hidden, lengths = self.encode(mel, lengths)
    return fsq_codes(self.project_down(hidden)), lengths


def abstract_model(cfg: S3Config) -> S3TokenizerModel:
  return nnx.eval_shape(lambda: S3TokenizerModel(cfg, rngs=nnx.Rngs(0)))


def param_shapes(cfg: S3Config) -> dict[str, tuple[int, ...]]:
  """Parameter name ('blocks.0.attn.query.kernel', ...) -> shape, in the model's layout."""
  return weights.shapes(abstract_model(cfg))


def pieces(total: int, piece: int = PIECE_SAMPLES,
           min_last: int = MIN_LAST_PIECE_SAMPLES) -> list[tuple[int, int]]:
  """Fun-Audio-Chat's cut of long inputs (utils/cosyvoice_tokenizer.py for audio, 30 s pieces,
  min_last 1 s; utils/cosyvoice_detokenizer.py for codes, 750 and 50 codes): consecutive pieces;
  when there are several and the last is under min_last, the last two are merged and split in
  half (the first half gets the odd one short). Returns [start, end) bounds."""
  bounds = [(start, min(start + piece, total)) for start in range(0, total, piece)]
  if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
    start = bounds[-2][0]
    middle = start + (total - start) // 2
    bounds[-2:] = [(start, middle), (middle, total)]
  return bounds


class S3Tokenizer:
  """Converted S3Tokenizer v3 weights ready to tokenize waveforms (fac_jax.speech.speech_tokenizer's
  SpeechTokenizer interface). Batches pieces, padded to `bucket_frames` multiples of mel frames
  and to power-of-two batch sizes so that few shapes are compiled."""

  sample_rate = audio.SAMPLE_RATE
  frame_rate = CODE_RATE
  vocab_size = CODEBOOK_SIZE

  def __init__(self, cfg: S3Config, model: S3TokenizerModel, batch_size: int = 8,
               bucket_frames: int = 500, source: dict | None = None):
    """source: where the weights came from ({'file', 'sha256'} of the ONNX graph, as convert_s3
    records it), if known."""
    self.cfg = cfg
    self.batch_size = batch_size
    self.bucket_frames = bucket_frames
    self.source = source
    graphdef, self.params = nnx.split(model)
    self._codes = jax.jit(lambda params, mel, lengths: nnx.merge(graphdef, params)(mel, lengths))

  @classmethod
  def from_converted(cls, folder: str, **kwargs) -> 'S3Tokenizer':
    """Loads a folder written by fac_jax.speech.convert_s3."""
    cfg, source = weights.read_config(folder, parse_config, 'fac_jax.speech.convert_s3')
    return cls(cfg, weights.load(folder, abstract_model(cfg)), source=source, **kwargs)

  def fingerprint(self) -> str:
    """Identifies the codes this tokenizer makes: the sha256 of the ONNX graph it was converted
    from, else a hash of its weights."""
    if self.source and 'sha256' in self.source:
      return f'{FORMAT}-onnx-{self.source["sha256"]}'
    digest = hashlib.sha256(repr(self.cfg).encode())
    for _, leaf in nnx.to_flat_state(self.params):  # a fixed (sorted) order
      digest.update(np.ascontiguousarray(jax.device_get(leaf.get_value())).tobytes())
    return f'{FORMAT}-weights-{digest.hexdigest()}'

  def codes(self, mels: list[np.ndarray]) -> list[np.ndarray]:
    """Each (frames, num_mel_bins) log-mel on its own -> its (ceil(frames / 4),) int32 codes."""
    out = []
    for first in range(0, len(mels), self.batch_size):
      group = mels[first:first + self.batch_size]
      rows = 1 << (len(group) - 1).bit_length()
      frames = -(-max(len(m) for m in group) // self.bucket_frames) * self.bucket_frames
      batch = np.zeros((rows, frames, self.cfg.num_mel_bins), np.float32)
      lengths = np.zeros(rows, np.int32)
      for row, mel in enumerate(group):
        batch[row, :len(mel)], lengths[row] = mel, len(mel)
      codes, code_lengths = jax.device_get(self._codes(self.params, batch, lengths))
      out += [codes[row, :code_lengths[row]] for row in range(len(group))]
    return out

  def tokenize(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
    """16 kHz mono waveforms -> int32 codes each, cut as Fun-Audio-Chat cuts (see `pieces`), a
    log-mel per piece (its floor at max - 8 is the piece's own), the pieces' codes concatenated.
    A piece of n samples gives ceil((n // 160) / 4) codes."""
    mels, owners = [], []
    for index, waveform in enumerate(waveforms):
      waveform = np.asarray(waveform)
      if waveform.ndim != 1 or len(waveform) < MIN_SAMPLES:
        raise ValueError(f'waveform {index}: expected a mono waveform of at least {MIN_SAMPLES} '
                         f'samples at {audio.SAMPLE_RATE} Hz, got shape {waveform.shape}')
      for start, end in pieces(len(waveform)):
        mels.append(audio.log_mel(waveform[start:end], self.cfg.num_mel_bins))
        owners.append(index)
    per_waveform = [[] for _ in waveforms]
    for owner, codes in zip(owners, self.codes(mels)):
      per_waveform[owner].append(codes)
    return [np.concatenate(codes).astype(np.int32) for codes in per_waveform]

  def encode(self, waveform: np.ndarray) -> np.ndarray:
    return self.tokenize([waveform])[0]


def config_json(cfg: S3Config, source: dict) -> str:
  """The config.json of a converted folder: the format, the sizes and the source file."""
  return json.dumps({'format': FORMAT, **dataclasses.asdict(cfg), 'source': source}, indent=2)


def parse_config(text: str, path: str) -> tuple[S3Config, dict]:
  """A converted folder's config.json -> its sizes and its source ({} if not recorded)."""
  config = json.loads(text)
  if config.get('format') != FORMAT:
    raise ValueError(f'{path}: "format" is {config.get("format")!r}, expected {FORMAT!r}')
  fields = [field.name for field in dataclasses.fields(S3Config)]
  missing = [name for name in fields if not isinstance(config.get(name), int)]
  if missing:
    raise ValueError(f'{path}: no integer field {missing[0]!r}')
  return S3Config(**{name: config[name] for name in fields}), config.get('source') or {}


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program (it is also a library)."""
  flags.DEFINE_string('model', None, 'Folder written by fac_jax.speech.convert_s3.', required=True)
  flags.DEFINE_string('audio', None, 'Audio file (any rate; mixed to mono, resampled to 16 kHz).',
                      required=True)
  flags.DEFINE_string('out', None, 'Write the codes here as .npy (default: print them).')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  codes = S3Tokenizer.from_converted(FLAGS.model).encode(audio.load(FLAGS.audio))
  if FLAGS.out:
    np.save(FLAGS.out, codes)
    print(f'{len(codes)} codes ({len(codes) / CODE_RATE:.2f} s) -> {FLAGS.out}')
  else:
    print(' '.join(map(str, codes.tolist())))


def run():
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
