"""JSONL conversation manifests: the format, and a reader that validates every line.

One conversation per line:

  {"id": "train-00042",                       optional, a plain name (it names files); default
                                              "<file name>:<line number>"
   "task": "spoken_qa",                       optional tag; default "chat"
   "system": "You are a helpful assistant.",  optional system prompt
   "turns": [
     {"role": "user", "audio": "audio/q42.wav", "text": "what is two plus five"},
     {"role": "user", "text": "And in words?"},
     {"role": "assistant", "text": "Seven.", "audio": "audio/a42.wav"}],
   "meta": {...}}                             optional, kept as is (speaker, voice, answer, ...)

A user turn has `audio` (read by the continuous encoder; its `text`, if any, is the transcript,
kept for evaluation only) or `text`. An assistant turn has `text` and, for a spoken answer,
`audio` (turned into speech codes). Audio paths are relative to the manifest's folder unless
absolute. A conversation ends with an assistant turn.

Function calling (fac_jax.data.tools): "tools" lists the declarations the system turn offers;
an assistant turn may instead hold a call, {"role": "assistant", "tool_call": {"name":
"set_timer", "arguments": {"minutes": 5}}} (no text or audio: nothing is spoken during a call),
of a declared tool with arguments that fit its schema; the next turn is the call's result,
{"role": "tool", "text": "{\"timer_minutes\": 5}"}.
"""

import dataclasses
import json
import os

from fac_jax import files
from fac_jax.data import tools as tools_lib

ROLES = ('user', 'assistant', 'tool')


class ManifestError(ValueError):
  """A manifest line that cannot be used; the message names the file, the line and the field."""


@dataclasses.dataclass
class Turn:
  role: str
  text: str | None = None
  audio: str | None = None  # absolute path
  tool_call: tools_lib.Call | None = None  # an assistant turn's call


@dataclasses.dataclass
class Conversation:
  id: str
  turns: list[Turn]
  task: str = 'chat'
  system: str | None = None
  meta: dict = dataclasses.field(default_factory=dict)
  source: str = ''  # "<manifest path>:<line number>", for error messages
  tools: list[dict] | None = None  # declarations offered in the system turn


def _optional_str(record: dict, field: str, where: str) -> str | None:
  value = record.get(field)
  if value is not None and not isinstance(value, str):
    raise ManifestError(f'{where}: field {field!r} must be a string, got {type(value).__name__}')
  return value


def parse_line(line: str, path: str, number: int) -> Conversation:
  """One manifest line -> Conversation; ManifestError names the file, line and field at fault."""
  where = f'{path}:{number}'
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ManifestError(f'{where}: not valid JSON ({e.msg} at column {e.colno})') from None
  if not isinstance(record, dict):
    raise ManifestError(f'{where}: expected a JSON object, got {type(record).__name__}')
  unknown = sorted(set(record) - {'id', 'task', 'system', 'tools', 'turns', 'meta'})
  if unknown:
    raise ManifestError(f'{where}: unknown fields {unknown}; expected id, task, system, tools, '
                        'turns, meta')
  declared = None
  if 'tools' in record:
    try:
      declared = tools_lib.declarations(record['tools'])
    except tools_lib.ToolError as e:
      raise ManifestError(f'{where}: field "tools": {e}') from None
  turns = record.get('turns')
  if not isinstance(turns, list) or not turns:
    raise ManifestError(f'{where}: field "turns" must be a non-empty list')
  folder = os.path.dirname(os.path.abspath(path))
  parsed = []
  for i, turn in enumerate(turns):
    at = f'{where}: turns[{i}]'
    if not isinstance(turn, dict):
      raise ManifestError(f'{at} must be an object')
    unknown = sorted(set(turn) - {'role', 'text', 'audio', 'tool_call'})
    if unknown:
      raise ManifestError(f'{at}: unknown fields {unknown}; expected role, text, audio, '
                          'tool_call')
    role = turn.get('role')
    if role not in ROLES:
      raise ManifestError(f'{at}: field "role" must be one of {list(ROLES)}, got {role!r}')
    text, audio = _optional_str(turn, 'text', at), _optional_str(turn, 'audio', at)
    call = _tool_call(turn, role, declared, at) if 'tool_call' in turn else None
    if role == 'user' and not (text or audio):
      raise ManifestError(f'{at}: a user turn needs "audio" or "text"')
    if role == 'assistant' and not (text or call):
      raise ManifestError(f'{at}: an assistant turn needs "text" or "tool_call"')
    follows_call = bool(parsed) and parsed[-1].tool_call is not None
    if role == 'tool' and (not text or audio or not follows_call):
      raise ManifestError(f'{at}: a tool turn needs "text" (the result, no "audio") and must '
                          'follow an assistant turn with "tool_call"')
    if follows_call and role != 'tool':
      raise ManifestError(f'{at}: the turn after a "tool_call" must be its result, a "tool" '
                          f'turn; got role {role!r}')
    if audio is not None:
      audio = os.path.join(folder, audio)
    parsed.append(Turn(role, text, audio, call))
  if parsed[-1].role != 'assistant' or parsed[-1].tool_call is not None:
    raise ManifestError(f'{where}: the last turn must be the assistant\'s answer (not a '
                        '"tool_call")')
  meta = record.get('meta', {})
  if not isinstance(meta, dict):
    raise ManifestError(f'{where}: field "meta" must be an object')
  conversation_id = _optional_str(record, 'id', where) or f'{os.path.basename(path)}:{number}'
  if not files.is_plain_name(conversation_id):  # ids name files, e.g. the pipeline's samples
    raise ManifestError(f'{where}: field "id" must be a plain name (no path separator, not "." '
                        f'or ".."), got {conversation_id!r}')
  return Conversation(id=conversation_id, turns=parsed, task=_optional_str(record, 'task', where)
                      or 'chat', system=_optional_str(record, 'system', where), meta=meta,
                      source=where, tools=record.get('tools'))


def _tool_call(turn: dict, role: str, declared: dict | None, at: str) -> tools_lib.Call:
  """An assistant turn's "tool_call", checked against the conversation's declarations."""
  if role != 'assistant' or 'text' in turn or 'audio' in turn:
    raise ManifestError(f'{at}: only an assistant turn without "text" or "audio" may hold '
                        '"tool_call"')
  if declared is None:
    raise ManifestError(f'{at}: field "tool_call" needs the conversation\'s "tools"')
  value = turn['tool_call']
  if (not isinstance(value, dict) or set(value) != {'name', 'arguments'}
      or not isinstance(value['name'], str)):
    raise ManifestError(f'{at}: field "tool_call" must be {{"name": string, "arguments": '
                        'object}')
  call = tools_lib.Call(value['name'], value['arguments'])
  try:
    tools_lib.check_call(declared, call)
  except tools_lib.ToolError as e:
    raise ManifestError(f'{at}: field "tool_call": {e}') from None
  return call


def read(path: str):
  """Yields (line number, Conversation or ManifestError) for every non-blank line, so that a
  caller can report and skip bad lines and go on."""
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        try:
          yield number, parse_line(line, path, number)
        except ManifestError as e:
          yield number, e


def write(path: str, records: list[dict]) -> None:
  """Writes manifest records (dicts in the format above) as JSONL, atomically."""
  files.write_atomically(path, ''.join(json.dumps(record, ensure_ascii=False) + '\n'
                                       for record in records))
