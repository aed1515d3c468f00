"""Converts CosyVoice 3's released detokenizer files to fac_jax folders (torch only to read them).

  python -m fac_jax.speech.convert_cosyvoice --flow=flow.pt [--flow_config=flow.json] --out=DIR
  python -m fac_jax.speech.convert_cosyvoice --hift=hift.pt [--hift_config=hift.json] --out=DIR
  python -m fac_jax.speech.convert_cosyvoice --spk2info=new_spk2info.pt [--speaker=中文女] --out=DIR

DIR/flow/ gets config.json and model.safetensors (with its index): the weights in fac_jax's
layout, named by module path, plus `rand_noise`, the flow's fixed starting noise, which the
reference draws in its constructor (torch.manual_seed(0); torch.randn(1, 80, 15000)) and does
not store; load it with fac_jax.speech.flow.load(DIR/flow). The `.pt` files are read with
torch.load(weights_only=True), never unpickled freely; a missing, extra or misshapen tensor is
refused by name before anything is written (CosyVoice loads flow.pt with strict=True and no
renaming; only its HiFT loader strips a `generator.` prefix). --flow_config is the flow section of
cosyvoice3.yaml as JSON (the layout of the tiny fixture's config.json); without it the released
Fun-CosyVoice3-0.5B-2512 sizes are assumed, and the tensors must match them.

DIR/hift/ gets the vocoder the same way (fac_jax.speech.hift.load), its weight norm folded
(w = g v / ||v||), plus the fixed tables `sine_waves` (300 s x 9, uniform) and `rand_ini` that the
reference draws at construction: the converter replays that draw with torch, which depends on the
flow's sizes (--flow_config) as well. --hift_config is the hift section of cosyvoice3.yaml as
JSON.

DIR/speaker.json gets one speaker's x-vector from a speaker table (`spk2info.pt`: speaker name ->
{'embedding': (1, 192), ...}, read with weights_only=True): Fun-Audio-Chat speaks with '中文女' of
its utils/new_spk2info.pt, the default. With all three, DIR is what
fac_jax.speech.detokenizer.load reads (the flags may be given in one run or in several).
"""

import json
import os
import re

from absl import app, flags
from flax import nnx
import numpy as np

from fac_jax.speech import detokenizer, flow as flow_lib, hift as hift_lib, weights

FLOW_NOISE_SEED = 0

# fac_jax module path -> CosyVoice state-dict name; the leaves map kernel -> weight, bias -> bias.
_FLOW_MODULES = {
    'spk_affine': 'spk_embed_affine_layer',
    'pre_lookahead.conv1': 'pre_lookahead_layer.conv1',
    'pre_lookahead.conv2': 'pre_lookahead_layer.conv2',
    'estimator.time_in': 'decoder.estimator.time_embed.time_mlp.0',
    'estimator.time_out': 'decoder.estimator.time_embed.time_mlp.2',
    'estimator.input_proj': 'decoder.estimator.input_embed.proj',
    'estimator.position_conv1': 'decoder.estimator.input_embed.conv_pos_embed.conv1.0',
    'estimator.position_conv2': 'decoder.estimator.input_embed.conv_pos_embed.conv2.0',
    'estimator.final_modulation': 'decoder.estimator.norm_out.linear',
    'estimator.proj_out': 'decoder.estimator.proj_out',
}
_FLOW_BLOCK_MODULES = {
    'modulation': 'attn_norm.linear', 'q': 'attn.to_q', 'k': 'attn.to_k', 'v': 'attn.to_v',
    'out': 'attn.to_out.0', 'ff_in': 'ff.ff.0.0', 'ff_out': 'ff.ff.2',
}
_FLOW_PLAIN = {
    'input_embedding.embedding': 'input_embedding.weight',
    'estimator.inv_freq': 'decoder.estimator.rotary_embed.inv_freq',
}


class ConversionError(ValueError):
  """A checkpoint that is not exactly the tensors the model needs."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch state dict as float32 NumPy arrays, loaded with weights_only=True."""
  import torch  # only the converter needs torch
  state = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state, dict):
    raise ConversionError(f'{path}: holds a {type(state).__name__}, not a state dict')
  arrays = {}
  for name, tensor in state.items():
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
      raise ConversionError(f'{path}: entry {name!r} is not a floating-point tensor')
    arrays[name] = tensor.detach().to(torch.float32).numpy()
  return arrays


def check_tensors(path: str, found: dict[str, np.ndarray],
                  expected: dict[str, tuple[int, ...]]) -> None:
  """Refuses, naming the tensor and the file, anything but exactly the expected names and shapes."""
  missing = sorted(set(expected) - set(found))
  if missing:
    raise ConversionError(f'{path}: missing tensor {missing[0]!r} (expected shape '
                          f'{expected[missing[0]]}; {len(missing)} missing in all)')
  extra = sorted(set(found) - set(expected))
  if extra:
    raise ConversionError(f'{path}: unexpected tensor {extra[0]!r} of shape '
                          f'{tuple(found[extra[0]].shape)} ({len(extra)} unexpected in all)')
  for name, shape in expected.items():
    if tuple(found[name].shape) != tuple(shape):
      raise ConversionError(f'{path}: tensor {name!r} has shape {tuple(found[name].shape)}, '
                            f'expected {tuple(shape)}')


def _torch_layout(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Linear kernels are (in, out) here and (out, in) in torch; conv kernels (taps, in, out) here
  and (out, in, taps) there: both are the reversed axes."""
  return tuple(reversed(shape)) if name.endswith('kernel') else tuple(shape)


def flow_tensor_names(cfg: flow_lib.FlowConfig) -> dict[str, tuple[str, int | None]]:
  """CosyVoice state-dict name -> (fac_jax array name, block index or None) for every tensor of
  flow.pt at these sizes."""
  names = {}
  for ours, theirs in _FLOW_PLAIN.items():
    names[theirs] = (ours, None)
  for ours, theirs in _FLOW_MODULES.items():
    names[f'{theirs}.weight'] = (f'{ours}.kernel', None)
    names[f'{theirs}.bias'] = (f'{ours}.bias', None)
  for block in range(cfg.depth):
    for ours, theirs in _FLOW_BLOCK_MODULES.items():
      prefix = f'decoder.estimator.transformer_blocks.{block}.{theirs}'
      names[f'{prefix}.weight'] = (f'estimator.blocks.{ours}.kernel', block)
      names[f'{prefix}.bias'] = (f'estimator.blocks.{ours}.bias', block)
  return names


def flow_noise_table(frames: int) -> np.ndarray:
  """The reference's fixed starting noise, (frames, 80) time-major: torch.manual_seed(0);
  torch.randn(1, 80, frames), drawn on its own generator."""
  import torch
  generator = torch.Generator().manual_seed(FLOW_NOISE_SEED)
  noise = torch.randn(1, flow_lib.MEL_DIM, frames, generator=generator)
  return noise[0].T.contiguous().numpy()


def flow_arrays(path: str, cfg: flow_lib.FlowConfig) -> dict[str, np.ndarray]:
  """flow.pt -> fac_jax arrays by module path (rand_noise included), checked exactly."""
  shapes = weights.shapes(nnx.eval_shape(lambda: flow_lib.create(cfg)))
  names = flow_tensor_names(cfg)
  expected = {theirs: _torch_layout(ours, shapes[ours][1:] if block is not None else shapes[ours])
              for theirs, (ours, block) in names.items()}
  found = read_state_dict(path)
  check_tensors(path, found, expected)
  arrays = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
  for theirs, (ours, block) in names.items():
    value = found[theirs].T if ours.endswith('kernel') else found[theirs]
    if block is None:
      arrays[ours] = value
    else:
      arrays[ours][block] = value
  arrays['rand_noise'] = flow_noise_table(cfg.noise_frames)
  return arrays


def _read_config(path: str | None, config_class):
  """config_class's released sizes, or those of a cosyvoice3.yaml section saved as JSON."""
  if path is None:
    return config_class()
  with open(path, encoding='utf-8') as f:
    return config_class.from_cosyvoice(json.load(f), path)


def read_flow_config(path: str | None) -> flow_lib.FlowConfig:
  return _read_config(path, flow_lib.FlowConfig)


def convert_flow(flow_path: str, out: str, config_path: str | None = None) -> str:
  """flow.pt -> the folder `out` (must not exist), loadable with fac_jax.speech.flow.load."""
  cfg = read_flow_config(config_path)
  return weights.write(out, flow_arrays(flow_path, cfg), cfg.to_json())


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
  """torch's weight-norm parametrization (dim 0): w = g v / ||v||, the norm over all axes but 0."""
  norm = np.sqrt(np.sum(np.square(v, dtype=np.float64), axis=tuple(range(1, v.ndim)),
                        keepdims=True))
  return (v * (g / norm)).astype(np.float32)


def hift_tensor_names(model: hift_lib.CausalHiFT) -> dict[str, str]:
  """CosyVoice state-dict name (weight norm folded) -> fac_jax array name, for every weight of
  hift.pt; the F0 predictor's convs are every other entry of its nn.Sequential (ELUs between)."""
  names = {}
  for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    ours = '.'.join(map(str, path))
    theirs = re.sub(r'condnet\.(\d+)', lambda m: f'condnet.{2 * int(m.group(1))}', ours)
    names[re.sub(r'kernel$', 'weight', theirs)] = ours
  return names


def _hift_weight_normed(name: str, ndim: int) -> bool:
  """Every conv of the reference is weight-normed except the source downsamplers."""
  return ndim == 3 and not name.startswith('source_downs.')


def hift_noise_tables(cfg: hift_lib.HiftConfig,
                      flow_cfg: flow_lib.FlowConfig) -> tuple[np.ndarray, np.ndarray]:
  """The HiFT's fixed tables, `sine_waves` (300 s x 9) and `rand_ini` (9,), as the reference draws
  them: after the flow's CFM constructor reseeds torch to 0 and draws rand_noise, the flow builds
  its token embedding and speaker Linear, then the HiFT its F0 predictor (5 convs, a Linear) and
  SineGen2 (rand_ini, then sine_waves). Modules of the same shapes make the same draws, so this
  replays that order on a forked copy of torch's global generator."""
  import torch
  channels = cfg.f0_cond_channels
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(FLOW_NOISE_SEED)
    torch.randn(1, flow_lib.MEL_DIM, flow_cfg.noise_frames)
    torch.nn.Embedding(flow_cfg.vocab_size, flow_lib.MEL_DIM)
    torch.nn.Linear(flow_cfg.spk_embed_dim, flow_lib.MEL_DIM)
    torch.nn.Conv1d(cfg.in_channels, channels, hift_lib.F0_LOOKAHEAD + 1)
    for _ in range(4):
      torch.nn.Conv1d(channels, channels, 3)
    torch.nn.Linear(channels, 1)
    rand_ini = torch.rand(1, cfg.nb_harmonics + 1)
    rand_ini[:, 0] = 0
    sine_waves = torch.rand(1, cfg.noise_samples, cfg.nb_harmonics + 1)
  return sine_waves[0].numpy(), rand_ini[0].numpy()


def hift_weights(path: str, cfg: hift_lib.HiftConfig) -> dict[str, np.ndarray]:
  """hift.pt -> fac_jax weights by module path, weight norm folded, after checking that the file
  holds exactly the expected tensors (a `generator.` prefix is dropped, as CosyVoice's loader
  does)."""
  model = nnx.eval_shape(lambda: hift_lib.create(cfg))
  shapes = weights.shapes(model)
  names = hift_tensor_names(model)
  expected, sources = {}, {}  # sources: fac_jax name -> its tensors in the file, (g, v) if normed
  for theirs, ours in names.items():
    shape = _torch_layout(ours, shapes[ours])
    if _hift_weight_normed(theirs, len(shape)):
      stem = theirs.removesuffix('weight') + 'parametrizations.weight.'
      sources[ours] = (stem + 'original0', stem + 'original1')
      expected[stem + 'original0'] = (shape[0],) + (1,) * (len(shape) - 1)
      expected[stem + 'original1'] = shape
    else:
      sources[ours] = (theirs,)
      expected[theirs] = shape
  found = {name.removeprefix('generator.'): value
           for name, value in read_state_dict(path).items()}
  check_tensors(path, found, expected)
  folded = {}
  for ours, parts in sources.items():
    value = fold_weight_norm(*(found[p] for p in parts)) if len(parts) == 2 else found[parts[0]]
    folded[ours] = value.T if ours.endswith('kernel') else value
  return folded


def read_hift_config(path: str | None) -> hift_lib.HiftConfig:
  return _read_config(path, hift_lib.HiftConfig)


def convert_hift(hift_path: str, out: str, config_path: str | None = None,
                 flow_config_path: str | None = None) -> str:
  """hift.pt -> the folder `out` (must not exist), loadable with fac_jax.speech.hift.load. The
  flow's sizes (flow_config_path, default the released ones) enter the replay of the tables."""
  cfg = read_hift_config(config_path)
  arrays = hift_weights(hift_path, cfg)
  arrays['m_source.sine_waves'], arrays['m_source.rand_ini'] = hift_noise_tables(
      cfg, read_flow_config(flow_config_path))
  return weights.write(out, arrays, cfg.to_json())


def speaker_embedding(path: str, speaker: str, dim: int) -> np.ndarray:
  """The (dim,) x-vector of `speaker` in a spk2info.pt speaker table."""
  import torch
  table = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(table, dict) or speaker not in table:
    names = sorted(table) if isinstance(table, dict) else type(table).__name__
    raise ConversionError(f'{path}: no speaker {speaker!r} (it holds {names})')
  entry = table[speaker]
  embedding = entry.get('embedding') if isinstance(entry, dict) else None
  if not isinstance(embedding, torch.Tensor) or embedding.numel() != dim or \
      not embedding.is_floating_point():
    raise ConversionError(f'{path}: speaker {speaker!r} has no floating-point "embedding" of '
                          f'{dim} numbers')
  return embedding.detach().to(torch.float32).reshape(dim).numpy()


def convert_speaker(spk2info_path: str, out: str, speaker: str = detokenizer.DEFAULT_SPEAKER,
                    flow_config_path: str | None = None) -> str:
  """Writes out/speaker.json (which must not exist) with the speaker's x-vector, sized for the
  flow of flow_config_path (default the released sizes)."""
  path = os.path.join(out, detokenizer.SPEAKER_FILE)
  if os.path.exists(path):
    raise FileExistsError(f'{path} exists; refusing to overwrite it')
  embedding = speaker_embedding(spk2info_path, speaker,
                                read_flow_config(flow_config_path).spk_embed_dim)
  source = {'file': os.path.basename(spk2info_path), 'sha256': weights.sha256(spk2info_path)}
  os.makedirs(out, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(detokenizer.speaker_json(speaker, embedding, source))
  return path


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program (it is also a library)."""
  flags.DEFINE_string('flow', None, "CosyVoice 3's flow.pt.")
  flags.DEFINE_string('flow_config', None, 'The flow section of cosyvoice3.yaml as JSON (default: '
                      'the released sizes).')
  flags.DEFINE_string('hift', None, "CosyVoice 3's hift.pt.")
  flags.DEFINE_string('hift_config', None, 'The hift section of cosyvoice3.yaml as JSON (default: '
                      'the released sizes).')
  flags.DEFINE_string('spk2info', None, 'A speaker table, e.g. Fun-Audio-Chat\'s '
                      'utils/new_spk2info.pt.')
  flags.DEFINE_string('speaker', detokenizer.DEFAULT_SPEAKER, 'The speaker of --spk2info to keep.')
  flags.DEFINE_string('out', None, 'Output folder; each model goes to a subfolder that must not '
                      'exist, the speaker to speaker.json.', required=True)


def main(argv):
  del argv
  converted = []
  if flags.FLAGS.flow:
    converted.append(convert_flow(flags.FLAGS.flow, os.path.join(flags.FLAGS.out, 'flow'),
                                  flags.FLAGS.flow_config))
  if flags.FLAGS.hift:
    converted.append(convert_hift(flags.FLAGS.hift, os.path.join(flags.FLAGS.out, 'hift'),
                                  flags.FLAGS.hift_config, flags.FLAGS.flow_config))
  if flags.FLAGS.spk2info:
    converted.append(convert_speaker(flags.FLAGS.spk2info, flags.FLAGS.out, flags.FLAGS.speaker,
                                     flags.FLAGS.flow_config))
  if not converted:
    raise app.UsageError('nothing to convert: pass --flow, --hift and/or --spk2info')
  print('wrote ' + ', '.join(converted))


def run():
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
