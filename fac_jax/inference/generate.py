"""Generation: prefill, then 5 Hz steps (one LLM decode and five refined-head decodes) inside
jax.lax.while_loop, over KV caches passed as pytrees. Follows the official loop (DESIGN.md §3):
the first new text token is forced to <|audio_bos|>; from then on each step's LLM input is
(E(previous text) + G(previous 5 codes)) / 2; speech stops at the first eos code (the text token
of that step becomes <|audio_eos|>); text stops at a stop token or after max_new_tokens.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from fac_jax.inference.sampling import Sampling, select
from fac_jax.model import fun_audio_chat, qwen3


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  max_new_tokens: int = 512  # text tokens, the forced <|audio_bos|> included
  mode: str = 's2s'  # 's2t': text only, the refined head does not run
  force_audio_bos: bool = True
  text: Sampling = Sampling()
  speech: Sampling = Sampling()
  return_logits: bool = False  # also return each step's text and code logits (for checks)


def _code_group(model, split, sub_positions, previous_code_embedding, cache, valid, history,
                key, s: Sampling, prefill: bool = False):
  """The refined head's five sub-steps for the last LLM position of `split` (B, 5n, D).

  The first call also runs every earlier sub-slot (the prompt, at prefill, into the empty
  cache), each plus the previous code's embedding, as the official loop does. `history` (B, H)
  holds the codes spoken so far (-1 empty), for the repetition penalty. Returns (codes (B, 5),
  embedding of the last code, cache, logits (B, 5, codebook)).
  """
  head, embedding = model.speech_refined_head, model.adapters.code_embedding
  group, slots = head.group_size, split.shape[1]
  keys = jax.random.split(key, group)
  first = slots - (group - 1)
  inputs = split[:, :first] + previous_code_embedding[:, None]
  if prefill:
    logits, cache = head.prefill(inputs, sub_positions[:, :first],
                                 valid[:, :first].astype(jnp.int32), cache, embedding)
  else:
    logits, cache = head.decode(inputs, sub_positions[:, :first], cache, valid, embedding)
  codes, all_logits = [select(keys[0], logits[:, -1], history, s)], [logits[:, -1]]
  for j in range(1, group):
    slot = slots - group + j
    logits, cache = head.decode(split[:, slot:slot + 1] + embedding(codes[-1])[:, None],
                                sub_positions[:, slot:slot + 1], cache, valid, embedding)
    all_logits.append(logits[:, -1])
    codes.append(select(keys[j], logits[:, -1], jnp.concatenate(
        [history, jnp.stack(codes, axis=1)], axis=1), s))
  return (jnp.stack(codes, axis=1), embedding(codes[-1]), cache,
          jnp.stack(all_logits, axis=1))


def prefill(model: fun_audio_chat.FunAudioChat, prompt: dict, cfg: ml_collections.ConfigDict,
            gen: GenerationConfig, key: jax.Array, earlier: dict | None = None) -> dict:
  """Runs a left-padded prompt batch (fac_jax.batch fields without targets) through the LLM and
  the refined head, and returns the decoding state (a pytree) holding the first text token.

  With `earlier`, the final state of a generation, the prompt continues it from its KV caches
  (fac_jax.inference.tools.continuation_prompt builds it): their slots before that generation's
  last prompt token are kept, and the prompt (that token, the turn generated and the turns
  appended, positions absolute) runs over them as a fresh prefill of the whole history would;
  the turn just generated runs again, as the refined head saw it with the codes sampled then.
  After a text-only turn (a tool call) the continuation is that of the fresh prefill."""
  if gen.mode not in ('s2s', 's2t'):
    raise ValueError(f"mode {gen.mode!r}: expected 's2s' or 's2t'")
  group = cfg.speech.group_size
  keep = 0 if earlier is None else earlier['llm_valid'].shape[1] - earlier['text'].shape[1] - 1
  end = keep + prompt['input_ids'].shape[1]  # the prompt fills slots [keep, end)
  positions = prompt['positions']

  inputs, head_text = model.embed_inputs(prompt, training=False)
  caches = _empty_caches(prompt, cfg, gen, keep, inputs.dtype)
  if earlier is None:
    hidden, caches['llm_cache'] = model.llm.decoder.prefill(
        inputs, positions, (prompt['segment_ids'] > 0).astype(jnp.int32), caches['llm_cache'])
  else:
    for name, slots in (('llm_valid', keep), ('text_history', keep), ('head_valid', group * keep)):
      caches[name] = caches[name].at[:, :slots].set(earlier[name][:, :slots])
    caches['llm_cache'] = _kept_cache(earlier['llm_cache'], caches['llm_cache'], keep)
    caches['head_cache'] = _kept_cache(earlier['head_cache'], caches['head_cache'], group * keep)
    hidden, caches['llm_cache'] = model.llm.decoder.decode(inputs, positions, caches['llm_cache'],
                                                           caches['llm_valid'])
  return _first_token(model, hidden, head_text, positions, key, cfg, gen, caches, end,
                      prefill=earlier is None)


def begin_prefill(model: fun_audio_chat.FunAudioChat, prompt: dict,
                  cfg: ml_collections.ConfigDict, gen: GenerationConfig) -> dict:
  """prefill in chunks of `size` positions, for a server that decodes other requests between
  them. This part runs the embeddings (the audio encoder among them) and no decoder layer: the
  prompt's inputs and empty caches. Over a left-padded prompt of n * size positions,
  prefill_chunk on chunks 0 .. n - 2 in order (those wholly padding may be left out), then
  finish_prefill, give prefill's state up to float rounding (each chunk attends as decode does)."""
  if gen.mode not in ('s2s', 's2t'):
    raise ValueError(f"mode {gen.mode!r}: expected 's2s' or 's2t'")
  inputs, head_text = model.embed_inputs(prompt, training=False)
  return {'inputs': inputs, 'head_text': head_text, 'positions': prompt['positions'],
          **_empty_caches(prompt, cfg, gen, 0, inputs.dtype)}


def prefill_chunk(model: fun_audio_chat.FunAudioChat, partial: dict,
                  cfg: ml_collections.ConfigDict, gen: GenerationConfig, index: jax.Array,
                  size: int) -> dict:
  """Prompt positions [index * size, (index + 1) * size) (index may be traced) through the LLM
  and, in s2s mode, their sub-slots through the refined head after the start-of-speech code's
  embedding (as _code_group's first call runs every prompt sub-slot), into `partial`'s caches."""
  hidden, head_text, positions, partial = _llm_chunk(model, partial, index, size)
  if gen.mode == 's2s':
    group, head = cfg.speech.group_size, model.speech_refined_head
    batch = positions.shape[0]
    sub_positions = (positions[..., None] * group + jnp.arange(group)).reshape(batch, -1)
    bos = model.adapters.code_embedding(jnp.full((batch,), cfg.speech.bos_id))
    cache = dict(partial['head_cache'], index=group * size * index)
    _, partial['head_cache'] = head.decode(head.split(hidden + head_text) + bos[:, None],
                                           sub_positions, cache, partial['head_valid'],
                                           model.adapters.code_embedding)
  return partial


def finish_prefill(model: fun_audio_chat.FunAudioChat, partial: dict,
                   cfg: ml_collections.ConfigDict, gen: GenerationConfig, key: jax.Array,
                   size: int) -> dict:
  """The prompt's last chunk, then its first text token and code group sampled as prefill
  samples them: prefill's decoding state."""
  prompt_len = partial['inputs'].shape[1]
  index = prompt_len // size - 1
  hidden, head_text, positions, partial = _llm_chunk(model, partial, index, size)
  partial['head_cache'] = dict(partial['head_cache'], index=jnp.asarray(
      cfg.speech.group_size * size * index, jnp.int32))
  return _first_token(model, hidden, head_text, positions, key, cfg, gen, partial, prompt_len,
                      prefill=False)


def _llm_chunk(model, partial: dict, index, size: int):
  """The LLM over prompt chunk `index`: its final-normed states, the head's text embeddings and
  positions there, and `partial` with the chunk in its LLM cache."""
  start = index * size
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
  cache = dict(partial['llm_cache'], index=jnp.asarray(start, jnp.int32))
  hidden, llm_cache = model.llm.decoder.decode(take(partial['inputs']), take(partial['positions']),
                                               cache, partial['llm_valid'])
  return hidden, take(partial['head_text']), take(partial['positions']), dict(partial,
                                                                              llm_cache=llm_cache)


def _empty_caches(prompt: dict, cfg: ml_collections.ConfigDict, gen: GenerationConfig,
                  keep: int, dtype) -> dict:
  """The KV caches of a generation over `keep` earlier slots, the prompt and gen's steps, with
  the prompt's slots marked valid (nothing written yet), and the text history holding it."""
  group = cfg.speech.group_size
  batch, prompt_len = prompt['input_ids'].shape
  end = keep + prompt_len
  slots = end + gen.max_new_tokens
  valid = prompt['segment_ids'] > 0
  return {
      'llm_cache': qwen3.init_cache(cfg.llm, batch, slots, dtype),
      'llm_valid': jnp.zeros((batch, slots), bool).at[:, keep:end].set(valid),
      'head_cache': qwen3.init_cache(cfg.speech_refined_head, batch, group * slots, dtype),
      'head_valid': jnp.zeros((batch, group * slots), bool).at[:, group * keep:group * end].set(
          jnp.repeat(valid, group, axis=1)),
      'text_history': jnp.full((batch, slots), -1, jnp.int32).at[:, keep:end].set(
          jnp.where(valid, prompt['input_ids'], -1)),
  }


def _first_token(model, hidden, head_text, positions, key, cfg, gen, caches: dict, end: int,
                 prefill: bool) -> dict:
  """The decoding state after the prompt's last positions (`hidden`, `head_text` and
  `positions` (B, T) hold them; the LLM cache has them written): the first text token, and in
  s2s mode the refined head's code group over them (_code_group, with `prefill` as there)."""
  tokens, speech = cfg.tokens, cfg.speech
  group = speech.group_size
  batch, steps = positions.shape[0], gen.max_new_tokens
  llm_cache, llm_valid, head_cache, head_valid, text_history = (
      caches[k] for k in ('llm_cache', 'llm_valid', 'head_cache', 'head_valid', 'text_history'))
  key, text_key, head_key = jax.random.split(key, 3)
  first_text = select(text_key, model.llm.lm_head(hidden[:, -1]), text_history[:, :end],
                      gen.text)
  if gen.force_audio_bos:
    first_text = jnp.full_like(first_text, tokens.audio_bos)

  code_embedding = model.adapters.code_embedding(jnp.full((batch,), speech.bos_id))
  if gen.mode == 's2s':
    sub_positions = (positions[..., None] * group + jnp.arange(group)).reshape(batch, -1)
    split = model.speech_refined_head.split(hidden + head_text)
    _, code_embedding, head_cache, _ = _code_group(
        model, split, sub_positions, code_embedding, head_cache, head_valid,
        jnp.zeros((batch, 0), jnp.int32), head_key, gen.speech, prefill=prefill)

  state = {
      'key': key,
      'step': jnp.ones((), jnp.int32),  # text tokens so far
      'text': jnp.full((batch, steps), tokens.endoftext, jnp.int32).at[:, 0].set(first_text),
      'text_history': text_history.at[:, end].set(first_text),
      'text_done': jnp.isin(first_text, _stop_ids(cfg)),
      'speech': jnp.full((batch, steps, group), speech.pad_id, jnp.int32),
      'num_speech': jnp.zeros((batch,), jnp.int32),
      'speaking': jnp.zeros((batch,), bool),
      'position': positions[:, -1] + 1,
      'llm_cache': llm_cache, 'llm_valid': llm_valid,
      'head_cache': head_cache, 'head_valid': head_valid,
      'code_embedding': code_embedding,
  }
  if gen.return_logits:
    state['text_logits'] = jnp.zeros((batch, steps, cfg.llm.vocab_size), jnp.float32)
    state['code_logits'] = jnp.zeros((batch, steps, group, speech.codebook_size), jnp.float32)
  return state


def _kept_cache(earlier: dict, empty: dict, slots: int) -> dict:
  """`empty` (a larger cache) holding `earlier`'s first `slots` slots, to be written from there."""
  kept = {name: empty[name].at[:, :, :slots].set(earlier[name][:, :, :slots])
          for name in ('k', 'v')}
  return {**kept, 'index': jnp.asarray(slots, jnp.int32)}


def _stop_ids(cfg):
  return jnp.asarray([cfg.tokens.im_end, cfg.tokens.endoftext])


def keep_going(state: dict) -> jax.Array:
  return (state['step'] < state['text'].shape[1]) & ~state['text_done'].all()


def decode_step(model: fun_audio_chat.FunAudioChat, state: dict, cfg: ml_collections.ConfigDict,
                gen: GenerationConfig) -> dict:
  """One 5 Hz step: an LLM decode for the next text token and, in s2s mode, the refined head's
  five decodes for the next code group."""
  tokens, speech = cfg.tokens, cfg.speech
  group = speech.group_size
  batch, steps = state['text'].shape
  prompt_len = state['llm_valid'].shape[1] - steps
  t = state['step']
  previous_text = state['text'][:, t - 1]
  # A row whose text has stopped speaks no more either.
  speaking = (state['speaking'] | (previous_text == tokens.audio_bos)) & ~state['text_done']
  last_codes = state['speech'][jnp.arange(batch), jnp.maximum(state['num_speech'] - 1, 0)]
  text_embedding = model.llm.embed_tokens(previous_text)
  mixed = (text_embedding + model.adapters.group_codes(last_codes)) / 2
  x = jnp.where((speaking & (state['num_speech'] > 0))[:, None], mixed, text_embedding)

  position = state['position'][:, None]
  llm_valid = state['llm_valid'].at[:, prompt_len + t - 1].set(True)
  hidden, llm_cache = model.llm.decoder.decode(x[:, None], position, state['llm_cache'],
                                               llm_valid)
  text_key, head_key = jax.random.split(jax.random.fold_in(state['key'], t))
  text_logits = model.llm.lm_head(hidden[:, -1])
  text = select(text_key, text_logits, state['text_history'], gen.text)
  text = jnp.where(state['text_done'], tokens.endoftext, text)
  new = dict(state, step=t + 1, llm_cache=llm_cache, llm_valid=llm_valid,
             position=state['position'] + 1, speaking=speaking)
  if gen.return_logits:
    new['text_logits'] = state['text_logits'].at[:, t].set(text_logits)

  if gen.mode == 's2s':
    head_valid = jax.lax.dynamic_update_slice(
        state['head_valid'], jnp.ones((batch, group), bool), (0, group * (prompt_len + t - 1)))
    split = model.speech_refined_head.split(hidden + text_embedding[:, None])
    sub_positions = position * group + jnp.arange(group)
    spoken = jnp.where(jnp.arange(steps * group) < group * state['num_speech'][:, None],
                       state['speech'].reshape(batch, -1), -1)
    codes, code_embedding, head_cache, code_logits = _code_group(
        model, split, sub_positions, state['code_embedding'], state['head_cache'], head_valid,
        spoken, head_key, gen.speech)
    if gen.return_logits:
      new['code_logits'] = state['code_logits'].at[:, t].set(code_logits)
    finished = speaking & (codes == speech.eos_id).any(axis=1)
    codes = jnp.where(finished[:, None], speech.eos_id, codes)
    row = jnp.arange(batch)
    new['speech'] = state['speech'].at[row, state['num_speech']].set(
        jnp.where(speaking[:, None], codes, state['speech'][row, state['num_speech']]))
    new['num_speech'] = state['num_speech'] + speaking
    new['speaking'] = speaking & ~finished
    text = jnp.where(finished, tokens.audio_eos, text)
    new.update(head_cache=head_cache, head_valid=head_valid, code_embedding=code_embedding)

  new['text'] = state['text'].at[:, t].set(text)
  new['text_history'] = state['text_history'].at[:, prompt_len + t].set(text)
  new['text_done'] = state['text_done'] | jnp.isin(text, _stop_ids(cfg))
  return new


def outputs(state: dict, cfg: ml_collections.ConfigDict) -> dict:
  """text (B, max_new_tokens) with the pad token after a row stops, num_text (B,), speech
  (B, max_new_tokens, 5), num_speech_groups (B,), and the logits when they were kept."""
  stopped = jnp.isin(state['text'], _stop_ids(cfg))
  num_text = jnp.where(stopped.any(1), stopped.argmax(1) + 1, state['step'])
  out = {'text': state['text'], 'num_text': num_text, 'speech': state['speech'],
         'num_speech_groups': state['num_speech']}
  out.update({k: state[k] for k in ('text_logits', 'code_logits') if k in state})
  return out


def generate_state(model: fun_audio_chat.FunAudioChat, prompt: dict,
                   cfg: ml_collections.ConfigDict, gen: GenerationConfig, key: jax.Array,
                   earlier: dict | None = None) -> dict:
  """Prefill (continuing `earlier`, see prefill), then decode steps in a while_loop until every
  row stops; the final state. Pure: jit it."""
  state = prefill(model, prompt, cfg, gen, key, earlier)
  return jax.lax.while_loop(keep_going, lambda s: decode_step(model, s, cfg, gen), state)


def generate(model: fun_audio_chat.FunAudioChat, prompt: dict, cfg: ml_collections.ConfigDict,
             gen: GenerationConfig, key: jax.Array) -> dict:
  """Prefill, then decode steps in a while_loop until every row stops. Pure: jit it."""
  return outputs(generate_state(model, prompt, cfg, gen, key), cfg)


def make_generate_fn(graphdef: nnx.GraphDef, cfg: ml_collections.ConfigDict,
                     gen: GenerationConfig):
  """jit(params, prompt, key) -> outputs of `generate`."""
  return jax.jit(lambda params, prompt, key: generate(nnx.merge(graphdef, params), prompt, cfg,
                                                      gen, key))


def make_generate_state_fn(graphdef: nnx.GraphDef, cfg: ml_collections.ConfigDict,
                           gen: GenerationConfig):
  """jit(params, prompt, key, earlier=None) -> the final state of `generate_state`."""
  return jax.jit(lambda params, prompt, key, earlier=None: generate_state(
      nnx.merge(graphdef, params), prompt, cfg, gen, key, earlier))
