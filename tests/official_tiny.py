"""Loads the official implementation's tiny golden files (tests/testdata/official_tiny)."""

import json
import os

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

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


def model(cfg):
  params = official_layout.load_params(load_file(os.path.join(DIR, 'model.safetensors')),
                                       official_layout.fun_audio_chat_maps(cfg))
  graphdef, _ = nnx.split(fun_audio_chat.abstract_model(cfg))
  return nnx.merge(graphdef, jax.tree.map(np.asarray, params))


def forward_reference():
  return dict(np.load(os.path.join(DIR, 'reference_forward.npz')))


def official_batch(reference):
  return {k[len('in.'):]: v for k, v in reference.items() if k.startswith('in.')}
