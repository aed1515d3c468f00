"""Learning-rate schedule against its formula; freezing by path patterns (no update, no moments)."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from fac_jax import config as config_lib
from fac_jax.model import fun_audio_chat
from fac_jax.train import optim


def test_warmup_then_cosine_to_the_floor():
  train = config_lib.train_config('stage2')
  train.update(steps=1000, warmup_fraction=0.02)
  schedule = optim.learning_rate_schedule(train)
  peak, floor = train.learning_rate, train.end_learning_rate
  assert (peak, floor) == (1e-5, 1e-6)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(peak / 2)
  assert float(schedule(20)) == pytest.approx(peak)
  for step in (20, 300, 510, 800, 1000):
    progress = (step - 20) / 980
    expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
  assert float(schedule(5000)) == pytest.approx(floor)


def test_frozen_paths_get_no_update_and_no_moments(tiny_config):
  params = nnx.to_pure_dict(nnx.split(fun_audio_chat.create(tiny_config.model))[1])
  train = config_lib.train_config('prealign')
  mask = optim.trainable_mask(params, train.frozen)
  assert not any(jax.tree.leaves(mask['llm']))
  assert all(jax.tree.leaves({k: v for k, v in mask.items() if k != 'llm'}))

  optimizer = optim.make_optimizer(train, params)
  state = optimizer.init(params)
  moments = sum(x.size for x in jax.tree.leaves(state))
  trainable = sum(x.size for part, sub in params.items() if part != 'llm'
                  for x in jax.tree.leaves(sub))
  assert moments < 2 * trainable + 16  # mu and nu of trainable leaves, plus counters
  grads = jax.tree.map(np.ones_like, params)
  _, state = optimizer.update(grads, state, params)  # step 0 of the warm-up has rate 0
  updates, _ = optimizer.update(grads, state, params)
  assert all(np.all(u == 0) for u in jax.tree.leaves(updates['llm']))
  assert all(np.any(u != 0) for u in jax.tree.leaves(updates['adapters']))


def test_freezing_everything_is_refused(tiny_config):
  params = nnx.to_pure_dict(nnx.split(fun_audio_chat.abstract_model(tiny_config.model))[1])
  train = config_lib.train_config('stage1')
  train.frozen = ('.',)
  with pytest.raises(ValueError, match='freezes every parameter'):
    optim.make_optimizer(train, params)
