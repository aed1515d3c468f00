"""`python -m fac_jax.serve`: a checkpoint answers spoken conversations over WebSockets, with a
page to talk to it at http://HOST:PORT/.

  python -m fac_jax.serve [--ckpt=DIR] [--detokenizer=DIR|speech_tokenizer.npz]
      [--host=127.0.0.1] [--port=8000] [--max_sessions=8] [--quantize=none|int8|w8a8]
      [--mode=s2s|s2t] [--max_new_tokens=256] [--greedy] [--prefill_chunk=64]

--ckpt defaults to the main job's final checkpoint (/tmp/fac_jax_pipeline/dpo/final); the
detokenizer to the one it holds. The server compiles its programs on a warm-up turn before it
listens, then never again (GET /status shows the counts).
"""

import asyncio
import os
import sys
import time

from absl import app, flags
import jax
import numpy as np
import uvicorn

from fac_jax import audio, cli
from fac_jax.inference import chat
from fac_jax.model import quantization
from fac_jax.pipeline import main_job
from fac_jax.serve import conversation, engine as engine_lib, server

DEFAULT_CKPT = os.path.join(main_job.default_workdir(False), main_job.MODELS['dpo'])

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The chat command's flags (the server only changes --ckpt's default) and the server's own."""
  chat.define_flags()  # --ckpt, --detokenizer, --mode, --max_new_tokens, --greedy, --system
  FLAGS.set_default('ckpt', DEFAULT_CKPT)
  flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: every interface).')
  flags.DEFINE_integer('port', 8000, 'Port to listen on (0: any free one, printed).')
  flags.DEFINE_integer('max_sessions', 8, 'Conversations at once (slots of the decode step).')
  flags.DEFINE_enum('quantize', 'none', list(quantization.MODES), 'Weights of the LLM and the '
                    'refined head: as stored, int8 weight-only, or int8 weights and activations.')
  flags.DEFINE_integer('max_prompt_tokens', 512, 'Positions of a prompt, history included '
                       '(older turns are left out beyond).')
  flags.DEFINE_integer('prefill_chunk', 64, 'Positions prefilled between two decode steps of the '
                       'other conversations (must divide --max_prompt_tokens).')
  flags.DEFINE_integer('max_windows', 16, 'Encoder windows of a prompt, history included.')
  flags.DEFINE_integer('max_message_bytes', server.Limits.max_message_bytes,
                       'Largest WebSocket message.')
  flags.DEFINE_float('session_seconds', server.Limits.session_seconds,
                     'A conversation is closed after this long.')
  flags.DEFINE_float('max_turn_seconds', server.Limits.max_turn_seconds, 'Longest question.')
  flags.DEFINE_integer('max_queued_messages', server.Limits.max_queued_messages,
                       'Answer messages a slow client may leave unread before it is dropped.')
  flags.DEFINE_integer('vad_silence_ms', server.Limits.vad_silence_ms,
                       'Quiet after speech that ends a turn (turn "vad").')


def warm_up(engine: engine_lib.Engine, assets: conversation.Assets) -> None:
  """Two turns, so that each program (prefill's pieces, slot insert, step) is compiled before
  serving."""
  question = np.random.default_rng(0).normal(0, 0.1, audio.SAMPLE_RATE).astype(np.float32)
  for seed in range(2):
    events = []
    conv = conversation.Conversation(assets, seed)
    turn = engine_lib.Turn(conv.prompt(question), conv.key(), events.append)
    engine.submit(turn)
    while len(events) < 2 and not (events and events[-1].done):
      time.sleep(0.01)
    engine.cancel(turn)


def main(argv):
  del argv
  if FLAGS.prefill_chunk < 1 or FLAGS.max_prompt_tokens % FLAGS.prefill_chunk:
    sys.exit(f'error: --prefill_chunk={FLAGS.prefill_chunk} must divide '
             f'--max_prompt_tokens={FLAGS.max_prompt_tokens}')
  try:
    assets = conversation.load_assets(
        FLAGS.ckpt, FLAGS.detokenizer, FLAGS.mode, FLAGS.max_new_tokens, FLAGS.greedy,
        FLAGS.max_prompt_tokens, FLAGS.max_windows, FLAGS.system, FLAGS.quantize)
  except (chat.ChatError, OSError, ValueError) as e:
    sys.exit(f'error: {e}')
  limits = server.Limits(FLAGS.max_sessions, FLAGS.max_message_bytes, FLAGS.session_seconds,
                         FLAGS.max_turn_seconds, FLAGS.max_queued_messages,
                         FLAGS.vad_silence_ms)
  service = server.Service(assets, limits, FLAGS.prefill_chunk)
  service.engine.start()
  started = time.perf_counter()
  warm_up(service.engine, assets)
  print(f'compiled in {time.perf_counter() - started:.1f} s on {jax.devices()[0].device_kind}',
        file=sys.stderr, flush=True)
  config = uvicorn.Config(server.create_app(service), host=FLAGS.host, port=FLAGS.port,
                          ws_max_size=4 * limits.max_message_bytes, log_level='warning')
  uvicorn_server = uvicorn.Server(config)

  async def serve():
    serving = asyncio.create_task(uvicorn_server.serve())
    while not uvicorn_server.started and not serving.done():
      await asyncio.sleep(0.05)
    for sock in (s for srv in uvicorn_server.servers for s in srv.sockets):
      host, port = sock.getsockname()[:2]
      print(f'serving on http://{host}:{port}/', flush=True)
    await serving

  asyncio.run(serve())
  service.engine.stop()


def run():
  """Console-script entry point."""
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
