"""Token selection for one output channel: repetition penalty over the channel's history,
temperature, top-k, top-p, then a draw (or greedy argmax), with Hugging Face's semantics."""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  greedy: bool = False
  temperature: float = 0.8
  top_k: int = 0  # 0: off
  top_p: float = 0.9  # 1.0: off
  repetition_penalty: float = 1.2  # 1.0: off


def process(logits: jax.Array, history: jax.Array, s: Sampling) -> jax.Array:
  """logits (B, V) float, history (B, H) int with -1 for empty -> processed logits (B, V)."""
  logits = logits.astype(jnp.float32)
  if s.repetition_penalty != 1.0:
    seen = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None],
                                            jnp.maximum(history, 0)].max(history >= 0)
    penalised = jnp.where(logits > 0, logits / s.repetition_penalty,
                          logits * s.repetition_penalty)
    logits = jnp.where(seen, penalised, logits)
  if s.greedy:
    return logits
  logits = logits / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1 - s.top_p
    remove_sorted = remove_sorted.at[:, -1].set(False)  # always keep the most likely token
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None],
                                              order].set(remove_sorted)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def select(key: jax.Array, logits: jax.Array, history: jax.Array, s: Sampling) -> jax.Array:
  """The next token per row (B,) int32."""
  processed = process(logits, history, s)
  if s.greedy:
    return jnp.argmax(processed, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
