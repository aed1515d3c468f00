"""Incremental decoding over the KV cache reproduces the full causal forward of the decoder stack,
dense or MoE.

Tolerance: float32, max abs error 1e-5 on final hidden states.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fac_jax import config as config_lib
from fac_jax.model import qwen3
from conftest import REPO


@pytest.mark.parametrize('config_arg', ['stage1', 'moe'])
def test_prefill_then_steps_match_full_forward(config_arg):
  cfg = config_lib.load(os.path.join(REPO, 'configs', f'tiny.py:{config_arg}')).model.llm
  stack = nnx.jit(lambda: qwen3.DecoderStack(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                                             rngs=nnx.Rngs(0)))()
  batch, length, prompt = 2, 11, 4
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, length, cfg.hidden_size)),
                  jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  full = stack(x, positions, jnp.ones((batch, length), jnp.int32))

  decode = jax.jit(lambda s, x, p, c, v: s.decode(x, p, c, v))
  cache = qwen3.init_cache(cfg, batch, slots=16)
  valid = jnp.arange(16)[None, :] < prompt
  valid = jnp.broadcast_to(valid, (batch, 16))
  hidden, cache = decode(stack, x[:, :prompt], positions[:, :prompt], cache, valid)
  outputs = [hidden]
  for t in range(prompt, length):
    valid = valid.at[:, t].set(True)
    hidden, cache = decode(stack, x[:, t:t + 1], positions[:, t:t + 1], cache, valid)
    outputs.append(hidden)
  assert int(cache['index']) == length
  np.testing.assert_allclose(np.concatenate(outputs, axis=1), full, atol=1e-5)


def test_slots_a_row_may_not_see_are_ignored(tiny_config):
  cfg = tiny_config.model.llm
  stack = nnx.jit(lambda: qwen3.DecoderStack(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                                             rngs=nnx.Rngs(1)))()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 5, cfg.hidden_size)), jnp.float32)
  positions = jnp.arange(5)[None]
  alone = stack(x[:, 2:], positions[:, :3], jnp.ones((1, 3), jnp.int32))
  # Slots 0-1 hold unrelated inputs that the row is told not to see (a left-padded prompt).
  cache = qwen3.init_cache(cfg, 1, slots=5)
  valid = jnp.asarray([[False, False, True, True, True]])
  hidden, _ = stack.decode(x, jnp.asarray([[0, 0, 0, 1, 2]]), cache, valid)
  np.testing.assert_allclose(hidden[:, 2:], alone, atol=1e-5)
