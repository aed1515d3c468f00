"""Function calling in the chat template (Qwen3's layout), tool declarations and their argument
checks, and the demo tools of the synthesised corpus.

  system turn     the persona, then the tools' JSON schemas, one a line, inside <tools></tools>
                  (a persona holding "{tools_definition}" gets them there instead, as the
                  official FUNCTION_CALLING_PROMPT does)
  assistant call  <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, text only
  tool result     a user turn <tool_response>\\n...\\n</tool_response>, as Qwen3 renders a tool
                  message

A declaration is {"name", "description" (optional), "parameters": a JSON schema of type object
whose "properties" give each argument a "type" (string, integer, number, boolean) and optionally
an "enum"; "required" lists the arguments a call must give}; the official {"type": "function",
"function": {...}} wrapper is accepted too.
"""

import dataclasses
import json

TOOLS_PLACEHOLDER = '{tools_definition}'
CALL_OPEN, CALL_CLOSE = '<tool_call>', '</tool_call>'
RESPONSE_OPEN, RESPONSE_CLOSE = '<tool_response>', '</tool_response>'
# The official function-calling system prompt (utils/constant.py), for a checkpoint that was not
# trained on a persona of its own.
OFFICIAL_PROMPT = (
    'You are asked to generate text tokens.\n# Tools\n\nYou may call one or more functions to '
    'assist with the user query.\n\nYou are provided with function signatures within '
    '<tools></tools> XML tags:\n<tools>\n' + TOOLS_PLACEHOLDER + '\n</tools>\n\nFor each '
    'function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    '<args-json-object>}\n</tool_call>')
TYPES = {'string': str, 'integer': int, 'number': (int, float), 'boolean': bool}


class ToolError(ValueError):
  """A declaration, call or arguments that do not fit; the message says what was expected."""


@dataclasses.dataclass(frozen=True)
class Call:
  name: str
  arguments: dict


def declaration(tool) -> dict:
  """A checked declaration without the official wrapper; ToolError says what is wrong."""
  if isinstance(tool, dict) and tool.get('type') == 'function' and 'function' in tool:
    tool = tool['function']
  if not isinstance(tool, dict) or not isinstance(tool.get('name'), str) or not tool['name']:
    raise ToolError('a tool must be an object with a non-empty string "name"')
  unknown = sorted(set(tool) - {'name', 'description', 'parameters'})
  if unknown:
    raise ToolError(f'tool {tool["name"]!r}: unknown fields {unknown}; expected name, '
                    'description, parameters')
  schema = tool.get('parameters', {'type': 'object', 'properties': {}})
  if (not isinstance(schema, dict) or schema.get('type') != 'object'
      or not isinstance(schema.get('properties', {}), dict)):
    raise ToolError(f'tool {tool["name"]!r}: "parameters" must be a JSON schema of type object '
                    'with "properties"')
  for name, prop in schema.get('properties', {}).items():
    if not isinstance(prop, dict) or prop.get('type') not in TYPES:
      raise ToolError(f'tool {tool["name"]!r}: argument {name!r} needs a "type", one of '
                      f'{list(TYPES)}')
    if 'enum' in prop and not (isinstance(prop['enum'], list) and prop['enum']):
      raise ToolError(f'tool {tool["name"]!r}: argument {name!r}: "enum" must be a non-empty list')
  required = schema.get('required', [])
  if not isinstance(required, list) or not set(required) <= set(schema.get('properties', {})):
    raise ToolError(f'tool {tool["name"]!r}: "required" must list declared arguments')
  return {**tool, 'parameters': schema}


def declarations(tools) -> dict[str, dict]:
  """A list of declarations -> {name: checked declaration}; names must be unique."""
  if not isinstance(tools, list) or not tools:
    raise ToolError('tools must be a non-empty list of declarations')
  checked = {}
  for i, tool in enumerate(tools):
    try:
      tool = declaration(tool)
    except ToolError as e:
      raise ToolError(f'tools[{i}]: {e}') from None
    if tool['name'] in checked:
      raise ToolError(f'tools[{i}]: a second tool named {tool["name"]!r}')
    checked[tool['name']] = tool
  return checked


def check_arguments(tool: dict, arguments) -> None:
  """ToolError unless `arguments` fit the tool's schema: an object, only declared arguments,
  every required one, each of its type and in its enum."""
  schema = tool['parameters']
  properties = schema.get('properties', {})
  if not isinstance(arguments, dict):
    raise ToolError(f'{tool["name"]}: "arguments" must be an object')
  unknown = sorted(set(arguments) - set(properties))
  if unknown:
    raise ToolError(f'{tool["name"]}: unknown arguments {unknown}; expected {sorted(properties)}')
  missing = sorted(set(schema.get('required', [])) - set(arguments))
  if missing:
    raise ToolError(f'{tool["name"]}: missing required arguments {missing}')
  for name, value in arguments.items():
    prop = properties[name]
    kind = TYPES[prop['type']]
    if isinstance(value, bool) != (prop['type'] == 'boolean') or not isinstance(value, kind):
      raise ToolError(f'{tool["name"]}: argument {name!r} must be of type {prop["type"]}, got '
                      f'{json.dumps(value)}')
    if 'enum' in prop and value not in prop['enum']:
      raise ToolError(f'{tool["name"]}: argument {name!r} must be one of {prop["enum"]}, got '
                      f'{json.dumps(value)}')


def check_call(tools: dict[str, dict], call: Call) -> None:
  """ToolError unless the call names a declared tool with arguments that fit it."""
  if call.name not in tools:
    raise ToolError(f'unknown tool {call.name!r}; declared: {sorted(tools)}')
  check_arguments(tools[call.name], call.arguments)


def system_text(system: str | None, tools: list[dict]) -> str:
  """The system turn's text: the persona and the tools' schemas (see the module docstring)."""
  lines = '\n'.join(json.dumps(tool, ensure_ascii=False) for tool in tools)
  if system and TOOLS_PLACEHOLDER in system:
    return system.replace(TOOLS_PLACEHOLDER, lines)
  return (f'{system}\n' if system else '') + f'<tools>\n{lines}\n</tools>'


def call_text(call: Call) -> str:
  body = json.dumps({'name': call.name, 'arguments': call.arguments}, ensure_ascii=False)
  return f'{CALL_OPEN}\n{body}\n{CALL_CLOSE}'


def response_text(content: str) -> str:
  return f'{RESPONSE_OPEN}\n{content}\n{RESPONSE_CLOSE}'


def parse_call(text: str) -> Call | None:
  """The call in an assistant turn's text; None when it holds no <tool_call>. ToolError when the
  call is malformed: no closing tag, not JSON, not {"name": str, "arguments": object}."""
  start = text.find(CALL_OPEN)
  if start < 0:
    return None
  end = text.find(CALL_CLOSE, start)
  if end < 0:
    raise ToolError(f'the call has no closing {CALL_CLOSE}')
  body = text[start + len(CALL_OPEN):end].strip()
  try:
    value = json.loads(body)
  except json.JSONDecodeError as e:
    raise ToolError(f'the call is not valid JSON ({e.msg} at column {e.colno})') from None
  if (not isinstance(value, dict) or not isinstance(value.get('name'), str)
      or not isinstance(value.get('arguments', {}), dict)):
    raise ToolError('the call must be {"name": string, "arguments": object}')
  return Call(value['name'], value.get('arguments', {}))


# The demo corpus's tools (fac_jax.data.synth): timer, unit conversion, weather from a fixed table,
# arithmetic. Results stay below 100 so that the corpus can say them in words.
UNITS = {'weeks': ('days', 7), 'feet': ('inches', 12), 'yards': ('feet', 3)}
WEATHER = {'paris': 'sunny', 'rome': 'hot', 'london': 'rainy', 'tokyo': 'windy',
           'madrid': 'sunny', 'berlin': 'cloudy', 'oslo': 'snowy', 'cairo': 'hot'}
OPERATIONS = {'plus': lambda a, b: a + b, 'minus': lambda a, b: a - b,
              'times': lambda a, b: a * b}


def _integer(name: str) -> dict:
  return {name: {'type': 'integer'}}


# Without descriptions, enums or "required": the tiny model's rows hold 128 positions, and its
# 250-token BPE spends about 20 tokens on each of these declarations.
DEMO_TOOLS = [
    {'name': 'set_timer', 'parameters': {'type': 'object', 'properties': _integer('minutes')}},
    {'name': 'convert_units', 'parameters': {
        'type': 'object', 'properties': {**_integer('value'), 'unit': {'type': 'string'}}}},
    {'name': 'get_weather', 'parameters': {
        'type': 'object', 'properties': {'city': {'type': 'string'}}}},
    {'name': 'calculate', 'parameters': {
        'type': 'object', 'properties': {**_integer('a'), 'op': {'type': 'string'},
                                         **_integer('b')}}},
]


def set_timer(minutes: int) -> dict:
  return {'timer_minutes': minutes}


def convert_units(value: int, unit: str) -> dict:
  if unit not in UNITS:
    raise ToolError(f'convert_units: unit must be one of {list(UNITS)}, got {unit!r}')
  to, factor = UNITS[unit]
  return {to: value * factor}


def get_weather(city: str) -> dict:
  if city not in WEATHER:
    raise ToolError(f'get_weather: no weather for {city!r}; known: {sorted(WEATHER)}')
  return {'weather': WEATHER[city]}


def calculate(a: int, op: str, b: int) -> dict:
  if op not in OPERATIONS:
    raise ToolError(f'calculate: op must be one of {list(OPERATIONS)}, got {op!r}')
  return {'result': OPERATIONS[op](a, b)}


DEMO_FUNCTIONS = {f.__name__: f for f in (set_timer, convert_units, get_weather, calculate)}
