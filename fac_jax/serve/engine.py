"""Continuous batching for the server: a fixed number of session slots, each holding one turn's
generation state and KV caches (fac_jax.inference.generate's, a batch of one). One jitted step
advances every live slot at once (generate.decode_step vmapped over the slots); a turn joins a
free slot, or leaves its slot, between two steps. A joining turn is prefilled in chunks of
`prefill_chunk` positions (generate.begin_prefill, prefill_chunk, finish_prefill), one piece
between two steps, so it stalls the others for one chunk at most (or for its embeddings, the
audio encoder's pass over its windows, the piece before its first chunk).

Shapes never change while serving: prompts come left-padded to one length (positions and mel
windows, chat.build_prompt's prompt_len and num_windows), the chunk's index is traced and the
live slots are a mask, so each program is compiled once (Engine.compiled counts them).
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


@dataclasses.dataclass(eq=False)
class _Joining:
  """A turn being prefilled into `slot`: its partial state (None before begin_prefill) and the
  index of its next chunk."""
  slot: int
  turn: Turn
  partial: dict | None = None
  chunk: int = 0


class Engine:
  """Runs turns on `num_slots` slots from a thread of its own (start()); submit() and cancel()
  may be called from any thread. params may hold int8 kernels (fac_jax.model.quantization).
  Prompts must have a multiple of `prefill_chunk` positions."""

  def __init__(self, graphdef: nnx.GraphDef, params, cfg: ml_collections.ConfigDict,
               gen: generate.GenerationConfig, num_slots: int, prefill_chunk: int):
    self.params, self.num_slots, self.prefill_chunk = params, num_slots, prefill_chunk
    # One device, and every state on it alike: a jitted function is compiled again for inputs
    # placed otherwise (the model's sharding constraints would leave its outputs on a mesh).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    model = lambda p: quantization.merge(graphdef, p)
    self._begin = jax.jit(lambda p, prompt: generate.begin_prefill(model(p), prompt, cfg, gen),
                          out_shardings=device)
    self._chunk = jax.jit(lambda p, partial, index: generate.prefill_chunk(
        model(p), partial, cfg, gen, index, prefill_chunk), donate_argnums=1,
                          out_shardings=device)
    self._finish = jax.jit(lambda p, partial, key: generate.finish_prefill(
        model(p), partial, cfg, gen, key, prefill_chunk), donate_argnums=1,
                           out_shardings=device)
    self._step = jax.jit(lambda p, states, live: _step(model(p), states, live, cfg, gen),
                         donate_argnums=1, out_shardings=device)
    self._insert = jax.jit(lambda states, slot, one: jax.tree.map(
        lambda s, x: s.at[slot].set(x), states, one), donate_argnums=0, out_shardings=device)
    self._states = None  # every slot's state, stacked; made from the first prefill
    self._slots: list[Turn | None] = [None] * num_slots  # decoding, or being prefilled
    self._joining: _Joining | None = None
    self._pending: collections.deque[Turn] = collections.deque()
    self._wake = threading.Condition()
    self._stopped = False
    self._thread = threading.Thread(target=self._run, name='engine', daemon=True)
    self.steps = 0  # decode steps run (each over every slot)
    self.chunks = 0  # prefill chunks run (prefill_chunk or finish_prefill)

  def start(self) -> 'Engine':
    self._thread.start()
    return self

  def stop(self) -> None:
    with self._wake:
      self._stopped = True
      self._wake.notify()
    self._thread.join()

  def submit(self, turn: Turn) -> None:
    prompt_len = turn.prompt['input_ids'].shape[1]
    if prompt_len % self.prefill_chunk:
      raise ValueError(f'a prompt of {prompt_len} positions: the engine prefills chunks of '
                       f'{self.prefill_chunk}, which must divide it')
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
            (('begin', self._begin), ('chunk', self._chunk), ('finish', self._finish),
             ('insert', self._insert), ('step', self._step))}

  def _run(self) -> None:
    while True:
      with self._wake:
        self._slots = [None if turn is None or turn.cancelled else turn for turn in self._slots]
        if self._joining and self._joining.turn.cancelled:
          self._joining = None
        self._pending = collections.deque(t for t in self._pending if not t.cancelled)
        while not self._stopped and not any(self._slots) and not self._pending:
          self._wake.wait()
        if self._stopped:
          return
        free = [i for i, turn in enumerate(self._slots) if turn is None]
        if not self._joining and free and self._pending:
          self._joining = _Joining(free[0], self._pending.popleft())
          self._slots[free[0]] = self._joining.turn
      if self._joining:
        self._prefill_piece(self._joining)
      if self._live().any():
        self._advance()

  def _live(self) -> np.ndarray:
    joining = self._joining.turn if self._joining else None
    return np.asarray([turn is not None and turn is not joining for turn in self._slots])

  def _prefill_piece(self, joining: _Joining) -> None:
    """The joining turn's next piece: its embeddings, a chunk, or its last chunk and first token
    (then it decodes with the others)."""
    turn = joining.turn
    chunks = turn.prompt['input_ids'].shape[1] // self.prefill_chunk
    if joining.partial is None:
      joining.partial = self._begin(self.params, turn.prompt)
      # Chunks of padding alone are left out, but a turn runs one chunk before its last at least
      # (where it has one), so that the first turn compiles every program.
      first = int(np.argmax(np.asarray(turn.prompt['segment_ids'])[0] > 0))
      joining.chunk = min(first // self.prefill_chunk, max(chunks - 2, 0))
      return
    self.chunks += 1
    if joining.chunk < chunks - 1:
      joining.partial = self._chunk(self.params, joining.partial, np.int32(joining.chunk))
      joining.chunk += 1
      return
    state = self._finish(self.params, joining.partial, turn.key)
    if self._states is None:
      self._states = jax.tree.map(lambda x: jnp.stack([x] * self.num_slots), state)
    else:
      self._states = self._insert(self._states, joining.slot, state)
    done = not bool(generate.keep_going(state))
    with self._wake:
      self._joining = None
      if done:
        self._slots[joining.slot] = None
    turn.emit(Event(int(state['text'][0, 0]), None, done))

  def _advance(self) -> None:
    live = self._live()
    self._states, out = self._step(self.params, self._states, jnp.asarray(live))
    out = jax.device_get(out)
    self.steps += 1
    for slot, turn in enumerate(self._slots):
      if not live[slot] or not out['stepped'][slot]:
        continue
      codes = out['codes'][slot]
      done = bool(out['done'][slot])
      if done:
        with self._wake:
          self._slots[slot] = None
      if not turn.cancelled:
        turn.emit(Event(int(out['text'][slot]), codes if codes[0] >= 0 else None, done))
