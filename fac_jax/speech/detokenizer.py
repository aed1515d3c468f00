"""CosyVoice 3 detokenizer: 25 Hz S3 speech codes -> 24 kHz speech, the flow (codes -> 50 Hz mel)
then the CausalHiFT vocoder (mel -> waveform), in the fixed voice Fun-Audio-Chat speaks with.

A converted folder (fac_jax.speech.convert_cosyvoice) holds flow/, hift/ and speaker.json (the
x-vector of one speaker of spk2info.pt). `decode` is Fun-Audio-Chat's offline `token2wav`: 30 s
segments of 750 codes (a last one under 50 codes is merged with the one before and the two are
split in half), each through the flow (no prompt, finalize) and the vocoder from the start, the
waveforms concatenated. `stream()` turns codes into audio as they arrive with real caches: the
flow block by block under its block-causal chunk mask (FlowStream) and the vocoder over the new
frames only (HiftStream). Streamed audio is a prefix of `decode(codes, chunk_mask=True)`, the
same recipe with the chunk mask (which CosyVoice 3 is trained with), not of the default
full-attention decode: with full attention every new code changes every frame of its segment.

  detokenizer = load(DIR)          # or a k-means .npz -> its Griffin-Lim detokenizer
  waveform = detokenizer.decode(codes)
  session = detokenizer.stream(); chunks = [session.push(c) for c in pieces] + [session.finish()]
"""

import json
import os

import jax.numpy as jnp
import numpy as np

from fac_jax.speech import flow, hift, s3tokenizer, speech_tokenizer

SPEAKER_FILE = 'speaker.json'
DEFAULT_SPEAKER = '中文女'  # the voice of Fun-Audio-Chat's utils/new_spk2info.pt it speaks with
SEGMENT_TOKENS = 750  # 30 s of codes: Fun-Audio-Chat decodes long answers in such segments
MIN_LAST_SEGMENT_TOKENS = 50  # a shorter last segment is merged with the one before


def speaker_json(speaker: str, embedding: np.ndarray, source: dict) -> str:
  """speaker.json: the speaker's name, where it came from and its x-vector."""
  return json.dumps({'speaker': speaker, 'source': source,
                     'embedding': [float(x) for x in np.asarray(embedding, np.float32)]},
                    ensure_ascii=False, indent=1)


def read_speaker(folder: str, dim: int) -> np.ndarray:
  """The (dim,) float32 x-vector in folder/speaker.json."""
  path = os.path.join(folder, SPEAKER_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{folder} holds no {SPEAKER_FILE}: convert the speaker table with '
                            'fac_jax.speech.convert_cosyvoice --spk2info=spk2info.pt')
  with open(path, encoding='utf-8') as f:
    embedding = np.asarray(json.load(f).get('embedding'), np.float32)
  if embedding.shape != (dim,) or not np.all(np.isfinite(embedding)):
    raise ValueError(f'{path}: "embedding" has shape {embedding.shape}; the flow needs {dim} '
                     'finite numbers')
  return embedding


class CosyVoiceDetokenizer:
  """Codes in [0, vocab_size) -> 24 kHz waveform (fac_jax.speech.speech_tokenizer's
  SpeechDetokenizer, and a streaming one). lookahead: the flow's pre-look-ahead, the codes after
  the last one played that a streaming caller waits for."""

  def __init__(self, flow_model: flow.Flow, hift_model: hift.CausalHiFT, embedding: np.ndarray,
               segment_tokens: int = SEGMENT_TOKENS,
               min_last_segment_tokens: int = MIN_LAST_SEGMENT_TOKENS):
    cfg, vocoder = flow_model.config, hift_model.config
    embedding = np.asarray(embedding, np.float32)
    if embedding.shape != (cfg.spk_embed_dim,):
      raise ValueError(f'speaker embedding of shape {embedding.shape}; the flow needs '
                       f'({cfg.spk_embed_dim},)')
    frames = segment_tokens * cfg.token_mel_ratio
    if frames > cfg.noise_frames or frames * vocoder.upsample_scale > vocoder.noise_samples:
      raise ValueError(f'segments of {segment_tokens} codes outrun the fixed noise tables')
    self.flow, self.hift = flow_model, hift_model
    self.embedding = jnp.asarray(embedding)[None]
    self.segment_tokens, self.min_last_segment_tokens = segment_tokens, min_last_segment_tokens
    self.sample_rate = vocoder.sampling_rate
    self.vocab_size = cfg.vocab_size
    self.lookahead = cfg.pre_lookahead_len
    self.samples_per_code = cfg.token_mel_ratio * vocoder.upsample_scale

  @classmethod
  def load(cls, folder: str, **kwargs) -> 'CosyVoiceDetokenizer':
    """From a folder written by fac_jax.speech.convert_cosyvoice (flow/, hift/, speaker.json)."""
    flow_model = flow.load(os.path.join(folder, 'flow'))
    return cls(flow_model, hift.load(os.path.join(folder, 'hift')),
               read_speaker(folder, flow_model.config.spk_embed_dim), **kwargs)


  def segments(self, num_codes: int) -> list[tuple[int, int]]:
    """[start, end) of each segment `decode` cuts num_codes codes into."""
    return s3tokenizer.pieces(num_codes, self.segment_tokens, self.min_last_segment_tokens)

  def decode(self, codes, chunk_mask: bool = False) -> np.ndarray:
    """(n,) codes -> (960 n,) float32 waveform; chunk_mask: the flow's block-causal attention
    (what `stream` computes) instead of full attention (Fun-Audio-Chat's offline default)."""
    codes = speech_tokenizer.checked_codes(codes, self.vocab_size)
    pieces = [np.zeros(0, np.float32)]
    for start, end in self.segments(len(codes)):
      mel = flow.inference(self.flow, jnp.asarray(codes[start:end])[None], self.embedding,
                           streaming=chunk_mask)['mel']
      pieces.append(np.asarray(hift.inference(self.hift, mel))[0])
    return np.concatenate(pieces)

  def stream(self) -> 'CosyVoiceStream':
    return CosyVoiceStream(self)


class CosyVoiceStream:
  """One streamed answer: `push(codes)` returns the audio those codes complete, `finish()` the
  rest. Every segment_tokens codes the segment is finalized (its last block reads zeros past the
  end, as `decode` does) and a new one begins with fresh caches; unlike `decode`, a short last
  segment is not merged with the one before (the stream cannot know it is the last), so the
  stream equals decode(chunk_mask=True) whenever no segment boundary is followed by fewer than
  min_last_segment_tokens codes. Audio of a block of static_chunk_size frames comes out once its
  codes and pre_lookahead_len more have arrived, less the vocoder's look-ahead of 4 frames."""

  def __init__(self, detokenizer: CosyVoiceDetokenizer):
    self.detokenizer = detokenizer
    self.in_segment = 0
    self.finished = False
    self._begin_segment()

  def _begin_segment(self) -> None:
    detokenizer = self.detokenizer
    max_frames = detokenizer.segment_tokens * detokenizer.flow.config.token_mel_ratio
    self.flow_stream = flow.FlowStream(detokenizer.flow, detokenizer.embedding,
                                       max_frames=max_frames)
    self.hift_stream = hift.HiftStream(detokenizer.hift)
    self.in_segment = 0

  def _vocode(self, mel, final: bool) -> list[np.ndarray]:
    """Feeds the vocoder block by block (one compiled shape for all full blocks)."""
    block = self.detokenizer.flow.config.static_chunk_size
    starts = range(0, mel.shape[2], block)
    return [np.asarray(self.hift_stream.push(mel[:, :, start:start + block],
                                             finalize=final and start == starts[-1]))[0]
            for start in starts]

  def push(self, codes) -> np.ndarray:
    """Adds codes; returns the float32 samples they complete (maybe none)."""
    if self.finished:
      raise ValueError('this stream was finished')
    codes = speech_tokenizer.checked_codes(np.ravel(codes), self.detokenizer.vocab_size)
    out = [np.zeros(0, np.float32)]
    while len(codes):
      take = min(len(codes), self.detokenizer.segment_tokens - self.in_segment)
      self.in_segment += take
      full = self.in_segment == self.detokenizer.segment_tokens
      out += self._vocode(self.flow_stream.push(codes[:take], finalize=full), final=full)
      codes = codes[take:]
      if full:
        self._begin_segment()
    return np.concatenate(out)

  def finish(self) -> np.ndarray:
    """Ends the answer; returns the rest of its audio."""
    if self.finished:
      raise ValueError('this stream was finished')
    self.finished = True
    if not self.in_segment:
      return np.zeros(0, np.float32)
    return np.concatenate(self._vocode(self.flow_stream.push([], finalize=True), final=True))


def load(path: str) -> speech_tokenizer.SpeechDetokenizer:
  """A converted CosyVoice folder -> CosyVoiceDetokenizer; a k-means speech tokenizer file (.npz)
  -> its Griffin-Lim detokenizer."""
  if os.path.isdir(path):
    return CosyVoiceDetokenizer.load(path)
  return speech_tokenizer.GriffinLimDetokenizer.load(path)
