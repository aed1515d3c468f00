"""Function calling in the data: a conversation with a tool declaration, a call, its result and a
spoken answer formatted with hand-checked ids, masks and targets; manifest lines with tools
validated (each refusal names the line and field); declarations, calls and arguments checked."""

import json

import numpy as np
import pytest

from fac_jax.batch import IGNORE_ID
from fac_jax.checkpoints import text_tokenizer
from fac_jax.data import conversation, input_pipeline, manifest, tools

TIMER = {'name': 'set_timer', 'parameters': {
    'type': 'object', 'properties': {'minutes': {'type': 'integer'}}, 'required': ['minutes']}}


def test_a_tool_conversation_is_formatted_with_hand_checked_spans(tiny_config, tmp_path):
  model, tok = tiny_config.model, tiny_config.model.tokens
  call = tools.Call('set_timer', {'minutes': 5})
  system = tools.system_text('Be brief.', [TIMER])
  assert system == 'Be brief.\n<tools>\n' + json.dumps(TIMER) + '\n</tools>'
  texts = list(conversation.CHAT_TEMPLATE_TEXTS) + [system, tools.call_text(call),
                                                     tools.response_text('{"ok": 5}'), 'Done.']
  tokenizer = text_tokenizer.train_bpe(texts, dict(tok), str(tmp_path))
  enc = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
  codes = np.arange(8, dtype=np.int32)  # 2 delay groups + 8 codes -> 4 positions, 2 slots over
  record = {
      'conversation': json.dumps({
          'id': 'x', 'task': 'function_calling', 'system': 'Be brief.', 'tools': [TIMER],
          'meta': {}, 'turns': [
              {'role': 'user', 'text': 'Time five.'},
              {'role': 'assistant', 'text': None, 'tool_call': {'name': 'set_timer',
                                                                 'arguments': {'minutes': 5}}},
              {'role': 'tool', 'text': '{"ok": 5}'},
              {'role': 'assistant', 'text': 'Done.', 'seconds': 0.4, 'codes': [0, 8]}]}),
      'mel': np.zeros((0, model.encoder.num_mel_bins), np.float16), 'codes': codes}
  out = input_pipeline.FormatRecord(str(tmp_path), model)(record)

  head = ([tok.im_start] + enc('system\n' + system) + [tok.im_end] + enc('\n')
          + [tok.im_start] + enc('user\n') + enc('Time five.') + [tok.im_end] + enc('\n')
          + [tok.im_start] + enc('assistant\n'))
  call_ids = enc('<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 5}}\n</tool_call>')
  result = ([tok.im_start] + enc('user\n<tool_response>\n{"ok": 5}\n</tool_response>')
            + [tok.im_end] + enc('\n') + [tok.im_start] + enc('assistant\n'))
  text = enc('Done.') + [tok.sil] * (4 - len(enc('Done.')))
  expected = (head + call_ids + [tok.im_end] + enc('\n') + result + [tok.audio_bos] + text
              + [tok.audio_eos, tok.im_end] + enc('\n'))
  np.testing.assert_array_equal(out['input_ids'], expected)
  call_start = len(head)
  answer_start = call_start + len(call_ids) + 1 + len(enc('\n')) + len(result) + 1
  answer = list(range(answer_start, answer_start + 4))
  np.testing.assert_array_equal(np.flatnonzero(out['audio_mask']), answer)  # the call is silent
  np.testing.assert_array_equal(np.flatnonzero(out['text_mask']), answer)
  # Text targets (position i predicts token i + 1): the call and its <|im_end|> are trained, the
  # template around it and the tool's result are not; then the spoken answer as usual.
  targets = out['text_targets']
  trained = np.flatnonzero(targets != IGNORE_ID)
  call_span = list(range(call_start - 1, call_start + len(call_ids)))
  answer_span = list(range(answer_start - 2, answer[-1] + 2))
  np.testing.assert_array_equal(trained, call_span + answer_span)
  np.testing.assert_array_equal(targets[call_span], call_ids + [tok.im_end])
  np.testing.assert_array_equal(targets[answer_span], [tok.audio_bos] + text
                                + [tok.audio_eos, tok.im_end])
  # Speech targets only in the spoken answer: bos delay, codes, then eos after the last group.
  spoken = np.flatnonzero((out['speech_targets'] != IGNORE_ID).any(axis=1))
  np.testing.assert_array_equal(spoken, list(range(answer_start - 1, answer[-1] + 1)))
  np.testing.assert_array_equal(out['speech_targets'][answer_start - 1:answer[-1]].ravel(),
                                [model.speech.bos_id] * 10 + codes.tolist() + [IGNORE_ID] * 2)
  np.testing.assert_array_equal(out['speech_targets'][answer[-1]], [model.speech.eos_id] * 5)


def line(**changes) -> str:
  record = {'id': 'fc', 'system': 'Be brief.', 'tools': [TIMER], 'turns': [
      {'role': 'user', 'text': 'set a timer for five minutes'},
      {'role': 'assistant', 'tool_call': {'name': 'set_timer', 'arguments': {'minutes': 5}}},
      {'role': 'tool', 'text': '{"timer_minutes": 5}'},
      {'role': 'assistant', 'text': 'timer set'}]}
  record.update(changes)
  return json.dumps(record)


def test_a_manifest_line_with_tools_is_read():
  conv = manifest.parse_line(line(), 'm.jsonl', 3)
  assert conv.tools == [TIMER]
  assert [t.role for t in conv.turns] == ['user', 'assistant', 'tool', 'assistant']
  assert conv.turns[1].tool_call == tools.Call('set_timer', {'minutes': 5})
  assert conv.turns[1].text is None and conv.turns[2].text == '{"timer_minutes": 5}'


def turns_with(call=None, after=None):
  call = call or {'name': 'set_timer', 'arguments': {'minutes': 5}}
  after = after or {'role': 'tool', 'text': '{}'}
  return [{'role': 'user', 'text': 'q'}, {'role': 'assistant', 'tool_call': call}, after,
          {'role': 'assistant', 'text': 'a'}]


@pytest.mark.parametrize('changes, message', [
    ({'tools': [{'name': 'x', 'parameters': {'type': 'array'}}]},
     r'm.jsonl:3: field "tools": tools\[0\]: tool \'x\': "parameters" must be a JSON schema of '
     'type object'),
    ({'tools': [TIMER, TIMER]}, r'field "tools": tools\[1\]: a second tool named \'set_timer\''),
    ({'tools': []}, 'field "tools": tools must be a non-empty list'),
    ({'turns': turns_with({'name': 'alarm', 'arguments': {}})},
     r'm.jsonl:3: turns\[1\]: field "tool_call": unknown tool \'alarm\'; declared: '
     r"\['set_timer'\]"),
    ({'turns': turns_with({'name': 'set_timer', 'arguments': {'minutes': 'five'}})},
     r'turns\[1\]: field "tool_call": set_timer: argument \'minutes\' must be of type integer, '
     'got "five"'),
    ({'turns': turns_with({'name': 'set_timer', 'arguments': {}})},
     r"turns\[1\]: field \"tool_call\": set_timer: missing required arguments \['minutes'\]"),
    ({'turns': turns_with({'name': 'set_timer'})},
     r'turns\[1\]: field "tool_call" must be \{"name": string, "arguments": object\}'),
    ({'turns': turns_with(after={'role': 'assistant', 'text': 'a'})},
     r'turns\[2\]: the turn after a "tool_call" must be its result, a "tool" turn'),
    ({'turns': [{'role': 'user', 'text': 'q'}, {'role': 'tool', 'text': '{}'},
                {'role': 'assistant', 'text': 'a'}]},
     r'turns\[1\]: a tool turn needs "text" \(the result, no "audio"\) and must follow'),
    ({'turns': turns_with()[:2]}, r'the last turn must be the assistant\'s answer'),
])
def test_bad_tool_lines_are_refused_naming_line_and_field(changes, message):
  with pytest.raises(manifest.ManifestError, match=message):
    manifest.parse_line(line(**changes), 'm.jsonl', 3)


def test_a_call_needs_declarations_and_cannot_speak():
  record = json.loads(line())
  del record['tools']
  with pytest.raises(manifest.ManifestError,
                     match=r'turns\[1\]: field "tool_call" needs the conversation\'s "tools"'):
    manifest.parse_line(json.dumps(record), 'm.jsonl', 3)
  record = json.loads(line())
  record['turns'][1]['audio'] = 'a.wav'
  with pytest.raises(manifest.ManifestError, match=r'turns\[1\]: only an assistant turn without '
                                                   '"text" or "audio" may hold "tool_call"'):
    manifest.parse_line(json.dumps(record), 'm.jsonl', 3)


def test_calls_are_parsed_and_malformed_ones_refused():
  assert tools.parse_call('Done.') is None
  assert tools.parse_call(tools.call_text(tools.Call('f', {'x': 1}))) == tools.Call('f', {'x': 1})
  for text, message in (('<tool_call>\n{"name": "f"', 'no closing </tool_call>'),
                        ('<tool_call>{"name": f}</tool_call>', 'not valid JSON'),
                        ('<tool_call>["f"]</tool_call>', 'must be {"name": string')):
    with pytest.raises(tools.ToolError, match=message):
      tools.parse_call(text)


def test_arguments_are_checked_against_the_schema():
  tool = tools.declaration({'type': 'function', 'function': {'name': 'f', 'parameters': {
      'type': 'object', 'properties': {'n': {'type': 'integer'}, 'on': {'type': 'boolean'},
                                       'x': {'type': 'number'},
                                       'unit': {'type': 'string', 'enum': ['a', 'b']}}}}})
  tools.check_arguments(tool, {'n': 3, 'on': False, 'x': 2.5, 'unit': 'a'})
  for arguments, message in (({'n': True}, "'n' must be of type integer, got true"),
                             ({'on': 1}, "'on' must be of type boolean, got 1"),
                             ({'n': 1.5}, "'n' must be of type integer, got 1.5"),
                             ({'unit': 'c'}, r"'unit' must be one of \['a', 'b'\], got \"c\""),
                             ({'y': 1}, r"unknown arguments \['y'\]"),
                             ([1], '"arguments" must be an object')):
    with pytest.raises(tools.ToolError, match=message):
      tools.check_arguments(tool, arguments)


def test_demo_tools_answer_from_fixed_tables():
  declared = tools.declarations(tools.DEMO_TOOLS)
  assert sorted(declared) == sorted(tools.DEMO_FUNCTIONS)
  assert tools.convert_units(3, 'weeks') == {'days': 21}
  assert tools.get_weather('oslo') == {'weather': 'snowy'}
  assert tools.calculate(7, 'times', 8) == {'result': 56}
  with pytest.raises(tools.ToolError, match="no weather for 'mars'"):
    tools.get_weather('mars')
