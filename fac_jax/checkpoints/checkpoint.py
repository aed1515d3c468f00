"""Our model checkpoint folder: written leaf by leaf and committed atomically, read into shardings.

  CKPT/config.json            our model config (fac_jax.config fields under "model")
  CKPT/params/                the parameter pytree, an orbax checkpoint
  CKPT/official/              files of the official folder it came from (config.json, tokenizer,
                              processor and generation configs), kept for export; a trained
                              checkpoint's text tokenizer
  CKPT/chat/                  what `chat` needs of a trained checkpoint: settings.json (its
                              training tasks with their system prompts, its speech tokenizer) and
                              the k-means speech_tokenizer.npz it speaks
A checkpoint is built in CKPT.incomplete/ and renamed to CKPT only once everything is written,
so an interrupted write never leaves a folder that looks complete.
"""

from collections.abc import Iterable
import ctypes
import dataclasses
import json
import os
import shutil

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from fac_jax import sharding
from fac_jax.checkpoints import text_tokenizer
from fac_jax.model import fun_audio_chat

PARAMS = 'params'
OFFICIAL = 'official'
CHAT = 'chat'
CHAT_SETTINGS = 'settings.json'
SPEECH_TOKENIZER_FILE = 'speech_tokenizer.npz'


class CheckpointReadError(ValueError):
  """A checkpoint whose parameter files cannot be read (truncated or corrupt)."""


@dataclasses.dataclass(frozen=True)
class ChatAssets:
  """What `chat` needs beyond the parameters: the text tokenizer (its files go to official/), the
  training tasks with their system prompts, and the speech tokenizer (a k-means .npz is copied
  into chat/, another kind only recorded)."""
  tokenizer_dir: str
  tasks: dict  # task -> system, question and answer ('speech' or 'text'), conversations
  speech_tokenizer: dict  # kind, vocab_size, fingerprint and file, as fac_jax.data.prepare records


class Writer:
  """Writes a checkpoint: `add` leaves (saved in batches of at most `batch_bytes`, or one leaf
  when it is larger), then `commit`."""

  def __init__(self, ckpt_dir: str, model_config: ml_collections.ConfigDict,
               batch_bytes: int = 256 << 20):
    self.final_dir = os.path.abspath(ckpt_dir)
    if os.path.exists(self.final_dir):
      raise FileExistsError(f'{self.final_dir} exists; refusing to overwrite a checkpoint')
    self.dir = self.final_dir + '.incomplete'
    if jax.process_index() == 0:  # every process writes its shards; one manages the folder
      shutil.rmtree(self.dir, ignore_errors=True)  # leftovers of an interrupted write
      os.makedirs(os.path.join(self.dir, OFFICIAL))
      with open(os.path.join(self.dir, 'config.json'), 'w') as f:
        f.write(ml_collections.ConfigDict({'model': model_config}).to_json(indent=2))
    multihost_utils.sync_global_devices(f'checkpoint writer started: {self.dir}')
    self.batch_bytes = batch_bytes
    self._pending: dict = {}
    self._pending_bytes = 0

  def add(self, path: tuple[str, ...], array) -> None:
    if self._pending_bytes + array.nbytes > self.batch_bytes:
      self.flush()
    node = self._pending
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = array
    self._pending_bytes += array.nbytes
    if self._pending_bytes >= self.batch_bytes:  # save a large leaf before the next is made
      self.flush()

  def flush(self) -> None:
    if self._pending:
      ocp.partial.save(os.path.join(self.dir, PARAMS), self._pending)
      self._pending, self._pending_bytes = {}, 0
      release_freed_memory()

  def add_official_file(self, source: str) -> None:
    if jax.process_index() == 0:
      shutil.copy(source, os.path.join(self.dir, OFFICIAL, os.path.basename(source)))

  def add_chat_assets(self, assets: ChatAssets) -> None:
    for name in text_tokenizer.TOKENIZER_FILES:
      if os.path.exists(os.path.join(assets.tokenizer_dir, name)):
        self.add_official_file(os.path.join(assets.tokenizer_dir, name))
    if jax.process_index() == 0:
      folder = os.path.join(self.dir, CHAT)
      os.makedirs(folder)
      speech = dict(assets.speech_tokenizer)
      if speech['file'].endswith('.npz'):
        shutil.copy(speech['file'], os.path.join(folder, SPEECH_TOKENIZER_FILE))
        speech['file'] = SPEECH_TOKENIZER_FILE
      with open(os.path.join(folder, CHAT_SETTINGS), 'w') as f:
        json.dump({'tasks': assets.tasks, 'speech_tokenizer': speech}, f, indent=2)

  def abort(self) -> None:
    """Removes what was written, after a failure (a later Writer would remove it too)."""
    if jax.process_index() == 0:
      shutil.rmtree(self.dir, ignore_errors=True)

  def commit(self) -> str:
    self.flush()
    ocp.partial.finalize(os.path.join(self.dir, PARAMS))
    multihost_utils.sync_global_devices(f'checkpoint written: {self.dir}')
    if jax.process_index() == 0:
      os.rename(self.dir, self.final_dir)
    multihost_utils.sync_global_devices(f'checkpoint committed: {self.final_dir}')
    return self.final_dir


def save_params(ckpt_dir: str, model_config: ml_collections.ConfigDict, params: dict,
                assets: ChatAssets | None = None) -> str:
  """Writes a parameter tree (nested dicts of arrays), with `assets` if given, as a checkpoint;
  returns its path."""
  writer = Writer(ckpt_dir, model_config)
  try:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      writer.add(tuple(k.key for k in path), leaf)
    if assets is not None:
      writer.add_chat_assets(assets)
    return writer.commit()
  except BaseException:
    writer.abort()
    raise


def chat_settings(ckpt_dir: str) -> dict:
  """chat/settings.json ({'tasks': ..., 'speech_tokenizer': ...}); {} where there is none (e.g. an
  imported checkpoint)."""
  path = os.path.join(ckpt_dir, CHAT, CHAT_SETTINGS)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def load_config(ckpt_dir: str) -> ml_collections.ConfigDict:
  path = os.path.join(ckpt_dir, 'config.json')
  if not os.path.exists(os.path.join(ckpt_dir, PARAMS)) or not os.path.exists(path):
    raise FileNotFoundError(f'{ckpt_dir} is not a complete fac_jax checkpoint (needs config.json '
                            f'and {PARAMS}/)')
  with open(path) as f:
    # JSON has no tuples: sequences come back as the configs write them (moe.mlp_only_layers).
    return ml_collections.ConfigDict(json.load(f, object_hook=_lists_as_tuples)['model'])


def _lists_as_tuples(mapping: dict) -> dict:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in mapping.items()}


def release_freed_memory() -> None:
  """Returns freed heap pages to the OS (glibc keeps them otherwise), so that the peak resident
  memory of a leaf-by-leaf conversion follows the leaf in flight, not every leaf seen so far."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass


def _is_shape_dtype(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], np.dtype)


def _innermost(error: BaseException) -> str:
  """The first line of the error at the bottom of `error`'s chain: orbax wraps tensorstore's
  one-line reason in pages of its spec."""
  seen = set()
  while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_params(ckpt_dir: str, abstract) -> dict:
  """The leaves of params/ that `abstract` asks for; a truncated or corrupt file raises
  CheckpointReadError naming the checkpoint and the failed read."""
  try:
    return ocp.load(os.path.join(ckpt_dir, PARAMS), abstract)
  except Exception as e:  # orbax raises bare Exceptions
    raise CheckpointReadError(f'{ckpt_dir}: cannot read its parameters (truncated or corrupt '
                              f'files?): {_innermost(e)}') from None


def saved_shapes(ckpt_dir: str) -> dict:
  """The saved parameter tree with (shape, dtype) leaves, read from metadata only."""
  try:
    metadata = ocp.metadata(os.path.join(ckpt_dir, PARAMS)).metadata
  except Exception as e:  # orbax raises bare Exceptions
    raise CheckpointReadError(f'{ckpt_dir}: cannot read its parameter metadata (truncated or '
                              f'corrupt files?): {_innermost(e)}') from None
  return jax.tree.map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), metadata,
                      is_leaf=lambda m: hasattr(m, 'shape'))


class Reader:
  """Reads a checkpoint's parameters straight into their shardings on `mesh` (default: the mesh
  in scope, else one device)."""

  def __init__(self, ckpt_dir: str, mesh: jax.sharding.Mesh | None = None):
    self.dir = ckpt_dir
    self.config = load_config(ckpt_dir)
    _, abstract_state = nnx.split(fun_audio_chat.abstract_model(self.config))
    self.shardings = sharding.param_shardings(abstract_state, mesh or sharding.mesh_in_scope())
    self.shapes = jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(abstract_state))
    found = jax.tree.map(lambda s: s[0], saved_shapes(ckpt_dir), is_leaf=_is_shape_dtype)
    if found != self.shapes:
      raise ValueError(f'{ckpt_dir}: saved parameter shapes do not match its config.json')

  def load(self, dtype=None, paths: Iterable[tuple[str, ...]] | None = None) -> dict:
    """The parameter tree, cast to `dtype` (default: the config's param_dtype); with `paths`,
    only those leaves (the others hold Ellipsis)."""
    dtype = jnp.dtype(dtype or self.config.param_dtype)
    abstract = jax.tree.map(lambda shape, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s),
                            self.shapes, self.shardings, is_leaf=lambda x: isinstance(x, tuple))
    if paths is not None:
      wanted = {tuple(p) for p in paths}
      abstract = jax.tree_util.tree_map_with_path(
          lambda p, x: x if tuple(k.key for k in p) in wanted else ..., abstract)
    return read_params(self.dir, abstract)
