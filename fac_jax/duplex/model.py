"""The duplex model: FunAudioChat with a user stream summed into every LLM input, and its
checkpoints.

LLM input at session step p:

  x_p = A_p + U_p
  A_p = (E(t_p) + G(c_p)) / 2   while the assistant listens (t_p = <|sil|>, c_p = 5 x speech pad)
                                or speaks (its text token and code group), exactly the half-duplex
                                input; E(t_p) alone at its <|audio_bos|>, <|audio_eos|> and
                                <|im_end|> steps, as in half-duplex decoding
  U_p = continuous_projection(mean of the encoder's 5 frames of the user's chunk p)   user speaks
      = user_silence                                                                  user silent
      = 0                                                        prompt positions (no user stream)

`user_silence` is the only new parameter. It starts at zero, so a duplex model made from a
half-duplex checkpoint computes, while the user is silent, exactly what the half-duplex model
computes. User audio is never halved here (the official training halves user-audio rows;
in the duplex sum there are none).

Batch: the fields of fac_jax.batch (the assistant channel, and `mel`, `mel_lengths`,
`continuous_frames` for the user's chunks; `continuous_mask` stays false) plus
  user_speech  (B, S) bool  the user speaks in this step's chunk: U_p from the encoder
  user_silent  (B, S) bool  a session step whose chunk is silent: U_p = user_silence

A duplex checkpoint is a fac_jax checkpoint of the shared modules (half-duplex tools read it)
with a `duplex/` folder: user_silence.npy, the speech tokenizer the model speaks and
settings.json (system prompt and the timing rules it was trained on).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fac_jax.checkpoints import checkpoint
from fac_jax.model import fun_audio_chat

DUPLEX_FOLDER = 'duplex'
SILENCE_FILE = 'user_silence.npy'
SPEECH_TOKENIZER_FILE = 'speech_tokenizer.npz'
SETTINGS_FILE = 'settings.json'
USER_FIELDS = ('user_speech', 'user_silent')


class FunAudioChatDuplex(fun_audio_chat.FunAudioChat):
  """Every FunAudioChat module, plus the learned silence input of the user stream."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.compute_dtype = jnp.dtype(cfg.dtype)
    self.user_silence = nnx.Param(jnp.zeros((cfg.llm.hidden_size,), jnp.dtype(cfg.param_dtype)),
                                  logical_axes=('embed',))

  def user_inputs(self, mel, mel_lengths, frame_index, speech, silent) -> jax.Array:
    """U (B, S, D): encoded user chunks where `speech`, the silence vector where `silent`, zero
    elsewhere. mel (B, W, F, M) windows, frame_index (B, S, 5) into their encoder frames."""
    silence = jnp.where(silent[..., None], self.user_silence[...].astype(self.compute_dtype), 0)
    if not mel.shape[1]:
      return silence
    frames = self.continuous_encoder(mel, mel_lengths).astype(self.compute_dtype)
    spoken = self.adapters.group_frames(frames, frame_index)
    return jnp.where(speech[..., None], spoken, silence)

  def embed_inputs(self, batch: dict, training: bool = True) -> tuple[jax.Array, jax.Array]:
    """A + U (see the module docstring) and the text embeddings the refined head sees."""
    no_user_audio = dict(batch, mel=batch['mel'][:, :0])  # the user stream is added below
    assistant, head_text = super().embed_inputs(no_user_audio, training)
    user = self.user_inputs(batch['mel'], batch['mel_lengths'], batch['continuous_frames'],
                            batch['user_speech'], batch['user_silent'])
    return assistant + user.astype(assistant.dtype), head_text


def create(cfg: ml_collections.ConfigDict, seed: int = 0) -> FunAudioChatDuplex:
  return nnx.jit(lambda: FunAudioChatDuplex(cfg, rngs=nnx.Rngs(seed)))()


def abstract_model(cfg: ml_collections.ConfigDict) -> FunAudioChatDuplex:
  return nnx.eval_shape(lambda: FunAudioChatDuplex(cfg, rngs=nnx.Rngs(0)))


def from_half_duplex(params: dict, silence=None) -> dict:
  """Duplex parameters from a half-duplex tree: the same leaves plus `user_silence` (zero unless
  given)."""
  if 'user_silence' in params:
    raise ValueError('these parameters already hold user_silence: they are a duplex tree')
  embedding = params['llm']['embed_tokens']['embedding']
  if silence is None:
    silence = jnp.zeros(embedding.shape[-1:], embedding.dtype)
  if tuple(silence.shape) != tuple(embedding.shape[-1:]):
    raise ValueError(f'user_silence has shape {tuple(silence.shape)}; the model width is '
                     f'{embedding.shape[-1]}')
  return dict(params, user_silence=jnp.asarray(silence, embedding.dtype))


def shared_params(params: dict) -> dict:
  """The half-duplex tree inside duplex parameters."""
  return {name: value for name, value in params.items() if name != 'user_silence'}


def save(ckpt_dir: str, cfg: ml_collections.ConfigDict, params: dict, *, settings: dict,
         tokenizer_dir: str | None = None, speech_tokenizer_file: str | None = None) -> str:
  """Writes a duplex checkpoint (committed atomically, like every fac_jax checkpoint)."""
  writer = checkpoint.Writer(ckpt_dir, cfg)
  for path, leaf in jax.tree_util.tree_flatten_with_path(shared_params(params))[0]:
    writer.add(tuple(k.key for k in path), leaf)
  if tokenizer_dir:
    for name in sorted(os.listdir(tokenizer_dir)):
      writer.add_official_file(os.path.join(tokenizer_dir, name))
  folder = os.path.join(writer.dir, DUPLEX_FOLDER)
  if jax.process_index() == 0:
    os.makedirs(folder)
    np.save(os.path.join(folder, SILENCE_FILE), np.asarray(jax.device_get(params['user_silence'])))
    with open(os.path.join(folder, SETTINGS_FILE), 'w') as f:
      json.dump(settings, f, indent=2)
    if speech_tokenizer_file:
      shutil.copy(speech_tokenizer_file, os.path.join(folder, SPEECH_TOKENIZER_FILE))
  return writer.commit()


def is_duplex(ckpt_dir: str) -> bool:
  """Whether the checkpoint holds a duplex fine-tune's silence vector and settings."""
  return os.path.exists(os.path.join(ckpt_dir, DUPLEX_FOLDER, SILENCE_FILE))


def load(ckpt_dir: str) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """(model config, duplex parameters, settings) of a duplex checkpoint; a half-duplex checkpoint
  loads with a zero silence vector and empty settings."""
  reader = checkpoint.Reader(ckpt_dir)
  params = reader.load()
  folder = os.path.join(ckpt_dir, DUPLEX_FOLDER)
  silence, settings = None, {}
  if is_duplex(ckpt_dir):
    silence = np.load(os.path.join(folder, SILENCE_FILE))
    with open(os.path.join(folder, SETTINGS_FILE)) as f:
      settings = json.load(f)
  try:
    return reader.config, from_half_duplex(params, silence), settings
  except ValueError as e:
    raise ValueError(f'{ckpt_dir}/{DUPLEX_FOLDER}/{SILENCE_FILE}: {e}') from None


def speech_tokenizer_path(ckpt_dir: str) -> str | None:
  path = os.path.join(ckpt_dir, DUPLEX_FOLDER, SPEECH_TOKENIZER_FILE)
  return path if os.path.exists(path) else None
