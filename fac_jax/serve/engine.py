"""Continuous batching for the server: a fixed number of session slots, each holding one turn's
generation state and KV caches (fac_jax.inference.generate's, a batch of one). One jitted step
advances every live slot at once (generate.decode_step vmapped over the slots); a turn joins a
free slot, or leaves its slot, between two steps, and at most one turn is prefilled between two
steps, so a joining turn stalls the others for one prefill at most.

Shapes never change while serving: prompts come left-padded to one length (positions and mel
windows, chat.build_prompt's prompt_len and num_windows) and the live slots are a mask, so the
prefill, the slot insert and the step are each compiled once (Engine.compiled counts them).
"""

import collections
from collections.abc import Callable
import dataclasses
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fac_jax.inference import generate
from fac_jax.model import quantization


@dataclasses.dataclass
class Event:
  text: int  # the step's text token (the first event: the forced or first token of prefill)
  codes: np.ndarray | None  # (5,) the code group spoken at this step, or None
  done: bool  # the turn's last event


@dataclasses.dataclass(eq=False)
class Turn:
  prompt: dict  # a padded batch of one (chat.build_prompt with prompt_len and num_windows)
  key: jax.Array
  emit: Callable[[Event], None]  # called from the engine's thread
  cancelled: bool = False


def _step(model, states: dict, live: jax.Array, cfg: ml_collections.ConfigDict,
          gen: generate.GenerationConfig) -> tuple[dict, dict]:
  """generate.decode_step on each slot that is live and not finished; the others stay as they
  are. Also returns each slot's step output: stepped, text, codes (-1 unless spoken), done."""

  def one(state, live):
    going = live & generate.keep_going(state)
    new = generate.decode_step(model, state, cfg, gen)
    new = jax.tree.map(lambda a, b: jnp.where(going, a, b), new, state)
    spoken = new['num_speech'][0]
    codes = new['speech'][0, jnp.maximum(spoken - 1, 0)]
    return new, {'stepped': going, 'text': new['text'][0, state['step']],
                 'codes': jnp.where(spoken > state['num_speech'][0], codes, -1),
                 'done': ~generate.keep_going(new)}

  return jax.vmap(one)(states, live)


class Engine:
  """Runs turns on `num_slots` slots from a thread of its own (start()); submit() and cancel()
  may be called from any thread. params may hold int8 kernels (fac_jax.model.quantization)."""

  def __init__(self, graphdef: nnx.GraphDef, params, cfg: ml_collections.ConfigDict,
               gen: generate.GenerationConfig, num_slots: int):
    self.params, self.num_slots = params, num_slots
    # One device, and every state on it alike: a jitted function is compiled again for inputs
    # placed otherwise (the model's sharding constraints would leave its outputs on a mesh).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    self._prefill = jax.jit(lambda p, prompt, key: generate.prefill(
        quantization.merge(graphdef, p), prompt, cfg, gen, key), out_shardings=device)
    self._step = jax.jit(lambda p, states, live: _step(quantization.merge(graphdef, p), states, live,
                                                       cfg, gen),
                         donate_argnums=1, out_shardings=device)
    self._insert = jax.jit(lambda states, slot, one: jax.tree.map(
        lambda s, x: s.at[slot].set(x), states, one), donate_argnums=0, out_shardings=device)
    self._states = None  # every slot's state, stacked; made from the first prefill
    self._slots: list[Turn | None] = [None] * num_slots
    self._pending: collections.deque[Turn] = collections.deque()
    self._wake = threading.Condition()
    self._stopped = False
    self._thread = threading.Thread(target=self._run, name='engine', daemon=True)
    self.steps = 0  # decode steps run (each over every slot)

  def start(self) -> 'Engine':
    self._thread.start()
    return self

  def stop(self) -> None:
    with self._wake:
      self._stopped = True
      self._wake.notify()
    self._thread.join()

  def submit(self, turn: Turn) -> None:
    with self._wake:
      self._pending.append(turn)
      self._wake.notify()

  def cancel(self, turn: Turn) -> None:
    """The turn's slot is freed before the next step; it emits nothing more."""
    with self._wake:
      turn.cancelled = True
      self._wake.notify()

  def busy_slots(self) -> int:
    with self._wake:
      return sum(turn is not None for turn in self._slots)

  def compiled(self) -> dict:
    """Programs compiled so far per jitted function (each stays 1 however sessions come and go)."""
    return {name: fn._cache_size() for name, fn in
            (('prefill', self._prefill), ('insert', self._insert), ('step', self._step))}

  def _run(self) -> None:
    while True:
      with self._wake:
        self._slots = [None if turn is None or turn.cancelled else turn for turn in self._slots]
        self._pending = collections.deque(t for t in self._pending if not t.cancelled)
        while not self._stopped and not any(self._slots) and not self._pending:
          self._wake.wait()
        if self._stopped:
          return
        free = [i for i, turn in enumerate(self._slots) if turn is None]
        joining = self._pending.popleft() if free and self._pending else None
        if joining:
          self._slots[free[0]] = joining
      if joining:
        self._join(free[0], joining)
      if any(self._slots):
        self._advance()

  def _join(self, slot: int, turn: Turn) -> None:
    state = self._prefill(self.params, turn.prompt, turn.key)
    if self._states is None:
      self._states = jax.tree.map(lambda x: jnp.stack([x] * self.num_slots), state)
    else:
      self._states = self._insert(self._states, slot, state)
    done = not bool(generate.keep_going(state))
    if done:
      self._slots[slot] = None
    turn.emit(Event(int(state['text'][0, 0]), None, done))

  def _advance(self) -> None:
    live = np.asarray([turn is not None for turn in self._slots])
    self._states, out = self._step(self.params, self._states, jnp.asarray(live))
    out = jax.device_get(out)
    self.steps += 1
    for slot, turn in enumerate(self._slots):
      if turn is None or not out['stepped'][slot]:
        continue
      codes = out['codes'][slot]
      done = bool(out['done'][slot])
      if done:
        with self._wake:
          self._slots[slot] = None
      if not turn.cancelled:
        turn.emit(Event(int(out['text'][slot]), codes if codes[0] >= 0 else None, done))
