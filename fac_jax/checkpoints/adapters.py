"""Adapter checkpoints: what a LoRA run trained (the adapters, and any leaf it trained fully),
apart from the base model, with the base named and fingerprinted.

  ADAPTERS/config.json, params/, chat/, official/   as any fac_jax checkpoint; params/ holds only
                                                    the trained leaves
  ADAPTERS/lora.json                                {"base": path, "base_fingerprint": ...,
                                                     "lora": rank, alpha, targets, ...}

Anything that reads parameters for use (chat, evaluation, the next stage, merges) reads an adapter
checkpoint as its base with the adapters folded in (fac_jax.model.lora.fold), after checking that
the base is the one the adapters were trained on.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, traverse_util

from fac_jax import fingerprint, sharding
from fac_jax.checkpoints import checkpoint
from fac_jax.model import lora as lora_lib

FILE = 'lora.json'


class AdapterError(ValueError):
  """An adapter checkpoint that cannot be used as asked (the message says why)."""


def is_adapter_checkpoint(path: str) -> bool:
  return os.path.exists(os.path.join(path, FILE))


def read_settings(path: str) -> dict:
  """lora.json: the base, its fingerprint, and the LoRA settings."""
  record = os.path.join(path, FILE)
  try:
    with open(record, encoding='utf-8') as f:
      settings = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise AdapterError(f'{record}: cannot read the adapter settings: {e}') from None
  for field in ('base', 'base_fingerprint', 'lora'):
    if field not in settings:
      raise AdapterError(f'{record}: field "{field}" is missing')
  return settings


def lora_config(settings: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(settings['lora'])


def checked_base(path: str, base: str | None = None) -> str:
  """The base checkpoint of the adapters at `path`: `base` if given, else the one lora.json names
  (relative to the adapter folder when not absolute). Refused, with both fingerprints, when it is
  not the checkpoint the adapters were trained on."""
  settings = read_settings(path)
  if base is None:
    base = os.path.join(path, settings['base'])
  if not os.path.isdir(base):
    raise AdapterError(f'{path}: its base checkpoint {base} does not exist (lora.json "base"); '
                       'pass the base explicitly')
  found = fingerprint.of_folder(base)
  if found != settings['base_fingerprint']:
    raise AdapterError(f'{path} was trained on a base with fingerprint '
                       f'{settings["base_fingerprint"]}; {base} has fingerprint {found}')
  return base


def save(out: str, model_config: ml_collections.ConfigDict, trained: dict,
         lora: ml_collections.ConfigDict, base: str,
         assets: checkpoint.ChatAssets | None = None) -> str:
  """Writes the trained leaves `trained` (a subtree of the adapted model's parameters) as an
  adapter checkpoint of `base`; committed atomically like any checkpoint."""
  writer = checkpoint.Writer(out, model_config)
  try:
    for path, leaf in jax.tree_util.tree_flatten_with_path(trained)[0]:
      writer.add(tuple(k.key for k in path), leaf)
    if assets is not None:
      writer.add_chat_assets(assets)
    if jax.process_index() == 0:
      with open(os.path.join(writer.dir, FILE), 'w', encoding='utf-8') as f:
        json.dump({'base': os.path.abspath(base), 'base_fingerprint': fingerprint.of_folder(base),
                   'lora': lora.to_dict()}, f, indent=2)
    return writer.commit()
  except BaseException:
    writer.abort()
    raise


def load_params(path: str, mesh: jax.sharding.Mesh | None = None, dtype=None,
                base: str | None = None) -> dict:
  """The plain model's parameters of any checkpoint: a full one as stored, an adapter checkpoint
  as its (checked) base, itself read this way, with its trained leaves in place and its adapters
  folded in."""
  if not is_adapter_checkpoint(path):
    return checkpoint.Reader(path, mesh).load(dtype)
  lora = lora_config(read_settings(path))
  base = checked_base(path, base)
  trained = trained_leaves(path, checkpoint.load_config(base), lora, mesh, dtype)
  return lora_lib.fold(lora_lib.insert(load_params(base, mesh, dtype), trained), lora)


def trained_leaves(path: str, model_config: ml_collections.ConfigDict,
                   lora: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                   dtype=None) -> dict:
  """The leaves an adapter checkpoint holds, read into the adapted model's shardings on `mesh`
  (default: the mesh in scope); refused when they do not fit the adapted model."""
  _, state = nnx.split(lora_lib.abstract_model(model_config, lora))
  shardings = traverse_util.flatten_dict(
      sharding.param_shardings(state, mesh or sharding.mesh_in_scope()))
  shapes = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  wanted = {}
  for leaf_path, (saved_shape, _) in traverse_util.flatten_dict(
      checkpoint.saved_shapes(path)).items():
    name = '/'.join(leaf_path)
    if leaf_path not in shapes:
      raise AdapterError(f'{path}: leaf {name} is not a parameter of its base model with these '
                         'adapters')
    shape = tuple(shapes[leaf_path].shape)
    if tuple(saved_shape) != shape:
      raise AdapterError(f'{path}: leaf {name} is {list(saved_shape)}, its base model with these '
                         f'adapters has {list(shape)}')
    wanted[leaf_path] = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype or model_config.param_dtype),
                                             sharding=shardings[leaf_path])
  return checkpoint.read_params(path, traverse_util.unflatten_dict(wanted))
