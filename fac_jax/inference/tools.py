"""Function calling at inference: a registry of Python callables behind declared tools, and a
conversation loop that generates, runs the call the model writes, appends the result as a tool
turn and continues from the KV caches (generate.prefill with `earlier`).

Whatever the model writes, a call never crashes the loop: malformed JSON, an unknown tool,
arguments that break the schema and a callable that raises all come back to the model as a tool
turn {"error": "..."}, which it answers from.
"""

import dataclasses
import importlib
import json

import jax
import numpy as np

from fac_jax.data import conversation, tools


class Registry:
  """Declared tools (checked, fac_jax.data.tools.declarations) and the callables that run them;
  every declared tool needs one."""

  def __init__(self, declared: list[dict], functions: dict):
    self.declared = list(declared)
    self.tools = tools.declarations(self.declared)
    missing = sorted(set(self.tools) - set(functions))
    if missing:
      raise tools.ToolError(f'no callable for the declared tools {missing}; the functions hold '
                            f'{sorted(functions)}')
    self.functions = functions

  def respond(self, text: str) -> 'Response':
    """The call in an assistant turn's text and the tool turn that answers it: the callable's
    result as JSON, or {"error": why}; called False when the text calls nothing."""
    try:
      call = tools.parse_call(text)
      if call is None:
        return Response(called=False)
      tools.check_call(self.tools, call)
    except tools.ToolError as e:
      return Response(True, None, json.dumps({'error': str(e)}))
    try:
      result = self.functions[call.name](**call.arguments)
    except Exception as e:  # a user's callable may raise anything; the model hears why
      return Response(True, call, json.dumps({'error': f'{call.name} failed: {e}'}))
    return Response(True, call, result if isinstance(result, str)
                    else json.dumps(result, ensure_ascii=False))


@dataclasses.dataclass(frozen=True)
class Response:
  called: bool
  call: tools.Call | None = None  # None for a malformed call
  content: str | None = None  # the tool turn's content


def read_declarations(path: str) -> list[dict]:
  """A JSON file holding a list of tool declarations; ToolError names the file and what is
  wrong."""
  try:
    with open(path, encoding='utf-8') as f:
      declared = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise tools.ToolError(f'cannot read tools file {path}: {e}') from None
  try:
    tools.declarations(declared)
  except tools.ToolError as e:
    raise tools.ToolError(f'{path}: {e}') from None
  return declared


def load_functions(spec: str) -> dict:
  """The dict of tool name -> callable named by 'MODULE[:NAME]' (NAME default FUNCTIONS)."""
  module, _, name = spec.partition(':')
  try:
    functions = getattr(importlib.import_module(module), name or 'FUNCTIONS')
  except (ImportError, AttributeError) as e:
    raise tools.ToolError(f'--functions={spec}: expected an importable module holding a dict of '
                          f'tool name -> callable ({e})') from None
  if not isinstance(functions, dict) or not all(map(callable, functions.values())):
    raise tools.ToolError(f'--functions={spec}: expected a dict of tool name -> callable')
  return functions


def continuation_prompt(state: dict, appended: list[list], cfg, prompt_len: int | None = None,
                        num_windows: int | None = None) -> dict:
  """The prompt that continues a generation's final `state` (generate.prefill with `earlier`):
  per row, the last token of the prompt it answered, the turn it generated, then `appended[row]`
  (conversation pieces, e.g. a tool turn and the assistant header); left-padded, positions
  absolute."""
  state = jax.device_get(state)
  out_steps = state['text'].shape[1]
  keep = state['llm_valid'].shape[1] - out_steps - 1
  counts = num_text(state['text'], state['step'], cfg)
  examples = []
  for row, pieces in enumerate(appended):
    ids = [int(state['text_history'][row, keep])] + state['text'][row, :counts[row]].tolist()
    examples.append(conversation.format_conversation(
        [conversation.Text(ids, trained=False)] + list(pieces), cfg))
  prompt = conversation.prompt_batch(examples, cfg, prompt_len, num_windows)
  last_position = state['position'] - state['step']  # of the answered prompt's last token
  prompt['positions'] = prompt['positions'] + last_position[:, None].astype(np.int32)
  return prompt


@dataclasses.dataclass
class Turn:
  """One generation of the loop: its text ids and speech codes, and how the registry answered
  it (response.called False for the answer)."""
  text: list[int]
  codes: list[int]
  response: Response


def tool_turn(fmt, content: str) -> list:
  """Pieces that follow a call turn: the template's newline, the tool turn, the assistant header
  (fmt: a fac_jax.data.input_pipeline.FormatRecord)."""
  tok = fmt.model.tokens
  return ([conversation.Text(fmt.encode('\n'), trained=False)]
          + fmt.turn_pieces({'role': 'tool', 'text': content}, {}, trained=False)
          + [conversation.Text([tok.im_start] + fmt.encode('assistant\n'), trained=False)])


def num_text(text: np.ndarray, step, cfg) -> np.ndarray:
  """Text tokens of each row up to its stop token (generate.outputs' num_text, on the host)."""
  stopped = np.isin(text, [cfg.tokens.im_end, cfg.tokens.endoftext])
  return np.where(stopped.any(1), stopped.argmax(1) + 1, step)


def converse(generate_state_fn, params, prompt: dict, registry: Registry, fmt, decode,
             key: jax.Array, max_calls: int = 3) -> list[Turn]:
  """Generates for a one-row prompt; while the model calls a tool (at most `max_calls` times)
  runs it and continues with its result. `generate_state_fn` is generate.make_generate_state_fn,
  `decode` ids -> text. Returns every turn, the answer last."""
  cfg, turns, state = fmt.model, [], None
  for i in range(max_calls + 1):
    state = generate_state_fn(params, prompt, jax.random.fold_in(key, i), state)
    out = jax.device_get({k: state[k] for k in ('text', 'speech', 'num_speech', 'step')})
    count = int(num_text(out['text'], out['step'], cfg)[0])
    text = out['text'][0, :count].tolist()
    codes = out['speech'][0, :out['num_speech'][0]].reshape(-1).tolist()
    turns.append(Turn(text, codes, registry.respond(decode(text))))
    if not turns[-1].response.called:
      break
    prompt = continuation_prompt(state, [tool_turn(fmt, turns[-1].response.content)], cfg)
  return turns
