"""JSONL preference manifests for DPO: the format, and a reader that validates every line.

One preference pair per line:

  {"id": "prefs-train-00007",                  optional; default "<file name>:<line number>"
   "task": "robustness",                       optional tag, mapped to an id by config.dpo.tasks:
                                               robustness | instruction_following |
                                               audio_understanding | voice_empathy | any other
   "system": "Answer the question.",           optional system prompt
   "turns": [                                  the prompt, in the conversation manifest format
     {"role": "user", "audio": "audio/q7.wav", "text": "what is two plus five"}],
   "chosen": {"text": "seven", "audio": "audio/a7.wav"},     the preferred assistant answer
   "rejected": {"text": "eight", "audio": "audio/b7.wav"},   the dispreferred one
   "meta": {...}}                              optional, kept as is

The prompt follows fac_jax.data.manifest's turn rules (user turns with audio or text, assistant
turns with text and optional audio, paths relative to the manifest's folder) and ends with a user
turn; `chosen` and `rejected` are assistant turns without the role. Both conversations, prompt +
chosen and prompt + rejected, are checked by the conversation manifest parser, so the two formats
share one set of rules. A line holding "chosen" or "rejected" is a pair; any other line is a
conversation, so one reader (`read`) serves both kinds of manifest.
"""

import dataclasses
import json

from fac_jax.data import manifest

ANSWER_FIELDS = ('chosen', 'rejected')


@dataclasses.dataclass
class PreferencePair:
  id: str
  task: str
  system: str | None
  prompt: list[manifest.Turn]
  chosen: manifest.Turn
  rejected: manifest.Turn
  meta: dict = dataclasses.field(default_factory=dict)
  source: str = ''  # "<manifest path>:<line number>", for error messages

  @property
  def turns(self) -> list[manifest.Turn]:
    """Every turn the pair holds (prompt, chosen, rejected), e.g. for tokenizer training."""
    return self.prompt + [self.chosen, self.rejected]


def is_pair(record: dict) -> bool:
  return isinstance(record, dict) and any(field in record for field in ANSWER_FIELDS)


def _answer_turn(record: dict, field: str, where: str) -> dict:
  """The `chosen` or `rejected` object as a manifest assistant turn."""
  answer = record.get(field)
  if not isinstance(answer, dict):
    raise manifest.ManifestError(f'{where}: field {field!r} must be an object with "text" and '
                                 'optionally "audio"')
  unknown = sorted(set(answer) - {'text', 'audio'})
  if unknown:
    raise manifest.ManifestError(f'{where}: {field}: unknown fields {unknown}; expected text, '
                                 'audio')
  for name in ('text', 'audio'):
    if answer.get(name) is not None and not isinstance(answer[name], str):
      raise manifest.ManifestError(f'{where}: {field}: field {name!r} must be a string, got '
                                   f'{type(answer[name]).__name__}')
  if not answer.get('text'):
    raise manifest.ManifestError(f'{where}: {field}: an answer needs "text"')
  return {'role': 'assistant', **answer}


def _pair(record: dict, path: str, number: int) -> PreferencePair:
  where = f'{path}:{number}'
  unknown = sorted(set(record) - {'id', 'task', 'system', 'turns', 'meta', *ANSWER_FIELDS})
  if unknown:
    raise manifest.ManifestError(f'{where}: unknown fields {unknown}; expected id, task, system, '
                                 'turns, chosen, rejected, meta')
  answers = [_answer_turn(record, field, where) for field in ANSWER_FIELDS]
  prompt = record.get('turns')
  if not isinstance(prompt, list) or not prompt:
    raise manifest.ManifestError(f'{where}: field "turns" must be a non-empty list (the prompt)')
  if isinstance(prompt[-1], dict) and prompt[-1].get('role') == 'assistant':
    raise manifest.ManifestError(f'{where}: field "turns": the prompt must end with a user turn')
  shared = {k: v for k, v in record.items() if k not in ANSWER_FIELDS}
  chosen, rejected = (manifest.parse_line(json.dumps({**shared, 'turns': prompt + [answer]}),
                                          path, number) for answer in answers)
  return PreferencePair(id=chosen.id, task=chosen.task, system=chosen.system,
                        prompt=chosen.turns[:-1], chosen=chosen.turns[-1],
                        rejected=rejected.turns[-1], meta=chosen.meta, source=where)


def _json(line: str):
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None


def parse_line(line: str, path: str, number: int) -> PreferencePair:
  """One preference line -> PreferencePair; ManifestError names the file, line and field."""
  record = _json(line)
  if not isinstance(record, dict):
    manifest.parse_line(line, path, number)  # raises its error for a line that is no JSON object
  return _pair(record, path, number)


def parse_any(line: str, path: str, number: int) -> manifest.Conversation | PreferencePair:
  """A manifest line of either kind: a pair when it holds "chosen" or "rejected"."""
  record = _json(line)
  if is_pair(record):
    return _pair(record, path, number)
  return manifest.parse_line(line, path, number)


def read(path: str):
  """Yields (line number, Conversation, PreferencePair or ManifestError) for every non-blank line,
  as manifest.read does."""
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        try:
          yield number, parse_any(line, path, number)
        except manifest.ManifestError as e:
          yield number, e
