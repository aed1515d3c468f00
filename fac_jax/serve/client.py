"""A Python client of the speech server's WebSocket protocol (fac_jax.serve.server): it speaks
questions as a microphone would (200 ms frames of 16-bit PCM), ends each turn, and records the
answer's messages and timings. The load benchmark and the tests drive the server with it."""

import dataclasses
import json
import time

import numpy as np
from websockets.sync import client as ws_client

from fac_jax.duplex import features
from fac_jax.serve import conversation


@dataclasses.dataclass
class TurnRecord:
  heard_seconds: float
  text: str  # the text deltas, joined
  done: dict  # the server's done message
  audio_samples: int  # of the answer's speech, received
  audio_chunks: int
  first_text_s: float | None  # after the turn was sent, as the client sees it
  first_audio_s: float | None
  answer_s: float


def frames(question: np.ndarray) -> list[bytes]:
  """The question as a microphone streams it: 200 ms frames, the last one zero-padded."""
  padded = np.pad(question, (0, -len(question) % features.CHUNK_SAMPLES))
  return [conversation.pcm16(chunk) for chunk in
          padded.reshape(-1, features.CHUNK_SAMPLES)]


def spoken(question: np.ndarray) -> np.ndarray:
  """What the server hears of `question` sent by `frames` with push-to-talk."""
  return conversation.from_pcm16(b''.join(frames(question)))


class Client:
  """One conversation (push-to-talk), as a context manager."""

  def __init__(self, url: str, seed: int = 0, timeout: float = 120.0):
    self.ws = ws_client.connect(url, max_size=None, open_timeout=timeout)
    self.timeout = timeout
    self.ws.send(json.dumps({'type': 'hello', 'sample_rate': 16000, 'turn': 'push',
                             'seed': seed}))
    self.ready = self.receive()
    if self.ready.get('type') != 'ready':
      raise RuntimeError(f'the server refused the conversation: {self.ready}')

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.ws.close()

  def receive(self):
    message = self.ws.recv(timeout=self.timeout)
    return message if isinstance(message, bytes) else json.loads(message)

  def ask(self, question: np.ndarray) -> TurnRecord:
    for frame in frames(question):
      self.ws.send(frame)
    self.ws.send(json.dumps({'type': 'end_turn'}))
    sent = time.perf_counter()
    first_text = first_audio = None
    text, samples, chunks, heard = '', 0, 0, None
    while True:
      message = self.receive()
      now = time.perf_counter() - sent
      if isinstance(message, bytes):
        first_audio = first_audio if first_audio is not None else now
        samples, chunks = samples + len(message) // 2, chunks + 1
      elif message['type'] == 'heard':
        heard = message['seconds']
      elif message['type'] == 'text':
        first_text = first_text if first_text is not None else now
        text += message['delta']
      elif message['type'] == 'done':
        return TurnRecord(heard, text, message, samples, chunks, first_text, first_audio, now)
      else:
        raise RuntimeError(f'unexpected message: {message}')
