"""CosyVoice 3 flow: 25 Hz speech codes -> 50 Hz mel, as `CausalMaskedDiffWithDiT` computes it.

Token embedding -> pre-look-ahead convolutions -> repeat x2 in time = `mu`; the speaker x-vector,
L2-normalised, through Linear 192->80 = `spks`; the prompt mel (if any) in the first frames =
`cond`. A DiT estimator (adaptive LayerNorm-zero blocks) drives N Euler steps on the cosine
schedule from the fixed starting noise `rand_noise`, with classifier-free guidance whose
unconditional row zeroes mu, spks and cond. Offline (`inference`) and chunk by chunk with KV caches
(`FlowStream`, block-causal chunk mask). Public arrays are channel-first like the reference:
mel (B, 80, T); inside, everything is time-major (B, T, C).

Quirks kept because the released weights were trained with them: the rotary embedding
(x-transformers) uses interleaved pairs and rotates only the first `dim_head` channels of the flat
q and k, i.e. head 0 only; the Euler time is accumulated, not read from the schedule; the final
AdaLN chunks as (scale, shift), the block AdaLN as (shift, scale, gate) x 2.
"""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fac_jax.model import layers
from fac_jax.speech import weights

MEL_DIM = 80  # the reference solver and its noise table hard-code 80 channels
TIME_FREQ_DIM = 256
POSITION_KERNEL, POSITION_GROUPS = 31, 16


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """Sizes and inference settings; the defaults are the released Fun-CosyVoice3-0.5B-2512's."""
  vocab_size: int = 6561
  spk_embed_dim: int = 192
  token_mel_ratio: int = 2
  pre_lookahead_len: int = 3
  pre_lookahead_channels: int = 1024
  dim: int = 1024
  depth: int = 22
  heads: int = 16
  dim_head: int = 64
  ff_mult: int = 2
  static_chunk_size: int = 50  # frames per block of the block-causal chunk mask
  n_timesteps: int = 10
  temperature: float = 1.0
  inference_cfg_rate: float = 0.7
  noise_frames: int = 15000  # length of rand_noise: 300 s of 50 Hz mel

  def __post_init__(self):
    if self.dim % POSITION_GROUPS:
      raise ValueError(f'flow dim {self.dim} must be divisible by {POSITION_GROUPS} (position conv '
                       'groups)')
    if self.static_chunk_size % self.token_mel_ratio:
      raise ValueError(f'static_chunk_size {self.static_chunk_size} must be a multiple of '
                       f'token_mel_ratio {self.token_mel_ratio}')

  @classmethod
  def from_cosyvoice(cls, section: dict, source: str) -> 'FlowConfig':
    """From the flow section of a CosyVoice 3 yaml, nested as there (a dict, e.g. read from the
    JSON copy the tiny fixture ships); refuses settings this port does not implement."""
    def get(node, *keys):
      for key in keys:
        if not isinstance(node, dict) or key not in node:
          raise ValueError(f'{source}: missing {".".join(keys)}')
        node = node[key]
      return node
    fixed = {('input_size',): MEL_DIM, ('output_size',): MEL_DIM,
             ('decoder', 'in_channels'): 3 * MEL_DIM, ('decoder', 'n_spks'): 1,
             ('decoder', 'spk_emb_dim'): MEL_DIM, ('pre_lookahead_layer', 'in_channels'): MEL_DIM,
             ('decoder', 'cfm_params', 'solver'): 'euler',
             ('decoder', 'cfm_params', 't_scheduler'): 'cosine'}
    for name in ('mel_dim', 'mu_dim', 'spk_dim', 'out_channels'):
      fixed[('decoder', 'estimator', name)] = MEL_DIM
    for keys, expected in fixed.items():
      if get(section, *keys) != expected:
        raise ValueError(f'{source}: {".".join(keys)} is {get(section, *keys)!r}; this port '
                         f'implements {expected!r}')
    if get(section, 'pre_lookahead_layer', 'pre_lookahead_len') != section.get('pre_lookahead_len'):
      raise ValueError(f'{source}: pre_lookahead_len differs between the flow and its '
                       'pre_lookahead_layer')
    estimator = get(section, 'decoder', 'estimator')
    inference = section.get('inference', {})
    return cls(
        vocab_size=get(section, 'vocab_size'), spk_embed_dim=get(section, 'spk_embed_dim'),
        token_mel_ratio=get(section, 'token_mel_ratio'),
        pre_lookahead_len=get(section, 'pre_lookahead_len'),
        pre_lookahead_channels=get(section, 'pre_lookahead_layer', 'channels'),
        dim=estimator['dim'], depth=estimator['depth'], heads=estimator['heads'],
        dim_head=estimator['dim_head'], ff_mult=estimator['ff_mult'],
        static_chunk_size=estimator['static_chunk_size'],
        n_timesteps=inference.get('n_timesteps', cls.n_timesteps),
        temperature=inference.get('temperature', cls.temperature),
        inference_cfg_rate=get(section, 'decoder', 'cfm_params', 'inference_cfg_rate'))

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)

  @classmethod
  def from_json(cls, text: str, source: str) -> 'FlowConfig':
    values = json.loads(text)
    names = {f.name for f in dataclasses.fields(cls)}
    if set(values) != names:
      raise ValueError(f'{source}: fields {sorted(set(values) ^ names)} are missing or unknown')
    return cls(**values)


def _conv(in_features, out_features, kernel, rngs, groups=1):
  return nnx.Conv(in_features, out_features, (kernel,), padding='VALID',
                  feature_group_count=groups, rngs=rngs)


def layer_norm(x, eps=1e-6):
  """LayerNorm without affine parameters (two-pass variance, as torch)."""
  mean = x.mean(-1, keepdims=True)
  centred = x - mean
  return centred * jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + eps)


class PreLookahead(nnx.Module):
  """Conv1d(k = look-ahead + 1) over the next tokens -> leaky ReLU -> causal Conv1d(k=3) ->
  + input."""

  def __init__(self, cfg: FlowConfig, *, rngs: nnx.Rngs):
    self.lookahead = cfg.pre_lookahead_len
    self.conv1 = _conv(MEL_DIM, cfg.pre_lookahead_channels, cfg.pre_lookahead_len + 1, rngs)
    self.conv2 = _conv(cfg.pre_lookahead_channels, MEL_DIM, 3, rngs)

  def __call__(self, window: jax.Array, first: jax.Array) -> jax.Array:
    """window: (B, 2 + L + lookahead, 80) embeddings of tokens first-2 ... first+L+lookahead-1
    (zeros where there is no token); returns (B, L, 80) for tokens first ... first+L-1."""
    hidden = jax.nn.leaky_relu(self.conv1(window), 0.01)
    # conv2 is left-padded with zero *outputs* at the start of the sequence
    token = first - 2 + jnp.arange(hidden.shape[1])
    hidden = jnp.where((token >= 0)[None, :, None], hidden, 0.0)
    return self.conv2(hidden) + window[:, 2:window.shape[1] - self.lookahead]


def apply_rotary(x: jax.Array, angles: jax.Array) -> jax.Array:
  """x-transformers' rotary embedding on the flat projection x (B, T, heads * dim_head): GPT-J
  interleaved pairs (2i, 2i+1), only the first 2 * angles.shape[-1] channels (head 0).
  angles: (T, dim_head / 2)."""
  width = 2 * angles.shape[-1]
  pairs = x[..., :width].reshape(*x.shape[:-1], width // 2, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return jnp.concatenate([rotated.reshape(*x.shape[:-1], width), x[..., width:]], axis=-1)


class DiTBlock(nnx.Module):
  """AdaLayerNormZero -> attention -> gated residual; modulated LayerNorm -> tanh-GELU FF -> gated
  residual."""

  def __init__(self, cfg: FlowConfig, *, rngs: nnx.Rngs):
    dim, inner = cfg.dim, cfg.heads * cfg.dim_head
    self.heads, self.dim_head = cfg.heads, cfg.dim_head
    self.modulation = nnx.Linear(dim, 6 * dim, rngs=rngs)
    self.q = nnx.Linear(dim, inner, rngs=rngs)
    self.k = nnx.Linear(dim, inner, rngs=rngs)
    self.v = nnx.Linear(dim, inner, rngs=rngs)
    self.out = nnx.Linear(inner, dim, rngs=rngs)
    self.ff_in = nnx.Linear(dim, dim * cfg.ff_mult, rngs=rngs)
    self.ff_out = nnx.Linear(dim * cfg.ff_mult, dim, rngs=rngs)

  def __call__(self, x, time, angles, mask, frame_valid, first_frame, cache=None):
    """x: (B, T, D); time: (B, D); angles: (T, dim_head/2); mask: (B, 1, T, S) keys visible;
    frame_valid: (B, T). With cache = {'k', 'v': (B, S, inner)}, this call's keys and values are
    written at slots first_frame... and attention runs over all S slots."""
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
     gate_mlp) = jnp.split(self.modulation(jax.nn.silu(time))[:, None], 6, axis=-1)
    normed = layer_norm(x) * (1 + scale_msa) + shift_msa
    batch, length, _ = x.shape
    q = apply_rotary(self.q(normed), angles)
    k = apply_rotary(self.k(normed), angles)
    v = self.v(normed)
    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache['k'], k, (0, first_frame, 0))
      v = jax.lax.dynamic_update_slice(cache['v'], v, (0, first_frame, 0))
      cache = {'k': k, 'v': v}
    heads = lambda a: a.reshape(batch, a.shape[1], self.heads, self.dim_head)  # noqa: E731
    attended = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), mask=mask)
    attended = self.out(attended.reshape(batch, length, -1)) * frame_valid[..., None]
    x = x + gate_msa * attended
    normed = layer_norm(x) * (1 + scale_mlp) + shift_mlp
    x = x + gate_mlp * self.ff_out(jax.nn.gelu(self.ff_in(normed), approximate=True))
    return x if cache is None else (x, cache)


class DiT(nnx.Module):
  """The CFM estimator: time embedding, input embedding with a causal conv position embedding,
  DiT blocks (scanned), final AdaLN (scale, shift) and the projection to 80 mel channels."""

  def __init__(self, cfg: FlowConfig, *, rngs: nnx.Rngs):
    dim = cfg.dim
    self.time_in = nnx.Linear(TIME_FREQ_DIM, dim, rngs=rngs)
    self.time_out = nnx.Linear(dim, dim, rngs=rngs)
    self.input_proj = nnx.Linear(4 * MEL_DIM, dim, rngs=rngs)
    self.position_conv1 = _conv(dim, dim, POSITION_KERNEL, rngs, POSITION_GROUPS)
    self.position_conv2 = _conv(dim, dim, POSITION_KERNEL, rngs, POSITION_GROUPS)
    self.inv_freq = weights.Constant(
        1.0 / 10000 ** (jnp.arange(0, cfg.dim_head, 2, dtype=jnp.float32) / cfg.dim_head))
    self.blocks = layers.stacked_layers(lambda r: DiTBlock(cfg, rngs=r), cfg.depth, rngs)
    self.final_modulation = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.proj_out = nnx.Linear(dim, MEL_DIM, rngs=rngs)

  def time_embedding(self, t: jax.Array) -> jax.Array:
    """(B,) flow time in [0, 1] -> (B, D): sinusoid of 1000 t ([sin, cos], 256) -> MLP."""
    half = TIME_FREQ_DIM // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000) / (half - 1)))
    angles = 1000.0 * t[:, None] * freqs[None]
    sinusoid = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return self.time_out(jax.nn.silu(self.time_in(sinusoid)))

  def __call__(self, x, mu, cond, spks, t, mask, frame_valid, first_frame=0, cache=None):
    """Velocity (B, T, 80) at time t (B,) for x, mu, cond (B, T, 80) and spks (B, 80).

    mask: (B, 1, T, S) keys visible to each query (S = T offline); frame_valid: (B, T), False on
    padding frames, whose attention output is zeroed. With `cache` (a stream's, see
    `init_stream_cache` for one Euler step), this call covers frames first_frame... of a longer
    sequence: keys and values of earlier frames come from the cache, and the conv position
    embedding continues from the cached tails; returns (velocity, updated cache).
    """
    batch, length, _ = x.shape
    time = self.time_embedding(t)
    hidden = self.input_proj(jnp.concatenate(
        [x, cond, mu, jnp.broadcast_to(spks[:, None], (batch, length, MEL_DIM))], axis=-1))
    tail = POSITION_KERNEL - 1
    if cache is None:
      cache_in = {'conv1': jnp.zeros((batch, tail, hidden.shape[-1]), hidden.dtype)}
      cache_in['conv2'] = cache_in['conv1']
    else:
      cache_in = cache
    padded1 = jnp.concatenate([cache_in['conv1'], hidden], axis=1)
    conv1 = jax.nn.mish(self.position_conv1(padded1))
    padded2 = jnp.concatenate([cache_in['conv2'], conv1], axis=1)
    hidden = jax.nn.mish(self.position_conv2(padded2)) + hidden
    positions = (first_frame + jnp.arange(length)).astype(jnp.float32)
    angles = positions[:, None] * self.inv_freq[...][None]
    if cache is None:
      hidden = layers.scan_layers(self.blocks, hidden, time, angles, mask, frame_valid, 0)
    else:
      hidden, kv = layers.scan_layers(self.blocks, hidden, time, angles, mask, frame_valid,
                                      first_frame, per_layer={'k': cache['k'], 'v': cache['v']})
    scale, shift = jnp.split(self.final_modulation(jax.nn.silu(time))[:, None], 2, axis=-1)
    velocity = self.proj_out(layer_norm(hidden) * (1 + scale) + shift)
    if cache is None:
      return velocity
    return velocity, dict(kv, conv1=padded1[:, -tail:], conv2=padded2[:, -tail:])


class Flow(nnx.Module):
  """The whole flow: token embedding, speaker projection, pre-look-ahead layer, DiT estimator and
  the fixed starting noise (rand_noise (noise_frames, 80); drawn here only for a random-weight
  model: the converter writes the released one)."""

  def __init__(self, cfg: FlowConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.input_embedding = nnx.Embed(cfg.vocab_size, MEL_DIM, rngs=rngs)
    self.spk_affine = nnx.Linear(cfg.spk_embed_dim, MEL_DIM, rngs=rngs)
    self.pre_lookahead = PreLookahead(cfg, rngs=rngs)
    self.estimator = DiT(cfg, rngs=rngs)
    self.rand_noise = weights.Constant(
        jax.random.normal(rngs.params(), (cfg.noise_frames, MEL_DIM)))


def create(cfg: FlowConfig, seed: int = 0) -> Flow:
  """A flow with random weights (for tests and benchmarks)."""
  return Flow(cfg, rngs=nnx.Rngs(seed))


def load(folder: str) -> Flow:
  """A flow from a folder written by `fac_jax.speech.convert_cosyvoice` (config.json and
  safetensors named by module path); refuses missing, extra or misshapen tensors."""
  cfg = weights.read_config(folder, FlowConfig.from_json, 'fac_jax.speech.convert_cosyvoice')
  return weights.load(folder, nnx.eval_shape(lambda: create(cfg)))


def euler_schedule(n_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
  """(t, dt) of each Euler step in float32, as the reference solver forms them: the cosine
  schedule t_span = 1 - cos(linspace(0, 1, n+1) pi/2), t accumulated and dt = t_span[k+1] - t."""
  t_span = 1 - np.cos(np.linspace(0, 1, n_timesteps + 1, dtype=np.float32) * np.float32(0.5 * np.pi))
  t_span = t_span.astype(np.float32)
  ts, dts = [], []
  t, dt = t_span[0], t_span[1] - t_span[0]
  for step in range(1, n_timesteps + 1):
    ts.append(t)
    dts.append(dt)
    t = np.float32(t + dt)
    if step < n_timesteps:
      dt = np.float32(t_span[step + 1] - t)
  return np.array(ts, np.float32), np.array(dts, np.float32)


def speaker_features(model: Flow, embedding: jax.Array) -> jax.Array:
  """(B, spk_embed_dim) x-vector -> (B, 80): F.normalize (eps 1e-12), then Linear."""
  norm = jnp.linalg.norm(embedding, axis=-1, keepdims=True)
  return model.spk_affine(embedding / jnp.maximum(norm, 1e-12))


def token_window_features(model: Flow, window_tokens: jax.Array, window_valid: jax.Array,
                          first: jax.Array) -> jax.Array:
  """Per-token features (B, L, 80) of tokens first ... first+L-1 from a window holding tokens
  first-2 ... first+L+lookahead-1 (B, L+2+lookahead) and which of them exist."""
  embedded = model.input_embedding(jnp.maximum(window_tokens, 0))
  return model.pre_lookahead(embedded * window_valid[..., None], first)


def token_features(model: Flow, tokens: jax.Array, num_tokens: jax.Array) -> jax.Array:
  """mu (B, N * token_mel_ratio, 80) of all tokens (B, N) (right-padded past num_tokens (B,)),
  with the look-ahead beyond the end read as zeros (finalize=True semantics; for finalize=False
  keep only the frames of the first num_tokens - lookahead tokens)."""
  cfg = model.config
  batch, length = tokens.shape
  padded = jnp.pad(tokens, ((0, 0), (2, cfg.pre_lookahead_len)))
  position = jnp.arange(padded.shape[1]) - 2
  valid = (position >= 0) & (position < num_tokens[:, None])
  per_token = token_window_features(model, padded, valid, jnp.zeros((), jnp.int32))
  return jnp.repeat(per_token, cfg.token_mel_ratio, axis=1)


def attention_mask(frame_valid: jax.Array, chunk_frames: int) -> jax.Array:
  """(B, 1, T, T): valid keys; with chunk_frames > 0 also block-causal (key j is visible to query i
  iff j < (i // chunk + 1) * chunk). Rows left with no key see every key, as in the reference."""
  length = frame_valid.shape[1]
  mask = jnp.broadcast_to(frame_valid[:, None, :], (frame_valid.shape[0], length, length))
  if chunk_frames:
    index = jnp.arange(length)
    mask = mask & (index[None, :] < (index[:, None] // chunk_frames + 1) * chunk_frames)[None]
  mask = jnp.where(mask.any(-1, keepdims=True), mask, True)
  return mask[:, None]


def guided_velocity(model: Flow, x, mu, cond, spks, t, mask, frame_valid, first_frame=0,
                    cache=None):
  """The CFG velocity (1 + r) v(x | mu, spks, cond) - r v(x | 0, 0, 0), both rows in one batch."""
  rate = model.config.inference_cfg_rate
  batch = x.shape[0]
  double = lambda a: jnp.concatenate([a, a], axis=0)  # noqa: E731
  unconditional = lambda a: jnp.concatenate([a, jnp.zeros_like(a)], axis=0)  # noqa: E731
  out = model.estimator(double(x), unconditional(mu), unconditional(cond), unconditional(spks),
                        jnp.full((2 * batch,), t), double(mask), double(frame_valid),
                        first_frame, cache)
  velocity, cache = out if cache is not None else (out, None)
  velocity = (1.0 + rate) * velocity[:batch] - rate * velocity[batch:]
  return velocity if cache is None else (velocity, cache)


def solve(model: Flow, mu: jax.Array, spks: jax.Array, cond: jax.Array, frame_valid: jax.Array,
          chunk_frames: int) -> jax.Array:
  """Euler integration from rand_noise[:T]: states (n_timesteps + 1, B, T, 80), x_0 first."""
  cfg = model.config
  batch, length, _ = mu.shape
  x0 = jnp.broadcast_to(model.rand_noise[:length] * cfg.temperature, (batch, length, MEL_DIM))
  mask = attention_mask(frame_valid, chunk_frames)
  ts, dts = euler_schedule(cfg.n_timesteps)

  def step(x, t_dt):
    t, dt = t_dt
    x = x + dt * guided_velocity(model, x, mu, cond, spks, t, mask, frame_valid)
    return x, x

  _, states = jax.lax.scan(step, x0, (jnp.asarray(ts), jnp.asarray(dts)))
  return jnp.concatenate([x0[None], states], axis=0)


@functools.partial(nnx.jit, static_argnames=('finalize', 'streaming'), graph=False)
def inference(model: Flow, tokens: jax.Array, embedding: jax.Array,
              prompt_tokens: jax.Array | None = None, prompt_feat: jax.Array | None = None,
              num_tokens: jax.Array | None = None, *, finalize: bool = True,
              streaming: bool = False) -> dict:
  """`CausalMaskedDiffWithDiT.inference` on a batch.

  tokens: (B, N) int codes, right-padded past num_tokens (B,) (default: all N); embedding:
  (B, spk_embed_dim); prompt_tokens (B, P) and prompt_feat (B, F, 80) (default: none). finalize
  False: the last pre_lookahead_len tokens are look-ahead context only. streaming: the block-causal
  chunk mask of static_chunk_size frames. Returns channel-first arrays like the reference:
  'spks' (B, 80), 'mu' and 'cond' (B, 80, T), 'euler_states' (n+1, B, 80, T) and 'mel'
  (B, 80, T - F), where T = 2 (P + N) for finalize, 2 (P + N - lookahead) otherwise; 'num_frames'
  (B,): the valid mel frames of each row (the rest is padding).
  """
  cfg = model.config
  batch = tokens.shape[0]
  if num_tokens is None:
    num_tokens = jnp.full((batch,), tokens.shape[1], jnp.int32)
  if prompt_tokens is None:
    prompt_tokens = jnp.zeros((batch, 0), jnp.int32)
  if prompt_feat is None:
    prompt_feat = jnp.zeros((batch, 0, MEL_DIM), jnp.float32)
  all_tokens = jnp.concatenate([prompt_tokens, tokens], axis=1)
  total = prompt_tokens.shape[1] + num_tokens
  mu = token_features(model, all_tokens, total)
  kept = total if finalize else total - cfg.pre_lookahead_len
  if not finalize:
    mu = mu[:, :mu.shape[1] - cfg.pre_lookahead_len * cfg.token_mel_ratio]
  frames = mu.shape[1]
  frame_valid = jnp.arange(frames)[None] < (kept * cfg.token_mel_ratio)[:, None]
  prompt_frames = prompt_feat.shape[1]
  cond = jnp.pad(prompt_feat, ((0, 0), (0, frames - prompt_frames), (0, 0)))
  spks = speaker_features(model, embedding)
  states = solve(model, mu, spks, cond, frame_valid,
                 cfg.static_chunk_size if streaming else 0)
  channels_first = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731
  return {'spks': spks, 'mu': channels_first(mu), 'cond': channels_first(cond),
          'euler_states': channels_first(states),
          'mel': channels_first(states[-1, :, prompt_frames:]),
          'num_frames': kept * cfg.token_mel_ratio - prompt_frames}


def init_stream_cache(cfg: FlowConfig, batch: int, max_frames: int) -> dict:
  """Empty caches of a chunked stream, per Euler step: every block's keys and values for both
  CFG rows, 'k'/'v' (steps, depth, 2B, max_frames, heads * dim_head), and the conv position
  embedding's input tails, 'conv1'/'conv2' (steps, 2B, 30, dim)."""
  kv = (cfg.n_timesteps, cfg.depth, 2 * batch, max_frames, cfg.heads * cfg.dim_head)
  tail = (cfg.n_timesteps, 2 * batch, POSITION_KERNEL - 1, cfg.dim)
  return {'k': jnp.zeros(kv), 'v': jnp.zeros(kv), 'conv1': jnp.zeros(tail),
          'conv2': jnp.zeros(tail)}


@functools.partial(nnx.jit, donate_argnames=('cache',), graph=False)
def stream_chunk(model: Flow, cache: dict, window_tokens: jax.Array, window_valid: jax.Array,
                 spks: jax.Array, cond: jax.Array, first_token: jax.Array,
                 num_frames: jax.Array) -> tuple[jax.Array, dict]:
  """All Euler steps of one block of the chunk mask, frames first_token * ratio ... + chunk.

  The block's frames see only earlier blocks (cached keys and values of the same Euler step) and
  themselves, so computing block after block gives what one offline pass with the chunk mask
  gives. window_tokens/window_valid: (B, chunk/ratio + 2 + lookahead) tokens first_token-2 ...
  (see token_window_features); spks (B, 80); cond (B, chunk, 80); num_frames: how many of the
  block's frames exist (fewer only in a stream's last block). Returns the final Euler state of
  the block (B, chunk, 80) and the caches with the block written.
  """
  cfg = model.config
  chunk = cfg.static_chunk_size
  batch = window_tokens.shape[0]
  first_frame = first_token * cfg.token_mel_ratio
  mu = jnp.repeat(token_window_features(model, window_tokens, window_valid, first_token),
                  cfg.token_mel_ratio, axis=1)
  frame_valid = jnp.broadcast_to(jnp.arange(chunk) < num_frames, (batch, chunk))
  key_valid = jnp.arange(cache['k'].shape[3]) < first_frame + num_frames
  mask = jnp.broadcast_to(key_valid, (batch, 1, chunk, key_valid.shape[0]))
  noise = jax.lax.dynamic_slice_in_dim(model.rand_noise[...], first_frame, chunk)
  x0 = jnp.broadcast_to(noise * cfg.temperature, (batch, chunk, MEL_DIM))
  ts, dts = euler_schedule(cfg.n_timesteps)

  def step(x, inputs):
    t, dt, step_cache = inputs
    velocity, step_cache = guided_velocity(model, x, mu, cond, spks, t, mask, frame_valid,
                                           first_frame, step_cache)
    return x + dt * velocity, step_cache

  return jax.lax.scan(step, x0, (jnp.asarray(ts), jnp.asarray(dts), cache))


class FlowStream:
  """A growing code stream -> mel chunk by chunk, with the block-causal chunk mask and real caches.

  `push(tokens)` returns the mel of every block of static_chunk_size frames whose tokens and
  look-ahead tokens have all arrived (finalize=False); `push(tokens, finalize=True)` ends the
  stream and returns the rest, the last block reading the look-ahead past the end as zeros. The
  concatenated output equals `inference(..., streaming=True, finalize=True)` on all the tokens,
  and what a non-final push returned equals the complete blocks of `inference(...,
  streaming=True, finalize=False)` on the tokens so far: frames of a block depend only on that
  block and earlier ones. (With full attention, the released default, no such prefix exists:
  every new token changes every frame.) One stream of batch 1; the caches hold max_frames
  frames (prompt included), about 2 * steps * depth * 2 * max_frames * heads * dim_head floats.
  """

  def __init__(self, model: Flow, embedding: jax.Array, prompt_tokens=None, prompt_feat=None,
               max_frames: int = 1500):
    cfg = model.config
    self.model = model
    self.chunk_tokens = cfg.static_chunk_size // cfg.token_mel_ratio
    self.tokens = [] if prompt_tokens is None else [int(t) for t in np.ravel(prompt_tokens)]
    self.prompt_feat = (np.zeros((0, MEL_DIM), np.float32) if prompt_feat is None
                        else np.asarray(prompt_feat, np.float32).reshape(-1, MEL_DIM))
    if max_frames > cfg.noise_frames:
      raise ValueError(f'max_frames {max_frames} exceeds the {cfg.noise_frames} frames of '
                       'rand_noise')
    self.max_frames = -(-max_frames // cfg.static_chunk_size) * cfg.static_chunk_size
    self.spks = speaker_features(model, jnp.asarray(embedding, jnp.float32).reshape(1, -1))
    self.cache = init_stream_cache(cfg, 1, self.max_frames)
    self.blocks_done = 0
    self.finished = False

  def push(self, tokens, finalize: bool = False) -> jax.Array:
    """Adds codes; returns the mel (1, 80, n) of the frames completed by them (n may be 0)."""
    if self.finished:
      raise ValueError('this stream was finalized')
    cfg = self.model.config
    self.tokens.extend(int(t) for t in np.ravel(tokens))
    ratio, lookahead = cfg.token_mel_ratio, cfg.pre_lookahead_len
    if ratio * len(self.tokens) > self.max_frames:
      raise ValueError(f'{len(self.tokens)} tokens need {ratio * len(self.tokens)} frames; this '
                       f'stream holds {self.max_frames} (max_frames)')
    prompt_frames = self.prompt_feat.shape[0]
    out = []
    while True:
      first = self.blocks_done * self.chunk_tokens
      end = first + self.chunk_tokens
      if not (first < len(self.tokens) if finalize else end + lookahead <= len(self.tokens)):
        break
      window = np.arange(first - 2, end + lookahead)
      valid = (window >= 0) & (window < len(self.tokens))
      ids = np.array([self.tokens[i] if ok else 0 for i, ok in zip(window, valid)], np.int32)
      first_frame = first * ratio
      cond = np.zeros((cfg.static_chunk_size, MEL_DIM), np.float32)
      prompt_part = self.prompt_feat[first_frame:first_frame + cfg.static_chunk_size]
      cond[:len(prompt_part)] = prompt_part
      num_frames = min(cfg.static_chunk_size, ratio * len(self.tokens) - first_frame)
      x, self.cache = stream_chunk(self.model, self.cache, jnp.asarray(ids)[None],
                                   jnp.asarray(valid)[None], self.spks, jnp.asarray(cond)[None],
                                   jnp.int32(first), jnp.int32(num_frames))
      out.append(x[:, max(prompt_frames - first_frame, 0):num_frames])
      self.blocks_done += 1
    self.finished = finalize
    mel = jnp.concatenate(out, axis=1) if out else jnp.zeros((1, 0, MEL_DIM))
    return jnp.swapaxes(mel, 1, 2)
