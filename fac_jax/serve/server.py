"""The speech server's web side: a FastAPI app with the page (GET /), its state (GET /status) and
one WebSocket per conversation (/ws), all answered by one slot engine (fac_jax.serve.engine).

The protocol (docs/serving.md): the client opens with a JSON hello, {"type": "hello",
"sample_rate": 16000, "turn": "vad" | "push", "seed": 0}, then streams 16-bit mono PCM at 16 kHz
in binary frames; a turn ends after `vad_silence_ms` of quiet following speech ("vad") or at
{"type": "end_turn"} ("push"). The server answers {"type": "ready", ...}, then per turn
{"type": "heard"}, {"type": "text", "delta"} as tokens come, the speech as binary frames of 16-bit
PCM at the ready message's sample_rate, and {"type": "done", ...} with the turn's latencies. Audio
heard while it answers is dropped (the page's own speaker would be heard). Bad input gets
{"type": "error", "message"} and the connection is closed; the other conversations go on.
"""

import asyncio
import dataclasses
import json
import os
import time

import fastapi
from fastapi import websockets as fastapi_ws
import numpy as np

from fac_jax import audio
from fac_jax.inference import chat
from fac_jax.serve import conversation as conversation_lib, engine as engine_lib

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static', 'index.html')
# Close codes (RFC 6455): 1003 data it cannot take, 1008 policy, 1009 too big, 1013 try later.
UNSUPPORTED, POLICY, TOO_BIG, TRY_LATER = 1003, 1008, 1009, 1013


@dataclasses.dataclass(frozen=True)
class Limits:
  max_sessions: int = 8  # conversations at once (the engine's slots)
  max_message_bytes: int = 1 << 20  # one WebSocket message
  session_seconds: float = 600.0  # one conversation
  max_turn_seconds: float = 20.0  # one spoken question
  max_queued_messages: int = 256  # answer messages waiting for a client that reads too slowly
  vad_silence_ms: int = 800  # quiet after speech that ends a turn
  vad_threshold: float = conversation_lib.timeline.VAD_THRESHOLD


class Refused(Exception):
  """Ends a conversation: sent to the client as an error, then the connection is closed."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


class Service:
  """The engine and the assets every conversation shares."""

  def __init__(self, assets: conversation_lib.Assets, limits: Limits, prefill_chunk: int):
    self.assets, self.limits = assets, limits
    self.engine = engine_lib.Engine(assets.graphdef, assets.params, assets.cfg, assets.gen,
                                    limits.max_sessions, prefill_chunk)
    self.sessions = 0
    self.turns = 0  # answered

  def status(self) -> dict:
    return {'sessions': self.sessions, 'busy_slots': self.engine.busy_slots(),
            'turns': self.turns, 'engine_steps': self.engine.steps,
            'compiled': self.engine.compiled()}


class Session:
  """One WebSocket conversation."""

  def __init__(self, service: Service, ws: fastapi.WebSocket):
    self.service, self.ws, self.limits = service, ws, service.limits
    self.outgoing: asyncio.Queue = asyncio.Queue(self.limits.max_queued_messages)
    self.slow = asyncio.Event()  # the client let outgoing fill up
    self.turn: engine_lib.Turn | None = None
    self.answering: asyncio.Task | None = None

  def send(self, message) -> None:
    """Queues a message (dict: JSON, bytes: audio) for the sender."""
    try:
      self.outgoing.put_nowait(message)
    except asyncio.QueueFull:
      self.slow.set()

  async def sender(self) -> None:
    while True:
      message = await self.outgoing.get()
      if isinstance(message, bytes):
        await self.ws.send_bytes(message)
      else:
        await self.ws.send_text(json.dumps(message))

  async def receive(self) -> bytes | dict:
    message = await self.ws.receive()
    if message['type'] == 'websocket.disconnect':
      raise fastapi_ws.WebSocketDisconnect(message.get('code', 1000))
    data = message.get('bytes')
    data = data if data is not None else message.get('text', '')
    if len(data) > self.limits.max_message_bytes:
      raise Refused(f'a message of {len(data)} bytes: at most {self.limits.max_message_bytes} '
                    'bytes a message (--max_message_bytes)', TOO_BIG)
    if isinstance(data, bytes):
      if len(data) % 2:
        raise Refused(f'a binary frame of {len(data)} bytes is not audio: binary frames carry '
                      '16-bit PCM, an even number of bytes', UNSUPPORTED)
      return data
    try:
      control = json.loads(data)
    except json.JSONDecodeError:
      control = None
    if not isinstance(control, dict) or control.get('type') not in ('hello', 'end_turn'):
      raise Refused(f'text frame {data[:60]!r} is not a control message: expected JSON '
                    '{"type": "hello" or "end_turn", ...}', UNSUPPORTED)
    return control

  async def hello(self) -> tuple[conversation_lib.Conversation, str]:
    first = await self.receive()
    if not isinstance(first, dict) or first['type'] != 'hello':
      raise Refused('the first message must be {"type": "hello", "sample_rate": 16000, '
                    '"turn": "vad" or "push"}', POLICY)
    rate, turn, seed = first.get('sample_rate'), first.get('turn', 'vad'), first.get('seed', 0)
    if rate != audio.SAMPLE_RATE:
      raise Refused(f'sample_rate {rate!r}: this server takes {audio.SAMPLE_RATE} Hz mono '
                    '16-bit PCM', UNSUPPORTED)
    if turn not in ('vad', 'push') or not isinstance(seed, int):
      raise Refused(f'turn {turn!r}, seed {seed!r}: expected turn "vad" or "push" and an '
                    'integer seed', POLICY)
    assets = self.service.assets
    detokenizer = assets.detokenizer
    self.send({'type': 'ready', 'mode': assets.gen.mode, 'turn': turn,
               'sample_rate': detokenizer.sample_rate if detokenizer else None,
               'vad_silence_ms': self.limits.vad_silence_ms,
               'max_message_bytes': self.limits.max_message_bytes,
               'max_turn_seconds': self.limits.max_turn_seconds})
    return conversation_lib.Conversation(assets, seed), turn

  async def run(self) -> None:
    conversation, turn_taking = await self.hello()
    vad = conversation_lib.EndOfTurn(self.limits.vad_threshold,
                                     max(1, self.limits.vad_silence_ms // 200))
    heard: list[np.ndarray] = []
    max_samples = int(self.limits.max_turn_seconds * audio.SAMPLE_RATE)
    while True:
      message = await self.receive()
      answering = self.answering is not None and not self.answering.done()
      if isinstance(message, bytes):
        if answering:
          continue
        samples = conversation_lib.from_pcm16(message)
        heard.append(samples)
        if sum(map(len, heard)) > max_samples:
          heard = []
          vad.reset()
          self.send({'type': 'error', 'message': 'a turn of more than '
                     f'{self.limits.max_turn_seconds:g} s (--max_turn_seconds): it is dropped'})
          continue
        ended = turn_taking == 'vad' and vad.push(samples)
      else:
        ended = message['type'] == 'end_turn' and not answering
      if ended and heard:
        question = np.concatenate(heard)
        heard = []
        vad.reset()
        self.answering = asyncio.create_task(self.answer(conversation, question))

  async def answer(self, conversation: conversation_lib.Conversation,
                   question: np.ndarray) -> None:
    heard = time.perf_counter()
    if len(question) < 4 * audio.HOP_LENGTH:
      self.send({'type': 'error', 'message': f'a turn of {len(question)} samples is too short'})
      return
    try:
      prompt = await asyncio.to_thread(conversation.prompt, question)
    except chat.ChatError as e:
      self.send({'type': 'error', 'message': f'{e}: the turn is dropped'})
      return
    self.send({'type': 'heard', 'seconds': round(len(question) / audio.SAMPLE_RATE, 2)})
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    self.turn = engine_lib.Turn(prompt, conversation.key(),
                                lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    self.service.engine.submit(self.turn)
    answer = conversation_lib.Answer(self.service.assets)
    first_text = first_audio = None
    audio_samples = 0
    while True:
      event = await events.get()
      delta = answer.text(event)
      if delta:
        first_text = first_text or time.perf_counter()
        self.send({'type': 'text', 'delta': delta})
      for chunk in await asyncio.to_thread(answer.audio, event):
        first_audio = first_audio or time.perf_counter()
        audio_samples += len(chunk)
        self.send(conversation_lib.pcm16(chunk))
      if event.done:
        break
    self.turn = None
    conversation.add(question, answer.shown)
    self.service.turns += 1
    since = lambda t: None if t is None else round(1000 * (t - heard), 1)
    rate = self.service.assets.detokenizer.sample_rate if self.service.assets.detokenizer else 1
    self.send({'type': 'done', 'text': answer.shown, 'text_ids': answer.text_ids,
               'codes': answer.codes, 'first_text_ms': since(first_text),
               'first_audio_ms': since(first_audio),
               'audio_seconds': round(audio_samples / rate, 3),
               'answer_ms': since(time.perf_counter())})

  def close(self) -> None:
    if self.turn is not None:
      self.service.engine.cancel(self.turn)
    if self.answering is not None:
      self.answering.cancel()


async def _refuse(ws: fastapi.WebSocket, message: str, code: int) -> None:
  try:
    await asyncio.wait_for(ws.send_text(json.dumps({'type': 'error', 'message': message})), 5)
    await asyncio.wait_for(ws.close(code), 5)
  except Exception:  # the client is gone or does not read: nothing more to tell it
    pass


def create_app(service: Service) -> fastapi.FastAPI:
  app = fastapi.FastAPI(title='fac_jax speech server')
  limits = service.limits

  @app.get('/')
  async def page():
    return fastapi.responses.FileResponse(PAGE, media_type='text/html')

  @app.get('/status')
  async def status():
    return service.status()

  @app.websocket('/ws')
  async def talk(ws: fastapi.WebSocket):
    await ws.accept()
    if service.sessions >= limits.max_sessions:
      await _refuse(ws, f'the server is full: {limits.max_sessions} conversations at once '
                    '(--max_sessions); try again later', TRY_LATER)
      return
    service.sessions += 1
    session = Session(service, ws)
    sender = asyncio.create_task(session.sender())
    receiver = asyncio.create_task(session.run())
    slow = asyncio.create_task(session.slow.wait())
    try:
      done, _ = await asyncio.wait({sender, receiver, slow}, timeout=limits.session_seconds,
                                   return_when=asyncio.FIRST_COMPLETED)
      if not done:
        raise Refused(f'the session time limit of {limits.session_seconds:g} s '
                      '(--session_seconds) is over', POLICY)
      if slow in done:
        raise Refused(f'the client reads too slowly: {limits.max_queued_messages} answer '
                      'messages were waiting (--max_queued_messages)', POLICY)
      for task in done:
        task.result()
    except Refused as e:
      session.close()
      sender.cancel()
      await _refuse(ws, str(e), e.code)
    except (fastapi_ws.WebSocketDisconnect, RuntimeError, OSError):
      pass  # the client went away (a send on a closed socket raises RuntimeError)
    finally:
      session.close()
      for task in (sender, receiver, slow):
        task.cancel()
      service.sessions -= 1

  return app
