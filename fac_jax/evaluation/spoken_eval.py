"""Held-out evaluation by generation: a checkpoint answers the questions of a prepared split, and
its answers are scored as a user would hear them.

  transcription   user speech -> text answer (s2t): word error rate against the transcript
  spoken_qa       user speech -> text and speech answer (s2s): accuracy of the text answer, and of
                  the speech answer transcribed back by the ASR judge (fac_jax.evaluation.asr_judge) after the
                  speech detokenizer; the judge's accuracy on the reference answers' own codes
                  (detokenized the same way) is the ceiling of the speech score. Where the
                  corpus marks questions as taught in speech or not (meta taught), also the
                  accuracy of each part: taught_accuracy, text_only_accuracy
  text_qa         a typed question -> text answer (s2t): what the text base M_0 knew
  correct_answer  a preference pair's spoken question in noise, scored as spoken_qa against the
                  chosen answer

An answer is right when its normalised words (asr_judge.normalise) equal the reference's. Greedy
text; speech sampled as the official examples do, from a fixed key.
"""

import dataclasses
import json
import os

import jax
import librosa
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from fac_jax import audio
from fac_jax.checkpoints import adapters
from fac_jax.data import conversation, input_pipeline, prepare
from fac_jax.evaluation import asr_judge
from fac_jax.inference import generate, sampling
from fac_jax.model import fun_audio_chat
from fac_jax.speech import speech_tokenizer

TASK_MODES = {'transcription': 's2t', 'spoken_qa': 's2s', 'text_qa': 's2t',
              'correct_answer': 's2s'}
PARTS = {'taught': True, 'text_only': False}  # Question.taught of each reported part
_POSITION_BUCKET = 32  # prompts are left-padded to a multiple of this: few distinct compiles


@dataclasses.dataclass
class Question:
  id: str
  task: str
  prompt: dict  # formatted conversation up to the assistant header (conversation.format_…)
  reference: str  # the reference answer's text
  reference_codes: np.ndarray | None  # its speech codes, when the reference answer is spoken
  source: str  # manifest file and line
  reference_heard: str | None = None  # what the judge hears in reference_codes (hear_references)
  taught: bool | None = None  # asked in train's speech (True) or known only from text (False)


def questions(data_dir: str, split: str, cfg: ml_collections.ConfigDict, tasks: tuple[str, ...],
              per_task: int) -> list[Question]:
  """`per_task` conversations of each task in a prepared split (in its stored order), cut after
  the user's turn and followed by the assistant header. Where a task's questions are marked taught
  or not, half come from each part (the other part fills in where one runs short): the stored
  order is a hash of the keys, so a plain prefix could miss a part."""
  fmt = input_pipeline.FormatRecord(os.path.join(data_dir, prepare.TOKENIZER_FOLDER), cfg.model)
  tok = cfg.model.tokens
  header = conversation.Text([tok.im_start] + fmt.encode('assistant\n'), trained=False)
  parts = {task: {} for task in tasks}  # task -> taught (True, False or None) -> questions
  source = prepare.open_split(data_dir, split)
  for index in range(len(source)):
    record = source[index]
    conv = json.loads(record['conversation'])
    if conv['task'] not in parts:
      continue
    taught = (conv.get('meta') or {}).get('taught')
    found = parts[conv['task']].setdefault(taught, [])
    if len(found) >= per_task:
      continue
    user, answer = (conv['turns'][0], conv['chosen']) if 'chosen' in conv else conv['turns'][:2]
    pieces = fmt.conversation_pieces({'system': conv['system'], 'turns': [user]}, record,
                                     train_replies=False) + [header]
    codes = (np.asarray(record['codes'][slice(*answer['codes'])]) if 'codes' in answer else None)
    found.append(Question(conv['id'], conv['task'],
                          conversation.format_conversation(pieces, cfg.model), answer['text'],
                          codes, conv['source'], taught=taught))
    if all(_full(by_part, per_task) for by_part in parts.values()):
      break
  return [q for task in tasks for q in _balanced(parts[task], per_task)]


def _marked(by_part: dict) -> bool:
  """Whether a task's questions are marked taught or not (questions without a mark are then
  left out)."""
  return bool(set(by_part) & set(PARTS.values()))


def _full(by_part: dict, per_task: int) -> bool:
  needed = PARTS.values() if _marked(by_part) else (None,)
  return all(len(by_part.get(part, ())) >= per_task for part in needed)


def _balanced(by_part: dict, per_task: int) -> list[Question]:
  """Up to per_task questions, half taught and half text-only where both parts hold enough."""
  if not _marked(by_part):
    return by_part.get(None, [])[:per_task]
  taught, text_only = by_part.get(True, []), by_part.get(False, [])
  num_taught = max(-(-per_task // 2), per_task - len(text_only))
  chosen = taught[:num_taught]
  return chosen + text_only[:per_task - len(chosen)]


def _generation_config(mode: str, max_new_tokens: int) -> generate.GenerationConfig:
  return generate.GenerationConfig(
      max_new_tokens, mode=mode, force_audio_bos=mode == 's2s',
      text=sampling.Sampling(greedy=True, repetition_penalty=1.0), speech=sampling.Sampling())


def answer(graphdef: nnx.GraphDef, params, cfg: ml_collections.ConfigDict,
           asked: list[Question], max_new_tokens: int, batch_size: int = 16, seed: int = 0,
           text_tokenizer=None, desc: str = 'answering', functions: dict | None = None
           ) -> list[dict]:
  """{'text': str (token ids without a tokenizer), 'codes': int array} for each question, in
  order; each task in its mode. `functions` caches the jitted generation across calls."""
  answers = [None] * len(asked)
  num_windows = max(len(q.prompt['mel_lengths']) for q in asked)
  functions = {} if functions is None else functions
  order = sorted(range(len(asked)), key=lambda i: (TASK_MODES[asked[i].task],
                                                   len(asked[i].prompt['input_ids'])))
  batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  special = set(cfg.model.tokens.values())
  for rows in tqdm(batches, desc=desc, unit='batch', leave=False):
    modes = {TASK_MODES[asked[i].task] for i in rows}
    if len(modes) > 1:  # split a batch straddling two modes
      batches.extend([[i for i in rows if TASK_MODES[asked[i].task] == m] for m in sorted(modes)])
      continue
    mode = modes.pop()
    if mode not in functions:
      functions[mode] = generate.make_generate_fn(graphdef, cfg.model,
                                                  _generation_config(mode, max_new_tokens))
    longest = max(len(asked[i].prompt['input_ids']) for i in rows)
    examples = [asked[i].prompt for i in rows]
    examples += [examples[0]] * (batch_size - len(rows))  # a fixed batch shape
    prompt = conversation.prompt_batch(examples, cfg.model,
                                       -(-longest // _POSITION_BUCKET) * _POSITION_BUCKET,
                                       num_windows)
    out = jax.device_get(functions[mode](params, prompt, jax.random.key(seed)))
    for row, i in enumerate(rows):
      ids = [int(t) for t in out['text'][row, :out['num_text'][row]] if int(t) not in special]
      codes = out['speech'][row, :out['num_speech_groups'][row]].reshape(-1)
      answers[i] = {'text': text_tokenizer.decode(ids) if text_tokenizer else ids,
                    'codes': codes[(codes >= 0) & (codes < cfg.model.speech.bos_id)]}
  return answers


def score(asked: list[Question], answers: list[dict], judge: asr_judge.Judge | None,
          detokenizer: speech_tokenizer.SpeechDetokenizer | None) -> dict:
  """Metrics per task (see the module docstring) and each question's record."""
  metrics, records = {}, []
  by_task = {}
  for q, a in zip(asked, answers):
    by_task.setdefault(q.task, []).append((q, a))
  for task, items in by_task.items():
    refs = [q.reference for q, _ in items]
    hyps = [a['text'] for _, a in items]
    right = [asr_judge.normalise(h) == asr_judge.normalise(r) for r, h in zip(refs, hyps)]
    metrics[f'{task}/questions'] = len(items)
    if task == 'transcription':
      metrics[f'{task}/wer'] = asr_judge.word_error_rate(refs, hyps)
    else:
      metrics[f'{task}/accuracy'] = float(np.mean(right))
      for part, taught in PARTS.items():
        part_right = [ok for (q, _), ok in zip(items, right) if q.taught is taught]
        if part_right:
          metrics[f'{task}/{part}_accuracy'] = float(np.mean(part_right))
    heard = [None] * len(items)
    if TASK_MODES[task] == 's2s' and judge is not None:
      heard = _heard(judge, detokenizer, [a['codes'] for _, a in items])
      for name, transcripts in (('speech_accuracy', heard),
                                ('speech_ceiling', [q.reference_heard for q, _ in items])):
        metrics[f'{task}/{name}'] = float(np.mean(
            [asr_judge.normalise(h) == asr_judge.normalise(r) for r, h in zip(refs, transcripts)]))
    for (q, a), ok, h in zip(items, right, heard):
      records.append({'id': q.id, 'task': task, 'source': q.source, 'reference': q.reference,
                      'answer': a['text'], 'right': bool(ok), 'speech_codes': len(a['codes']),
                      **({'taught': q.taught} if q.taught is not None else {}),
                      **({'heard': h, 'reference_heard': q.reference_heard}
                         if h is not None else {})})
  return {'metrics': metrics, 'answers': records}


def _heard(judge: asr_judge.Judge, detokenizer: speech_tokenizer.SpeechDetokenizer,
           code_lists: list[np.ndarray]) -> list[str]:
  """What the judge hears in each code sequence, detokenized and brought to 16 kHz."""
  waveforms = []
  for codes in code_lists:
    waveform = (detokenizer.decode(np.asarray(codes, np.int64)) if len(codes)
                else np.zeros(audio.SAMPLE_RATE // 10, np.float32))
    if detokenizer.sample_rate != audio.SAMPLE_RATE:
      waveform = librosa.resample(waveform, orig_sr=detokenizer.sample_rate,
                                  target_sr=audio.SAMPLE_RATE)
    waveforms.append(waveform)
  return judge.transcribe(waveforms)


def hear_references(asked: list[Question], judge: asr_judge.Judge,
                    detokenizer: speech_tokenizer.SpeechDetokenizer) -> None:
  """Sets reference_heard of every question with spoken reference codes."""
  spoken = [q for q in asked if q.reference_codes is not None]
  for q, heard in zip(spoken, _heard(judge, detokenizer, [q.reference_codes for q in spoken])):
    q.reference_heard = heard


def majority_baseline(asked: list[Question]) -> dict:
  """Chance levels: per task, the accuracy of always giving the most common reference answer
  (and its WER for transcription)."""
  baseline = {}
  for task in {q.task for q in asked}:
    refs = [asr_judge.normalise(q.reference) for q in asked if q.task == task]
    common = max(sorted(set(refs)), key=refs.count)
    if task == 'transcription':
      baseline[f'{task}/wer'] = asr_judge.word_error_rate(refs, [common] * len(refs))
      continue
    baseline[f'{task}/accuracy'] = refs.count(common) / len(refs)
    for part, taught in PARTS.items():
      part_refs = [asr_judge.normalise(q.reference) for q in asked
                   if q.task == task and q.taught is taught]
      if part_refs:
        baseline[f'{task}/{part}_accuracy'] = (
            max(part_refs.count(r) for r in part_refs) / len(part_refs))
  return baseline


def load_model(ckpt: str, cfg: ml_collections.ConfigDict):
  """(graphdef, params) of a fac_jax checkpoint (an adapter checkpoint folded) for `cfg.model`."""
  graphdef, _ = nnx.split(fun_audio_chat.abstract_model(cfg.model))
  return graphdef, adapters.load_params(ckpt, dtype=cfg.model.param_dtype)
