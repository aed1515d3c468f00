"""Talk to a checkpoint: a spoken (or typed) question in, the answer out as text (printed as it
comes) and speech (a wav written through a speech detokenizer).

  python -m fac_jax.inference.chat --ckpt=CKPT --audio=question.wav [--out=answer.wav] [--mode=s2s|s2t]
      [--stream] [--detokenizer=DIR|speech_tokenizer.npz] [--max_new_tokens=256] [--greedy]
      [--text="typed question"] [--history=turns.json] [--system=TASK|"text"]
      [--tools=tools.json [--functions=MODULE[:NAME]]]

--detokenizer is a CosyVoice 3 folder written by fac_jax.speech.convert_cosyvoice (flow, HiFT
and speaker: the released model's voice, 24 kHz; --stream vocodes with real caches under the
flow's chunk mask, otherwise the whole answer at once as Fun-Audio-Chat does) or a k-means speech
tokenizer .npz (its Griffin-Lim detokenizer, 16 kHz); by default the one a trained checkpoint
holds in CKPT/chat/.

The system prompt: --system names one of the checkpoint's training tasks (CKPT/chat/settings.json)
or is the prompt's text. By default it is the prompt of the most trained task that answers as
--mode does (speech for s2s, text for s2t), one whose questions are spoken (--audio) or typed
(--text) first; for a checkpoint without tasks (an imported one), the official prompt of the mode.

--tools=FILE.json declares tools (a JSON list, fac_jax.data.tools) that --functions=MODULE[:NAME]
runs (a dict of tool name -> callable, default the demo corpus's fac_jax.data.tools:DEMO_FUNCTIONS):
the model may call one, its arguments are checked against the schema and the result (or the
error) comes back as a tool turn that it answers from, continuing from the KV caches. Calls and
results are printed to stderr. With tools, the default system prompt (the persona) is that of a
trained task that declared tools, else the official function-calling prompt.

--history is a JSON list of earlier turns, {"user": "typed text" or {"audio": "path.wav"},
"assistant": "its answer's text"}; as in the official multi-turn example, earlier answers come
back as text.
"""

import json
import os
import sys

from absl import app, flags
import jax
import numpy as np
import soundfile
from flax import nnx

from fac_jax import audio, cli
from fac_jax.checkpoints import adapters, checkpoint, text_tokenizer
from fac_jax.data import conversation, input_pipeline, tools as tools_data
from fac_jax.inference import generate, sampling, streaming, tools
from fac_jax.model import fun_audio_chat
from fac_jax.speech import detokenizer as detokenizer_lib, speech_tokenizer

SYSTEM_PROMPTS = {
    's2s': 'You are asked to generate both text and speech tokens at the same time.',
    's2t': 'You are asked to generate text tokens.',
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The chat command's flags, defined only when it (or the server, which reuses them) is the
  program: as a library this module defines none."""
  flags.DEFINE_string('ckpt', None, 'fac_jax checkpoint (from training or '
                      '`fac_jax.checkpoints.convert`).')
  flags.DEFINE_string('audio', None, 'The spoken question: any audio file librosa reads.')
  flags.DEFINE_string('text', None, 'A typed question, instead of --audio.')
  flags.DEFINE_string('history', None, 'JSON file of earlier turns (see the module docstring).')
  flags.DEFINE_string('out', None, 's2s: where to write the spoken answer (wav).')
  flags.DEFINE_enum('mode', 's2s', ['s2s', 's2t'], 'Speech and text, or text only.')
  flags.DEFINE_bool('stream', False, 'Print text and write audio chunks as they are produced.')
  flags.DEFINE_string('detokenizer', None, 'Turns codes into audio: a converted CosyVoice 3 '
                      'folder (fac_jax.speech.convert_cosyvoice), or a k-means speech tokenizer '
                      '.npz (Griffin-Lim; default: the one in CKPT/chat/).')
  flags.DEFINE_string('system', None, 'System prompt: a training task of the checkpoint, or the '
                      "prompt's text (default: see the module docstring).")
  flags.DEFINE_string('tools', None, 'JSON file of tool declarations the model may call.')
  flags.DEFINE_string('functions', 'fac_jax.data.tools:DEMO_FUNCTIONS', 'With --tools: the Python '
                      'dict of tool name -> callable that runs them, MODULE[:NAME] (NAME default '
                      'FUNCTIONS).')
  flags.DEFINE_integer('max_new_tokens', 256, 'Text tokens to generate at most (5 per second).')
  flags.DEFINE_float('max_audio_seconds', 300.0, 'Longest question accepted.')
  flags.DEFINE_bool('greedy', False, 'Greedy text (the official examples); speech is sampled.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')


class ChatError(ValueError):
  """Input the chat cannot use; the message says which file and why."""


def read_question(path: str) -> np.ndarray:
  return audio.load(path, max_seconds=FLAGS.max_audio_seconds)


def read_history(path: str) -> list[dict]:
  try:
    with open(path) as f:
      turns = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ChatError(f'cannot read history file {path}: {e}') from None
  for i, turn in enumerate(turns if isinstance(turns, list) else [None]):
    user = turn.get('user') if isinstance(turn, dict) else None
    if not (isinstance(user, str) or (isinstance(user, dict) and 'audio' in user)) or \
        not isinstance(turn.get('assistant'), str):
      raise ChatError(f'{path}: turn {i} must be {{"user": text or {{"audio": path}}, '
                      '"assistant": text}')
  return turns


def system_prompt(tasks: dict, mode: str, typed: bool, choice: str | None,
                  with_tools: bool = False) -> tuple[str, str]:
  """(system prompt, where it comes from) as the module docstring says."""
  if choice in tasks:
    return tasks[choice]['system'] or '', f'task {choice}'
  if choice is not None:
    return choice, '--system'
  answer, question = ('speech' if mode == 's2s' else 'text'), ('text' if typed else 'speech')
  fitting = [name for name, task in tasks.items()
             if task['answer'] == answer and task.get('tools', False) == with_tools]
  if with_tools and not fitting:
    return tools_data.OFFICIAL_PROMPT, 'the official function-calling prompt'
  fitting.sort(key=lambda name: tasks[name]['question'] != question)  # stable: most trained first
  if fitting:
    return tasks[fitting[0]]['system'] or '', f'task {fitting[0]}'
  return SYSTEM_PROMPTS[mode], f'the official {mode} prompt'


def check_out(path: str) -> None:
  """Refuses an --out that cannot be written, before any answer is generated."""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ChatError(f'--out={path} is a folder; give the wav file to write')
  if not os.path.isdir(folder):
    raise ChatError(f'--out={path}: folder {folder} does not exist')
  if not os.access(folder, os.W_OK):
    raise ChatError(f'--out={path}: folder {folder} is not writable')


def load_detokenizer(ckpt: str, cfg) -> speech_tokenizer.SpeechDetokenizer:
  """--detokenizer, else the k-means speech tokenizer the checkpoint holds."""
  path = FLAGS.detokenizer or os.path.join(ckpt, checkpoint.CHAT, checkpoint.SPEECH_TOKENIZER_FILE)
  if FLAGS.detokenizer and not os.path.exists(path):
    raise ChatError(f'--detokenizer={path} does not exist')
  if not os.path.exists(path):
    trained = checkpoint.chat_settings(ckpt).get('speech_tokenizer')
    raise ChatError('--out needs --detokenizer (a CosyVoice 3 folder or a speech tokenizer .npz) '
                    f'to make audio: {ckpt} holds none' + (
                        f' (it speaks the codes of {trained["kind"]} {trained["file"]})'
                        if trained else ''))
  detokenizer = detokenizer_lib.load(path)
  if detokenizer.vocab_size > cfg.speech.bos_id:
    raise ChatError(f'{path} has {detokenizer.vocab_size} codes; the model speaks '
                    f'{cfg.speech.bos_id}')
  return detokenizer


def build_prompt(tokenizer, cfg, system: str, history: list[dict], question,
                 prompt_len: int | None = None, num_windows: int | None = None) -> dict:
  """ChatML prompt: system (none when empty, as training leaves it out), earlier turns (a user
  turn typed, spoken as {'audio': path} or as a waveform), the question (a waveform or a str), the
  assistant header; left-padded to `prompt_len` positions and `num_windows` mel windows when
  given (conversation.prompt_batch)."""
  tok = cfg.tokens
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
  newline = encode('\n')
  pieces = [conversation.Text([tok.im_start] + encode('system\n' + system) + [tok.im_end]
                              + newline, trained=False)] if system else []

  def user_turn(content):
    pieces.append(conversation.Text([tok.im_start] + encode('user\n'), trained=False))
    if isinstance(content, str):
      pieces.append(conversation.Text(encode(content), trained=False))
    else:
      pieces.append(conversation.Text([tok.audio_bos], trained=False))
      pieces.append(conversation.user_audio(audio.log_mel(content, cfg.encoder.num_mel_bins),
                                            int(len(content) / audio.SAMPLE_RATE * 25), cfg))
      pieces.append(conversation.Text([tok.audio_eos], trained=False))
    pieces.append(conversation.Text([tok.im_end] + newline + [tok.im_start]
                                    + encode('assistant\n'), trained=False))

  for turn in history:
    user = turn['user']
    user_turn(user if isinstance(user, (str, np.ndarray)) else read_question(user['audio']))
    pieces.append(conversation.Text(encode(turn['assistant']) + [tok.im_end] + newline,
                                    trained=False))
  user_turn(question)
  example = conversation.format_conversation(pieces, cfg)
  for what, need, room in (('positions', len(example['input_ids']), prompt_len),
                           ('mel windows', len(example['mel_lengths']), num_windows)):
    if room is not None and need > room:
      raise ChatError(f'the conversation needs {need} {what}; there is room for {room}')
  return conversation.prompt_batch([example], cfg, prompt_len, num_windows)


def answer_text(tokenizer, ids, cfg) -> str:
  special = set(cfg.tokens.values())
  return tokenizer.decode([int(i) for i in ids if int(i) not in special])


def main(argv):
  del argv
  if not FLAGS.ckpt or bool(FLAGS.audio) == bool(FLAGS.text):
    raise app.UsageError('--ckpt and one of --audio or --text are required')
  try:
    if FLAGS.out and FLAGS.mode == 's2t':
      raise ChatError('--out writes a spoken answer, but --mode=s2t answers in text only: drop '
                      '--out, or use --mode=s2s')
    if FLAGS.out:
      check_out(FLAGS.out)
    cfg = checkpoint.load_config(FLAGS.ckpt)
    official = os.path.join(FLAGS.ckpt, checkpoint.OFFICIAL)
    try:
      tokenizer = text_tokenizer.load(official)
    except FileNotFoundError:
      raise ChatError(f'{FLAGS.ckpt} has no tokenizer files in {official}/: copy there those of '
                      'the data it was trained on (DATA/tokenizer/) or of the official '
                      'folder it came from') from None
    if FLAGS.tools and FLAGS.stream:
      raise ChatError('--stream does not run tools: drop --stream or --tools')
    registry = tools.Registry(tools.read_declarations(FLAGS.tools),
                              tools.load_functions(FLAGS.functions)) if FLAGS.tools else None
    detokenizer = load_detokenizer(FLAGS.ckpt, cfg) if FLAGS.out else None
    history = read_history(FLAGS.history) if FLAGS.history else []
    question = FLAGS.text or read_question(FLAGS.audio)
    system, source = system_prompt(checkpoint.chat_settings(FLAGS.ckpt).get('tasks', {}),
                                   FLAGS.mode, bool(FLAGS.text), FLAGS.system, bool(registry))
    prompt = build_prompt(tokenizer, cfg, tools_data.system_text(system, registry.declared)
                          if registry else system, history, question)
    params = adapters.load_params(FLAGS.ckpt)
  except (ChatError, OSError, ValueError) as e:  # ToolError is a ValueError
    sys.exit(f'error: {e}')

  print(f'system prompt ({source}): {system!r}', file=sys.stderr)
  graphdef, _ = nnx.split(fun_audio_chat.abstract_model(cfg))
  text_sampling = sampling.Sampling(greedy=True) if FLAGS.greedy else sampling.Sampling()
  # With tools the model opens its answer itself: <|audio_bos|> to speak, or a call.
  gen = generate.GenerationConfig(FLAGS.max_new_tokens, mode=FLAGS.mode, text=text_sampling,
                                  force_audio_bos=registry is None)
  key = jax.random.key(FLAGS.seed)
  chunks, codes, text_ids = [], [], []
  if registry:
    turns = tools.converse(generate.make_generate_state_fn(graphdef, cfg, gen), params, prompt,
                           registry, input_pipeline.FormatRecord(official, cfg),
                           lambda ids: answer_text(tokenizer, ids, cfg), key)
    for turn in turns:
      if turn.response.called:
        print(f'tool call: {answer_text(tokenizer, turn.text, cfg)} -> {turn.response.content}',
              file=sys.stderr)
    text_ids, codes = turns[-1].text, turns[-1].codes
    print(answer_text(tokenizer, text_ids, cfg))
  elif FLAGS.stream:
    chunker = streaming.SpeechChunker(detokenizer, cfg.speech.bos_id) if detokenizer else None
    printed = ''
    for step in streaming.stream(graphdef, params, prompt, cfg, gen, key):
      text_ids.append(int(step.text[0]))
      shown = answer_text(tokenizer, text_ids, cfg)
      print(shown[len(printed):], end='', flush=True)
      printed = shown
      if (step.codes[0] >= 0).all():
        codes += step.codes[0].tolist()
        if chunker:
          chunks += chunker.push(step.codes[0])
    if chunker:
      chunks += chunker.finish()
    print()
  else:
    out = jax.device_get(generate.make_generate_fn(graphdef, cfg, gen)(params, prompt, key))
    text_ids = out['text'][0, :out['num_text'][0]].tolist()
    codes = out['speech'][0, :out['num_speech_groups'][0]].reshape(-1).tolist()
    print(answer_text(tokenizer, text_ids, cfg))
  if detokenizer and not FLAGS.stream:
    chunks = [detokenizer.decode(np.asarray([c for c in codes if 0 <= c < cfg.speech.bos_id],
                                            np.int64))]
  if detokenizer:
    waveform = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    soundfile.write(FLAGS.out, waveform, detokenizer.sample_rate)
    print(f'wrote {FLAGS.out}: {len(waveform) / detokenizer.sample_rate:.2f} s of speech '
          f'from {len(codes)} codes')


def run():
  """Console-script entry point."""
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
