"""Import the released Fun-Audio-Chat checkpoint layout into a fac_jax checkpoint, and export back.

  python -m fac_jax.checkpoints.convert import --hf_dir=DIR --out=CKPT [--dtype=bfloat16] [--mesh=data:1,fsdp:-1,tensor:1]
      [--without_tokenizer]
  python -m fac_jax.checkpoints.convert export --ckpt=CKPT --out=DIR [--max_shard_gb=5] [--dtype=bfloat16]

Import checks everything before writing anything (model_type, keys, shapes, truncated files),
then converts tensor by tensor: each parameter is assembled from memory-mapped safetensors and
placed straight onto its sharding, so host memory holds about one parameter at a time beyond
what the devices hold. Export streams the parameters back into safetensors shards with an index.
A failed import or export leaves nothing behind.
"""

import json
import os
import shutil
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
import tqdm

from fac_jax import cli, config as config_lib, sharding
from fac_jax.checkpoints import checkpoint, official_layout, safetensors_io, text_tokenizer
from fac_jax.model import fun_audio_chat

SIDE_FILES = ('config.json', 'generation_config.json', 'processor_config.json',
              'preprocessor_config.json') + text_tokenizer.TOKENIZER_FILES
UNUSED_TENSORS_FILE = 'unused_tensors.safetensors'
TORCH_DTYPES = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float16'}


class CheckpointError(ValueError):
  """The official checkpoint does not have what its config.json promises."""


def read_official_config(hf_dir: str, require_tokenizer: bool = False
                         ) -> tuple[dict, ml_collections.ConfigDict]:
  """config.json and our model config from it, special ids from the tokenizer files; without
  them, a refusal if `require_tokenizer`, else a warning."""
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.exists(path):
    raise CheckpointError(f'{hf_dir}: no config.json')
  with open(path) as f:
    hf_config = json.load(f)
  try:
    cfg = official_layout.config_from_official(hf_config, config_lib.default_config().model)
  except KeyError as e:
    raise CheckpointError(f'{path}: missing field {e}') from None
  except ValueError as e:  # its message starts with config.json
    raise CheckpointError(f'{hf_dir}/{e}') from None
  if any(os.path.exists(os.path.join(hf_dir, n)) for n in ('tokenizer.json', 'vocab.json')):
    ids = text_tokenizer.special_ids(text_tokenizer.load(hf_dir), hf_dir)
    for field in ('audio', 'audio_bos', 'audio_eos', 'sil'):
      if ids[field] != cfg.tokens[field]:
        raise CheckpointError(f'{hf_dir}: {text_tokenizer.SPECIAL_TOKENS[field]} is id {ids[field]} in '
                              f'the tokenizer but {cfg.tokens[field]} in config.json')
    cfg.tokens.update(ids)
  elif require_tokenizer:
    raise CheckpointError(f'{hf_dir} has no tokenizer files (tokenizer.json, or vocab.json with '
                          'merges.txt), which chat needs: copy them there, or pass '
                          '--without_tokenizer to import the weights alone')
  else:
    logging.warning('%s has no tokenizer files: special ids come from config.json; im_start and '
                    'im_end keep their defaults', hf_dir)
  return hf_config, cfg


def check_experts(tensors: safetensors_io.Checkpoint, maps, llm: ml_collections.ConfigDict
                  ) -> None:
  """Refuses, in one line naming the file, the tensor and what config.json expects, experts that
  are missing, beyond config.json's count, or routers of the wrong shape (before anything is
  built from the config)."""
  expert_maps = [m for m in maps if m.path[0] == 'llm' and len(m.stack) == 2]
  if not expert_maps:
    return
  num_experts = expert_maps[0].stack[1]
  index = os.path.join(tensors.folder, safetensors_io.INDEX_NAME)
  listing = index if os.path.exists(index) else tensors.folder
  promise = (f"config.json's text_config.num_experts is {num_experts} (experts 0 to "
             f'{num_experts - 1} in every layer)')
  found = set(tensors.keys())
  for m in expert_maps:
    for i, key in enumerate(m.keys):
      if key not in found:
        layer, expert = np.unravel_index(i, m.stack)
        raise CheckpointError(f'{listing}: no tensor {key} (expert {expert} of layer {layer}); '
                              f'{promise}')
  expected = {k for m in expert_maps for k in m.keys}
  for key in sorted(found - expected):
    match = official_layout.EXPERT_KEY.search(key)
    if match:
      raise CheckpointError(f'{tensors.path(key)}: tensor {key} is expert {match[2]} of layer '
                            f'{match[1]}, beyond what the config expects: {promise}')
  want = (num_experts, llm.hidden_size)
  for m in maps:
    if m.path[0] == 'llm' and m.path[-3:] == ('moe', 'router', 'kernel'):
      for key in m.keys:
        if key in found and tensors.shape(key) != want:
          raise CheckpointError(f'{tensors.path(key)}: tensor {key} has shape '
                                f'{list(tensors.shape(key))}; expected {list(want)} '
                                f'(num_experts, hidden_size): {promise}')


def check_tensors(tensors: safetensors_io.Checkpoint, maps, abstract_params: dict) -> None:
  """Refuses, listing every problem, if keys are missing or unexpected or shapes differ."""
  expected = {k for m in maps for k in m.keys}
  found = set(tensors.keys())
  problems = []
  missing = sorted(expected - found)
  if missing:
    problems.append(f'missing {len(missing)} keys: {missing[:20]}')
  unexpected = sorted(found - expected - set(official_layout.UNUSED_OFFICIAL_KEYS))
  if unexpected:
    problems.append(f'unexpected {len(unexpected)} keys: {unexpected[:20]}')
  for m in maps:
    want = official_layout.official_shape(official_layout.at_path(abstract_params, m.path).shape,
                                          m)
    for key in m.keys:
      if key in found and tensors.shape(key) != want:
        problems.append(f'{key}: expected shape {want}, found {tensors.shape(key)}')
  tied, embedding = 'audio_invert_tower.lm_head.weight', 'audio_tower.embed_tokens.weight'
  if tied in found and embedding in found and not np.array_equal(tensors.array(tied),
                                                                 tensors.array(embedding)):
    problems.append(f'{tied} differs from {embedding}; the model ties them (the official '
                    'tie_weights), so both must hold the same values')
  if problems:
    raise CheckpointError('official checkpoint refused:\n  ' + '\n  '.join(problems))


def import_checkpoint(hf_dir: str, out: str, dtype: str | None = None,
                      mesh: jax.sharding.Mesh | None = None,
                      require_tokenizer: bool = False) -> str:
  """Official folder -> fac_jax checkpoint at `out`, each parameter placed on its sharding over
  `mesh` (default: the mesh in scope, else one device). Returns the committed path."""
  hf_config, cfg = read_official_config(hf_dir, require_tokenizer)
  cfg.param_dtype = dtype or TORCH_DTYPES.get(hf_config.get('torch_dtype'), 'float32')
  try:
    tensors = safetensors_io.Checkpoint(hf_dir)
  except safetensors_io.FormatError as e:
    raise CheckpointError(str(e)) from None
  try:
    maps = official_layout.fun_audio_chat_maps(cfg)
  except ValueError as e:  # a layout the model cannot hold, e.g. dense and MoE layers mixed
    raise CheckpointError(f'{hf_dir}/config.json: {e}') from None
  check_experts(tensors, maps, cfg.llm)
  _, abstract_state = nnx.split(fun_audio_chat.abstract_model(cfg))
  abstract_params = nnx.to_pure_dict(abstract_state)
  check_tensors(tensors, maps, abstract_params)
  shardings = sharding.param_shardings(abstract_state, mesh or sharding.mesh_in_scope())

  writer = checkpoint.Writer(out, cfg)
  try:
    _write_parameters(writer, tensors, maps, abstract_params, shardings,
                      jnp.dtype(cfg.param_dtype))
    for name in SIDE_FILES:
      if os.path.exists(os.path.join(hf_dir, name)):
        writer.add_official_file(os.path.join(hf_dir, name))
    return writer.commit()
  except BaseException:
    writer.abort()
    raise


def _write_parameters(writer: checkpoint.Writer, tensors: safetensors_io.Checkpoint, maps,
                      abstract_params: dict, shardings: dict, target: np.dtype) -> None:
  """Every mapped parameter, converted to `target` on its sharding, and the unused tensors."""
  total = sum(int(np.prod(tensors.shape(k))) * target.itemsize for m in maps for k in m.keys)
  with tqdm.tqdm(total=total, unit='B', unit_scale=True, desc='import') as progress:
    for m in maps:
      # On CPU the device array aliases read_block's buffer: one copy of the parameter in memory.
      array = jax.make_array_from_callback(
          official_layout.at_path(abstract_params, m.path).shape,
          official_layout.at_path(shardings, m.path),
          lambda index, m=m: official_layout.read_block(tensors.slice, m, index, target))
      writer.add(m.path, array)
      progress.update(array.size * target.itemsize)
      del array
  unused = [k for k in official_layout.UNUSED_OFFICIAL_KEYS if k in tensors.keys()]
  if unused:
    shards = safetensors_io.plan_shards(
        [(k, tensors.shape(k), tensors.dtype(k)) for k in unused], 1 << 62)
    shards_dir = os.path.join(writer.dir, checkpoint.OFFICIAL, 'unused')
    os.makedirs(shards_dir)
    safetensors_io.write_sharded(shards_dir, shards, (tensors.array(k) for k in unused))


def export_checkpoint(ckpt: str, out: str, max_shard_bytes: int = 5 << 30,
                      dtype: str | None = None) -> str:
  """fac_jax checkpoint -> official folder at `out` (safetensors shards, index, config.json)."""
  cfg = checkpoint.load_config(ckpt)
  official_dir = os.path.join(ckpt, checkpoint.OFFICIAL)
  template = {}
  if os.path.exists(os.path.join(official_dir, 'config.json')):
    with open(os.path.join(official_dir, 'config.json')) as f:
      template = json.load(f)
  hf_config = official_layout.config_to_official(cfg, template)
  dtype = dtype or hf_config.get('torch_dtype') or cfg.param_dtype
  hf_config['torch_dtype'] = dtype
  target = np.dtype(jnp.dtype(dtype))

  final = os.path.abspath(out)
  if os.path.exists(final):
    raise FileExistsError(f'{final} exists; refusing to overwrite')

  maps = official_layout.fun_audio_chat_maps(cfg)
  saved = checkpoint.saved_shapes(ckpt)
  unused_dir = os.path.join(official_dir, 'unused')
  unused = safetensors_io.Checkpoint(unused_dir) if os.path.isdir(unused_dir) else None
  plan = []
  for m in maps:
    shape, _ = official_layout.at_path(saved, m.path)
    plan += [(k, official_layout.official_shape(shape, m), target) for k in m.keys]
  if unused is not None:
    plan += [(k, unused.shape(k), unused.dtype(k)) for k in unused.keys()]

  reader = checkpoint.Reader(ckpt)

  def arrays():
    for m in tqdm.tqdm(maps, desc='export', unit='parameter'):
      leaf = np.asarray(jax.device_get(official_layout.at_path(reader.load(paths=[m.path]),
                                                               m.path)))
      for i in range(len(m.keys)):
        yield official_layout.official_tensor(leaf, m, i)
      del leaf
      checkpoint.release_freed_memory()
    if unused is not None:
      for k in unused.keys():
        yield unused.array(k)

  work = final + '.incomplete'
  shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work)
  try:
    safetensors_io.write_sharded(work, safetensors_io.plan_shards(plan, max_shard_bytes),
                                 arrays())
    with open(os.path.join(work, 'config.json'), 'w') as f:
      json.dump(hf_config, f, indent=2)
    for name in SIDE_FILES:
      if name != 'config.json' and os.path.exists(os.path.join(official_dir, name)):
        shutil.copy(os.path.join(official_dir, name), work)
  except BaseException:
    shutil.rmtree(work, ignore_errors=True)
    raise
  os.rename(work, final)
  return final


FLAGS = flags.FLAGS
flags.DEFINE_string('hf_dir', None, 'import: the official checkpoint folder.')
flags.DEFINE_string('ckpt', None, 'export: the fac_jax checkpoint.')
flags.DEFINE_string('out', None, 'Where to write (must not exist).')
flags.DEFINE_string('dtype', None, 'Parameter dtype to write (default: as stored).')
flags.DEFINE_string('mesh', None, 'import: place parameters on this mesh, e.g. '
                    'data:1,fsdp:-1,tensor:1 (default: one device).')
flags.DEFINE_float('max_shard_gb', 5.0, 'export: size limit of one safetensors shard.')
flags.DEFINE_bool('without_tokenizer', False, 'import: accept a folder without tokenizer files '
                  '(special ids from config.json); chat cannot read the result until they are '
                  'put in CKPT/official/.')


def main(argv):
  if len(argv) != 2 or argv[1] not in ('import', 'export'):
    raise app.UsageError('usage: python -m fac_jax.checkpoints.convert import|export --out=... ')
  if not FLAGS.out:
    raise app.UsageError('--out is required')
  if argv[1] == 'import' and not FLAGS.hf_dir:
    raise app.UsageError('import needs --hf_dir')
  if argv[1] == 'export' and not FLAGS.ckpt:
    raise app.UsageError('export needs --ckpt')
  start = time.time()
  try:
    if argv[1] == 'import':
      mesh = sharding.mesh_from_flag(FLAGS.mesh) if FLAGS.mesh else None
      path = import_checkpoint(FLAGS.hf_dir, FLAGS.out, FLAGS.dtype, mesh,
                               require_tokenizer=not FLAGS.without_tokenizer)
    else:
      path = export_checkpoint(FLAGS.ckpt, FLAGS.out, int(FLAGS.max_shard_gb * (1 << 30)),
                               FLAGS.dtype)
  except (CheckpointError, checkpoint.CheckpointReadError, OSError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'{argv[1]}: wrote {path} in {time.time() - start:.1f} s')


def run():
  """Console-script entry point."""
  cli.run(main)


if __name__ == '__main__':
  run()
