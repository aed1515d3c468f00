"""DRSR parts against a NumPy re-derivation written from DESIGN.md section 1.

Grouping (mean of 5, projection), (E(text) + G) / 2 mixing, the 2-group bos delay, <|sil|> text
padding, label shift, refined-head teacher forcing (split state + embedding of the previous
code, labels rolled by -4) and the 1:1 loss, on the tiny config where every dimension differs.
Tolerance: float32, max abs error 1e-5 on embeddings and 1e-5 relative on losses.
"""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fac_jax.data import conversation
from fac_jax.model import fun_audio_chat

IGNORE = -100
GROUP = 5


@pytest.fixture
def setup(tiny_config):
  cfg = tiny_config.model
  cfg.halve_user_audio = True  # the official training behaviour, which the reference derives
  rng = np.random.default_rng(7)
  tok, sp = cfg.tokens, cfg.speech
  user_mel = rng.normal(size=(53, cfg.encoder.num_mel_bins)).astype(np.float32)
  user_frames = 13  # 25 Hz frames; the encoder yields ((53 - 1) // 2 + 1) // 2 = 13
  codes = rng.integers(0, sp.bos_id, size=17).tolist()
  text = [11, 12, tok.endoftext]  # the end-of-text token becomes <|sil|> too
  system, prompt_tail = [tok.im_start, 5, 6, 7, tok.im_end], [tok.im_end, tok.im_start, 9]
  raw = dict(system=system, user_mel=user_mel, user_frames=user_frames, prompt_tail=prompt_tail,
             codes=codes, text=text)
  pieces = [conversation.Text(system + [tok.audio_bos], False),
            conversation.user_audio(user_mel, user_frames, cfg),
            conversation.Text([tok.audio_eos] + prompt_tail, False),
            conversation.Text([tok.audio_bos], True),
            conversation.assistant_audio(codes, text, cfg),
            conversation.Text([tok.audio_eos, tok.im_end], True)]
  example = conversation.format_conversation(pieces, cfg)
  batch = conversation.pack([[example]], seq_len=31, num_windows=4, cfg=cfg)
  model = fun_audio_chat.create(cfg, seed=3)
  return cfg, raw, batch, model


def reference_sequence(cfg, raw, encoder_frames, weights):
  """Per-position LLM inputs, refined-head text inputs, labels and speech labels (unshifted)."""
  tok, sp = cfg.tokens, cfg.speech
  E, C = weights['text_embedding'], weights['code_embedding']
  inputs, head_text, labels, speech_labels = [], [], [], []

  def text_position(t, trained):
    inputs.append(E[t])
    head_text.append(E[t])
    labels.append(t if trained else IGNORE)
    speech_labels.append([sp.eos_id] * GROUP if trained and t == tok.audio_eos
                         else [IGNORE] * GROUP)

  for t in raw['system'] + [tok.audio_bos]:
    text_position(t, False)
  # User audio: continuous frames zero-padded to a multiple of 5, mean, projection, halved.
  n_user = math.ceil(raw['user_frames'] / GROUP)
  frames = np.zeros((n_user * GROUP, E.shape[1]), np.float32)
  usable = min(len(encoder_frames), n_user * GROUP)
  frames[:usable] = encoder_frames[:usable]
  for p in range(n_user):
    g = frames[p * GROUP:(p + 1) * GROUP].mean(0) @ weights['continuous_projection']
    inputs.append(g / 2)
    head_text.append(np.zeros_like(g))
    labels.append(IGNORE)
    speech_labels.append([IGNORE] * GROUP)
  for t in [tok.audio_eos] + raw['prompt_tail']:
    text_position(t, False)
  text_position(tok.audio_bos, True)
  # Assistant audio: 2 groups of bos, then the codes, padded with pad; one text token per group.
  stream = [sp.bos_id] * (2 * GROUP) + raw['codes']
  n_assistant = math.ceil(len(stream) / GROUP)
  padded = stream + [sp.pad_id] * (n_assistant * GROUP - len(stream))
  label_stream = stream + [IGNORE] * (n_assistant * GROUP - len(stream))
  text = [tok.sil if t == tok.endoftext else t for t in raw['text']]
  text = (text + [tok.sil] * n_assistant)[:n_assistant]
  for p in range(n_assistant):
    g = C[padded[p * GROUP:(p + 1) * GROUP]].mean(0) @ weights['code_projection']
    inputs.append((E[text[p]] + g) / 2)
    head_text.append(E[text[p]])
    labels.append(text[p])
    speech_labels.append(label_stream[p * GROUP:(p + 1) * GROUP])
  for t in (tok.audio_eos, tok.im_end):
    text_position(t, True)
  return (np.array(inputs), np.array(head_text), np.array(labels), np.array(speech_labels))


def numpy_cross_entropy(logits, labels):
  valid = labels != IGNORE
  logits = logits[valid].astype(np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return float(np.mean(log_z - logits[np.arange(len(logits)), labels[valid]]))


def weights_of(model):
  return dict(text_embedding=np.asarray(model.llm.embed_tokens.embedding[...]),
              code_embedding=np.asarray(model.adapters.code_embedding.embedding[...]),
              code_projection=np.asarray(model.adapters.code_projection.kernel[...]),
              continuous_projection=np.asarray(model.adapters.continuous_projection.kernel[...]),
              split_kernel=np.asarray(model.speech_refined_head.split_projection.kernel[...]),
              split_bias=np.asarray(model.speech_refined_head.split_projection.bias[...]))


def test_inputs_labels_and_teacher_forcing(setup):
  cfg, raw, batch, model = setup
  weights = weights_of(model)
  window = cfg.encoder.window_frames
  mel = raw['user_mel']
  num_windows = math.ceil(len(mel) / window)
  windows = np.zeros((1, num_windows, window, mel.shape[1]), np.float32)
  lengths = np.zeros((1, num_windows), np.int32)
  for w in range(num_windows):
    chunk = mel[w * window:(w + 1) * window]
    windows[0, w, :len(chunk)], lengths[0, w] = chunk, len(chunk)
  per_window = np.asarray(model.continuous_encoder(jnp.asarray(windows), jnp.asarray(lengths)))
  per_window = per_window.reshape(num_windows, window // 4, -1)
  valid = [((l - 1) // 2 + 1) // 2 for l in lengths[0]]
  encoder_frames = np.concatenate([per_window[w, :valid[w]] for w in range(num_windows)])

  inputs, head_text, labels, speech_labels = reference_sequence(cfg, raw, encoder_frames, weights)
  n = len(labels)
  assert (batch['segment_ids'][0, :n] == 1).all() and (batch['segment_ids'][0, n:] == 0).all()

  jbatch = jax.tree.map(jnp.asarray, batch)
  ours_inputs, ours_head_text = model.embed_inputs(jbatch)
  np.testing.assert_allclose(np.asarray(ours_inputs)[0, :n], inputs, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours_head_text)[0, :n], head_text, atol=1e-5)

  # Shift: h_p predicts text label p + 1 and speech group p + 1.
  np.testing.assert_array_equal(batch['text_targets'][0, :n - 1], labels[1:])
  np.testing.assert_array_equal(batch['speech_targets'][0, :n - 1], speech_labels[1:])
  assert (batch['text_targets'][0, n - 1:] == IGNORE).all()
  assert (batch['speech_targets'][0, n - 1:] == IGNORE).all()

  # Teacher forcing: sub-slot i gets split(h + T)[i] + C[roll(labels, -4)[i]], ignore -> pad.
  hidden = np.random.default_rng(1).normal(size=ours_inputs.shape).astype(np.float32)
  ours = np.asarray(model.speech_head_inputs(jnp.asarray(hidden), ours_head_text,
                                             jbatch['speech_targets']))[0]
  seq = batch['input_ids'].shape[1]
  full_head_text = np.zeros((seq, head_text.shape[1]), np.float32)
  full_head_text[:n] = head_text
  full_head_text[n:] = weights['text_embedding'][cfg.tokens.endoftext]
  split = ((hidden[0] + full_head_text) @ weights['split_kernel'] + weights['split_bias'])
  split = split.reshape(seq * GROUP, -1)
  flat_labels = np.full(seq * GROUP, IGNORE)
  flat_labels[:n * GROUP] = speech_labels.reshape(-1)
  previous = np.roll(flat_labels, -(GROUP - 1))
  previous = np.where(previous == IGNORE, cfg.speech.pad_id, previous)
  expected = split + weights['code_embedding'][previous]
  np.testing.assert_allclose(ours[:-(GROUP - 1)], expected[:-(GROUP - 1)], atol=1e-5)

  # Loss: text CE + speech CE (1:1), speech position i against flat label i + 5.
  rng = np.random.default_rng(2)
  text_logits = rng.normal(size=(1, seq, cfg.llm.vocab_size)).astype(np.float32)
  speech_logits = rng.normal(size=(1, seq * GROUP, cfg.speech.codebook_size)).astype(np.float32)
  losses = fun_audio_chat.compute_losses(
      {'text_logits': jnp.asarray(text_logits), 'speech_logits': jnp.asarray(speech_logits)},
      jbatch)
  full_labels = np.full(seq, IGNORE)
  full_labels[:n] = labels
  text_loss = numpy_cross_entropy(text_logits[0, :-1], full_labels[1:])
  speech_loss = numpy_cross_entropy(speech_logits[0, :-GROUP], flat_labels[GROUP:])
  np.testing.assert_allclose(float(losses['text_loss']), text_loss, rtol=1e-5)
  np.testing.assert_allclose(float(losses['speech_loss']), speech_loss, rtol=1e-5)
  np.testing.assert_allclose(float(losses['loss']), text_loss + speech_loss, rtol=1e-5)


def test_user_audio_unhalved_option(setup):
  cfg, _, batch, halved = setup
  cfg = copy.deepcopy(cfg)
  cfg.halve_user_audio = False
  unhalved = fun_audio_chat.create(cfg, seed=3)
  jbatch = jax.tree.map(jnp.asarray, batch)
  a, _ = halved.embed_inputs(jbatch)
  b, _ = unhalved.embed_inputs(jbatch)
  user = batch['continuous_mask'][0]
  assert user.any()
  np.testing.assert_allclose(np.asarray(b)[0, user], 2 * np.asarray(a)[0, user], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(b)[0, ~user], np.asarray(a)[0, ~user])
