"""Merge fac_jax checkpoints leaf by leaf (Core-Cocktail, DESIGN.md section 2), or fold LoRA
adapters into their base, e.g.

  python -m fac_jax.merging.merge --method=linear --alpha=0.5 --base=M0 --finetuned=M1 --out=MR \
      --include='^llm/'
  python -m fac_jax.merging.merge --method=lora --base=M0 --adapters=RUN/final --out=M1

An adapter checkpoint (fac_jax.checkpoints.adapters) given as a fine-tune is read as the model it
makes, its adapters folded into its base's weights: in any method it is a task vector
(alpha/rank)·A·B plus what it trained fully.

Methods and their flags: linear (--alpha, one weight per fine-tune), task_arithmetic (--scale),
ties (--density, --scale), dare (--drop_rate, --scale, --seed), slerp (--alpha); see
fac_jax.merging.methods. --base is a fac_jax checkpoint (it may hold only some leaves, e.g. `llm/...`,
as long as it has every leaf the selection merges) or a Hugging Face Qwen3 (or, for an MoE LLM,
Qwen3-MoE with per-expert tensors) causal-LM folder, whose weights are mapped onto our `llm/`
subtree. Leaves are named by path, so --include/--exclude can single out an MoE LLM's router
(`moe/router`) or experts (`moe/(gate|up|down)_proj`). Everything is checked from metadata
before anything is written; then each leaf is read from every input, merged and written before
the next is read, so host memory holds the inputs' and the merged copies of one leaf (small
leaves are read a few together) plus the buffers of one orbax read (about two more copies while
it decodes), never the model. The output gets the first fine-tune's config.json, official/ and
chat/ files and is committed atomically.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import shutil
import time

from absl import app, flags
import jax
import ml_collections
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx
import tqdm

from fac_jax import cli, sharding
from fac_jax.checkpoints import adapters, checkpoint, official_layout, safetensors_io
from fac_jax.merging import methods
from fac_jax.model import fun_audio_chat, lora, moe
from fac_jax.train import optim

Path = tuple[str, ...]
# Hugging Face Qwen3 config.json field -> our LLM config field, for the sizes that must agree.
QWEN3_SIZES = {'vocab_size': 'vocab_size', 'num_hidden_layers': 'num_layers',
               'hidden_size': 'hidden_size', 'num_attention_heads': 'num_heads',
               'num_key_value_heads': 'num_kv_heads', 'head_dim': 'head_dim',
               'intermediate_size': 'mlp_dim'}
# Hugging Face Qwen3-MoE config.json field -> our `moe` field, for those that shape the leaves.
QWEN3_MOE_SIZES = {theirs: ours for theirs, ours in official_layout.MOE_FIELDS.items()
                   if theirs in ('num_experts', 'moe_intermediate_size', 'decoder_sparse_step',
                                 'mlp_only_layers')}
MAX_LISTED_PROBLEMS = 20


class MergeError(ValueError):
  """The inputs cannot be merged as asked; nothing was written."""


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, tuple]:
  flat = {}
  for name, node in tree.items():
    if isinstance(node, Mapping):
      flat.update(_flatten(node, prefix + (name,)))
    else:
      flat[prefix + (name,)] = node
  return flat


def nest(flat: Mapping[Path, object]) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = leaf
  return tree


class CheckpointLeaves:
  """The leaves of a fac_jax checkpoint, read a few at a time into given shardings."""

  compare_dtypes = True

  def __init__(self, ckpt_dir: str):
    try:
      checkpoint.load_config(ckpt_dir)
      self.shapes: dict[Path, tuple] = _flatten(checkpoint.saved_shapes(ckpt_dir))
    except (FileNotFoundError, checkpoint.CheckpointReadError) as e:
      raise MergeError(str(e)) from None
    self.name = ckpt_dir

  def read(self, paths: Sequence[Path], shardings: Mapping[Path, jax.sharding.Sharding]
           ) -> dict[Path, jax.Array]:
    """These leaves as stored (orbax reads only the leaves not left as placeholders)."""
    if not paths:
      return {}
    abstract = {path: ocp.PLACEHOLDER for path in self.shapes}
    for path in paths:
      abstract[path] = jax.ShapeDtypeStruct(*self.shapes[path], sharding=shardings[path])
    try:
      loaded = _flatten(checkpoint.read_params(self.name, nest(abstract)))
    except checkpoint.CheckpointReadError as e:
      raise MergeError(str(e)) from None
    return {path: loaded[path] for path in paths}


def qwen3_causal_lm_maps(hf_dir: str, llm_config: ml_collections.ConfigDict
                         ) -> tuple[safetensors_io.Checkpoint, list[official_layout.TensorMap]]:
  """The tensors of a Hugging Face Qwen3 causal-LM folder and where each goes in our `llm/`
  subtree (plain `model.*` and `lm_head` names; the official Fun-Audio-Chat folder puts the same
  under `language_model.`). Refuses other model types, sizes that differ from `llm_config`, and
  missing or unexpected tensors; leaf shapes are checked against the fine-tunes' by
  `check_inputs`."""
  config_path = os.path.join(hf_dir, 'config.json')
  with open(config_path) as f:
    hf_config = json.load(f)
  sparse = moe.is_sparse_stack(llm_config)
  model_type = 'qwen3_moe' if sparse else 'qwen3'
  if hf_config.get('model_type') != model_type:
    raise MergeError(f'{config_path}: model_type is {hf_config.get("model_type")!r}; a base '
                     f'folder for this LLM must be a Hugging Face {model_type!r} causal LM')
  hf_config.setdefault('head_dim', hf_config['hidden_size'] // hf_config['num_attention_heads'])
  sizes = {theirs: llm_config[ours] for theirs, ours in QWEN3_SIZES.items()}
  if sparse:  # every layer MoE: the dense MLP width sizes none of them
    del sizes['intermediate_size']
    sizes.update({theirs: llm_config.moe[ours] for theirs, ours in QWEN3_MOE_SIZES.items()})
    sizes['mlp_only_layers'] = list(sizes['mlp_only_layers'])
  found = {theirs: official_layout.official_field(hf_config, theirs, None) for theirs in sizes}
  wrong = [f'{theirs} is {found[theirs]}, ours {ours}'
           for theirs, ours in sizes.items() if found[theirs] != ours]
  if wrong:
    raise MergeError(f'{config_path}: sizes differ from the fine-tuned LLM: ' + '; '.join(wrong))
  try:
    tensors = safetensors_io.Checkpoint(hf_dir)
  except safetensors_io.FormatError as e:
    raise MergeError(f'base {hf_dir}: {e}') from None
  maps = official_layout.causal_lm_maps(llm_config, prefix='', path=('llm',))
  expected = {key for m in maps for key in m.keys}
  found = set(tensors.keys())
  missing, unexpected = sorted(expected - found), sorted(found - expected)
  if missing or unexpected:
    raise MergeError(f'base {hf_dir}: missing tensors {missing[:MAX_LISTED_PROBLEMS]}, '
                     f'unexpected tensors {unexpected[:MAX_LISTED_PROBLEMS]}')
  uneven = [f'{m.keys[0]} is {tensors.shape(m.keys[0])}, {key} is {tensors.shape(key)}'
            for m in maps for key in m.keys if tensors.shape(key) != tensors.shape(m.keys[0])]
  if uneven:
    raise MergeError(f'base {hf_dir}: layers differ in shape: {uneven[:MAX_LISTED_PROBLEMS]}')
  return tensors, maps


class CausalLMLeaves:
  """The `llm/` leaves of a Hugging Face Qwen3 causal-LM folder in our layout, read in float32
  (the merge's compute dtype) whatever dtype the folder stores."""

  compare_dtypes = False

  def __init__(self, hf_dir: str, llm_config: ml_collections.ConfigDict):
    self.name = hf_dir
    self.tensors, maps = qwen3_causal_lm_maps(hf_dir, llm_config)
    self.maps = {m.path: m for m in maps}
    self.shapes = {m.path: (self._our_shape(m), np.dtype(methods.COMPUTE_DTYPE)) for m in maps}

  def _our_shape(self, m: official_layout.TensorMap) -> tuple[int, ...]:
    shape = self.tensors.shape(m.keys[0])
    shape = tuple(reversed(shape)) if m.layout in ('linear', 'conv1d') else shape
    return m.stack + shape

  def read(self, paths: Sequence[Path], shardings: Mapping[Path, jax.sharding.Sharding]
           ) -> dict[Path, jax.Array]:
    return {path: jax.make_array_from_callback(
        self.shapes[path][0], shardings[path],
        lambda index, m=self.maps[path]: official_layout.read_block(
            self.tensors.slice, m, index, methods.COMPUTE_DTYPE)) for path in paths}


class AdapterLeaves:
  """An adapter checkpoint read as the model it makes: its base's leaves (the base checked against
  the fingerprint it records; itself a checkpoint or adapter checkpoint), its fully trained
  leaves in place, and each adapted kernel with W + (alpha/rank)·A·B folded in as it is read."""

  compare_dtypes = True

  def __init__(self, ckpt_dir: str, base: str | None = None):
    try:
      self.lora = adapters.lora_config(adapters.read_settings(ckpt_dir))
      self.base = open_checkpoint(adapters.checked_base(ckpt_dir, base))
    except adapters.AdapterError as e:
      raise MergeError(str(e)) from None
    self.trained = CheckpointLeaves(ckpt_dir)
    self.shapes = dict(self.base.shapes)
    self.name = ckpt_dir

  def read(self, paths: Sequence[Path], shardings: Mapping[Path, jax.sharding.Sharding]
           ) -> dict[Path, jax.Array]:
    own = [path for path in paths if path in self.trained.shapes]
    leaves = {**self.base.read([p for p in paths if p not in self.trained.shapes], shardings),
              **self.trained.read(own, shardings)}
    adapted = lambda path: path[-1] == 'kernel' and (
        path[:-1] + (lora.ADAPTER_NAMES[0],) in self.trained.shapes)
    pairs = {path: tuple(path[:-1] + (name,) for name in lora.ADAPTER_NAMES)
             for path in paths if adapted(path)}
    if pairs:  # the group's adapters in one read; they are small: replicated
      replicated = jax.sharding.NamedSharding(shardings[next(iter(pairs))].mesh,
                                              jax.sharding.PartitionSpec())
      wanted = [name for pair in pairs.values() for name in pair]
      factors = self.trained.read(wanted, dict.fromkeys(wanted, replicated))
      for path, (a, b) in pairs.items():
        leaves[path] = lora.fold_kernel(leaves[path], factors[a], factors[b],
                                        lora.scale(self.lora))
    return leaves


def open_checkpoint(path: str) -> CheckpointLeaves | AdapterLeaves:
  """A fac_jax checkpoint's leaves; an adapter checkpoint's as the model it makes."""
  return AdapterLeaves(path) if adapters.is_adapter_checkpoint(path) else CheckpointLeaves(path)


def open_base(base: str, llm_config: ml_collections.ConfigDict
              ) -> CheckpointLeaves | CausalLMLeaves:
  """A fac_jax checkpoint, or else a Hugging Face Qwen3 folder mapped onto our `llm/` leaves."""
  if os.path.isdir(os.path.join(base, checkpoint.PARAMS)):
    return open_checkpoint(base)
  if os.path.exists(os.path.join(base, 'config.json')):
    return CausalLMLeaves(base, llm_config)
  raise MergeError(f'base {base}: neither a fac_jax checkpoint ({checkpoint.PARAMS}/ and '
                   'config.json) nor a Hugging Face folder (config.json and safetensors)')


def _describe(shape_dtype: tuple) -> str:
  shape, dtype = shape_dtype
  return f'{list(shape)} {dtype}'


def check_inputs(base: CheckpointLeaves | CausalLMLeaves, finetuned: Sequence[CheckpointLeaves],
                 include: str | None, exclude: str | None) -> list[Path]:
  """The paths the selection merges; refuses, listing the problems with leaf paths, shapes and
  dtypes, if the fine-tunes differ in leaves, shapes or dtypes, if the base has a leaf they lack
  or differs in one they share, or if the base lacks a selected leaf."""
  reference = finetuned[0]
  name = optim.path_name
  problems = []
  for other in finetuned[1:]:
    for path in sorted(reference.shapes.keys() - other.shapes.keys()):
      problems.append(f'{other.name} lacks leaf {name(path)} '
                      f'({_describe(reference.shapes[path])} in {reference.name})')
    for path in sorted(other.shapes.keys() - reference.shapes.keys()):
      problems.append(f'{other.name} has leaf {name(path)}, which {reference.name} lacks')
    for path in sorted(other.shapes.keys() & reference.shapes.keys()):
      if other.shapes[path] != reference.shapes[path]:
        problems.append(f'leaf {name(path)}: {_describe(other.shapes[path])} in {other.name}, '
                        f'{_describe(reference.shapes[path])} in {reference.name}')
  for path in sorted(base.shapes.keys() - reference.shapes.keys()):
    problems.append(f'base {base.name} has leaf {name(path)}, which {reference.name} lacks')
  for path in sorted(base.shapes.keys() & reference.shapes.keys()):
    (base_shape, base_dtype), (shape, dtype) = base.shapes[path], reference.shapes[path]
    if base_shape != shape or (base.compare_dtypes and base_dtype != dtype):
      problems.append(f'leaf {name(path)}: {_describe(base.shapes[path])} in base '
                      f'{base.name}, {_describe(reference.shapes[path])} in {reference.name}')
  selected = [path for path in sorted(reference.shapes)
              if methods.is_selected(name(path), include, exclude)]
  lacking = [name(path) for path in selected if path not in base.shapes]
  if lacking:
    problems.append(f'base {base.name} lacks {len(lacking)} leaves that --include/--exclude '
                    f'select (narrow the selection, e.g. --include=^llm/): {lacking}')
  if problems:
    listed = problems[:MAX_LISTED_PROBLEMS]
    if len(problems) > len(listed):
      listed.append(f'... and {len(problems) - len(listed)} more')
    raise MergeError('refusing to merge:\n  ' + '\n  '.join(listed))
  return selected


def leaf_shardings(model_config: ml_collections.ConfigDict, paths: Sequence[Path],
                   mesh: jax.sharding.Mesh | None) -> dict[Path, jax.sharding.Sharding]:
  """Each leaf's sharding on `mesh` as the model lays it out; the mesh in scope (by default one
  device), replicated, without one."""
  if mesh is None:
    replicated = jax.sharding.NamedSharding(sharding.mesh_in_scope(), jax.sharding.PartitionSpec())
    return {path: replicated for path in paths}
  _, abstract_state = nnx.split(fun_audio_chat.abstract_model(model_config))
  model_shardings = _flatten(sharding.param_shardings(abstract_state, mesh))
  unknown = [optim.path_name(path) for path in paths if path not in model_shardings]
  if unknown:
    raise MergeError(f'--mesh lays leaves out as the model in config.json does, which has no '
                     f'{unknown[:MAX_LISTED_PROBLEMS]}')
  return {path: model_shardings[path] for path in paths}


@dataclasses.dataclass(frozen=True)
class Summary:
  """What a merge wrote."""
  path: str
  leaves: int
  merged_leaves: int
  bytes_written: int
  seconds: float


def merge_checkpoints(method: str, base: str, finetuned: Sequence[str], out: str, *,
                      include: str | None = None, exclude: str | None = None,
                      mesh: jax.sharding.Mesh | None = None, read_batch_bytes: int = 64 << 20,
                      **args) -> Summary:
  """Merges the selected leaves of fac_jax checkpoints `finetuned` over `base` (see the module
  docstring) into a new checkpoint at `out`; the other leaves come from finetuned[0]. Leaves are
  read in groups of at most `read_batch_bytes` (a larger leaf alone), to spare small leaves the
  per-read overhead of orbax."""
  start = time.time()
  if os.path.exists(out):
    raise MergeError(f'{out} exists; refusing to overwrite')
  try:
    args = methods.method_args(method, len(finetuned), **args)
  except ValueError as e:
    raise MergeError(str(e)) from None
  # lora folds the adapters onto --base itself: checked against the base they record.
  inputs = ([AdapterLeaves(finetuned[0], base)] if method == 'lora' else
            [open_checkpoint(path) for path in finetuned])
  model_config = checkpoint.load_config(finetuned[0])
  base_leaves = open_base(base, model_config.llm)
  selected = set(check_inputs(base_leaves, inputs, include, exclude))
  shapes = inputs[0].shapes
  shardings = leaf_shardings(model_config, sorted(shapes), mesh)
  total = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in shapes.values())

  # Saving as often as reading keeps a merged leaf from waiting in memory while the next are read.
  writer = checkpoint.Writer(out, model_config, batch_bytes=read_batch_bytes)
  try:
    with tqdm.tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024,
                   desc=f'merge ({method})') as progress:
      plan = [(path, *shapes[path]) for path in sorted(shapes)]
      for group in safetensors_io.plan_shards(plan, read_batch_bytes):
        paths = [path for path, _, _ in group]
        merged_paths = [path for path in paths if path in selected]
        firsts = inputs[0].read(paths, shardings)
        others = [source.read(merged_paths, shardings) for source in inputs[1:]]
        bases = base_leaves.read(merged_paths, shardings)
        for path in paths:
          leaf = firsts.pop(path)
          if path in selected:
            models = [leaf] + [leaves.pop(path) for leaves in others]
            leaf = methods.merge_leaf(method, optim.path_name(path), bases.pop(path), models,
                                      **args)
            del models
          writer.add(path, leaf)
          progress.update(leaf.nbytes)
          del leaf
        checkpoint.release_freed_memory()
    # An adapter checkpoint's official/ files go over its base's: the export needs the base's.
    sources = ([inputs[0].base.name] if isinstance(inputs[0], AdapterLeaves) else []) + [
        finetuned[0]]
    for source_dir in sources:
      for folder in (checkpoint.OFFICIAL, checkpoint.CHAT):
        source = os.path.join(source_dir, folder)
        if jax.process_index() == 0 and os.path.isdir(source):
          shutil.copytree(source, os.path.join(writer.dir, folder), dirs_exist_ok=True)
    path = writer.commit()
  except BaseException:
    writer.abort()
    raise
  return Summary(path, len(shapes), len(selected), total, time.time() - start)


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program (it is also a library)."""
  flags.DEFINE_enum('method', 'linear', sorted(methods.METHODS), 'Merge method.')
  flags.DEFINE_string('base', None, 'The original model M_0: a fac_jax checkpoint or a Hugging '
                      'Face Qwen3 (Qwen3-MoE for an MoE LLM) folder.', required=True)
  flags.DEFINE_list('finetuned', None, 'Fine-tuned fac_jax checkpoints (or adapter checkpoints), '
                    'comma-separated.')
  flags.DEFINE_string('adapters', None, 'lora: the adapter checkpoint to fold into --base.')
  flags.DEFINE_string('out', None, 'Checkpoint to write (must not exist).', required=True)
  flags.DEFINE_string('include', None, 'Merge only leaves whose path matches this regex '
                      '(re.search on e.g. llm/decoder/layers/mlp/up_proj/kernel).')
  flags.DEFINE_string('exclude', None, 'Do not merge leaves whose path matches this regex.')
  flags.DEFINE_list('alpha', None, 'linear: weight of each fine-tune; slerp: position from base '
                    '(0) to the fine-tune (1).')
  flags.DEFINE_float('density', None, 'ties: fraction of each task vector kept.')
  flags.DEFINE_float('drop_rate', None, 'dare: probability of dropping a task-vector entry.')
  flags.DEFINE_float('scale', None, 'task_arithmetic, ties, dare: λ on the merged task vector '
                     '(default 1).')
  flags.DEFINE_integer('seed', None, 'dare: seed of the drop masks (default 0).')
  flags.DEFINE_string('mesh', None, 'Read and merge each leaf sharded on this mesh, e.g. '
                      'data:1,fsdp:-1,tensor:1 (default: one device).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS
  args = {name: FLAGS[name].value for name in ('alpha', 'density', 'drop_rate', 'scale', 'seed')
          if FLAGS[name].value is not None}
  if 'alpha' in args:
    args['alpha'] = [float(a) for a in args['alpha']]
  mesh = sharding.mesh_from_flag(FLAGS.mesh) if FLAGS.mesh else None
  if FLAGS.method == 'lora' and (not FLAGS.adapters or FLAGS.finetuned):
    raise app.UsageError('--method=lora takes --adapters, not --finetuned')
  if FLAGS.method != 'lora' and (FLAGS.adapters or not FLAGS.finetuned):
    raise app.UsageError(f'--method={FLAGS.method} takes --finetuned (--adapters is lora\'s)')
  try:
    summary = merge_checkpoints(FLAGS.method, FLAGS.base, FLAGS.finetuned or [FLAGS.adapters],
                                FLAGS.out,
                                include=FLAGS.include, exclude=FLAGS.exclude, mesh=mesh, **args)
  except MergeError as e:
    raise SystemExit(f'merge: {e}') from None
  print(f'merge ({FLAGS.method}): {summary.merged_leaves} of {summary.leaves} leaves merged, '
        f'{summary.bytes_written / 2**30:.2f} GiB written to {summary.path} in '
        f'{summary.seconds:.1f} s ({summary.bytes_written / 2**30 / summary.seconds:.2f} GiB/s)')


def run():
  """Console-script entry point."""
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
