"""A simulated live call with a duplex checkpoint: the user's side of a conversation is played to
the model 200 ms at a time, in order, as a microphone would deliver it; the model answers,
keeps talking over backchannels, yields when interrupted and listens again.

  python -m fac_jax.duplex --ckpt=CKPT --audio=conversation.wav --out=reply.wav
      [--timeline=reply.json] [--detokenizer=DIR|speech_tokenizer.npz] [--tail_seconds=3]
      [--system="..."] [--seed=0] [--window_steps=N] [--allow_half_duplex]

CKPT is a duplex checkpoint (python -m fac_jax.duplex.finetune); a half-duplex one, never taught
when to speak, is refused unless --allow_half_duplex (then the silence vector is zero).
--detokenizer voices the codes: a CosyVoice 3 folder written by fac_jax.speech.convert_cosyvoice,
or a k-means speech tokenizer .npz (its Griffin-Lim detokenizer; default: the one in the
checkpoint). --out receives a stereo wav at 16 kHz, the user on the left and the assistant on the
right (resampled from the detokenizer's rate), each code group played in the 200 ms step after
the one that produced it; --timeline (default: --out with .json) a JSON with every step (time,
user voice activity, the assistant's phase and text token) and every reply (steps, text, whether
the user was speaking when it ended). The caches keep the system prompt and the last
--window_steps steps (fac_jax.duplex.stream); by default as many as the sessions the checkpoint
was trained on, so that however long the call the model meets no longer distance than in
training.
"""

import json
import os
import sys
import time

from absl import app, flags
import jax
import librosa
import numpy as np
import soundfile
from flax import nnx

from fac_jax import audio, cli
from fac_jax.checkpoints import checkpoint, text_tokenizer
from fac_jax.duplex import features, model as duplex_model, stream, timeline
from fac_jax.inference import streaming
from fac_jax.speech import detokenizer as detokenizer_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('ckpt', None, 'Duplex (or half-duplex) fac_jax checkpoint.')
flags.DEFINE_string('audio', None, "The user's side of the call: any audio file librosa reads.")
flags.DEFINE_string('out', None, 'Stereo wav to write (user left, assistant right).')
flags.DEFINE_string('timeline', None, 'Timeline JSON to write (default: --out with .json).')
flags.DEFINE_string('detokenizer', None, 'A converted CosyVoice 3 folder, or a speech tokenizer '
                    '.npz (Griffin-Lim; default: the one in the checkpoint).')
flags.DEFINE_float('tail_seconds', 3.0, 'Silence played after the audio, for a last answer.')
flags.DEFINE_string('system', None, 'System prompt (default: the one the checkpoint was '
                    'trained with).')
flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.DEFINE_bool('allow_half_duplex', False, 'Run a half-duplex checkpoint as an untrained '
                  'duplex model (zero silence vector).')
flags.DEFINE_integer('window_steps', None,
                     'Steps kept in the caches after the system prompt (200 ms each; default: '
                     'the session length the checkpoint was trained on, else 1500).')


def replies_of(steps: list[dict], decode) -> list[dict]:
  """Each reply: its <|audio_bos|> and <|audio_eos|> steps, its text, and whether the user was
  speaking in the chunk that made it stop (it yielded)."""
  replies, current = [], None
  for i, record in enumerate(steps):
    if record['phase'] == 'bos':
      current = {'start': record['step'], 'tokens': []}
    elif current is not None and record['phase'] == 'speak':
      current['tokens'].append(record['token'])
    elif current is not None and record['phase'] == 'eos':
      replies.append({'start': current['start'], 'end': record['step'],
                      'text': decode(current['tokens']),
                      'user_speaking': steps[i - 1]['user_speech']})
      current = None
  return replies


def main(argv):
  del argv
  if not FLAGS.ckpt or not FLAGS.audio or not FLAGS.out:
    raise app.UsageError('--ckpt, --audio and --out are required')
  try:
    if not FLAGS.allow_half_duplex and not duplex_model.is_duplex(FLAGS.ckpt):
      checkpoint.load_config(FLAGS.ckpt)  # a folder that is no checkpoint is refused as such
      raise ValueError(f'{FLAGS.ckpt} is a half-duplex checkpoint (no '
                       f'{duplex_model.DUPLEX_FOLDER}/{duplex_model.SILENCE_FILE}): fine-tune it '
                       'with python -m fac_jax.duplex.finetune, or pass --allow_half_duplex to '
                       'run it untrained')
    cfg, params, settings = duplex_model.load(FLAGS.ckpt)
    official = os.path.join(FLAGS.ckpt, checkpoint.OFFICIAL)
    try:
      tokenizer = text_tokenizer.load(official)
    except FileNotFoundError:
      raise ValueError(f'{FLAGS.ckpt} has no tokenizer files in {official}/') from None
    detokenizer_path = FLAGS.detokenizer or duplex_model.speech_tokenizer_path(FLAGS.ckpt)
    if not detokenizer_path:
      raise ValueError(f'{FLAGS.ckpt} holds no speech tokenizer: give --detokenizer')
    detokenizer = detokenizer_lib.load(detokenizer_path)
    if detokenizer.vocab_size > cfg.speech.bos_id:
      raise ValueError(f'{detokenizer_path} has {detokenizer.vocab_size} codes; the model speaks '
                       f'{cfg.speech.bos_id}')
    user = audio.load(FLAGS.audio)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')

  trained = settings.get('timeline', {})
  vad_threshold = trained.get('vad_threshold', timeline.VAD_THRESHOLD)
  system = FLAGS.system or settings.get('system_prompt') or ''
  chunk = features.CHUNK_SAMPLES
  steps = -(-(len(user) + int(FLAGS.tail_seconds * audio.SAMPLE_RATE)) // chunk)
  user = np.pad(user, (0, steps * chunk - len(user)))
  window = FLAGS.window_steps or trained.get('steps', stream.LoopConfig.window_steps)
  loop = stream.LoopConfig(window_steps=window, evict_steps=max(1, window // 5))
  graphdef, _ = nnx.split(duplex_model.abstract_model(cfg))
  session = stream.Session(graphdef, params, cfg, loop,
                           stream.system_prompt_ids(tokenizer, cfg, system),
                           jax.random.key(FLAGS.seed), vad_threshold)
  special = set(cfg.tokens.values())
  decode = lambda ids: tokenizer.decode([i for i in ids if i not in special])

  assistant = np.zeros_like(user)

  def play(pieces: list, reply_start: int | None, end: int) -> None:
    """Lays a reply's audio from sample reply_start, cut at sample `end` (where it stopped)."""
    if reply_start is not None and pieces:
      voice = np.concatenate(pieces)
      if detokenizer.sample_rate != audio.SAMPLE_RATE:
        voice = librosa.resample(voice, orig_sr=detokenizer.sample_rate,
                                 target_sr=audio.SAMPLE_RATE)
      voice = voice[:min(end, len(assistant)) - reply_start]
      assistant[reply_start:reply_start + len(voice)] = voice

  records, took = [], []
  phase, token = stream.LISTEN, cfg.tokens.sil  # the assistant's input at the coming step
  chunker = None
  for p in range(steps):
    records.append({'step': p, 'time': round(p * features.STEP_SECONDS, 1),
                    'phase': stream.PHASE_NAMES[phase], 'token': token,
                    'text': tokenizer.id_to_token(token) or ''})
    start = time.perf_counter()
    result = session.push(user[p * chunk:(p + 1) * chunk])
    took.append(time.perf_counter() - start)
    records[-1]['user_speech'] = result.user_speech
    if result.phase == stream.BOS:
      chunker, reply_start, played = streaming.SpeechChunker(detokenizer, cfg.speech.bos_id), \
          None, []
    elif chunker is not None and result.phase == stream.SPEAK:
      if reply_start is None and ((result.codes >= 0) & (result.codes < cfg.speech.bos_id)).any():
        reply_start = (p + 1) * chunk  # a group plays in the step after the one producing it
      played += chunker.push(result.codes)
    elif chunker is not None and result.phase == stream.EOS:
      play(played + chunker.finish(), reply_start, (p + 1) * chunk)
      chunker = None
    phase, token = result.phase, result.text
  if chunker is not None:  # the call ended while the assistant spoke
    play(played + chunker.finish(), reply_start, len(assistant))

  soundfile.write(FLAGS.out, np.stack([user, assistant], axis=1), audio.SAMPLE_RATE)
  replies = replies_of(records, decode)
  path = FLAGS.timeline or os.path.splitext(FLAGS.out)[0] + '.json'
  mean_ms = 1000 * float(np.mean(took[1:] if len(took) > 1 else took))
  with open(path, 'w') as f:
    json.dump({'step_seconds': features.STEP_SECONDS, 'system_prompt': system,
               'vad_threshold': vad_threshold, 'mean_step_ms': round(mean_ms, 2),
               'replies': replies, 'steps': records}, f, indent=1)
  for reply in replies:
    how = 'yielded to the user' if reply['user_speaking'] else 'finished'
    print(f'{reply["start"] * features.STEP_SECONDS:6.1f} s - '
          f'{reply["end"] * features.STEP_SECONDS:6.1f} s  {reply["text"]!r} ({how})')
  print(f'{steps} steps of 200 ms, {mean_ms:.1f} ms each on average; wrote {FLAGS.out} '
        f'(user left, assistant right) and {path}')


def run():
  cli.run(main)


if __name__ == '__main__':
  run()
