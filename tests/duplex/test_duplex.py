"""The duplex model and its streaming loop: with the user silent, duplex steps reproduce the
half-duplex decode steps of the same weights and the duplex forward the half-duplex forward; the
teacher-forced streaming loop gives the training forward's logits (window-prefix encoder windows
included) and, once its bounded caches slide, those of an uncached forward built to mean the
eviction policy; the causal log-mel against librosa; duplex checkpoints, and the live call
refusing a half-duplex one."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import librosa
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fac_jax.checkpoints import checkpoint
from fac_jax.data import conversation, synthetic
from fac_jax.duplex import features, metrics, model as duplex_model, stream, timeline
from fac_jax.inference import generate, sampling
from fac_jax.model import fun_audio_chat, layers
from official_tiny import KEY, greedy, prompt_of

PLAIN = sampling.Sampling(greedy=True, repetition_penalty=1.0)


@pytest.fixture(scope='module')
def tiny():
  """The tiny config and one random duplex model (its silence vector at the initial zero)."""
  from conftest import REPO
  from fac_jax import config as config_lib
  cfg = config_lib.load(f'{REPO}/configs/tiny.py').model
  graphdef, state = nnx.split(duplex_model.create(cfg, seed=2))
  half_graphdef, _ = nnx.split(fun_audio_chat.abstract_model(cfg))
  return cfg, graphdef, nnx.to_pure_dict(state), half_graphdef


def test_silent_user_reproduces_half_duplex_decode_steps(tiny):
  """From the same prefilled state, duplex steps with a silent user (silence vector at its initial
  zero) give generate.decode_step's text and code logits and tokens, step by step."""
  cfg, graphdef, params, half_graphdef = tiny
  half_params = duplex_model.shared_params(params)
  rng = np.random.default_rng(3)
  pieces = synthetic.conversation_pieces(rng, cfg)[:3]  # system, user audio, assistant header
  example = conversation.format_conversation(pieces, cfg)
  prompt = prompt_of(conversation.pack([[example]], len(example['input_ids']),
                                       len(example['mel_lengths']), cfg))
  steps = 6
  gen = dataclasses.replace(greedy(steps), return_logits=True)
  half = jax.jit(lambda p, x: generate.prefill(nnx.merge(half_graphdef, p), x, cfg, gen, KEY))(
      half_params, prompt)
  decode_step = jax.jit(lambda p, s: generate.decode_step(nnx.merge(half_graphdef, p), s, cfg,
                                                          gen))
  reference = half
  for _ in range(1, steps):
    reference = decode_step(half_params, reference)
  reference = jax.device_get(generate.outputs(reference, cfg))
  assert not (reference['speech'][0, :steps - 1] == cfg.speech.eos_id).any()

  loop = stream.LoopConfig(window_steps=steps, evict_steps=steps, text=PLAIN, speech=PLAIN,
                           return_logits=True)
  step = jax.jit(lambda p, s, mel, speech: stream.step(nnx.merge(graphdef, p), s, mel, speech,
                                                       cfg, loop))
  silent_chunk = jnp.full((1, features.CHUNK_MEL_FRAMES, cfg.encoder.num_mel_bins), -1.5)
  text_diff = code_diff = 0.0
  duplex_state = speaking_state(half, cfg, loop)
  for t in range(1, steps):
    duplex_state, out = step(params, duplex_state, silent_chunk, jnp.asarray([False]))
    out = jax.device_get(out)
    text_diff = max(text_diff, np.abs(out['text_logits'][0] - reference['text_logits'][0, t]).max())
    code_diff = max(code_diff, np.abs(out['code_logits'][0] - reference['code_logits'][0, t]).max())
    assert out['text'][0] == reference['text'][0, t]
    np.testing.assert_array_equal(out['codes'][0], reference['speech'][0, t - 1])
  # Same operations on the same state: equal up to float32 rounding of a differently fused
  # program (measured: 0 for both on CPU).
  assert text_diff <= 1e-5 and code_diff <= 1e-5, (text_diff, code_diff)

  # The user stream is really there: a non-zero silence vector changes the step.
  loud = dict(params, user_silence=jnp.full_like(params['user_silence'], 0.1))
  _, out = step(loud, speaking_state(half, cfg, loop), silent_chunk, jnp.asarray([False]))
  assert np.abs(np.asarray(out['text_logits'][0]) - reference['text_logits'][0, 1]).max() > 1e-3


def speaking_state(half: dict, cfg, loop: stream.LoopConfig) -> dict:
  """The duplex loop state at the half-duplex state after prefill: the caches, position and
  previous-code embedding it holds, the assistant at its <|audio_bos|> step."""
  group = cfg.speech.group_size
  state = {name: half[name] for name in ('key', 'position', 'llm_cache', 'llm_valid',
                                          'head_cache', 'head_valid', 'code_embedding')}
  state.update(
      step=jnp.zeros((), jnp.int32), phase=jnp.asarray([stream.BOS]),
      text=half['text'][:, 0], codes=jnp.full((1, group), cfg.speech.pad_id),
      reply_steps=jnp.zeros((1,), jnp.int32), text_history=jnp.full((1, loop.history_steps), -1),
      code_history=jnp.full((1, loop.history_steps * group), -1),
      mel_window=jnp.zeros((1, cfg.encoder.window_frames, cfg.encoder.num_mel_bins)))
  return state


def tone_exchanges(rng, cfg, count=6):
  """Exchanges of tone speech and random answers, and tone backchannels (no corpus needed)."""
  plain_vocab = min(cfg.llm.vocab_size, *cfg.tokens.values())
  exchanges = [timeline.Exchange(
      question=synthetic.tone_speech(rng, rng.uniform(1.2, 2.0)), question_text=f'q{i}',
      answer=f'a{i}', answer_ids=rng.integers(0, plain_vocab, 3).tolist(),
      answer_codes=rng.integers(0, cfg.speech.bos_id, int(rng.integers(30, 50))), voice='tone',
      engine='')
      for i in range(count)]
  return exchanges, {'tone': [synthetic.tone_speech(rng, 0.3) for _ in range(3)]}


def teacher_forcing(line: timeline.Timeline, cfg) -> dict:
  """What the assistant says next at each step: the next step's text input, and the code group
  it will speak (5 x eos where it stops, pad where it does not speak)."""
  following = np.concatenate([line.phase[1:], [stream.LISTEN]])
  codes = np.concatenate([line.codes[1:], line.codes[:1]])
  codes = np.where((following == stream.SPEAK)[:, None], codes, cfg.speech.pad_id)
  codes[(line.phase == stream.SPEAK) & (following == stream.EOS)] = cfg.speech.eos_id
  text = np.concatenate([line.text[1:], [cfg.tokens.sil]])
  return {'text': jnp.asarray(text[None]), 'codes': jnp.asarray(codes[None])}


@pytest.fixture(scope='module')
def session(tiny):
  """The tiny model with encoder windows of three chunks (parameters do not depend on it) and a
  non-zero silence vector, a synthetic timeline with an interruption and a backchannel, its
  training batch and teacher forcing."""
  cfg, graphdef, params, _ = tiny
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.encoder.window_frames = 3 * features.CHUNK_MEL_FRAMES
  rng = np.random.default_rng(0)
  exchanges, clips = tone_exchanges(rng, cfg)
  tcfg = timeline.TimelineConfig(steps=48, interruption_rate=0.5, backchannel_rate=1.0)
  line = next(t for t in (timeline.synthesise(seed, exchanges, clips, cfg, tcfg)
                          for seed in range(100))
              if t.events['interruptions'] and t.events['backchannels'])
  tok = cfg.tokens
  prompt = [tok.im_start, 3, 4, 5, tok.im_end, 6]
  row = timeline.format_timeline(line, prompt, cfg)
  batch = timeline.batch([row], len(row['input_ids']), len(row['mel_lengths']), cfg)
  params = dict(params, user_silence=0.02 * jax.random.normal(jax.random.key(3),
                                                              params['user_silence'].shape))
  mel, speech = timeline.chunked_user_audio(line, cfg.encoder.num_mel_bins)
  graphdef, _ = nnx.split(duplex_model.abstract_model(cfg))
  forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))
  return dict(cfg=cfg, line=line, prompt=prompt, batch=batch, graphdef=graphdef, params=params,
              mel=jnp.asarray(mel[None]), speech=jnp.asarray(speech[None]), forward=forward,
              forced=teacher_forcing(line, cfg), trained=jax.device_get(forward(params, batch)))


def eviction_policy(steps: int, window: int, evict: int) -> tuple[list[set], list[int]]:
  """Re-derived from the documented policy: for each step, the session steps it sees and how many
  steps had been evicted before it (by which its position and the kept steps' were moved)."""
  kept, visible, shifts, evicted = [], [], [], 0
  for step in range(steps):
    if len(kept) == window:
      kept, evicted = kept[evict:], evicted + evict
    kept.append(step)
    visible.append(set(kept))
    shifts.append(evicted)
  return visible, shifts


def evicting_forward(model, batch, prompt: int, visible: list[set], shifts: list[int]):
  """Text logits (T, V) and code logits (T, 5, codes) of the session steps, from one uncached
  forward built to mean what the evicting loop computes: the steps at their own positions, each
  seeing the steps `visible` to it and a copy of the prompt moved forward by its shift (so that
  its distance to the prompt is the one the loop's moved positions give)."""
  steps, group = len(visible), model.speech_refined_head.group_size
  epochs = sorted(set(shifts))
  copies = len(epochs) * prompt
  length = copies + steps
  mask = np.zeros((length, length), bool)
  positions = np.concatenate([shift + np.arange(prompt) for shift in epochs]
                             + [prompt + np.arange(steps)])
  for e in range(len(epochs)):
    mask[e * prompt:(e + 1) * prompt, e * prompt:(e + 1) * prompt] = np.tril(
        np.ones((prompt, prompt), bool))
  for step in range(steps):
    e = epochs.index(shifts[step])
    mask[copies + step, e * prompt:(e + 1) * prompt] = True
    mask[copies + step, copies + np.asarray(sorted(visible[step]))] = True
  inputs, head_text = model.embed_inputs(batch)
  sequence = jnp.concatenate([inputs[:, :prompt]] * len(epochs) + [inputs[:, prompt:]], axis=1)
  hidden = model.llm.decoder.final_norm(layers.scan_layers(
      model.llm.decoder.layers, sequence, jnp.asarray(positions)[None],
      jnp.asarray(mask)[None, None]))
  text = model.llm.lm_head(hidden[0, copies:])

  head = model.speech_refined_head
  as_trained = jnp.concatenate([hidden[:, :prompt], hidden[:, copies:]], axis=1)
  head_inputs = model.speech_head_inputs(as_trained, head_text, batch['speech_targets'])
  head_sequence = jnp.concatenate([head_inputs[:, :group * prompt]] * len(epochs)
                                  + [head_inputs[:, group * prompt:]], axis=1)
  sub = np.arange(length * group)
  sub_mask = mask[sub[:, None] // group, sub[None, :] // group] & (
      (sub[:, None] // group != sub[None, :] // group) | (sub[None, :] <= sub[:, None]))
  sub_positions = (positions[:, None] * group + np.arange(group)).reshape(1, -1)
  head_hidden = head.decoder.final_norm(layers.scan_layers(
      head.decoder.layers, head.down_projection(head_sequence), jnp.asarray(sub_positions),
      jnp.asarray(sub_mask)[None, None]))
  codes = model.adapters.code_embedding.attend(head.up_projection(head_hidden[0]))
  return text, codes[copies * group:].reshape(steps, group, -1)


def test_streaming_loop_equals_the_training_forward_with_bounded_caches(session):
  """The teacher-forced loop, caches of 12 steps (5 evicted when full) over a 48-step session:
  until the cache is full its text and code logits equal the training forward's at the same
  positions; throughout they equal an uncached forward built to mean what the documented
  eviction policy does (max abs diff 1e-4; measured about 5e-6). The loop goes through the
  timeline's phases, and its state keeps its size."""
  s = session
  cfg, graphdef, params = s['cfg'], s['graphdef'], s['params']
  window, evict = 12, 5
  loop = stream.LoopConfig(window_steps=window, evict_steps=evict, return_logits=True)
  out = jax.device_get(stream.make_simulate_fn(graphdef, cfg, loop)(
      params, jnp.asarray([s['prompt']]), s['mel'], s['speech'], KEY, s['forced']))
  np.testing.assert_array_equal(metrics.assistant_phases(out['phase'][0]), s['line'].phase)

  prompt, steps, group = len(s['prompt']), len(s['line'].phase), cfg.speech.group_size
  trained = s['trained']
  text = trained['text_logits'][0, prompt:prompt + window]
  codes = trained['speech_logits'][0].reshape(-1, group, cfg.speech.codebook_size)[prompt:]
  assert np.abs(out['text_logits'][0, :window] - text).max() <= 1e-4
  assert np.abs(out['code_logits'][0, :window] - codes[:window]).max() <= 1e-4
  # Evictions changed something: after the first one, full attention gives other logits.
  full = trained['text_logits'][0, prompt + window:]
  assert np.abs(out['text_logits'][0, window:] - full).max() > 1e-3

  visible, shifts = eviction_policy(steps, window, evict)
  assert max(shifts) >= 5 * evict  # several evictions
  text, codes = jax.device_get(jax.jit(lambda p, b: evicting_forward(
      nnx.merge(graphdef, p), b, prompt, visible, shifts))(params, s['batch']))
  assert np.abs(out['text_logits'][0] - text).max() <= 1e-4
  assert np.abs(out['code_logits'][0] - codes).max() <= 1e-4

  start = jax.eval_shape(lambda p: stream.prefill(nnx.merge(graphdef, p), jnp.zeros(
      (1, prompt), jnp.int32), cfg, loop, KEY), params)
  after = jax.eval_shape(lambda p, st: stream.step(nnx.merge(graphdef, p), st, s['mel'][:, 0],
                                                   s['speech'][:, 0], cfg, loop)[0], params, start)
  assert jax.tree.map(lambda x: x.shape, start) == jax.tree.map(lambda x: x.shape, after)
  assert start['llm_cache']['k'].shape[2] == prompt + window


def test_silent_user_stream_leaves_the_training_forward_unchanged(session):
  """The duplex forward with the user silent throughout (silence vector zero) equals the
  half-duplex forward of the same batch without its user stream."""
  s = session
  cfg = s['cfg']
  params = dict(s['params'], user_silence=jnp.zeros_like(s['params']['user_silence']))
  batch = dict(s['batch'], user_speech=np.zeros_like(s['batch']['user_speech']))
  batch['user_silent'] = batch['segment_ids'] > 0
  duplex = s['forward'](params, batch)
  half_graphdef, _ = nnx.split(fun_audio_chat.abstract_model(cfg))
  half = jax.jit(lambda p, b: nnx.merge(half_graphdef, p)(b))(
      duplex_model.shared_params(params), batch)
  for name in half:
    assert np.abs(np.asarray(half[name]) - np.asarray(duplex[name])).max() <= 1e-6, name


def test_causal_log_mel_is_chunkable_causal_and_matches_librosa():
  rng = np.random.default_rng(1)
  wave = synthetic.tone_speech(rng, 1.3)[:20640]  # 129 frames
  whole = features.causal_log_mel(wave, 19)
  featurizer = features.CausalLogMel(19)
  pieces = np.split(wave, [160, 3360, 3520, 9920])
  np.testing.assert_array_equal(np.concatenate([featurizer(p) for p in pieces]), whole)
  changed = wave.copy()
  changed[8000:] = rng.normal(size=len(wave) - 8000)
  np.testing.assert_array_equal(features.causal_log_mel(changed, 19)[:50], whole[:50])

  padded = np.concatenate([np.zeros(240), wave.astype(np.float64)])
  power = np.abs(librosa.stft(padded, n_fft=400, hop_length=160, window='hann',
                              center=False)) ** 2
  filters = librosa.filters.mel(sr=16000, n_fft=400, n_mels=19, norm='slaney', htk=False)
  log_spec = np.log10(np.maximum(filters @ power, 1e-10)).T
  floor = np.maximum.accumulate(log_spec.max(axis=1)) - 8
  reference = (np.maximum(log_spec, floor[:, None]) + 4) / 4
  assert whole.shape == reference.shape == (129, 19)
  np.testing.assert_allclose(whole, reference, atol=1e-5)


def test_encoder_windows_must_hold_whole_chunks():
  with pytest.raises(ValueError, match='window_frames=30 is not a multiple of the 20 mel frames'):
    features.chunks_per_window(30)


def test_duplex_checkpoints(tiny, tmp_path):
  cfg, _, params, _ = tiny
  half = duplex_model.shared_params(params)
  silence = np.linspace(-1, 1, cfg.llm.hidden_size).astype(np.float32)
  path = duplex_model.save(str(tmp_path / 'duplex'), cfg,
                           duplex_model.from_half_duplex(half, silence),
                           settings={'system_prompt': 'hi'})
  loaded_cfg, loaded, settings = duplex_model.load(path)
  np.testing.assert_array_equal(loaded['user_silence'], silence)
  np.testing.assert_array_equal(loaded['llm']['lm_head']['kernel'],
                                half['llm']['lm_head']['kernel'])
  assert settings == {'system_prompt': 'hi'} and loaded_cfg.to_dict() == cfg.to_dict()
  assert checkpoint.Reader(path).shapes == jax.tree.map(np.shape, half)  # half-duplex readable

  plain = checkpoint.save_params(str(tmp_path / 'half'), cfg, half)
  _, loaded, settings = duplex_model.load(plain)
  assert not np.asarray(loaded['user_silence']).any() and settings == {}

  np.save(f'{path}/duplex/user_silence.npy', silence[:-1])
  with pytest.raises(ValueError, match=r'duplex/user_silence.npy: user_silence has shape'):
    duplex_model.load(path)


def test_live_call_refuses_a_half_duplex_checkpoint(tiny, tmp_path):
  from conftest import REPO
  cfg, _, params, _ = tiny
  plain = checkpoint.save_params(str(tmp_path / 'half'), cfg, duplex_model.shared_params(params))
  result = subprocess.run(
      [sys.executable, '-m', 'fac_jax.duplex', f'--ckpt={plain}', '--audio=call.wav',
       f'--out={tmp_path / "reply.wav"}'], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: {plain} is a half-duplex checkpoint (no duplex/user_silence.npy): fine-tune it '
      'with python -m fac_jax.duplex.finetune, or pass --allow_half_duplex to run it untrained')
