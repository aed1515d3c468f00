"""Function calling at inference: a generation continued from its KV caches after appended turns
equals a fresh generation over the whole history (tokens, codes and logits); the tool loop parses
the call, runs it and answers from the result, and malformed JSON, an unknown tool, a schema
violation and a raising callable come back to the model as error turns, never a crash."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import paths

from fac_jax import config as config_lib
from fac_jax.checkpoints import text_tokenizer
from fac_jax.data import conversation, input_pipeline, synthetic, tools as tools_data
from fac_jax.inference import generate, sampling, tools
from fac_jax.model import fun_audio_chat

PLAIN = sampling.Sampling(greedy=True)  # argmax after the repetition penalty over the history
TIMER = {'name': 'set_timer', 'parameters': {
    'type': 'object', 'properties': {'minutes': {'type': 'integer'}}, 'required': ['minutes']}}


def gen_config(steps, force_audio_bos):
  return generate.GenerationConfig(steps, force_audio_bos=force_audio_bos, text=PLAIN,
                                   speech=PLAIN, return_logits=True)


@pytest.fixture(scope='module')
def model():
  cfg = config_lib.load(paths.TINY_CONFIG).model
  graphdef, state = nnx.split(fun_audio_chat.create(cfg, seed=11))
  return cfg, graphdef, nnx.to_pure_dict(state)


def assert_same_generation(resumed, fresh, row):
  for name in ('text', 'speech', 'num_speech', 'step'):
    got = resumed[name] if name == 'step' else resumed[name][row]
    want = fresh[name] if name == 'step' else fresh[name][0]
    np.testing.assert_array_equal(got, want, err_msg=name)
  for name in ('text_logits', 'code_logits'):
    np.testing.assert_allclose(resumed[name][row], fresh[name][0], rtol=1e-4, atol=1e-4,
                               err_msg=name)


def test_a_continuation_from_the_kv_caches_equals_a_fresh_generation(model):
  """Two rows of different lengths (a spoken question each) generate a text-only turn; a turn
  appended to each (of different lengths) continues from the caches, speaking, and every row's
  tokens, codes and logits equal those of a fresh prefill of its whole history."""
  cfg, graphdef, params = model
  rng = np.random.default_rng(4)
  plain = min(cfg.tokens.values())
  words = lambda n: rng.integers(0, plain, size=n).tolist()
  header = conversation.Text([cfg.tokens.im_start] + words(2), trained=False)
  histories = [synthetic.conversation_pieces(rng, cfg)[:3] + [header] for _ in range(2)]
  first = [conversation.format_conversation(pieces, cfg) for pieces in histories]
  assert len(first[0]['input_ids']) != len(first[1]['input_ids'])
  num_windows = max(len(e['mel_lengths']) for e in first)
  call_gen, answer_gen = gen_config(5, force_audio_bos=False), gen_config(6, True)
  run = lambda gen: generate.make_generate_state_fn(graphdef, cfg, gen)
  key = jax.random.key(3)
  called = run(call_gen)(params, conversation.prompt_batch(first, cfg), key)
  assert (jax.device_get(called['num_speech']) == 0).all()  # a text-only turn, as a call is

  appended = [[conversation.Text(words(n) + [cfg.tokens.im_start] + words(2), trained=False)]
              for n in (3, 9)]
  chunk = tools.continuation_prompt(called, appended, cfg)
  resumed = jax.device_get(run(answer_gen)(params, chunk, key, called))
  assert (resumed['num_speech'] > 0).all()  # the refined head's caches are in play
  generated = jax.device_get(called['text'])
  for row in range(2):
    whole = histories[row] + [conversation.Text(generated[row].tolist(), trained=False)] + (
        appended[row])
    fresh_prompt = conversation.prompt_batch([conversation.format_conversation(whole, cfg)], cfg,
                                             num_windows=num_windows)
    fresh = jax.device_get(run(answer_gen)(params, fresh_prompt, key))
    assert_same_generation(resumed, fresh, row)


class Counter:
  def __init__(self):
    self.calls = []

  def set_timer(self, minutes):
    self.calls.append(minutes)
    return {'timer_minutes': minutes}


def test_the_registry_answers_every_call_and_turns_every_failure_into_an_error_turn():
  def broken(**kwargs):
    raise RuntimeError('the clock is gone')

  counter = Counter()
  registry = tools.Registry([TIMER, {'name': 'alarm'}], {'set_timer': counter.set_timer,
                                                         'alarm': broken})
  good = registry.respond(tools_data.call_text(tools_data.Call('set_timer', {'minutes': 5})))
  assert (good.called, good.call, json.loads(good.content)) == (
      True, tools_data.Call('set_timer', {'minutes': 5}), {'timer_minutes': 5})
  assert registry.respond('Five minutes it is.') == tools.Response(called=False)
  for text, error in (
      ('<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 5}\n</tool_call>',
       'the call is not valid JSON'),
      ('<tool_call>{"name": "oven", "arguments": {}}</tool_call>', "unknown tool 'oven'"),
      ('<tool_call>{"name": "set_timer", "arguments": {"minutes": "five"}}</tool_call>',
       "argument 'minutes' must be of type integer"),
      ('<tool_call>{"name": "set_timer", "arguments": {}}</tool_call>',
       "missing required arguments ['minutes']"),
      ('<tool_call>{"name": "alarm", "arguments": {}}</tool_call>',
       'alarm failed: the clock is gone')):
    response = registry.respond(text)
    assert response.called and error in json.loads(response.content)['error'], text
  assert counter.calls == [5]  # only the valid call ran
  with pytest.raises(tools_data.ToolError, match=r"no callable for the declared tools \['alarm'\]"):
    tools.Registry([TIMER, {'name': 'alarm'}], {'set_timer': counter.set_timer})


def test_the_tool_loop_answers_from_the_result_after_error_turns(model, tmp_path):
  """Scripted calls (the tiny model writes no JSON): malformed, unknown tool, schema violation,
  then a good call; each comes back as a tool turn, and the answer after the last equals a fresh
  generation over the whole conversation."""
  cfg, graphdef, params = model
  tok = cfg.tokens
  texts = list(conversation.CHAT_TEMPLATE_TEXTS) + [
      tools_data.response_text('{"error": "x"}'), tools_data.response_text('{"timer_minutes": 5}')]
  text_tokenizer.train_bpe(texts, dict(tok), str(tmp_path))
  fmt = input_pipeline.FormatRecord(str(tmp_path), cfg)
  scripted = ['<tool_call>{"name": set_timer}</tool_call>',
              '<tool_call>{"name": "oven", "arguments": {}}</tool_call>',
              '<tool_call>{"name": "set_timer", "arguments": {"minutes": -1.5}}</tool_call>',
              '<tool_call>{"name": "set_timer", "arguments": {"minutes": 5}}</tool_call>',
              'timer set']
  decoded = []

  def decode(ids):
    decoded.append(ids)
    return scripted[len(decoded) - 1]

  counter = Counter()
  registry = tools.Registry([TIMER], {'set_timer': counter.set_timer})
  rng = np.random.default_rng(5)
  history = synthetic.conversation_pieces(rng, cfg)[:3] + [
      conversation.Text([tok.im_start] + fmt.encode('assistant\n'), trained=False)]
  prompt = conversation.prompt_batch([conversation.format_conversation(history, cfg)], cfg)
  gen = gen_config(4, force_audio_bos=False)
  fn = generate.make_generate_state_fn(graphdef, cfg, gen)
  key = jax.random.key(0)
  turns = tools.converse(fn, params, prompt, registry, fmt, decode, key, max_calls=4)

  assert len(turns) == 5 and [t.response.called for t in turns] == [True] * 4 + [False]
  errors = [json.loads(t.response.content).get('error', '') for t in turns[:3]]
  assert 'not valid JSON' in errors[0] and "unknown tool 'oven'" in errors[1]
  assert "'minutes' must be of type integer, got -1.5" in errors[2]
  assert turns[3].response.call == tools_data.Call('set_timer', {'minutes': 5})
  assert json.loads(turns[3].response.content) == {'timer_minutes': 5} and counter.calls == [5]
  assert [t.text for t in turns] == decoded

  whole = list(history)
  for turn in turns[:4]:
    whole += [conversation.Text(turn.text, trained=False)] + tools.tool_turn(
        fmt, turn.response.content)
  fresh = jax.device_get(fn(params, conversation.prompt_batch(
      [conversation.format_conversation(whole, cfg)], cfg), jax.random.fold_in(key, 4)))
  count = int(tools.num_text(fresh['text'], fresh['step'], cfg)[0])
  assert turns[4].text == fresh['text'][0, :count].tolist()
  assert turns[4].codes == fresh['speech'][0, :fresh['num_speech'][0]].reshape(-1).tolist()
