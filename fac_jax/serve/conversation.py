"""One conversation on the server, apart from the network: what the model needs to answer (the
Assets, shared), the turns so far and the prompt of the next one, where a spoken turn ends (an
energy VAD), and an answer being turned from engine events into text and audio chunks."""

import dataclasses
import os

import jax
import ml_collections
import numpy as np

from fac_jax.checkpoints import checkpoint, text_tokenizer
from fac_jax.duplex import features, timeline
from fac_jax.inference import chat, generate, sampling, streaming
from fac_jax.model import fun_audio_chat, quantization
from fac_jax.serve import engine as engine_lib
from fac_jax.speech import detokenizer as detokenizer_lib


@dataclasses.dataclass
class Assets:
  """A checkpoint's model and what its conversations share."""
  cfg: ml_collections.ConfigDict  # the model config
  graphdef: object  # nnx.GraphDef, run with quantization.merge
  params: dict
  tokenizer: object
  detokenizer: object | None  # None answers in text only
  system: str
  gen: generate.GenerationConfig
  max_prompt_tokens: int
  max_windows: int


def load_assets(ckpt: str, detokenizer: str | None, mode: str, max_new_tokens: int,
                greedy: bool, max_prompt_tokens: int, max_windows: int,
                system: str | None = None, quantize: str = 'none') -> Assets:
  """The checkpoint (its weights quantised as `quantize` says), its tokenizer, the detokenizer
  (`detokenizer`, else the one the checkpoint holds) and the system prompt chat uses by default
  for spoken questions in `mode`. Raises chat.ChatError naming what is missing."""
  cfg = checkpoint.load_config(ckpt)
  try:
    tokenizer = text_tokenizer.load(os.path.join(ckpt, checkpoint.OFFICIAL))
  except FileNotFoundError:
    raise chat.ChatError(f'{ckpt} has no tokenizer files in {checkpoint.OFFICIAL}/') from None
  voice = None
  if mode == 's2s':
    path = detokenizer or os.path.join(ckpt, checkpoint.CHAT, checkpoint.SPEECH_TOKENIZER_FILE)
    if not os.path.exists(path):
      raise chat.ChatError(f'{path} does not exist: --mode=s2s needs --detokenizer (a CosyVoice 3 '
                           'folder or a speech tokenizer .npz)')
    voice = detokenizer_lib.load(path)
  system, _ = chat.system_prompt(checkpoint.chat_settings(ckpt).get('tasks', {}), mode, False,
                                 system)
  text = sampling.Sampling(greedy=True) if greedy else sampling.Sampling()
  graphdef, params = quantization.quantize(fun_audio_chat.abstract_model(cfg),
                                           checkpoint.Reader(ckpt).load(), quantize)
  return Assets(cfg, graphdef, params, tokenizer, voice, system,
                generate.GenerationConfig(max_new_tokens, mode=mode, text=text),
                max_prompt_tokens, max_windows)


class Conversation:
  """The turns so far; earlier answers come back as text (chat's --history)."""

  def __init__(self, assets: Assets, seed: int):
    self.assets, self.seed = assets, seed
    self.history: list[dict] = []  # {'user': waveform, 'assistant': text}

  def prompt(self, question: np.ndarray) -> dict:
    """The next turn's prompt, padded to the server's fixed shape; the oldest turns are left out
    until it fits. Raises chat.ChatError when the question alone does not."""
    a = self.assets
    for first in range(len(self.history) + 1):
      try:
        return chat.build_prompt(a.tokenizer, a.cfg, a.system, self.history[first:], question,
                                 a.max_prompt_tokens, a.max_windows)
      except chat.ChatError:
        if first == len(self.history):
          raise

  def key(self) -> jax.Array:
    """The sampling key of the next turn: turn k of seed s draws as chat --seed=s would draw
    given the same k earlier turns as --history, with the key fold_in(key(s), k)."""
    return jax.random.fold_in(jax.random.key(self.seed), len(self.history))

  def add(self, question: np.ndarray, answer: str) -> None:
    self.history.append({'user': question, 'assistant': answer})


class EndOfTurn:
  """Energy VAD: a turn ends after `silence_chunks` quiet 200 ms chunks that follow speech (a
  chunk whose RMS exceeds `threshold`)."""

  def __init__(self, threshold: float = timeline.VAD_THRESHOLD, silence_chunks: int = 4):
    self.threshold, self.silence_chunks = threshold, silence_chunks
    self.reset()

  def reset(self) -> None:
    self.pending = np.zeros(0, np.float32)
    self.heard_speech, self.quiet = False, 0

  def push(self, samples: np.ndarray) -> bool:
    """True once the turn has ended."""
    self.pending = np.concatenate([self.pending, samples])
    whole = len(self.pending) // features.CHUNK_SAMPLES * features.CHUNK_SAMPLES
    for voiced in features.voice_activity(self.pending[:whole], self.threshold):
      self.heard_speech |= bool(voiced)
      self.quiet = 0 if voiced else self.quiet + 1
    self.pending = self.pending[whole:]
    return self.heard_speech and self.quiet >= self.silence_chunks


class Answer:
  """An answer as its engine events arrive: the new text of each step and its audio chunks."""

  def __init__(self, assets: Assets):
    self.assets = assets
    self.text_ids: list[int] = []
    self.codes: list[int] = []
    self.shown = ''
    self.chunker = streaming.SpeechChunker(assets.detokenizer, assets.cfg.speech.bos_id) \
        if assets.detokenizer else None

  def text(self, event: engine_lib.Event) -> str:
    """The text this event adds."""
    self.text_ids.append(event.text)
    shown = chat.answer_text(self.assets.tokenizer, self.text_ids, self.assets.cfg)
    new, self.shown = shown[len(self.shown):], shown
    return new

  def audio(self, event: engine_lib.Event) -> list[np.ndarray]:
    """Audio chunks completed by this event (slow: a detokenizer runs)."""
    if event.codes is not None:
      self.codes += event.codes.tolist()
    if not self.chunker:
      return []
    chunks = self.chunker.push(event.codes) if event.codes is not None else []
    return chunks + (self.chunker.finish() if event.done else [])


def pcm16(chunk: np.ndarray) -> bytes:
  """float audio in [-1, 1] -> 16-bit little-endian PCM."""
  return (np.clip(chunk, -1, 1) * 32767).astype('<i2').tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
  return np.frombuffer(data, '<i2').astype(np.float32) / 32768
