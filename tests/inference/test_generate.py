"""Generation: the official greedy speech-to-speech output reproduced exactly; determinism; rows
of a left-padded batch generate as they would alone; stop conditions on hand-set weights."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fac_jax.data import conversation, synthetic
from fac_jax.inference import generate
from fac_jax.model import fun_audio_chat
from official_tiny import KEY, greedy, prompt_of


def test_greedy_speech_to_speech_reproduces_official(golden_generation):
  cfg, model, prompt, reference = golden_generation
  graphdef, state = nnx.split(model)
  new_tokens = reference['out_ids'].shape[1] - reference['input_ids'].shape[1]
  fn = generate.make_generate_fn(graphdef, cfg, greedy(new_tokens))
  out = jax.device_get(fn(nnx.to_pure_dict(state), prompt, KEY))
  np.testing.assert_array_equal(out['text'][0, :out['num_text'][0]],
                                reference['out_ids'][0, reference['input_ids'].shape[1]:])
  codes = out['speech'][0, :out['num_speech_groups'][0]].reshape(-1)
  np.testing.assert_array_equal(codes, reference['out_speech_ids'][0])
  again = jax.device_get(fn(nnx.to_pure_dict(state), prompt, jax.random.key(9)))  # greedy
  jax.tree.map(np.testing.assert_array_equal, out, again)


def test_rows_of_a_padded_batch_generate_as_alone(tiny_config):
  cfg = tiny_config.model
  rng = np.random.default_rng(3)
  examples = []
  for _ in range(2):
    pieces = synthetic.conversation_pieces(rng, cfg)[:3]  # system, user audio, template
    pieces.append(conversation.Text([cfg.tokens.audio_bos], trained=False))
    examples.append(conversation.format_conversation(pieces, cfg))
  assert len(examples[0]['input_ids']) != len(examples[1]['input_ids'])
  num_windows = max(len(e['mel_lengths']) for e in examples)
  graphdef, state = nnx.split(fun_audio_chat.create(cfg, seed=2))
  params = nnx.to_pure_dict(state)
  fn = generate.make_generate_fn(graphdef, cfg, greedy(6))
  together = jax.device_get(fn(params, conversation.prompt_batch(examples, cfg), KEY))
  for row, example in enumerate(examples):
    alone = jax.device_get(fn(params, conversation.prompt_batch([example], cfg,
                                                                num_windows=num_windows), KEY))
    for key in together:
      np.testing.assert_array_equal(together[key][row], alone[key][0], err_msg=key)


def test_stops_on_eos_code_and_stop_token(tiny_config):
  graphdef, state = nnx.split(fun_audio_chat.create(tiny_config.model, seed=4))
  params = nnx.to_pure_dict(state)
  prompt = prompt_of(synthetic.batch(np.random.default_rng(5), tiny_config.model, 1, 96, 16))

  def run(cfg):
    fn = generate.make_generate_fn(graphdef, cfg, greedy(10))
    return jax.device_get(fn(params, prompt, KEY))

  # Greedy runs are deterministic, so we declare as eos the code the model first speaks at
  # step 1, and as the stop token the text it then writes at step 2.
  cfg = copy.deepcopy(tiny_config.model)
  free = run(cfg)
  assert free['num_speech_groups'][0] > 1 and free['num_text'][0] == 10
  cfg.speech.eos_id = int(free['speech'][0, 0, 2])
  speech_stopped = run(cfg)
  assert speech_stopped['num_speech_groups'][0] == 1
  assert (speech_stopped['speech'][0, 0] == cfg.speech.eos_id).all()  # the group becomes eos
  tok = cfg.tokens
  assert speech_stopped['text'][0, :2].tolist() == [tok.audio_bos, tok.audio_eos]
  cfg.tokens.im_end = int(speech_stopped['text'][0, 2])
  assert cfg.tokens.im_end not in (tok.audio_bos, tok.audio_eos)
  both_stopped = run(cfg)
  assert both_stopped['num_text'][0] == 3
  assert both_stopped['text'][0, :3].tolist() == [tok.audio_bos, tok.audio_eos, tok.im_end]
  assert (both_stopped['text'][0, 3:] == tok.endoftext).all()


def test_speech_to_text_mode_skips_speech(golden_generation):
  cfg, model, prompt, reference = golden_generation
  graphdef, state = nnx.split(model)
  new_tokens = reference['out_ids'].shape[1] - reference['input_ids'].shape[1]
  fn = generate.make_generate_fn(graphdef, cfg, greedy(new_tokens, mode='s2t'))
  out = jax.device_get(fn(nnx.to_pure_dict(state), prompt, KEY))
  assert out['num_speech_groups'][0] == 0
  # The text channel does not read the refined head, and the first step has no codes yet.
  assert out['text'][0, 0] == reference['out_ids'][0, reference['input_ids'].shape[1]]


def test_sampled_generation_depends_only_on_the_key(golden_generation):
  cfg, model, prompt, _ = golden_generation
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  fn = generate.make_generate_fn(graphdef, cfg, generate.GenerationConfig(12))  # DESIGN defaults
  a = jax.device_get(fn(params, prompt, jax.random.key(1)))
  b = jax.device_get(fn(params, prompt, jax.random.key(1)))
  c = jax.device_get(fn(params, prompt, jax.random.key(2)))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not all(np.array_equal(a[k], c[k]) for k in ('text', 'speech'))


def test_cached_steps_match_an_uncached_replay(golden_generation):
  """Every step's text and code logits from the cached loop equal a replay that reruns the whole
  sequence through the uncached forward at every step (max relative error 1e-4)."""
  cfg, model, prompt, _ = golden_generation
  graphdef, state = nnx.split(model)
  steps = 4
  gen = dataclasses.replace(greedy(steps), return_logits=True)
  out = jax.device_get(generate.make_generate_fn(graphdef, cfg, gen)(
      nnx.to_pure_dict(state), prompt, KEY))
  text, codes = out['text'][0], out['speech'][0]

  embed, group_codes = model.llm.embed_tokens, model.adapters.group_codes
  code_embedding, head = model.adapters.code_embedding, model.speech_refined_head
  group = head.group_size
  llm_inputs, head_text = model.embed_inputs(jax.tree.map(jnp.asarray, prompt), training=False)
  llm_inputs = llm_inputs[0]
  length = llm_inputs.shape[0]

  def llm_hidden(inputs):
    n = inputs.shape[0]
    return model.llm.decoder(inputs[None], jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))[0]

  def head_logits(inputs):
    n = inputs.shape[0]
    hidden = head.decoder(head.down_projection(inputs[None]), jnp.arange(n)[None],
                          jnp.ones((1, n), jnp.int32))
    return code_embedding.attend(head.up_projection(hidden))[0, -1]

  def speak(head_inputs, split, previous_code):
    """Five uncached sub-steps; returns the extended inputs, the codes and their logits."""
    head_inputs = jnp.concatenate([head_inputs, split[:-(group - 1)] + code_embedding(
        previous_code)])
    logits = [head_logits(head_inputs)]
    spoken = [int(jnp.argmax(logits[-1]))]
    for j in range(1, group):
      head_inputs = jnp.concatenate([head_inputs, (split[-group + j] + code_embedding(
          jnp.asarray(spoken[-1])))[None]])
      logits.append(head_logits(head_inputs))
      spoken.append(int(jnp.argmax(logits[-1])))
    return head_inputs, spoken, jnp.stack(logits)

  hidden = llm_hidden(llm_inputs)
  split = head.split((hidden + head_text[0])[None])[0]
  head_inputs, spoken, _ = speak(jnp.zeros((0, split.shape[-1])), split,
                                 jnp.asarray(cfg.speech.bos_id))
  for t in range(1, steps):
    previous = embed(jnp.asarray(text[t - 1]))
    x = previous if t == 1 else (previous + group_codes(jnp.asarray(codes[t - 2]))) / 2
    llm_inputs = jnp.concatenate([llm_inputs, x[None]])
    hidden = llm_hidden(llm_inputs)
    text_logits = model.llm.lm_head(hidden[-1])
    assert float(jnp.abs(text_logits - out['text_logits'][0, t]).max()
                 / jnp.abs(text_logits).max()) < 1e-4
    assert int(jnp.argmax(text_logits)) == text[t]
    split = head.split((hidden[-1] + previous)[None, None])[0]
    head_inputs, spoken, logits = speak(head_inputs, split, jnp.asarray(spoken[-1]))
    assert float(jnp.abs(logits - out['code_logits'][0, t]).max() / jnp.abs(logits).max()) < 1e-4
    assert spoken == codes[t - 1].tolist()
  assert llm_inputs.shape[0] == length + steps - 1


def test_rows_stop_independently(tiny_config):
  rng = np.random.default_rng(7)
  prompt = prompt_of(synthetic.batch(rng, tiny_config.model, 2, 96, 16))
  graphdef, state = nnx.split(fun_audio_chat.create(tiny_config.model, seed=6))
  params = nnx.to_pure_dict(state)

  def run(cfg):
    return jax.device_get(generate.make_generate_fn(graphdef, cfg, greedy(8))(params, prompt, KEY))

  free = run(tiny_config.model)
  # A token row 0 writes at step 3 that row 1 never writes becomes the stop token.
  stop = int(free['text'][0, 3])
  assert stop not in free['text'][1].tolist() and stop not in free['text'][0, :3].tolist()
  cfg = copy.deepcopy(tiny_config.model)
  cfg.tokens.im_end = stop
  stopped = run(cfg)
  assert stopped['num_text'].tolist() == [4, 8]
  np.testing.assert_array_equal(stopped['text'][0, :4], free['text'][0, :4])
  assert (stopped['text'][0, 4:] == cfg.tokens.endoftext).all()
  assert stopped['num_speech_groups'].tolist() == [3, free['num_speech_groups'][1]]
  np.testing.assert_array_equal(stopped['text'][1], free['text'][1])
  np.testing.assert_array_equal(stopped['speech'][1], free['speech'][1])
