"""Loads the official implementation's tiny golden files (tests/testdata/official_tiny)."""

import json
import os

import numpy as np
from flax import nnx

from fac_jax import checkpoint, convert
from fac_jax import config as config_lib
from fac_jax import official_layout
from fac_jax.model import fun_audio_chat

DIR = os.path.join(os.path.dirname(__file__), 'testdata', 'official_tiny')


def model_config():
  with open(os.path.join(DIR, 'config.json')) as f:
    hf_config = json.load(f)
  cfg = official_layout.config_from_official(hf_config, config_lib.default_config().model)
  cfg.tokens.update(im_start=201, im_end=202)  # from the golden README (tokenizer ids)
  return cfg


def imported_model(ckpt_dir):
  """Imports the golden folder with `python -m fac_jax.convert import` logic; the model and its
  config as the checkpoint holds them."""
  reader = checkpoint.Reader(convert.import_checkpoint(DIR, ckpt_dir))
  cfg = reader.config
  cfg.tokens.update(im_start=201, im_end=202)  # no tokenizer in the golden folder
  graphdef, _ = nnx.split(fun_audio_chat.abstract_model(cfg))
  return cfg, nnx.merge(graphdef, reader.load())


def forward_reference():
  return dict(np.load(os.path.join(DIR, 'reference_forward.npz')))


def official_batch(reference):
  return {k[len('in.'):]: v for k, v in reference.items() if k.startswith('in.')}
