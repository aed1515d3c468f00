"""Loads the official implementation's tiny golden files (tests/testdata/official_tiny)."""

import json
import os

import jax
import numpy as np
from flax import nnx

from fac_jax import config as config_lib
from fac_jax.batch import IGNORE_ID
from fac_jax.checkpoints import checkpoint, convert, official_layout
from fac_jax.data import official_batch
from fac_jax.inference import generate, sampling
from fac_jax.model import fun_audio_chat

DIR = os.path.join(os.path.dirname(__file__), 'testdata', 'official_tiny')


def model_config():
  with open(os.path.join(DIR, 'config.json')) as f:
    hf_config = json.load(f)
  cfg = official_layout.config_from_official(hf_config, config_lib.default_config().model)
  cfg.tokens.update(im_start=201, im_end=202)  # from the golden README (tokenizer ids)
  return cfg


def imported_model(ckpt_dir):
  """Imports the golden folder with `python -m fac_jax.checkpoints.convert import` logic; the model
  and its config as the checkpoint holds them."""
  reader = checkpoint.Reader(convert.import_checkpoint(DIR, ckpt_dir))
  cfg = reader.config
  cfg.tokens.update(im_start=201, im_end=202)  # no tokenizer in the golden folder
  graphdef, _ = nnx.split(fun_audio_chat.abstract_model(cfg))
  return cfg, nnx.merge(graphdef, reader.load())


def forward_reference():
  return dict(np.load(os.path.join(DIR, 'reference_forward.npz')))


def grads_reference():
  """The official gradient of the total loss on reference_forward.npz's batch, by official name."""
  return dict(np.load(os.path.join(DIR, 'reference_grads.npz')))


def forward_inputs(reference):
  """The official-format input batch of reference_forward.npz."""
  return {k[len('in.'):]: v for k, v in reference.items() if k.startswith('in.')}


KEY = jax.random.key(0)


def greedy(max_new_tokens, mode='s2s'):
  """Greedy on both channels, no repetition penalty: the official golden run's settings."""
  plain = sampling.Sampling(greedy=True, repetition_penalty=1.0)
  return generate.GenerationConfig(max_new_tokens, mode=mode, text=plain, speech=plain)


def prompt_of(batch):
  return {k: v for k, v in batch.items() if not k.endswith('targets')}


def generation_setup(ckpt_dir):
  """(config, imported model, the golden generation prompt in our format, the reference)."""
  cfg, model = imported_model(ckpt_dir)
  reference = dict(np.load(f'{DIR}/reference_generate.npz'))
  official = {k: reference[k] for k in ('input_ids', 'attention_mask', 'speech_ids',
                                        'speech_attention_mask', 'input_features',
                                        'feature_attention_mask', 'feature_exist_mask')}
  official['labels'] = np.full_like(official['input_ids'], IGNORE_ID)  # all prompt
  official['text_ids'] = np.zeros((1, 1), np.int64)
  official['text_attention_mask'] = np.zeros((1,), bool)
  prompt = prompt_of(official_batch.to_batch(official, cfg))
  return cfg, model, prompt, reference
