"""CosyVoice 3 vocoder: 50 Hz mel -> 24 kHz waveform, as `CausalHiFTGenerator` computes it.

mel -> F0 predictor (causal convs, 3 frames of look-ahead) -> harmonic source (9 harmonics whose
phase is a 50 Hz staircase, plus the fixed noise table `sine_waves`) -> STFT of the source. mel ->
conv_pre (4 frames of look-ahead) -> 3 stages of [leaky ReLU, nearest upsampling + causal conv,
+ the source's STFT brought to that rate, mean of Snake residual blocks] -> conv_post -> exp /
sin -> inverse STFT (n_fft 16, hop 4) -> clip. Offline (`inference`, `f0`, `source`, `decode`,
finalize True/False as the reference) and chunk by chunk with real caches (`HiftStream`).
Public arrays are channel-first like the reference: mel (B, 80, T), waveform (B, samples);
inside, everything is time-major (B, T, C).

Every convolution here pads nothing itself: it takes the frames before its input as `context`
(zeros at the start of a signal, the tail of the previous chunk when streaming) and returns the
context for the next call, so one call over a whole signal and many calls over its pieces compute
the same numbers. The reference's ReflectionPad1d((1, 0)) after the last upsampling and the
STFT's reflect padding touch only the first and last frames: they run in a stream's first and
last call.

The source phase integrates f0 and multiplies it by 480 * 2 pi, so the F0 predictor and the
source run at float32 HIGHEST precision with torch's roundings (the source given the reference's
f0 matches it to ~1e-7); the decoder's convolutions follow jax_default_matmul_precision.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fac_jax.speech import weights

HIGHEST = jax.lax.Precision.HIGHEST
F0_LOOKAHEAD = 3  # the F0 predictor's first conv (kernel 4) reads 3 frames ahead
SNAKE_EPS = 1e-9
POST_SLOPE = 0.01  # F.leaky_relu's default slope, used before conv_post
MAGNITUDE_MAX = 100.0


@dataclasses.dataclass(frozen=True)
class HiftConfig:
  """Sizes; the defaults are the released Fun-CosyVoice3-0.5B-2512's."""
  in_channels: int = 80
  base_channels: int = 512
  nb_harmonics: int = 8
  sampling_rate: int = 24000
  nsf_alpha: float = 0.1  # amplitude of the harmonics
  nsf_sigma: float = 0.003  # noise amplitude where voiced
  nsf_voiced_threshold: float = 10.0  # Hz
  upsample_rates: tuple[int, ...] = (8, 5, 3)
  upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
  n_fft: int = 16
  hop_len: int = 4
  resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
  resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
  source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
  source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
  lrelu_slope: float = 0.1
  audio_limit: float = 0.99
  conv_pre_look_right: int = 4
  f0_cond_channels: int = 512
  noise_samples: int = 300 * 24000  # length of sine_waves: 300 s, as the reference draws it

  def __post_init__(self):
    stages = len(self.upsample_rates)
    if not (len(self.upsample_kernel_sizes) == len(self.source_resblock_kernel_sizes) ==
            len(self.source_resblock_dilation_sizes) == stages):
      raise ValueError(f'upsample_rates, upsample_kernel_sizes and the source resblock lists must '
                       f'all have {stages} entries')
    if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
      raise ValueError('resblock_kernel_sizes and resblock_dilation_sizes differ in length')
    if self.base_channels % 2 ** stages:
      raise ValueError(f'base_channels {self.base_channels} must halve {stages} times')
    if self.n_fft % self.hop_len or self.n_fft % 2:
      raise ValueError(f'n_fft {self.n_fft} must be even and a multiple of hop_len {self.hop_len}')
    if self.upsample_scale < 3:
      raise ValueError(f'upsampling x{self.upsample_scale}: the phase downsampling below assumes '
                       'at least x3')

  @property
  def upsample_scale(self) -> int:
    """Waveform samples per mel frame (480)."""
    return int(np.prod(self.upsample_rates)) * self.hop_len

  @property
  def stage_channels(self) -> list[int]:
    return [self.base_channels // 2 ** (i + 1) for i in range(len(self.upsample_rates))]

  @property
  def source_down_rates(self) -> list[int]:
    """STFT frames per frame of each stage: 15, 3, 1 for rates (8, 5, 3)."""
    return [int(np.prod(self.upsample_rates[i + 1:])) for i in range(len(self.upsample_rates))]

  @classmethod
  def from_cosyvoice(cls, section: dict, source: str) -> 'HiftConfig':
    """From the hift section of a CosyVoice 3 yaml, nested as there (a dict, e.g. the JSON copy
    the tiny fixture ships); refuses settings this port does not implement."""
    def get(node, *keys):
      for key in keys:
        if not isinstance(node, dict) or key not in node:
          raise ValueError(f'{source}: missing {".".join(keys)}')
        node = node[key]
      return node
    if get(section, 'sampling_rate') == 22050:
      raise ValueError(f'{source}: sampling_rate 22050 selects the non-causal SineGen, which this '
                       'port does not implement')
    if get(section, 'nb_harmonics') != 8:
      raise ValueError(f'{source}: nb_harmonics is {section["nb_harmonics"]}; the reference\'s fixed '
                       'tables hard-code 8 + 1 columns')
    predictor = get(section, 'f0_predictor')
    if get(predictor, 'num_class') != 1:
      raise ValueError(f'{source}: f0_predictor.num_class is {predictor["num_class"]}; expected 1')
    if get(predictor, 'in_channels') != get(section, 'in_channels'):
      raise ValueError(f'{source}: f0_predictor.in_channels differs from in_channels')
    tuples = lambda key: tuple(get(section, key))
    nested = lambda key: tuple(tuple(d) for d in get(section, key))
    return cls(
        in_channels=get(section, 'in_channels'), base_channels=get(section, 'base_channels'),
        nb_harmonics=get(section, 'nb_harmonics'), sampling_rate=get(section, 'sampling_rate'),
        nsf_alpha=get(section, 'nsf_alpha'), nsf_sigma=get(section, 'nsf_sigma'),
        nsf_voiced_threshold=get(section, 'nsf_voiced_threshold'),
        upsample_rates=tuples('upsample_rates'),
        upsample_kernel_sizes=tuples('upsample_kernel_sizes'),
        n_fft=get(section, 'istft_params', 'n_fft'),
        hop_len=get(section, 'istft_params', 'hop_len'),
        resblock_kernel_sizes=tuples('resblock_kernel_sizes'),
        resblock_dilation_sizes=nested('resblock_dilation_sizes'),
        source_resblock_kernel_sizes=tuples('source_resblock_kernel_sizes'),
        source_resblock_dilation_sizes=nested('source_resblock_dilation_sizes'),
        lrelu_slope=get(section, 'lrelu_slope'), audio_limit=get(section, 'audio_limit'),
        conv_pre_look_right=get(section, 'conv_pre_look_right'),
        f0_cond_channels=get(predictor, 'cond_channels'))

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)

  @classmethod
  def from_json(cls, text: str, source: str) -> 'HiftConfig':
    values = json.loads(text)
    names = {f.name for f in dataclasses.fields(cls)}
    if set(values) != names:
      raise ValueError(f'{source}: fields {sorted(set(values) ^ names)} are missing or unknown')
    as_tuple = lambda v: tuple(as_tuple(x) for x in v) if isinstance(v, list) else v
    return cls(**{k: as_tuple(v) for k, v in values.items()})


class Conv(nnx.Module):
  """Conv1d over (B, T, C) that pads nothing itself: the frames before x come in as `context`."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, dilation: int = 1,
               stride: int = 1, initial_context: int | None = None, precision=None,
               rngs: nnx.Rngs):
    """initial_context: zero frames before the signal (default (kernel_size - 1) * dilation, a
    left-causal conv; 0 for a conv that reads ahead; stride - 1 for the strided downsampler)."""
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(
        rngs.params(), (kernel_size, in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,)))
    self.dilation, self.stride, self.precision = dilation, stride, precision
    self.initial_context = ((kernel_size - 1) * dilation if initial_context is None
                            else initial_context)

  def start(self, batch: int) -> jax.Array:
    return jnp.zeros((batch, self.initial_context, self.kernel.shape[1]))

  def __call__(self, x: jax.Array, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns the outputs that [context, x] determines and the context of the next call."""
    full = jnp.concatenate([context, x], axis=1)
    y = jax.lax.conv_general_dilated(full, self.kernel[...], (self.stride,), 'VALID',
                                     rhs_dilation=(self.dilation,),
                                     dimension_numbers=('NWC', 'WIO', 'NWC'),
                                     precision=self.precision) + self.bias[...]
    return y, full[:, y.shape[1] * self.stride:]


class Snake(nnx.Module):
  """x + sin^2(alpha x) / alpha, alpha per channel on a linear scale."""

  def __init__(self, channels: int):
    self.alpha = nnx.Param(jnp.ones((channels,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.alpha[...]
    return x + (1.0 / (alpha + SNAKE_EPS)) * jnp.sin(x * alpha) ** 2


class ResBlock(nnx.Module):
  """For each dilation d: x += conv(k)(Snake(conv(k, d)(Snake(x)))), both convs left-causal."""

  def __init__(self, channels: int, kernel_size: int, dilations, *, rngs: nnx.Rngs):
    self.convs1 = nnx.List([Conv(channels, channels, kernel_size, dilation=d, rngs=rngs)
                            for d in dilations])
    self.convs2 = nnx.List([Conv(channels, channels, kernel_size, rngs=rngs) for _ in dilations])
    self.activations1 = nnx.List([Snake(channels) for _ in dilations])
    self.activations2 = nnx.List([Snake(channels) for _ in dilations])

  def start(self, batch: int) -> list:
    return [(c1.start(batch), c2.start(batch)) for c1, c2 in zip(self.convs1, self.convs2)]

  def __call__(self, x: jax.Array, state: list) -> tuple[jax.Array, list]:
    new_state = []
    for conv1, conv2, act1, act2, (context1, context2) in zip(
        self.convs1, self.convs2, self.activations1, self.activations2, state):
      xt, context1 = conv1(act1(x), context1)
      xt, context2 = conv2(act2(xt), context2)
      x = xt + x
      new_state.append((context1, context2))
    return x, new_state


class F0Predictor(nnx.Module):
  """`CausalConvRNNF0Predictor`: conv(k4, reads 3 frames ahead) -> ELU -> 4 x [causal conv(k3)
  -> ELU] -> Linear -> |.|, in Hz. Always at float32 `HIGHEST` precision: the source phase
  integrates f0, and the reference runs this part on the CPU for that reason."""

  def __init__(self, in_channels: int, channels: int, *, rngs: nnx.Rngs):
    self.condnet = nnx.List(
        [Conv(in_channels, channels, F0_LOOKAHEAD + 1, initial_context=0, precision=HIGHEST,
              rngs=rngs)] +
        [Conv(channels, channels, 3, precision=HIGHEST, rngs=rngs) for _ in range(4)])
    self.classifier = nnx.Linear(channels, 1, precision=HIGHEST, rngs=rngs)

  def start(self, batch: int) -> list:
    return [conv.start(batch) for conv in self.condnet]

  def __call__(self, mel: jax.Array, state: list, final: bool) -> tuple[jax.Array, list]:
    """mel (B, T, C) -> f0 (B, T') of every frame whose look-ahead has arrived (the look-ahead
    past the end reads zeros when `final`)."""
    x = jnp.pad(mel, ((0, 0), (0, F0_LOOKAHEAD), (0, 0))) if final else mel
    new_state = []
    for conv, context in zip(self.condnet, state):
      x, context = conv(x, context)
      x = jax.nn.elu(x)
      new_state.append(context)
    return jnp.abs(self.classifier(x)[..., 0]), new_state


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  total = a + b
  b_part = total - a
  return total, (a - (total - b_part)) + (b - b_part)


def _add_double_float(x: tuple, y: tuple) -> tuple[jax.Array, jax.Array]:
  """(hi, lo) + (hi, lo) with float32 pairs carrying about 48 bits; hi stays the float32 nearest
  to hi + lo."""
  total, error = _two_sum(x[0], y[0])
  error = error + (x[1] + y[1])
  hi = total + error
  return hi, error - (hi - total)


class HarmonicSource(nnx.Module):
  """`SourceModuleHnNSF` with the causal `SineGen2`: f0 per frame -> excitation per sample.

  For harmonic k = 1..9 the rad/sample (k f0 / sr) mod 1 is constant over a frame; the reference
  upsamples it to samples, downsamples it linearly by 480 (align_corners=False reads samples 480i
  + 239 and + 240 of frame i, so one frame's value comes back unchanged), takes cumsum * 2 pi,
  multiplies by 480 and upsamples *nearest*: the phase is a 50 Hz staircase, trained in. The
  cumsum is the reference's (float64 accumulation on the CPU, rounded to float32: one float32 ulp
  of it moves the phase by ~0.01 rad), kept in double-float, so a stream carries it exactly. Then
  0.1 sin(phase) where f0 > 10 Hz, plus (0.003 if voiced else 0.1 / 3) * sine_waves[sample],
  -> tanh(Linear(9 -> 1)).

  `sine_waves` (uniform [0, 1), 300 s x 9) and `rand_ini` are fixed tables the reference draws in
  its constructor; the converter replays that draw. `rand_ini` is added to the first sample's
  rad only, which the 1/480 linear downsampling never reads: it cannot change the output, and is
  kept only so the converted tables are complete.
  """

  def __init__(self, cfg: HiftConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    harmonics = cfg.nb_harmonics + 1
    self.l_linear = nnx.Linear(harmonics, 1, precision=HIGHEST, rngs=rngs)
    self.sine_waves = weights.Constant(
        jax.random.uniform(rngs.params(), (cfg.noise_samples, harmonics)))
    self.rand_ini = weights.Constant(
        jax.random.uniform(rngs.params(), (harmonics,)).at[0].set(0.0))

  def start(self, batch: int) -> dict:
    """Phase integral so far (double-float) and the next sample's index into sine_waves."""
    zeros = jnp.zeros((batch, self.config.nb_harmonics + 1))
    return {'phase_hi': zeros, 'phase_lo': zeros, 'sample': jnp.zeros((), jnp.int32)}

  def __call__(self, f0: jax.Array, state: dict) -> tuple[jax.Array, dict]:
    """f0 (B, n) -> source (B, n * 480)."""
    cfg = self.config
    scale = cfg.upsample_scale
    batch, frames = f0.shape
    harmonics = f0[..., None] * jnp.arange(1, cfg.nb_harmonics + 2, dtype=jnp.float32)
    # The barriers keep torch's roundings: XLA would turn x / broadcast(c) into x * (1 / c) and
    # fold a chain of constant factors into one.
    rate = jax.lax.optimization_barrier(jnp.full(harmonics.shape, cfg.sampling_rate, jnp.float32))
    rad = (harmonics / rate) % 1
    running = jax.lax.associative_scan(_add_double_float, (rad, jnp.zeros_like(rad)), axis=1)
    phase_hi, phase_lo = _add_double_float(
        (state['phase_hi'][:, None], state['phase_lo'][:, None]), running)
    phase = jax.lax.optimization_barrier(phase_hi * np.float32(2 * np.float32(np.pi)))
    sines = jnp.sin(phase * scale) * cfg.nsf_alpha
    voiced = (f0 > cfg.nsf_voiced_threshold).astype(jnp.float32)
    noise_amp = voiced * cfg.nsf_sigma + (1 - voiced) * cfg.nsf_alpha / 3
    table = jax.lax.dynamic_slice_in_dim(self.sine_waves[...], state['sample'], frames * scale)
    per_sample = lambda a: jnp.repeat(a, scale, axis=1)
    excitation = (per_sample(sines * voiced[..., None]) +
                  per_sample(noise_amp)[..., None] * table)
    source = jnp.tanh(self.l_linear(excitation))[..., 0]
    new_state = {'phase_hi': phase_hi[:, -1], 'phase_lo': phase_lo[:, -1],
                 'sample': state['sample'] + frames * scale}
    return source, new_state


@functools.cache
def _stft_bases(n_fft: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The periodic Hann window (n_fft,), the windowed one-sided DFT (n_fft, 2 (n_fft/2 + 1)) giving
  [real | imag], and the inverse real DFT times the window (2 (n_fft/2 + 1), n_fft), which like
  torch.istft ignores the imaginary parts of the DC and Nyquist bins."""
  n = np.arange(n_fft)
  bins = np.arange(n_fft // 2 + 1)
  window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
  angle = 2 * np.pi * np.outer(n, bins) / n_fft  # (n_fft, bins)
  forward = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1) * window[:, None]
  weight = np.where((bins == 0) | (bins == n_fft // 2), 1.0, 2.0) / n_fft
  inverse = np.concatenate([np.cos(angle).T * weight[:, None], -np.sin(angle).T * weight[:, None]],
                           axis=0) * window[None, :]
  return window.astype(np.float32), forward.astype(np.float32), inverse.astype(np.float32)


class CausalHiFT(nnx.Module):
  """The whole vocoder; attribute names follow the reference's state dict."""

  def __init__(self, cfg: HiftConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_cond_channels, rngs=rngs)
    self.m_source = HarmonicSource(cfg, rngs=rngs)
    self.conv_pre = Conv(cfg.in_channels, cfg.base_channels, cfg.conv_pre_look_right + 1,
                         initial_context=0, rngs=rngs)
    channels = [cfg.base_channels] + cfg.stage_channels
    self.ups = nnx.List([Conv(channels[i], channels[i + 1], k, rngs=rngs)
                         for i, k in enumerate(cfg.upsample_kernel_sizes)])
    spectrum = cfg.n_fft + 2
    self.source_downs = nnx.List([
        Conv(spectrum, ch, 1, rngs=rngs) if u == 1 else
        Conv(spectrum, ch, 2 * u, stride=u, initial_context=u - 1, rngs=rngs)
        for u, ch in zip(cfg.source_down_rates, cfg.stage_channels)])
    self.source_resblocks = nnx.List([
        ResBlock(ch, k, d, rngs=rngs) for ch, k, d in zip(
            cfg.stage_channels, cfg.source_resblock_kernel_sizes,
            cfg.source_resblock_dilation_sizes)])
    self.resblocks = nnx.List([
        ResBlock(ch, k, d, rngs=rngs) for ch in cfg.stage_channels
        for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)])
    self.conv_post = Conv(cfg.stage_channels[-1], spectrum, 7, rngs=rngs)

  def start(self, batch: int) -> dict:
    """Caches of a signal not begun: f0 predictor, source, and decoder."""
    return {'f0': self.f0_predictor.start(batch), 'source': self.m_source.start(batch),
            'decode': self.start_decode(batch)}

  def start_decode(self, batch: int) -> dict:
    cfg = self.config
    overlap = cfg.n_fft // cfg.hop_len - 1
    return {
        'conv_pre': self.conv_pre.start(batch),
        'pending_source': jnp.zeros((batch, 0)),
        'ups': [conv.start(batch) for conv in self.ups],
        'source_downs': [conv.start(batch) for conv in self.source_downs],
        'source_resblocks': [block.start(batch) for block in self.source_resblocks],
        'resblocks': [block.start(batch) for block in self.resblocks],
        'conv_post': self.conv_post.start(batch),
        # overlap-add sums of the output hops not yet complete, and of the squared window
        'ola': jnp.zeros((batch, overlap, cfg.hop_len)),
        'envelope': jnp.zeros((overlap, cfg.hop_len)),
    }

  def _source_spectrum(self, pending: jax.Array, source: jax.Array, frames: int, first: bool,
                       final: bool) -> tuple[jax.Array, jax.Array]:
    """STFT frames (B, frames, n_fft + 2) of the source, [real | imag] (torch.stft, center=True,
    reflect padding, periodic Hann), continuing where the last call stopped; returns them and the
    source samples the next frames will need."""
    cfg = self.config
    half, hop = cfg.n_fft // 2, cfg.hop_len
    samples = jnp.concatenate([pending, source], axis=1)
    if first:
      samples = jnp.pad(samples, ((0, 0), (half, 0)), mode='reflect')
    if final:
      samples = jnp.pad(samples, ((0, 0), (0, half)), mode='reflect')
    needed = hop * (frames - 1) + cfg.n_fft
    if samples.shape[1] < needed or (final and samples.shape[1] != needed):
      raise ValueError(f'the source has {samples.shape[1]} samples where {frames} STFT frames need '
                       f'{needed}{"" if final else " or more"}: mel and source do not line up')
    _, forward, _ = _stft_bases(cfg.n_fft)
    index = hop * np.arange(frames)[:, None] + np.arange(cfg.n_fft)[None, :]
    spectrum = jnp.matmul(samples[:, index], forward, precision=HIGHEST)
    return spectrum, samples[:, hop * frames:]

  def _inverse_stft(self, x: jax.Array, state: dict, first: bool,
                    final: bool) -> tuple[jax.Array, dict]:
    """conv_post output (B, frames, n_fft + 2) -> the waveform samples it completes (torch.istft,
    center=True: overlap-add of windowed frames over the overlap-added squared window, the first
    and last n_fft/2 samples dropped), clipped."""
    cfg = self.config
    bins, hop, per_frame = cfg.n_fft // 2 + 1, cfg.hop_len, cfg.n_fft // cfg.hop_len
    window, _, inverse = _stft_bases(cfg.n_fft)
    magnitude = jnp.minimum(jnp.exp(x[..., :bins]), MAGNITUDE_MAX)
    phase = jnp.sin(x[..., bins:])
    spectrum = jnp.concatenate([magnitude * jnp.cos(phase), magnitude * jnp.sin(phase)], axis=-1)
    pieces = jnp.matmul(spectrum, inverse, precision=HIGHEST)  # (B, frames, n_fft), windowed
    batch, frames = pieces.shape[:2]
    pieces = pieces.reshape(batch, frames, per_frame, hop)
    squared = np.broadcast_to((window ** 2).reshape(per_frame, hop), (frames, per_frame, hop))
    out = jnp.zeros((batch, frames + per_frame - 1, hop))
    # The window's envelope is a constant: summed here in NumPy (the same float32 sums), as XLA
    # would take seconds to fold its scatter-adds over a long signal at compile time.
    envelope = np.zeros((frames + per_frame - 1, hop), np.float32)
    for part in range(per_frame):  # frame j's part p lands on output hop j + p
      out = out.at[:, part:part + frames].add(pieces[:, :, part])
      envelope[part:part + frames] += squared[:, part]
    out = out.at[:, :per_frame - 1].add(state['ola'])
    envelope = jnp.asarray(envelope).at[:per_frame - 1].add(state['envelope'])
    done = out.shape[1] if final else frames
    wav = (out[:, :done] / envelope[:done]).reshape(batch, done * hop)
    half = cfg.n_fft // 2
    wav = wav[:, half if first else 0:wav.shape[1] - (half if final else 0)]
    return (jnp.clip(wav, -cfg.audio_limit, cfg.audio_limit),
            {'ola': out[:, done:], 'envelope': envelope[done:]})

  def decode(self, mel: jax.Array, source: jax.Array, state: dict, *, first: bool,
             final: bool) -> tuple[dict, dict]:
    """mel (B, T, C) and source (B, S) -> {'wav': the samples they complete, 'conv_post': conv_post
    output (B, frames, n_fft + 2)}, and the caches. Not `final`, conv_pre's last 4 frames are
    look-ahead only, and the source must reach 8 samples past the decoded frames."""
    cfg = self.config
    x = jnp.pad(mel, ((0, 0), (0, cfg.conv_pre_look_right), (0, 0))) if final else mel
    x, conv_pre_context = self.conv_pre(x, state['conv_pre'])
    spectrum_frames = x.shape[1] * cfg.upsample_scale // cfg.hop_len + (1 if first else 0)
    spectrum, pending = self._source_spectrum(state['pending_source'], source, spectrum_frames,
                                              first, final)
    new_state = {'conv_pre': conv_pre_context, 'pending_source': pending, 'ups': [],
                 'source_downs': [], 'source_resblocks': [], 'resblocks': []}
    kernels = len(cfg.resblock_kernel_sizes)
    for i, rate in enumerate(cfg.upsample_rates):
      x = jax.nn.leaky_relu(x, cfg.lrelu_slope)
      x, context = self.ups[i](jnp.repeat(x, rate, axis=1), state['ups'][i])
      new_state['ups'].append(context)
      if i == len(cfg.upsample_rates) - 1 and first:  # ReflectionPad1d((1, 0))
        x = jnp.concatenate([x[:, 1:2], x], axis=1)
      fused, context = self.source_downs[i](spectrum, state['source_downs'][i])
      new_state['source_downs'].append(context)
      fused, context = self.source_resblocks[i](fused, state['source_resblocks'][i])
      new_state['source_resblocks'].append(context)
      x = x + fused
      total = None
      for j in range(i * kernels, (i + 1) * kernels):
        y, context = self.resblocks[j](x, state['resblocks'][j])
        new_state['resblocks'].append(context)
        total = y if total is None else total + y
      x = total / kernels
    x, new_state['conv_post'] = self.conv_post(jax.nn.leaky_relu(x, POST_SLOPE), state['conv_post'])
    wav, istft_state = self._inverse_stft(x, state, first, final)
    new_state.update(istft_state)
    return {'wav': wav, 'conv_post': x}, new_state


def create(cfg: HiftConfig, seed: int = 0) -> CausalHiFT:
  """A vocoder with random weights (for tests and benchmarks)."""
  return CausalHiFT(cfg, rngs=nnx.Rngs(seed))


def load(folder: str) -> CausalHiFT:
  """A vocoder from a folder written by `fac_jax.speech.convert_cosyvoice` (config.json and
  safetensors named by module path); refuses missing, extra or misshapen tensors."""
  cfg = weights.read_config(folder, HiftConfig.from_json, 'fac_jax.speech.convert_cosyvoice')
  return weights.load(folder, nnx.eval_shape(lambda: create(cfg)))


def _check_length(model: CausalHiFT, frames: int) -> None:
  cfg = model.config
  if frames * cfg.upsample_scale > cfg.noise_samples:
    raise ValueError(f'{frames} mel frames need {frames * cfg.upsample_scale} samples of '
                     f'sine_waves, which holds {cfg.noise_samples} '
                     f'({cfg.noise_samples / cfg.sampling_rate:g} s, as the reference)')


def _time_major(mel: jax.Array) -> jax.Array:
  return jnp.swapaxes(jnp.asarray(mel, jnp.float32), 1, 2)


@functools.partial(nnx.jit, static_argnames=('final',), graph=False)
def f0_step(model: CausalHiFT, mel: jax.Array, state: list, final: bool) -> tuple[jax.Array, list]:
  """F0 predictor on mel (B, 80, n) -> (f0 (B, n') of the frames whose look-ahead has arrived,
  caches)."""
  return model.f0_predictor(_time_major(mel), state, final)


@functools.partial(nnx.jit, graph=False)
def source_step(model: CausalHiFT, f0_values: jax.Array, state: dict) -> tuple[jax.Array, dict]:
  """Harmonic source of the next frames: f0 (B, n) -> (source (B, n * 480), caches)."""
  return model.m_source(f0_values, state)


@functools.partial(nnx.jit, static_argnames=('first', 'final'), graph=False)
def decode_step(model: CausalHiFT, mel: jax.Array, source_values: jax.Array, state: dict,
                first: bool, final: bool) -> tuple[dict, dict]:
  """Decoder on the next mel frames (B, 80, n) and source samples (B, m) -> ({'wav': the samples
  they complete, 'conv_post' (B, n_fft + 2, frames)}, caches); see CausalHiFT.decode."""
  out, state = model.decode(_time_major(mel), source_values, state, first=first, final=final)
  return {'wav': out['wav'], 'conv_post': jnp.swapaxes(out['conv_post'], 1, 2)}, state


def f0(model: CausalHiFT, mel: jax.Array, finalize: bool = True) -> jax.Array:
  """mel (B, 80, T) -> f0 (B, T) in Hz; not finalized, the last 3 frames are look-ahead only and
  f0 has T - 3 frames."""
  return f0_step(model, mel, model.f0_predictor.start(mel.shape[0]), finalize)[0]


def source(model: CausalHiFT, f0_values: jax.Array) -> jax.Array:
  """f0 (B, n) -> the harmonic source (B, n * 480) of a signal's first n frames."""
  _check_length(model, f0_values.shape[1])
  return source_step(model, f0_values, model.m_source.start(f0_values.shape[0]))[0]


def decode(model: CausalHiFT, mel: jax.Array, source_values: jax.Array,
           finalize: bool = True) -> dict:
  """The reference's `decode`: mel (B, 80, T) and source (B, 480 T) -> {'wav', 'conv_post'
  (B, n_fft + 2, frames)}. Not finalized, the last 4 mel frames are conv_pre's look-ahead only,
  and the last 480 samples are dropped too: wav has 480 (T - 5) samples."""
  cfg = model.config
  out, _ = decode_step(model, mel, source_values, model.start_decode(mel.shape[0]), True, finalize)
  if not finalize:  # the reference keeps 480 samples fewer than the frames determine
    out['wav'] = out['wav'][:, :(mel.shape[2] - cfg.conv_pre_look_right - 1) * cfg.upsample_scale]
  return out


def inference(model: CausalHiFT, mel: jax.Array, finalize: bool = True) -> jax.Array:
  """The reference's `inference`: mel (B, 80, T) -> waveform (B, 480 T), or, not finalized (the
  last 3 frames are the F0 predictor's look-ahead, the next 4 conv_pre's), (B, 480 (T - 8))."""
  source_values = source(model, f0(model, mel, finalize))
  return decode(model, mel if finalize else mel[:, :, :-F0_LOOKAHEAD], source_values,
                finalize)['wav']


@functools.partial(jax.jit, static_argnames=('graphdef', 'first', 'final'))
def _stream_step(graphdef: nnx.GraphDef, params: nnx.State, mel: jax.Array, state: dict, *,
                 first: bool, final: bool) -> tuple[jax.Array, dict]:
  """f0_step, source_step and decode_step of one chunk in one call, on a module split once (a
  module argument is flattened on every call: ~250 arrays here, more time than the tiny model's
  work)."""
  model = nnx.merge(graphdef, params)
  f0_values, f0_state = model.f0_predictor(_time_major(mel), state['f0'], final)
  source_values, source_state = model.m_source(f0_values, state['source'])
  out, decode_state = model.decode(_time_major(mel), source_values, state['decode'], first=first,
                                   final=final)
  return out['wav'], {'f0': f0_state, 'source': source_state, 'decode': decode_state}


class HiftStream:
  """Mel chunks -> waveform chunks with real caches: each push runs the vocoder over the new
  frames only (the reference's web demo re-runs it over the whole history every chunk).

  `push(mel)` returns every sample that the frames so far determine: all but the last 4 frames'
  worth (conv_pre's look-ahead) and 4 samples (the inverse STFT's overlap); `push(mel,
  finalize=True)` ends the stream and returns the rest. The concatenated output is the offline
  `inference(all frames)`, and the output so far is a prefix of it, up to float32 rounding: the
  F0 predictor's convolutions round differently over chunks (~1e-7 relative), which the phase
  integral amplifies (5e-4 on the tiny test); given the same inputs, the cached source and
  decoder reproduce the offline ones to 1e-7. Nothing comes out before 5 frames have arrived; each
  new chunk length compiles once. At most 300 s per stream (the length of sine_waves, as the
  reference).
  """

  def __init__(self, model: CausalHiFT, batch: int = 1):
    if model.config.conv_pre_look_right <= F0_LOOKAHEAD:
      raise ValueError('streaming needs the source (F0 look-ahead 3 frames) to run ahead of '
                       f'conv_pre (look-ahead {model.config.conv_pre_look_right})')
    self.model, self.config, self.batch = model, model.config, batch
    self.graphdef, self.params = nnx.split(model)  # once: the module is only read
    self.state = None
    self.waiting = np.zeros((batch, self.config.in_channels, 0), np.float32)
    self.frames = 0
    self.finished = False

  def push(self, mel, finalize: bool = False) -> jax.Array:
    """Adds mel frames (B, 80, n); returns the waveform samples (B, m) they complete."""
    if self.finished:
      raise ValueError('this stream was finalized')
    mel = np.asarray(mel, np.float32)
    if mel.ndim != 3 or mel.shape[:2] != (self.batch, self.config.in_channels):
      raise ValueError(f'mel chunk of shape {mel.shape}; expected ({self.batch}, '
                       f'{self.config.in_channels}, frames)')
    self.frames += mel.shape[2]
    _check_length(self.model, self.frames)
    self.finished = finalize
    first = self.state is None
    if first:
      mel = np.concatenate([self.waiting, mel], axis=2)
      if mel.shape[2] <= (0 if finalize else self.config.conv_pre_look_right):
        self.waiting = mel
        return jnp.zeros((self.batch, 0))
      self.state = self.model.start(self.batch)
    wav, self.state = _stream_step(self.graphdef, self.params, mel, self.state, first=first,
                                   final=finalize)
    return wav
