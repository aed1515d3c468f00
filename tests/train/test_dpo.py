"""Multi-task DPO: the loss against an independent NumPy derivation, log 2 when the policy is its
reference, preference manifests validated with file, line and field, prepared pairs batched with a
shared prompt, exact gradient accumulation and precomputed reference log-probabilities, steps that
raise the preference accuracy, and the demo corpus's noisy correct_answer pairs."""

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import soundfile as sf
from flax import nnx

import speech_corpus
from fac_jax import audio, config as config_lib, sharding
from fac_jax.batch import IGNORE_ID
from fac_jax.checkpoints import text_tokenizer
from fac_jax.data import input_pipeline, manifest, preference, prepare, synth
from fac_jax.model import fun_audio_chat
from fac_jax.speech import speech_tokenizer
from fac_jax.train import dpo, steps
from conftest import REPO

INPUT_FIELDS = ('input_ids', 'positions', 'segment_ids', 'audio_mask', 'continuous_mask',
                'text_mask', 'speech_codes', 'continuous_frames')


def numpy_dpo(logits: dict, targets: dict, task_ids: np.ndarray, cfg) -> dict:
  """The DPO metrics of the module docstring of fac_jax.train.dpo, pair by pair in float64.

  logits[model][answer][channel]: (B, T, V) with model in (policy, reference);
  targets[answer][channel]: (B, T)."""
  def logp(x, t):
    x = x.astype(np.float64)
    log_softmax = x - x.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    return np.array([sum(log_softmax[i, j, t[i, j]] for j in range(t.shape[1])
                         if t[i, j] != IGNORE_ID) for i in range(len(t))])

  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  channels = {'text': cfg.text_weight, 'speech': cfg.speech_weight}
  lp = {(m, a, c): logp(logits[m][a][c], targets[a][c])
        for m in ('policy', 'reference') for a in ('chosen', 'rejected') for c in channels}
  rows = []
  for i, task in enumerate(task_ids):
    margins, losses, weights = {}, {}, {}
    for c, w in channels.items():
      chosen = cfg.beta * (lp['policy', 'chosen', c][i] - lp['reference', 'chosen', c][i])
      rejected = cfg.beta * (lp['policy', 'rejected', c][i] - lp['reference', 'rejected', c][i])
      margins[c] = chosen - rejected
      losses[c] = (-(1 - cfg.label_smoothing) * log_sigmoid(margins[c])
                   - cfg.label_smoothing * log_sigmoid(-margins[c]))
      has = any((targets[a][c][i] != IGNORE_ID).any() for a in ('chosen', 'rejected'))
      weights[c] = w if has else 0.0
    total = sum(weights.values()) or 1.0  # an empty row has weight 0 in every mean
    rows.append(dict(task=task, weight=cfg.task_weights[task] if task >= 0 else 0.0,
                     prefers={c: lp['policy', 'chosen', c][i] > lp['policy', 'rejected', c][i]
                              for c in channels},
                     loss=sum(weights[c] * losses[c] for c in channels) / total,
                     margin=sum(weights[c] * margins[c] for c in channels) / total,
                     channel_margin=margins, has={c: weights[c] > 0 for c in channels}))
  dpo_loss = sum(r['weight'] * r['loss'] for r in rows) / sum(r['weight'] for r in rows)
  sft_loss = sum(-lp['policy', 'chosen', c].sum() / (targets['chosen'][c] != IGNORE_ID).sum()
                 for c in channels)
  real = [r for r in rows if r['task'] >= 0]
  expected = {'dpo_loss': dpo_loss, 'sft_loss': sft_loss,
              'loss': dpo_loss + cfg.sft_weight * sft_loss,
              'margin': np.mean([r['margin'] for r in real]),
              'accuracy': np.mean([r['margin'] > 0 for r in real])}
  for c in channels:
    with_c = [r['channel_margin'][c] for r in real if r['has'][c]]
    expected[f'{c}_margin'] = np.mean(with_c)
    expected[f'{c}_accuracy'] = np.mean([m > 0 for m in with_c])
    expected[f'{c}_likelihood_accuracy'] = np.mean([r['prefers'][c] for r in real if r['has'][c]])
  for t, task in enumerate(cfg.tasks):
    of_task = [r for r in rows if r['task'] == t]
    expected[f'{task}/pairs'] = len(of_task)
    if of_task:
      expected[f'{task}/loss'] = np.mean([r['loss'] for r in of_task])
      expected[f'{task}/margin'] = np.mean([r['margin'] for r in of_task])
      expected[f'{task}/accuracy'] = np.mean([r['margin'] > 0 for r in of_task])
  return expected


def test_loss_and_metrics_match_a_numpy_derivation(tiny_config):
  cfg = tiny_config.dpo
  cfg.update(beta=0.3, label_smoothing=0.1, text_weight=1.0, speech_weight=0.5, sft_weight=0.25,
             task_weights=(1.0, 2.0, 0.5, 1.0, 3.0))
  rng = np.random.default_rng(0)
  pairs, length, group, vocab, codes = 6, 7, 5, 11, 13
  task_ids = np.array([0, 1, 4, 1, -1, 2], np.int32)
  logits, targets, batch = {}, {}, {'task_ids': task_ids}
  for answer in ('chosen', 'rejected'):
    text = rng.integers(0, vocab, (pairs, length))
    text[rng.random(text.shape) < 0.3] = IGNORE_ID
    speech = rng.integers(0, codes, (pairs, length, group))
    speech[rng.random(speech.shape) < 0.3] = IGNORE_ID
    speech[3] = IGNORE_ID  # pair 3 is text only
    text[4], speech[4] = IGNORE_ID, IGNORE_ID  # row 4 is empty
    targets[answer] = {'text': text, 'speech': speech.reshape(pairs, -1)}
    batch[answer] = {'text_targets': text, 'speech_targets': speech}
  for model in ('policy', 'reference'):
    logits[model] = {answer: {'text': rng.normal(size=(pairs, length, vocab)) * 2,
                              'speech': rng.normal(size=(pairs, length * group, codes)) * 2}
                     for answer in ('chosen', 'rejected')}

  def logps(model):
    return {f'{answer}_{channel}': value for answer in ('chosen', 'rejected')
            for channel, value in dpo.sequence_logps(fun_audio_chat.logits_target_nll(
                {f'{c}_logits': logits[model][answer][c].astype(np.float32)
                 for c in ('text', 'speech')}, batch[answer])).items()}

  metrics = dpo.summarise(dpo.pair_statistics(logps('policy'), logps('reference'), batch, cfg),
                          cfg)
  expected = numpy_dpo(logits, targets, task_ids, cfg)
  assert 0 < expected['accuracy'] < 1 and 0 < expected['text_accuracy'] < 1
  assert 0 < expected['text_likelihood_accuracy'] < 1
  for name, value in expected.items():
    np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
  assert float(metrics['pairs']) == 5 and float(metrics['voice_empathy/pairs']) == 0
  assert float(metrics['voice_empathy/accuracy']) == 0
  # The SFT term is the ordinary cross-entropy of the chosen answers.
  chosen_outputs = {f'{c}_logits': logits['policy']['chosen'][c].astype(np.float32)
                    for c in ('text', 'speech')}
  sft = fun_audio_chat.compute_losses(chosen_outputs, batch['chosen'])['loss']
  np.testing.assert_allclose(float(metrics['sft_loss']), float(sft), rtol=1e-5)


def test_bad_preference_lines_name_file_line_and_field(tmp_path):
  path = str(tmp_path / 'prefs.jsonl')
  for number, (field, line) in enumerate(speech_corpus.BAD_PAIR_LINES, start=3):
    with pytest.raises(manifest.ManifestError,
                       match=rf'^{re.escape(path)}:{number}: .*{re.escape(field)}'):
      preference.parse_line(json.dumps(line), path, number)
  with pytest.raises(manifest.ManifestError, match=rf'^{re.escape(path)}:7: not valid JSON'):
    preference.parse_line('{"turns": [', path, 7)
  conversation_line = json.dumps({'turns': [{'role': 'user', 'text': 'Hi'},
                                            {'role': 'assistant', 'text': 'Hi.'}]})
  with pytest.raises(manifest.ManifestError,
                     match=rf'^{re.escape(path)}:8: field .chosen. must be'):
    preference.parse_line(conversation_line, path, 8)
  assert isinstance(preference.parse_any(conversation_line, path, 8), manifest.Conversation)
  pair = preference.parse_line(json.dumps({
      'task': 'voice_empathy', 'turns': [{'role': 'user', 'audio': 'q.wav'}],
      'chosen': {'text': 'Oh no.', 'audio': 'c.wav'}, 'rejected': {'text': 'Fine.'}}), path, 9)
  assert (pair.id, pair.task, pair.source) == ('prefs.jsonl:9', 'voice_empathy', f'{path}:9')
  assert pair.prompt == [manifest.Turn('user', None, str(tmp_path / 'q.wav'))]
  assert pair.chosen == manifest.Turn('assistant', 'Oh no.', str(tmp_path / 'c.wav'))
  assert pair.rejected == manifest.Turn('assistant', 'Fine.', None)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """A prepared preference split of tone speech, 1-layer stacks, 4 pairs a batch."""
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'tiny.py'))
  for stack in (cfg.model.llm, cfg.model.speech_refined_head, cfg.model.encoder):
    stack.num_layers = 1
  root = str(tmp_path_factory.mktemp('prefs'))
  path = speech_corpus.write_preferences(root, tuple(cfg.dpo.tasks))
  cfg.data.dir = os.path.join(root, 'prepared')
  report = prepare.prepare(cfg.data.dir, {'prefs': path}, cfg.model)
  cfg.data.update(batch_size=4, seq_len=64, num_windows=12)
  return cfg, path, report


def test_prepare_stores_each_pair_as_one_record(prepared):
  cfg, path, report = prepared
  entry = report['splits']['prefs']
  assert entry['kept'] == 8 and entry['skipped_by_reason'] == {'malformed_line': 5}
  for number, ((field, _), skip) in enumerate(zip(speech_corpus.BAD_PAIR_LINES, entry['skips']),
                                              start=9):
    assert skip['where'] == f'{path}:{number}' and field in skip['message']
  codes = speech_tokenizer.KMeansSpeechTokenizer.load(
      os.path.join(cfg.data.dir, prepare.SPEECH_TOKENIZER_FILE))
  source = prepare.open_split(cfg.data.dir, 'prefs')
  stored = {json.loads(r['conversation'])['id']: r for r in (source[i] for i in range(8))}
  for _, pair in preference.read(path):
    if isinstance(pair, manifest.ManifestError):
      continue
    record = stored[pair.id]
    conv = json.loads(record['conversation'])
    assert [t['text'] for t in conv['turns']] == [t.text for t in pair.prompt]
    assert (conv['chosen']['text'], conv['rejected']['text']) == (pair.chosen.text,
                                                                  pair.rejected.text)
    expected_codes = [codes.encode(audio.load(answer.audio))
                      for answer in (pair.chosen, pair.rejected) if answer.audio]
    np.testing.assert_array_equal(record['codes'],
                                  np.concatenate(expected_codes + [np.zeros(0, np.int32)]))
    if pair.chosen.audio:
      assert conv['chosen']['codes'] == [0, len(expected_codes[0])]
    if pair.rejected.audio:
      assert conv['rejected']['codes'][1] == len(record['codes'])
    user_mel = [audio.log_mel(audio.load(t.audio), cfg.model.encoder.num_mel_bins)
                for t in pair.prompt if t.audio]
    assert record['mel'].shape[0] == sum(len(m) for m in user_mel)


def test_pair_batches_share_the_prompt_and_train_only_the_answer(prepared):
  cfg, _, _ = prepared
  iterator = iter(input_pipeline.dpo_dataset(cfg, 'prefs', num_epochs=1, shuffle=False))
  batches = list(iterator)
  assert iterator.dropped == 1  # the pair with 8 s of user audio: 40 mel windows
  source = prepare.open_split(cfg.data.dir, 'prefs')
  kept = [source[i] for i in range(len(source))
          if json.loads(source[i]['conversation'])['id'] != 'p7']
  task_ids = [cfg.dpo.tasks.index(json.loads(r['conversation'])['task']) for r in kept]
  assert [b['task_ids'].tolist() for b in batches] == [task_ids[:4], task_ids[4:] + [-1]]
  tok = cfg.model.tokens
  tokenizer = text_tokenizer.load(os.path.join(cfg.data.dir, prepare.TOKENIZER_FOLDER))
  header = len(tokenizer.encode('assistant\n', add_special_tokens=False).ids) + 1
  sft_format = input_pipeline.FormatRecord(os.path.join(cfg.data.dir, prepare.TOKENIZER_FOLDER),
                                     cfg.model)
  for b, batch in enumerate(batches):
    chosen, rejected = batch['chosen'], batch['rejected']
    np.testing.assert_array_equal(chosen['mel'], rejected['mel'])
    for row in range(4):
      if batch['task_ids'][row] < 0:
        assert (chosen['segment_ids'][row] == 0).all()
        continue
      ids = chosen['input_ids'][row]
      answer_start = np.flatnonzero(ids == tok.im_start)[-1] + header
      for name in INPUT_FIELDS:
        np.testing.assert_array_equal(chosen[name][row, :answer_start],
                                      rejected[name][row, :answer_start], err_msg=name)
      for side in (chosen, rejected):
        assert (side['text_targets'][row, :answer_start - 1] == IGNORE_ID).all()
        assert (side['speech_targets'][row, :answer_start - 1] == IGNORE_ID).all()
        assert side['text_targets'][row, answer_start - 1] != IGNORE_ID
      assert any((chosen[name][row, answer_start:] != rejected[name][row, answer_start:]).any()
                 for name in ('input_ids', 'speech_codes', 'text_targets'))
      # Each row is the SFT formatting of prompt + that answer, the prompt's own replies untrained.
      record = kept[4 * b + row]
      conv = json.loads(record['conversation'])
      prompt = {k: v for k, v in conv.items() if k not in ('chosen', 'rejected')}
      for answer, side in (('chosen', chosen), ('rejected', rejected)):
        sft = sft_format({**record, 'conversation': json.dumps(
            {**prompt, 'turns': conv['turns'] + [conv[answer]]})})
        n = len(sft['input_ids'])
        assert (side['segment_ids'][row] > 0).sum() == n
        for name in INPUT_FIELDS:
          np.testing.assert_array_equal(side[name][row, :n], sft[name], err_msg=name)
        trained = np.arange(n) >= answer_start - 1
        np.testing.assert_array_equal(side['text_targets'][row, :n],
                                      np.where(trained, sft['text_targets'], IGNORE_ID))


def test_pair_batches_resume_exactly_and_formats_refuse_the_other_kind(prepared):
  cfg, _, _ = prepared
  take = lambda iterator, n: [next(iterator) for _ in range(n)]
  first = take(iter(input_pipeline.dpo_dataset(cfg, 'prefs', seed=5)), 6)
  iterator = iter(input_pipeline.dpo_dataset(cfg, 'prefs', seed=5))
  take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))
  resumed = iter(input_pipeline.dpo_dataset(cfg, 'prefs', seed=5))
  resumed.set_state(state)
  for a, b in zip(take(resumed, 4), first[2:]):
    assert all(np.array_equal(a[k][f], b[k][f]) for k in ('chosen', 'rejected') for f in a[k])
    np.testing.assert_array_equal(a['task_ids'], b['task_ids'])

  record = prepare.open_split(cfg.data.dir, 'prefs')[0]
  with pytest.raises(ValueError, match='is a preference pair'):
    next(iter(input_pipeline.dataset(cfg, 'prefs')))
  tokenizer_dir = os.path.join(cfg.data.dir, prepare.TOKENIZER_FOLDER)
  with pytest.raises(ValueError, match=r"task '\w+' is not in config.dpo.tasks"):
    input_pipeline.FormatPair(input_pipeline.FormatRecord(tokenizer_dir, cfg.model), ('other',))(record)


@pytest.fixture(scope='module')
def model_and_steps(prepared):
  """The model's parameters and the DPO steps jitted for a one-device mesh (Adam, 1e-3)."""
  cfg, _, _ = prepared
  mesh = sharding.mesh_in_scope()
  graphdef, state = nnx.split(fun_audio_chat.create(cfg.model, seed=0))
  params = nnx.to_pure_dict(state)
  optimizer = optax.adam(1e-3)
  param_shardings = sharding.param_shardings(state, mesh)
  opt_shardings = steps.optimizer_shardings(jax.eval_shape(optimizer.init, params),
                                            param_shardings, mesh)
  batches = list(input_pipeline.dpo_dataset(cfg, 'prefs', num_epochs=1, shuffle=False))
  train_step, eval_step, shardings = dpo.jit_dpo_steps(cfg, graphdef, optimizer, mesh,
                                                       param_shardings, opt_shardings, batches[0])
  batches = [input_pipeline.to_global(batch, shardings) for batch in batches]
  return graphdef, params, optimizer, train_step, eval_step, shardings, batches


def copied(tree):
  """A copy for the train step to donate."""
  return jax.tree.map(jnp.copy, tree)


def test_policy_equal_to_reference_gives_log_2(prepared, model_and_steps):
  cfg, _, _ = prepared
  _, params, optimizer, train_step, eval_step, _, batches = model_and_steps
  metrics = dpo.summarise(eval_step(params, params, batches[0]), cfg.dpo)
  assert float(metrics['dpo_loss']) == pytest.approx(math.log(2), abs=1e-6)
  for name in ('margin', 'text_margin', 'speech_margin', 'accuracy', 'speech_accuracy',
               'text_chosen_reward', 'speech_rejected_reward'):
    assert float(metrics[name]) == 0.0, name  # both passes run the same program: exact ties
  # In the train step the policy's pass is part of the gradient program and may round
  # differently from the reference's: margins are zero to float32 rounding only.
  _, _, train_metrics = train_step(copied(params), optimizer.init(params), params, batches[0])
  assert float(train_metrics['dpo_loss']) == pytest.approx(math.log(2), abs=1e-5)
  assert abs(float(train_metrics['margin'])) < 1e-4
  assert float(train_metrics['skipped']) == 0


def test_sliced_gradients_and_precomputed_reference_equal_the_plain_step(prepared,
                                                                         model_and_steps):
  cfg, _, _ = prepared
  graphdef, params, optimizer, train_step, _, _, batches = model_and_steps
  reference = nnx.to_pure_dict(nnx.split(fun_audio_chat.create(cfg.model, seed=1))[1])
  batch = batches[1]  # with an empty row
  _, plain_state, plain = train_step(copied(params), optimizer.init(params), reference, batch)
  precomputed = {**batch, 'reference_logps': jax.jit(
      lambda p, b: dpo.answer_logps(graphdef, p, b))(reference, batch)}
  sliced_step = jax.jit(dpo.make_dpo_step(graphdef, optimizer, cfg.dpo, grad_accum_steps=2))
  _, sliced_state, sliced = sliced_step(params, optimizer.init(params), None, precomputed)
  assert abs(float(plain['margin'])) > 1e-3  # a reference unlike the policy
  for name in plain:
    np.testing.assert_allclose(float(sliced[name]), float(plain[name]), rtol=2e-5, atol=1e-6,
                               err_msg=name)
  # Adam's first moment after one step is 0.1 x the gradient.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max()),
               sliced_state[0].mu, plain_state[0].mu)


def test_dpo_steps_raise_the_preference_accuracy(prepared, model_and_steps):
  cfg, _, _ = prepared
  _, params, optimizer, train_step, eval_step, shardings, batches = model_and_steps
  evaluate = lambda policy: dpo.evaluate(cfg, policy, params, eval_step, shardings, 'prefs')
  before = evaluate(params)
  assert before['pairs'] == 7 and before['accuracy'] == 0
  policy, opt_state = copied(params), optimizer.init(params)
  for i in range(6):
    policy, opt_state, metrics = train_step(policy, opt_state, params, batches[i % 2])
  after = evaluate(policy)
  print(f'\nDPO on the 7 training pairs: loss {before["dpo_loss"]:.4f} -> {after["dpo_loss"]:.4f}, '
        f'accuracy {before["accuracy"]:.2f} -> {after["accuracy"]:.2f}, margin '
        f'{after["margin"]:.3f} (text {after["text_margin"]:.3f}, speech '
        f'{after["speech_margin"]:.3f})')
  assert after['dpo_loss'] < before['dpo_loss'] - 0.1
  assert after['accuracy'] >= 6 / 7 and after['margin'] > 0
  assert sum(after[f'{task}/pairs'] for task in cfg.dpo.tasks) == 7


def test_demo_corpus_pairs_ask_known_questions_in_new_voices_and_noise(tmp_path):
  corpus = synth.plan(30, 12, seed=0, with_piper=False, num_pref_train=40, num_pref_eval=20)
  questions = {}
  for split, pairs in corpus.preferences.items():
    questions[split] = {record['turns'][0]['text'] for record, _ in pairs}
    for record, (user, chosen, rejected) in pairs:
      pair = preference.parse_line(json.dumps(record), str(tmp_path / 'p.jsonl'), 1)
      meta = record['meta']
      assert pair.task == synth.PREFERENCE_TASK and pair.chosen.text == meta['answer']
      assert pair.rejected.text == meta['wrong_answer'] != meta['answer']
      if meta['answer'] in synth.NUMBER_VALUES and meta['wrong_answer'] in synth.NUMBER_VALUES:
        assert abs(synth.NUMBER_VALUES[meta['answer']]
                   - synth.NUMBER_VALUES[meta['wrong_answer']]) == 1
      assert user.noise in synth.NOISE_KINDS and 5 <= user.snr_db <= 15
      assert user.voice in corpus.user_voices[split]
      assert (chosen.text, rejected.text) == (f'{meta["answer"]}.', f'{meta["wrong_answer"]}.')
  train_items = {r['turns'][0]['text'] for r in corpus.text_facts if r['meta']['split'] == 'train'}
  assert questions['train'] | questions['validation'] <= train_items
  assert not set(corpus.user_voices['train']) & set(corpus.user_voices['validation'])

  # The noise is mixed in at the planned SNR (PCM_16 rounding and clipping aside).
  summary = synth.synthesise(str(tmp_path), 0, 0, seed=0, use_piper='off', num_pref_train=2,
                             num_pref_eval=0)
  assert summary['preferences']['train']['pairs'] == 2
  for record, (user, _, _) in synth.plan(0, 0, 0, False, 2, 0).preferences['train']:
    noisy, _ = sf.read(str(tmp_path / user.path))
    clean = dataclasses.replace(user, noise=None, snr_db=None)
    synth.make_wav(str(tmp_path), clean, None)
    speech, _ = sf.read(str(tmp_path / clean.path))
    snr = 10 * np.log10(np.mean(speech ** 2) / np.mean((noisy - speech) ** 2))
    assert snr == pytest.approx(user.snr_db, abs=0.3), record['meta']
