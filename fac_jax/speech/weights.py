"""Converted speech-model folders (S3Tokenizer, flow, HiFT): config.json and float32 safetensors
named by the model's module paths, written complete or not at all, and read back into the model
the config describes with every tensor checked by name and shape."""

import hashlib
import os
import shutil
from collections.abc import Callable
from typing import TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fac_jax.checkpoints import safetensors_io

CONFIG_NAME = 'config.json'
Config = TypeVar('Config')


class Constant(nnx.Variable):
  """A fixed array a model uses but never trains: rotary frequencies, fixed noise tables."""


def sha256(path: str) -> str:
  """Hex sha256 of a file, read in 16 MiB pieces (the released files are up to 1 GB)."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 24), b''):
      digest.update(chunk)
  return digest.hexdigest()


def shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Every array of `model` (abstract or not) by dotted module path -> its shape."""
  return {'.'.join(map(str, path)): tuple(variable.get_value().shape)
          for path, variable in nnx.to_flat_state(nnx.state(model))}


def read_config(folder: str, parse: Callable[[str, str], Config], writer: str) -> Config:
  """parse(text, path) of the folder's config.json; `writer` names the converter that writes
  such folders, for the error when there is none."""
  path = os.path.join(folder, CONFIG_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{folder} holds no {CONFIG_NAME}: not a folder written by {writer}')
  with open(path, encoding='utf-8') as f:
    return parse(f.read(), path)


def load(folder: str, abstract: nnx.Module) -> nnx.Module:
  """`abstract` (an nnx.eval_shape model built from the folder's config) with its arrays read from
  the folder's safetensors as float32; refuses a missing, extra or misshapen tensor by name."""
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  names = {'.'.join(map(str, path)): path for path in flat}
  checkpoint = safetensors_io.Checkpoint(folder)
  stored = set(checkpoint.keys())
  sizes = f'the sizes in {os.path.join(folder, CONFIG_NAME)}'
  missing = sorted(set(names) - stored)
  if missing:
    raise ValueError(f'{folder}: tensor {missing[0]!r} is missing ({len(missing)} missing in all) '
                     f'for {sizes}')
  extra = sorted(stored - set(names))
  if extra:
    raise ValueError(f'{folder}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all) '
                     f'for {sizes}')
  for name, path in names.items():
    want = tuple(flat[path].get_value().shape)
    if checkpoint.shape(name) != want:
      raise ValueError(f'{folder}: tensor {name!r} has shape {checkpoint.shape(name)}, {sizes} '
                       f'need {want}')
    flat[path].set_value(jnp.asarray(np.asarray(checkpoint.array(name), np.float32)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def write(out: str, arrays: dict[str, np.ndarray], config_json: str) -> str:
  """Writes config.json and the arrays as float32 safetensors to `out` (which must not exist),
  complete or not at all."""
  if os.path.exists(out):
    raise FileExistsError(f'{out} exists; refusing to overwrite it')
  partial = out.rstrip('/') + '.incomplete'
  shutil.rmtree(partial, ignore_errors=True)  # leftovers of an interrupted conversion
  os.makedirs(partial)
  names = sorted(arrays)
  shards = safetensors_io.plan_shards(((n, arrays[n].shape, np.float32) for n in names), 1 << 62)
  safetensors_io.write_sharded(partial, shards, (np.asarray(arrays[n], np.float32) for n in names))
  with open(os.path.join(partial, CONFIG_NAME), 'w', encoding='utf-8') as f:
    f.write(config_json)
  os.rename(partial, out)
  return out
