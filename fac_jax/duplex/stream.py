"""The duplex streaming loop: a system prompt is prefilled, then every 200 ms chunk of user audio
drives one jitted step (one LLM decode and five refined-head decodes over KV caches) that emits
the assistant's text token and code group and decides what the assistant does next.

The assistant channel is in one of five phases; a step's phase fixes its assistant input:

  phase   text input        codes     input        next phase
  LISTEN  <|sil|>           5 x pad   (E + G) / 2  BOS if the model says <|audio_bos|>, else LISTEN
  BOS     <|audio_bos|>     -         E            SPEAK
  SPEAK   reply token/sil   the group (E + G) / 2  EOS when a code is eos or the text says
                                                   <|audio_eos|> or <|im_end|> (it finished or
                                                   yields to the user) or the reply reached
                                                   max_reply_steps; else SPEAK
  EOS     <|audio_eos|>     -         E            END
  END     <|im_end|>        -         E            as after LISTEN

This is the half-duplex reply format (fac_jax.inference.generate) between <|audio_bos|> and <|im_end|>,
with listening steps around it; in every phase the user stream (fac_jax.duplex.model) is added.
The refined head runs at every step, as in training: it samples codes at BOS and SPEAK steps and
is fed speech pad elsewhere (where training has no speech target).

Bounded memory: the LLM cache holds the system prompt plus `window_steps` steps (the refined
head's five times that); when it is full, the oldest `evict_steps` steps after the prompt are
dropped (the prompt stays, as an attention sink) and the kept ones slide down in slots and in
positions (their keys rotated back: StreamingLLM's rolling cache with positions reassigned). So
after any number of evictions a step computes exactly what a fresh forward over the system prompt
and the kept steps computes, and positions never pass prompt + window: a model trained on sessions
of that length meets no longer distance however long the call. Repetition-penalty histories hold
the current reply only (at most `history_steps` steps), the encoder window one window of mel.
Nothing grows with the length of a session.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fac_jax.duplex import features
from fac_jax.inference.sampling import Sampling, select
from fac_jax.model import layers, qwen3

LISTEN, BOS, SPEAK, EOS, END = range(5)
PHASE_NAMES = ('listen', 'bos', 'speak', 'eos', 'end')


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  window_steps: int = 1500  # LLM steps kept after the system prompt: 5 minutes
  evict_steps: int = 300  # dropped at once when the window is full
  max_reply_steps: int = 150  # a reply longer than 30 s is cut
  history_steps: int = 64  # repetition-penalty history of a reply, in steps (x5 codes)
  # Greedy text makes the listen / speak decisions deterministic; sampled speech as in DESIGN.md
  # section 3 (greedy speech is known to get stuck on one code).
  text: Sampling = Sampling(greedy=True, repetition_penalty=1.0)
  speech: Sampling = Sampling()
  return_logits: bool = False  # also return each step's text and code logits (for checks)


def system_prompt_ids(text_tokenizer, cfg: ml_collections.ConfigDict, system: str) -> list[int]:
  """The ChatML system turn that opens a duplex session."""
  encode = lambda text: text_tokenizer.encode(text, add_special_tokens=False).ids
  return [cfg.tokens.im_start] + encode('system\n' + system) + [cfg.tokens.im_end] + encode('\n')


def prefill(model, prompt_ids: jax.Array, cfg: ml_collections.ConfigDict, loop: LoopConfig,
            key: jax.Array) -> dict:
  """Runs the system prompt (B, L) through the LLM and the refined head (whose previous-code
  input is pad there, as in training) and returns the loop state: listening, step 0."""
  if not 0 < loop.evict_steps <= loop.window_steps:
    raise ValueError(f'evict_steps={loop.evict_steps} must be in [1, window_steps='
                     f'{loop.window_steps}]')
  group, pad = cfg.speech.group_size, cfg.speech.pad_id
  batch, length = prompt_ids.shape
  slots = length + loop.window_steps
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  text_embedding = model.llm.embed_tokens(prompt_ids)
  dtype = text_embedding.dtype
  llm_valid = jnp.zeros((batch, slots), bool).at[:, :length].set(True)
  hidden, llm_cache = model.llm.decoder.prefill(
      text_embedding, positions, jnp.ones((batch, length), jnp.int32),
      qwen3.init_cache(cfg.llm, batch, slots, dtype))
  head = model.speech_refined_head
  head_valid = jnp.zeros((batch, group * slots), bool).at[:, :group * length].set(True)
  pad_embedding = model.adapters.code_embedding(jnp.full((batch,), pad))
  sub_positions = (positions[..., None] * group + jnp.arange(group)).reshape(batch, -1)
  _, head_cache = head.prefill(
      head.split(hidden + text_embedding) + pad_embedding[:, None], sub_positions,
      jnp.ones((batch, group * length), jnp.int32),
      qwen3.init_cache(cfg.speech_refined_head, batch, group * slots, dtype),
      model.adapters.code_embedding)
  return {
      'key': key,
      'step': jnp.zeros((), jnp.int32),
      'phase': jnp.full((batch,), LISTEN, jnp.int32),
      'text': jnp.full((batch,), cfg.tokens.sil, jnp.int32),
      'codes': jnp.full((batch, group), pad, jnp.int32),
      'code_embedding': pad_embedding,
      'reply_steps': jnp.zeros((batch,), jnp.int32),
      'position': jnp.full((batch,), length, jnp.int32),
      'llm_cache': llm_cache, 'llm_valid': llm_valid,
      'head_cache': head_cache, 'head_valid': head_valid,
      'text_history': jnp.full((batch, loop.history_steps), -1, jnp.int32),
      'code_history': jnp.full((batch, loop.history_steps * group), -1, jnp.int32),
      'mel_window': jnp.zeros((batch, cfg.encoder.window_frames, cfg.encoder.num_mel_bins),
                              jnp.float32),
  }


def _drop(cache: dict, valid: jax.Array, start: int, amount: int,
          rope_theta: float) -> tuple[dict, jax.Array]:
  """Removes cache slots [start, start + amount) and slides the later ones down by `amount`
  slots and `amount` positions: their keys are rotated back by `amount` (RoPE rotates by
  position, R(-d) R(p) = R(p - d)), as if they had been computed right after the kept ones."""
  def slide(x, axis, moved=lambda kept: kept):
    head = jax.lax.slice_in_dim(x, 0, start, axis=axis)
    kept = moved(jax.lax.slice_in_dim(x, start + amount, x.shape[axis], axis=axis))
    fill = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, amount, axis=axis))
    return jnp.concatenate([head, kept, fill], axis=axis)

  def rotate_back(keys):  # (layers, B, T, K, H)
    flat = keys.reshape((keys.shape[0] * keys.shape[1],) + keys.shape[2:]).astype(jnp.float32)
    back = layers.apply_rope(flat, jnp.full(flat.shape[:2], -amount), rope_theta)
    return back.reshape(keys.shape).astype(keys.dtype)

  cache = {'k': slide(cache['k'], 2, rotate_back), 'v': slide(cache['v'], 2),
           'index': cache['index'] - amount}
  return cache, slide(valid, 1)


def _evict_if_full(state: dict, cfg: ml_collections.ConfigDict, loop: LoopConfig) -> dict:
  slots = state['llm_valid'].shape[1]
  sink = slots - loop.window_steps  # the system prompt
  group = cfg.speech.group_size

  def evict(s):
    llm_cache, llm_valid = _drop(s['llm_cache'], s['llm_valid'], sink, loop.evict_steps,
                                 cfg.llm.rope_theta)
    head_cache, head_valid = _drop(s['head_cache'], s['head_valid'], group * sink,
                                   group * loop.evict_steps, cfg.speech_refined_head.rope_theta)
    return dict(s, llm_cache=llm_cache, llm_valid=llm_valid, head_cache=head_cache,
                head_valid=head_valid, position=s['position'] - loop.evict_steps)
  return jax.lax.cond(state['llm_cache']['index'] >= slots, evict, lambda s: s, state)


def _user_input(model, state: dict, mel_chunk: jax.Array, user_speech: jax.Array):
  """U (B, D) of this step's chunk (window-prefix encoding, fac_jax.duplex.features) and the
  updated encoder window. The encoder runs only when some row's user speaks."""
  batch, window_frames, _ = state['mel_window'].shape
  k = state['step'] % features.chunks_per_window(window_frames)
  window = jnp.where(k == 0, 0.0, state['mel_window'])
  window = jax.lax.dynamic_update_slice(window, mel_chunk.astype(window.dtype),
                                        (0, k * features.CHUNK_MEL_FRAMES, 0))
  lengths = jnp.full((batch, 1), (k + 1) * features.CHUNK_MEL_FRAMES, jnp.int32)
  frames = k * features.CHUNK_ENCODER_FRAMES + jnp.arange(features.CHUNK_ENCODER_FRAMES)
  frame_index = jnp.broadcast_to(frames, (batch, 1, features.CHUNK_ENCODER_FRAMES))
  speech, silent = user_speech[:, None], ~user_speech[:, None]
  windows = window[:, None]
  user = jax.lax.cond(
      user_speech.any(),
      lambda: model.user_inputs(windows, lengths, frame_index, speech, silent)[:, 0],
      lambda: model.user_inputs(windows[:, :0], lengths[:, :0], frame_index, speech,
                                silent)[:, 0])
  return user, window


def _ring_write(history: jax.Array, index: jax.Array, values: jax.Array,
                write: jax.Array) -> jax.Array:
  """Writes values (B, n) at columns [n * index, n * index + n) of rows where `write`."""
  n = values.shape[1]
  columns = (index % (history.shape[1] // n))[:, None] * n + jnp.arange(n)
  rows = jnp.arange(history.shape[0])[:, None]
  return history.at[rows, columns].set(jnp.where(write[:, None], values, history[rows, columns]))


def _speech_group(model, sub_states, sub_positions, previous, cache, valid, history, keys,
                  s: Sampling, silent, forced_codes):
  """The refined head's five sub-steps of one step: (codes (B, 5), embedding of the last code,
  cache, logits (B, 5, codes)). Rows that are `silent` are fed pad codes (their codes are not
  spoken); `forced_codes` (teacher forcing) replaces the sampled codes."""
  head, embedding = model.speech_refined_head, model.adapters.code_embedding
  pad = model.speech_pad_id
  codes, all_logits = [], []
  for j in range(head.group_size):
    logits, cache = head.decode((sub_states[:, j] + previous)[:, None], sub_positions[:, j:j + 1],
                                cache, valid, embedding)
    logits = logits[:, -1]
    seen = jnp.concatenate([history, jnp.stack(codes, axis=1)], axis=1) if codes else history
    code = select(keys[j], logits, seen, s) if forced_codes is None else forced_codes[:, j]
    code = jnp.where(silent, pad, code)
    codes.append(code)
    all_logits.append(logits)
    previous = embedding(code)
  return jnp.stack(codes, axis=1), previous, cache, jnp.stack(all_logits, axis=1)


def step(model, state: dict, mel_chunk: jax.Array, user_speech: jax.Array,
         cfg: ml_collections.ConfigDict, loop: LoopConfig, forced: dict | None = None):
  """One 5 Hz step. mel_chunk (B, 20, mels): the chunk's causal log-mel; user_speech (B,): its
  voice activity. `forced` ({'text': (B,), 'codes': (B, 5)}) replaces the model's choices
  (teacher forcing). Returns (state, outputs): the assistant's next `phase`, its next `text`
  input and the `codes` it speaks next (-1 unless the next phase is SPEAK), per row."""
  tokens, speech = cfg.tokens, cfg.speech
  group = speech.group_size
  state = _evict_if_full(state, cfg, loop)
  user, mel_window = _user_input(model, state, mel_chunk, user_speech)
  phase = state['phase']
  text_embedding = model.llm.embed_tokens(state['text'])
  mixed = (text_embedding + model.adapters.group_codes(state['codes'])) / 2
  assistant = jnp.where(((phase == LISTEN) | (phase == SPEAK))[:, None], mixed, text_embedding)
  x = assistant + user.astype(assistant.dtype)

  slot = state['llm_cache']['index']
  llm_valid = state['llm_valid'].at[:, slot].set(True)
  position = state['position'][:, None]
  hidden, llm_cache = model.llm.decoder.decode(x[:, None], position, state['llm_cache'],
                                               llm_valid)
  keys = jax.random.split(jax.random.fold_in(state['key'], state['step']), group + 1)
  voiced = (phase == BOS) | (phase == SPEAK)
  text_logits = model.llm.lm_head(hidden[:, -1])
  text_history = jnp.where(voiced[:, None], state['text_history'], -1)
  text = select(keys[0], text_logits, text_history, loop.text) if forced is None else \
      forced['text']

  batch = phase.shape[0]
  head_valid = jax.lax.dynamic_update_slice(state['head_valid'], jnp.ones((batch, group), bool),
                                            (0, group * slot))
  sub_states = model.speech_refined_head.split(hidden + text_embedding[:, None])
  codes, code_embedding, head_cache, code_logits = _speech_group(
      model, sub_states, position * group + jnp.arange(group), state['code_embedding'],
      state['head_cache'], head_valid, state['code_history'], keys[1:], loop.speech,
      ~voiced, None if forced is None else forced['codes'])

  stop_text = jnp.isin(text, jnp.asarray([tokens.audio_eos, tokens.im_end, tokens.endoftext]))
  finished = (phase == SPEAK) & ((codes == speech.eos_id).any(axis=1) | stop_text
                                 | (state['reply_steps'] + 1 >= loop.max_reply_steps))
  start = ((phase == LISTEN) | (phase == END)) & (text == tokens.audio_bos)
  next_phase = jnp.select(
      [phase == BOS, phase == SPEAK, phase == EOS],
      [jnp.full_like(phase, SPEAK), jnp.where(finished, EOS, SPEAK), jnp.full_like(phase, END)],
      jnp.where(start, BOS, LISTEN))
  next_text = jnp.select(
      [next_phase == BOS, next_phase == SPEAK, next_phase == EOS, next_phase == END],
      [jnp.full_like(text, tokens.audio_bos), text, jnp.full_like(text, tokens.audio_eos),
       jnp.full_like(text, tokens.im_end)], jnp.full_like(text, tokens.sil))
  speaks = next_phase == SPEAK
  eos_embedding = model.adapters.code_embedding(jnp.full((batch,), speech.eos_id))
  code_embedding = jnp.where(finished[:, None], eos_embedding, code_embedding)

  reply_steps = jnp.where(start, 0, state['reply_steps'] + voiced)
  text_history = jnp.where(start[:, None], -1, state['text_history'])
  code_history = jnp.where(start[:, None], -1, state['code_history'])
  new = dict(
      state, step=state['step'] + 1, phase=next_phase, text=next_text,
      codes=jnp.where(speaks[:, None], codes, speech.pad_id), code_embedding=code_embedding,
      reply_steps=reply_steps, position=state['position'] + 1,
      llm_cache=llm_cache, llm_valid=llm_valid, head_cache=head_cache, head_valid=head_valid,
      text_history=_ring_write(text_history, state['reply_steps'], text[:, None], voiced),
      code_history=_ring_write(code_history, state['reply_steps'], codes, voiced),
      mel_window=mel_window)
  outputs = {'phase': next_phase, 'text': next_text,
             'codes': jnp.where(speaks[:, None], codes, -1)}
  if loop.return_logits:
    outputs.update(text_logits=text_logits, code_logits=code_logits)
  return new, outputs


def simulate(model, prompt_ids, mel_chunks, user_speech, cfg: ml_collections.ConfigDict,
             loop: LoopConfig, key: jax.Array, forced: dict | None = None) -> dict:
  """A whole session per row, in one lax.scan: prompt (B, L), mel_chunks (B, T, 20, mels),
  user_speech (B, T) [, forced {'text': (B, T), 'codes': (B, T, 5)}] -> step outputs (B, T, ...).
  Pure: jit it."""
  state = prefill(model, prompt_ids, cfg, loop, key)
  time_major = lambda tree: jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), tree)

  def body(state, inputs):
    mel_chunk, speech, forced_step = inputs
    return step(model, state, mel_chunk, speech, cfg, loop, forced_step)

  _, outputs = jax.lax.scan(body, state, time_major((mel_chunks, user_speech, forced)))
  return time_major(outputs)


def make_simulate_fn(graphdef: nnx.GraphDef, cfg: ml_collections.ConfigDict, loop: LoopConfig):
  """jit(params, prompt_ids, mel_chunks, user_speech, key[, forced]) -> `simulate` outputs."""
  return jax.jit(lambda params, prompt_ids, mel_chunks, user_speech, key, forced=None: simulate(
      nnx.merge(graphdef, params), prompt_ids, mel_chunks, user_speech, cfg, loop, key, forced))


@dataclasses.dataclass
class StepResult:
  phase: int  # the assistant's phase at the next step
  text: int  # its text input at the next step
  codes: np.ndarray  # (5,) the codes it speaks in the next step, or -1
  user_speech: bool  # voice activity of the chunk just heard


class Session:
  """A live call, one 200 ms chunk of user audio at a time (batch of one)."""

  def __init__(self, graphdef: nnx.GraphDef, params: dict, cfg: ml_collections.ConfigDict,
               loop: LoopConfig, prompt_ids: list[int], key: jax.Array, vad_threshold: float):
    self.params, self.vad_threshold = params, vad_threshold
    self.featurizer = features.CausalLogMel(cfg.encoder.num_mel_bins)
    self._step = jax.jit(lambda p, s, mel, speech: step(nnx.merge(graphdef, p), s, mel, speech,
                                                        cfg, loop), donate_argnums=1)
    start = jax.jit(lambda p, ids, k: prefill(nnx.merge(graphdef, p), ids, cfg, loop, k))
    self.state = start(params, jnp.asarray([prompt_ids], jnp.int32), key)

  def push(self, chunk: np.ndarray) -> StepResult:
    """Hears one chunk (3200 samples at 16 kHz) and returns what the assistant does next."""
    if np.shape(chunk) != (features.CHUNK_SAMPLES,):
      raise ValueError(f'a chunk is {features.CHUNK_SAMPLES} samples (200 ms at 16 kHz), got '
                       f'shape {np.shape(chunk)}')
    mel = self.featurizer(chunk)
    speech = bool(features.voice_activity(chunk, self.vad_threshold)[0])
    self.state, out = self._step(self.params, self.state, jnp.asarray(mel[None]),
                                 jnp.asarray([speech]))
    out = jax.device_get(out)
    return StepResult(int(out['phase'][0]), int(out['text'][0]), out['codes'][0], speech)
