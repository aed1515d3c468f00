"""The main job, from nothing to a talking model: synthesise the demo corpus -> prepare it (text
BPE and speech tokenizer, log-mel, codes) -> a text base model M_0 taught the corpus's facts in text
(our stand-in for a pretrained LLM) -> pre-alignment -> Core-Cocktail stage 1 -> merge with M_0 ->
stage 2 -> multi-task DPO -> evaluation of every stage -> a report.

  python -m fac_jax.pipeline --config=configs/tiny.py [--workdir=DIR] [--smoke]
      [--on_mismatch=redo|refuse]

DIR/corpus, DIR/prepared, DIR/<stage>/ (trainer workdirs; cocktail/ holds stage1, merged, stage2),
DIR/merge_sweep/, DIR/eval/<model>.json, DIR/samples/*.wav, DIR/report.md, DIR/results.json (for
fac_jax.pipeline.reports) and DIR/*.png. A rerun
continues where the last one stopped: finished parts are skipped, an interrupted training stage
resumes from its latest checkpoint, an evaluated model is not evaluated again. Every part records
the fingerprint of the settings and inputs it was made from: a part made otherwise (another model
config, a changed corpus, a retrained stage before it) is made again, saying what differs, or
with --on_mismatch=refuse stops there. Stage sizes and steps: config.pipeline.
"""

import copy
import json
import os
import shutil
import time

from absl import flags
import jax
import ml_collections
import numpy as np
import soundfile as sf
from ml_collections import config_flags

from fac_jax import cli, files, fingerprint, sharding
from fac_jax.checkpoints import text_tokenizer, whisper
from fac_jax.data import input_pipeline as data_pipeline, prepare, synth
from fac_jax.evaluation import asr_judge, spoken_eval
from fac_jax.merging import cocktail, merge_study
from fac_jax.pipeline import reports
from fac_jax.speech import speech_tokenizer
from fac_jax.train import dpo, trainer

# Models evaluated, in training order: name -> path of its checkpoint under the workdir.
MODELS = {'M_0': 'base/final', 'prealign': 'prealign/final', 'stage1': 'cocktail/stage1/final',
          'merged': 'cocktail/merged', 'stage2': 'cocktail/stage2/final', 'dpo': 'dpo/final'}
PREPARED_SPLITS = {'train': 'train', 'validation': 'validation', 'facts': 'text_facts',
                   'prefs_train': 'prefs_train', 'prefs_validation': 'prefs_validation'}


def smoke(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few minutes' version of cfg's pipeline (--smoke; CI runs it): tiny corpus, espeak-ng only,
  4 steps a stage, 3 questions a task. Checks that everything runs, not what it learns."""
  cfg = copy.deepcopy(cfg)
  cfg.pipeline.update(num_train=36, num_eval=12, num_pref_train=8, num_pref_eval=6, piper='off',
                      eval_questions=3, max_new_tokens=8, merge_alphas=(0.0, 1.0), samples=2)
  for stage in cfg.pipeline.stages.values():
    stage.update(steps=4, eval_every=4, checkpoint_every=4, log_every=2, eval_batches=1)
  return cfg


class Progress:
  """Numbered stage headers with the time since the job started; the seconds each stage took,
  summed over every invocation (a resumed stage adds its remainder), kept in DIR/timings.json
  with the fingerprint of the stage's settings: a stage made with other settings counts anew."""

  def __init__(self, total: int, workdir: str):
    self.total, self.done, self.start = total, 0, time.time()
    self.path = os.path.join(workdir, 'timings.json')
    self.stages = {}  # what -> {'seconds', 'fingerprint'}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.stages = json.load(f)
    self.current, self.current_start = None, None

  def _close(self) -> None:
    if self.current is not None:
      self.stages[self.current]['seconds'] += time.time() - self.current_start
      files.write_atomically(self.path, json.dumps(self.stages, indent=1))

  def stage(self, what: str, settings: dict) -> None:
    self._close()
    self.done += 1
    made = fingerprint.digest(settings)
    if not isinstance(self.stages.get(what), dict) or self.stages[what]['fingerprint'] != made:
      self.stages[what] = {'seconds': 0.0, 'fingerprint': made}
    self.current, self.current_start = what, time.time()
    print(f'\n[{self.done}/{self.total}  {time.time() - self.start:,.0f} s] {what}', flush=True)

  def finish(self) -> float:
    """Closes the last stage; the total seconds of every stage over all invocations."""
    self._close()
    self.current = None
    return sum(entry['seconds'] for entry in self.stages.values() if isinstance(entry, dict))


def pipeline_model(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """cfg with config.pipeline.encoder's fields in model.encoder, config.pipeline.data's in data
  and, where that encoder is pretrained, its pretrained trunk frozen in every stage."""
  cfg = copy.deepcopy(cfg)
  cfg.model.encoder.update(cfg.pipeline.encoder)
  cfg.data.update(cfg.pipeline.data)
  if cfg.model.encoder.pretrained:
    whisper.check_config(cfg.model.encoder)
    for stage in cfg.pipeline.stages.values():
      stage.frozen = (*stage.frozen, whisper.TRUNK_PATTERN)
  return cfg


def stage_config(cfg: ml_collections.ConfigDict, name: str, data_dir: str, train_split: str,
                 eval_split: str, init_checkpoint: str = '') -> ml_collections.ConfigDict:
  """cfg with config.pipeline.stages[name] as its trainer settings, these data splits and the
  stage's config.pipeline.stage_data."""
  stage = copy.deepcopy(cfg)
  stage.train = copy.deepcopy(cfg.pipeline.stages[name])
  stage.train.init_checkpoint = init_checkpoint
  stage.data.update(dir=data_dir, train_split=train_split, eval_split=eval_split,
                    **cfg.pipeline.stage_data.get(name, {}))
  return stage


def corpus_settings(cfg: ml_collections.ConfigDict) -> dict:
  """What the synthesised corpus depends on."""
  return {'seed': cfg.seed, **{k: cfg.pipeline[k] for k in (
      'num_train', 'num_eval', 'num_pref_train', 'num_pref_eval', 'piper')}}


def make_corpus(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  corpus = os.path.join(workdir, 'corpus')
  p = cfg.pipeline
  summary = synth.synthesise(corpus, p.num_train, p.num_eval, seed=cfg.seed, use_piper=p.piper,
                             num_pref_train=p.num_pref_train, num_pref_eval=p.num_pref_eval)
  print(f'corpus: {corpus} ({", ".join(summary["engines_used"])})', flush=True)
  return corpus


def prepare_data(cfg: ml_collections.ConfigDict, workdir: str, corpus: str,
                 on_mismatch: str) -> str:
  data_dir = os.path.join(workdir, 'prepared')
  report = prepare.prepare(data_dir, {split: os.path.join(corpus, f'{name}.jsonl')
                                      for split, name in PREPARED_SPLITS.items()}, cfg.model,
                           max_audio_seconds=cfg.data.max_audio_seconds, on_mismatch=on_mismatch)
  print('prepared: ' + ', '.join(f'{split} {entry["kept"]} kept / {entry["skipped"]} skipped'
                                 for split, entry in report['splits'].items()), flush=True)
  return data_dir


def train_all(cfg: ml_collections.ConfigDict, workdir: str, data_dir: str, progress: Progress,
              on_mismatch: str) -> dict[str, str]:
  """Every training stage and the merge, each reused where it was made with the same settings
  and inputs; {model name: checkpoint}."""
  path = lambda name: os.path.join(workdir, MODELS[name])
  base_cfg = stage_config(cfg, 'base', data_dir, 'facts', 'facts')
  base_cfg.data.num_windows = 0  # the facts are text: no mel windows, so no encoder in the step
  progress.stage('text base model M_0 on the facts in text', trainer.final_settings(base_cfg))
  trainer.train_to_final(base_cfg, os.path.join(workdir, 'base'), on_mismatch)
  prealign_cfg = stage_config(cfg, 'prealign', data_dir, 'train', 'validation', path('M_0'))
  progress.stage('pre-alignment from M_0 (LLM frozen)', trainer.final_settings(prealign_cfg))
  trainer.train_to_final(prealign_cfg, os.path.join(workdir, 'prealign'), on_mismatch)
  cocktail_cfg = stage_config(cfg, 'stage1', data_dir, 'train', 'validation', path('prealign'))
  cocktail_cfg.cocktail.update(base_checkpoint=path('M_0'),
                               stage2=copy.deepcopy(cfg.pipeline.stages.stage2))
  progress.stage('Core-Cocktail: stage 1, merge with M_0, stage 2',
                 {'stage1': trainer.final_settings(cocktail_cfg),
                  'cocktail': cocktail_cfg.cocktail})
  cocktail.run_cocktail(cocktail_cfg, os.path.join(workdir, 'cocktail'), on_mismatch)
  dpo_cfg = stage_config(cfg, 'dpo', data_dir, 'prefs_train', 'prefs_validation', path('stage2'))
  progress.stage('multi-task DPO against stage 2', trainer.final_settings(dpo_cfg))
  trainer.train_to_final(dpo_cfg, os.path.join(workdir, 'dpo'), on_mismatch)
  return {name: path(name) for name in MODELS}


def merge_sweep(cfg: ml_collections.ConfigDict, workdir: str, data_dir: str,
                models: dict[str, str], on_mismatch: str) -> list[dict]:
  """What the merge buys: M_0 and stage 1 merged at each alpha, text knowledge against the speech
  task (merge_study)."""
  out = os.path.join(workdir, 'merge_sweep')
  rows = merge_study.sweep(cfg, base=models['M_0'], finetuned=models['stage1'], workdir=out,
                           knowledge_data=f'{data_dir}@facts', task_data=f'{data_dir}@validation',
                           alphas=list(cfg.pipeline.merge_alphas), methods=['linear'],
                           include=cfg.cocktail.include, eval_batches=4, on_mismatch=on_mismatch)
  merge_study.write_reports(rows, out)
  return rows


class ModelEvaluator:
  """Every held-out metric of one checkpoint; results cached in DIR/eval/<model>.json with the
  settings they were measured with (a cache measured otherwise is measured again or refused)."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, data_dir: str,
               reference: str, on_mismatch: str):
    self.cfg, self.workdir, self.data_dir = copy.deepcopy(cfg), workdir, data_dir
    self.on_mismatch = on_mismatch
    self.cfg.data.dir = data_dir
    # Preference pairs are batched as the DPO stage batches them.
    self.preference_cfg = stage_config(cfg, 'dpo', data_dir, 'prefs_train', 'prefs_validation')
    per_task = cfg.pipeline.eval_questions
    self.questions = (
        spoken_eval.questions(data_dir, 'validation', self.cfg,
                              ('transcription', 'spoken_qa'), per_task)
        + spoken_eval.questions(data_dir, 'prefs_validation', self.cfg, ('correct_answer',),
                                per_task)
        + spoken_eval.questions(data_dir, 'facts', self.cfg, ('text_qa',), per_task))
    self.baseline = spoken_eval.majority_baseline(self.questions)
    self.text_tokenizer = text_tokenizer.load(os.path.join(data_dir, prepare.TOKENIZER_FOLDER))
    self.detokenizer = speech_tokenizer.GriffinLimDetokenizer.load(
        os.path.join(data_dir, prepare.SPEECH_TOKENIZER_FILE))
    self.judge = asr_judge.load()
    spoken_eval.hear_references(self.questions, self.judge, self.detokenizer)
    self.generate_fns = {}
    self.mesh = sharding.make_mesh(self.cfg.mesh)
    self.losses = merge_study.Evaluator(self.cfg, self.mesh, max_batches=8)
    self.reference = reference
    self._reference_params = self._preference_step = None

  def _preferences(self, graphdef, params) -> dict:
    """DPO metrics on the held-out pairs, against the DPO stage's reference (stage 2)."""
    if self._reference_params is None:
      self._reference_params = spoken_eval.load_model(self.reference, self.cfg)[1]
    if self._preference_step is None:
      first = next(iter(data_pipeline.dpo_dataset(self.preference_cfg, 'prefs_validation',
                                                  num_epochs=1,
                                                  shuffle=False)))
      self._preference_step = (jax.jit(dpo.make_dpo_eval_step(graphdef, self.cfg.dpo)),
                               data_pipeline.global_batch_shardings(first, self.mesh))
    step, shardings = self._preference_step
    result = dpo.evaluate(self.preference_cfg, params, self._reference_params, step, shardings,
                          'prefs_validation')
    return {f'preference/{k}': result[k] for k in (
        'accuracy', 'margin', 'text_likelihood_accuracy', 'speech_likelihood_accuracy')}

  def settings(self, ckpt: str) -> dict:
    """What the evaluation of checkpoint `ckpt` depends on."""
    batch_fields = lambda cfg: {k: cfg.data[k] for k in ('batch_size', 'seq_len', 'num_windows')}
    return {'config': {'model': self.cfg.model, 'dpo': self.cfg.dpo, 'data': batch_fields(self.cfg),
                       'preference_data': batch_fields(self.preference_cfg),
                       'pipeline': {k: self.cfg.pipeline[k]
                                    for k in ('eval_questions', 'max_new_tokens')}},
            'inputs': {'checkpoint': fingerprint.of_folder(ckpt),
                       'reference': fingerprint.of_folder(self.reference),
                       **{split: prepare.split_fingerprint(self.data_dir, split)
                          for split in ('validation', 'prefs_validation', 'facts')}}}

  def __call__(self, name: str, ckpt: str) -> dict:
    cached, made = os.path.join(self.workdir, 'eval', f'{name}.json'), self.settings(ckpt)
    if os.path.exists(cached):
      with open(cached) as f:
        result = json.load(f)
      if fingerprint.reuse(result.pop('made_from', None), made, self.on_mismatch, cached):
        return result
    start = time.time()
    graphdef, params = spoken_eval.load_model(ckpt, self.cfg)
    answers = spoken_eval.answer(graphdef, params, self.cfg, self.questions,
                                 self.cfg.pipeline.max_new_tokens,
                                 text_tokenizer=self.text_tokenizer, desc=f'{name} answering',
                                 functions=self.generate_fns)
    result = spoken_eval.score(self.questions, answers, self.judge, self.detokenizer)
    for split, prefix in (('validation', 'speech_eval'), ('facts', 'facts_eval')):
      result['metrics'].update({f'{prefix}/{k}': v for k, v in
                                self.losses(params, f'{self.data_dir}@{split}').items()})
    result['metrics'].update(self._preferences(graphdef, params))
    result['seconds'] = round(time.time() - start, 1)
    result['codes'] = [a['codes'].tolist() for a in answers]
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    files.write_atomically(cached, json.dumps({'made_from': fingerprint.plain(made), **result},
                                              indent=1))
    print(f'{name}: ' + '  '.join(f'{k} {v:.3f}' for k, v in result['metrics'].items()
                                  if k.split('/')[-1] in ('accuracy', 'wer', 'speech_accuracy')),
          flush=True)
    return result


def write_samples(evaluator: ModelEvaluator, result: dict, workdir: str, count: int) -> list:
  """The first `count` held-out spoken questions (their wav, copied) and one model's spoken
  answers (detokenized) in DIR/samples."""
  out = os.path.join(workdir, 'samples')
  os.makedirs(out, exist_ok=True)
  written = []
  for q, record, codes in zip(evaluator.questions, result['answers'], result['codes']):
    if q.task != 'spoken_qa' or len(written) == count:
      continue
    manifest_path, line = q.source.rsplit(':', 1)
    with open(manifest_path) as f:
      user_audio = json.loads(f.readlines()[int(line) - 1])['turns'][0]['audio']
    question_wav, answer_wav = (os.path.join(out, f'{q.id}_{part}.wav')
                                for part in ('question', 'answer'))
    shutil.copy(os.path.join(os.path.dirname(manifest_path), user_audio), question_wav)
    sf.write(answer_wav, evaluator.detokenizer.decode(np.asarray(codes, np.int64)),
             evaluator.detokenizer.sample_rate)
    written.append({'id': q.id, 'reference': q.reference, 'answer': record['answer'],
                    'heard': record.get('heard'),
                    'question_wav': os.path.relpath(question_wav, workdir),
                    'answer_wav': os.path.relpath(answer_wav, workdir)})
  return written


# Report columns: (metric key, heading, format); a missing metric shows as a dash.
REPORT_COLUMNS = (
    ('speech_eval/loss', 'held-out speech loss', '{:.3f}'),
    ('transcription/wer', 'transcription WER', '{:.1%}'),
    ('spoken_qa/taught_accuracy', 'spoken QA, taught in speech', '{:.1%}'),
    ('spoken_qa/text_only_accuracy', 'spoken QA, known only in text', '{:.1%}'),
    ('spoken_qa/speech_accuracy', 'spoken QA, speech', '{:.1%}'),
    ('correct_answer/accuracy', 'QA in noise, text', '{:.1%}'),
    ('text_qa/accuracy', 'text QA (knowledge)', '{:.1%}'),
    ('facts_eval/text_loss', 'facts text loss', '{:.3f}'),
    ('preference/text_likelihood_accuracy', 'prefers right answer', '{:.1%}'),
    ('preference/accuracy', 'DPO reward accuracy', '{:.1%}'),
)


def _cell(metrics: dict, key: str, fmt: str) -> str:
  value = metrics.get(key)
  return '–' if value is None else fmt.format(value)


def plot_stages(results: dict[str, dict], path: str) -> None:
  """Bars of the generation metrics per model."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  keys = [(k, h) for k, h, f in REPORT_COLUMNS if '%' in f]
  names = list(results)
  fig, ax = plt.subplots(figsize=(11, 4.5))
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    values = [results[name]['metrics'].get(k, np.nan) for k, _ in keys]
    ax.bar(np.arange(len(keys)) + i * width, values, width, label=name)
  ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [h for _, h in keys], rotation=20,
                ha='right')
  ax.set_ylim(0, 1)
  ax.set_ylabel('share of held-out questions (WER: errors per word)')
  ax.legend(ncol=len(names), fontsize=8)
  ax.set_title('Held-out metrics after each stage')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(workdir: str, results: dict[str, dict], baseline: dict, samples: list,
                 seconds: float) -> str:
  """DIR/report.md and DIR/stages.png; returns the markdown."""
  plot_stages(results, os.path.join(workdir, 'stages.png'))
  lines = ['# fac_jax pipeline report', '',
           f'Compute time of all stages (summed over resumed runs): {seconds / 60:.1f} min on '
           f'{jax.device_count()} x '
           f'{jax.devices()[0].platform}. Held-out questions per task: '
           f'{next(iter(results.values()))["metrics"]["spoken_qa/questions"]}.', '',
           '| model | ' + ' | '.join(h for _, h, _ in REPORT_COLUMNS) + ' |',
           '|---|' + '---:|' * len(REPORT_COLUMNS)]
  for name, result in results.items():
    lines.append(f'| {name} | ' + ' | '.join(_cell(result['metrics'], k, f)
                                             for k, _, f in REPORT_COLUMNS) + ' |')
  lines.append('| chance (most common answer) | ' + ' | '.join(
      _cell(baseline, k, f) for k, _, f in REPORT_COLUMNS) + ' |')
  ceiling = results[next(reversed(results))]['metrics'].get('spoken_qa/speech_ceiling')
  stage2, tuned = results['stage2']['metrics'], results['dpo']['metrics']
  lines += ['', '**DPO** (held-out pairs: known questions, new voices, 5-15 dB noise): reward accuracy '
            f'{tuned["preference/accuracy"]:.1%} against stage 2 as reference (0 at the start), '
            'the chosen answer more likely than the rejected one in text '
            f'{stage2["preference/text_likelihood_accuracy"]:.1%} -> '
            f'{tuned["preference/text_likelihood_accuracy"]:.1%} and in speech '
            f'{stage2["preference/speech_likelihood_accuracy"]:.1%} -> '
            f'{tuned["preference/speech_likelihood_accuracy"]:.1%}; held-out SFT loss '
            f'{stage2["speech_eval/loss"]:.3f} -> {tuned["speech_eval/loss"]:.3f} '
            f'({tuned["speech_eval/loss"] / stage2["speech_eval/loss"] - 1:+.1%}).']
  lines += ['', '![stages](stages.png)', '',
            'Spoken answers are scored by the ASR judge (Whisper tiny.en) after the speech '
            'detokenizer; on the reference answers\' own codes it scores '
            + ('–' if ceiling is None else f'{ceiling:.1%}') + ', the ceiling of that column. '
            '"prefers right answer": held-out preference pairs whose chosen answer the model '
            'finds more likely (text channel); "DPO reward accuracy": the same against stage 2 '
            'as reference (0 for stage 2 itself by definition).', '',
            '## What the merge buys', '',
            'M_0 and stage 1 merged at each alpha (1 = stage 1 alone) on the LLM weights:', '']
  with open(os.path.join(workdir, 'merge_sweep', 'merge_study.md')) as f:
    lines += [f.read().strip(), '', '![merge sweep](merge_sweep/merge_study.png)', '']
  lines += ['## Training curves', '']
  for stage in ('base', 'prealign', 'cocktail/stage1', 'cocktail/stage2', 'dpo'):
    lines.append(f'![{stage}]({stage}/loss_curves.png)')
  lines += ['', '## Samples', '', '| question | reference | text answer | speech answer heard as |',
            '|---|---|---|---|']
  for s in samples:
    lines.append(f'| [{s["id"]}]({s["question_wav"]}) | {s["reference"]} | {s["answer"]} | '
                 f'[{s["heard"] or "–"}]({s["answer_wav"]}) |')
  report = '\n'.join(lines) + '\n'
  files.write_atomically(os.path.join(workdir, 'report.md'), report)
  return report


def run_pipeline(cfg: ml_collections.ConfigDict, workdir: str, on_mismatch: str = 'redo') -> dict:
  """Runs or resumes every part, remaking ('redo') or refusing what was made with other settings
  or inputs; returns {'results': per model, 'baseline', 'report'}."""
  os.makedirs(workdir, exist_ok=True)
  cfg = pipeline_model(cfg)
  progress = Progress(7, workdir)
  progress.stage('synthesising the demo corpus', corpus_settings(cfg))
  corpus = make_corpus(cfg, workdir)
  progress.stage('preparing it: tokenizers, log-mel, speech codes',
                 {'corpus': corpus_settings(cfg), 'model': cfg.model,
                  'max_audio_seconds': cfg.data.max_audio_seconds})
  data_dir = prepare_data(cfg, workdir, corpus, on_mismatch)
  cfg.data.dir = data_dir
  models = train_all(cfg, workdir, data_dir, progress, on_mismatch)
  progress.stage('merge sweep and held-out evaluation of every model',
                 {'models': {name: fingerprint.of_folder(path) for name, path in models.items()},
                  'pipeline': cfg.pipeline, 'model': cfg.model})
  merge_rows = merge_sweep(cfg, workdir, data_dir, models, on_mismatch)
  evaluator = ModelEvaluator(cfg, workdir, data_dir, models['stage2'], on_mismatch)
  results = {name: evaluator(name, ckpt) for name, ckpt in models.items()}
  samples = write_samples(evaluator, results['dpo'], workdir, cfg.pipeline.samples)
  seconds = progress.finish()
  report = write_report(workdir, results, evaluator.baseline, samples, seconds)
  reports.write_results(workdir, {
      'columns': REPORT_COLUMNS, 'baseline': evaluator.baseline, 'merge_sweep': merge_rows,
      'models': {name: result['metrics'] for name, result in results.items()}},
      started=progress.start, compute_seconds=seconds)
  print('\n' + report, flush=True)
  return {'results': results, 'baseline': evaluator.baseline, 'report': report}


def default_workdir(smoke_run: bool) -> str:
  """--workdir when none is given: a smoke run has its own, so that it never meets a full one."""
  return '/tmp/fac_jax_pipeline_smoke' if smoke_run else '/tmp/fac_jax_pipeline'


def _define_flags() -> None:
  config_flags.DEFINE_config_file(
      'config', os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
          os.path.abspath(__file__)))), 'configs', 'tiny.py'), 'Experiment config file.')
  flags.DEFINE_string('workdir', None, 'Where every output goes (default: '
                      f'{default_workdir(False)}, with --smoke {default_workdir(True)}).')
  flags.DEFINE_bool('smoke', False, 'A few minutes\' run with a few steps a stage (see smoke).')
  flags.DEFINE_enum('on_mismatch', 'redo', fingerprint.ON_MISMATCH, 'A part made with other '
                    'settings or inputs (e.g. another model config): make it again, or refuse.')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  try:
    run_pipeline(smoke(FLAGS.config) if FLAGS.smoke else FLAGS.config,
                 FLAGS.workdir or default_workdir(FLAGS.smoke), FLAGS.on_mismatch)
  except (trainer.TrainingError, ValueError) as e:  # refusals: settings, data, config
    raise SystemExit(f'error: {e}') from None


def run():
  """Console-script entry point."""
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
