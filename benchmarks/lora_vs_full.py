"""Benchmark: LoRA stage 1 against full stage 1 on the main job's corpus, from the same start (the
main job's pre-alignment, itself M_0 with its encoder projection trained) for the same steps and
schedule. LoRA adapts the LLM's attention and MLP projections and trains the rest of what stage 1
trains (grouping adapters, refined head, encoder projection) fully; QLoRA does the same over an
int8 base. All models are measured by the main job's evaluation: held-out WER, spoken QA, text QA
on the facts M_0 learned in text (knowledge retention) and held-out losses.

  python benchmarks/lora_vs_full.py [--pipeline=/tmp/fac_jax_pipeline] [--workdir=/tmp/lora_vs_full]
      [--rank=16] [--alpha=32] [--base_quantization=none,int8]

Needs a finished main job in --pipeline (its prepared data and checkpoints). Writes
<out>/report.md and report.json (command, commit, machine, wall time).
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import config as config_lib, fingerprint  # noqa: E402
from fac_jax.pipeline import main_job, reports  # noqa: E402
from fac_jax.train import trainer  # noqa: E402

flags.DEFINE_string('pipeline', '/tmp/fac_jax_pipeline', 'A finished main job\'s workdir.')
flags.DEFINE_string('workdir', '/tmp/lora_vs_full', 'Where the LoRA run and evaluations go.')
flags.DEFINE_string('out', os.path.join(reports.REPORTS, 'lora_vs_full'), 'Report folder.')
flags.DEFINE_integer('rank', 16, 'LoRA rank.')
flags.DEFINE_float('alpha', 32.0, 'LoRA alpha.')
flags.DEFINE_list('base_quantization', ['none', 'int8'], 'One adapted run each: LoRA over the '
                  'float base (none), QLoRA over an int8 or int4 one.')
COLUMNS = (('transcription/wer', 'held-out WER', '{:.1%}'),
           ('spoken_qa/accuracy', 'spoken QA (text answer)', '{:.1%}'),
           ('spoken_qa/taught_accuracy', 'spoken QA, taught in speech', '{:.1%}'),
           ('text_qa/accuracy', 'text QA (knowledge kept from M_0)', '{:.1%}'),
           ('facts_eval/text_loss', 'facts text loss', '{:.3f}'),
           ('speech_eval/loss', 'held-out speech loss', '{:.3f}'))


def main(argv):
  del argv
  start = time.time()
  FLAGS = flags.FLAGS
  cfg = main_job.pipeline_model(config_lib.load(
      os.path.join(fingerprint.REPO, 'configs', 'tiny.py')))
  data = os.path.join(FLAGS.pipeline, 'prepared')
  model = lambda name: os.path.join(FLAGS.pipeline, main_job.MODELS[name])
  def check(*names):
    for name in names:
      if not os.path.isdir(model(name)):
        raise SystemExit(f'{model(name)} does not exist: run the main job first '
                         f'(python -m fac_jax.pipeline --workdir={FLAGS.pipeline})')

  check('M_0', 'prealign', 'stage1')
  stage = main_job.stage_config(cfg, 'stage1', data, 'train', 'validation', model('prealign'))
  stage.train.lora.update(rank=FLAGS.rank, alpha=FLAGS.alpha, train_fully=('^(?!llm/)',))
  adapted, seconds = {}, {}
  for quantization in FLAGS.base_quantization:
    name = 'LoRA stage 1' if quantization == 'none' else f'QLoRA ({quantization} base) stage 1'
    stage.train.lora.base_quantization = quantization
    started = time.time()
    adapted[name] = trainer.train_to_final(stage, os.path.join(
        FLAGS.workdir, 'stage1_lora' + ('' if quantization == 'none' else f'_{quantization}')),
        'redo')
    seconds[name] = time.time() - started
  check('stage2')  # the reference of the preference metrics

  evaluator = main_job.ModelEvaluator(cfg, FLAGS.workdir, data, model('stage2'), 'redo')
  models = {'M_0': model('M_0'), 'prealign (where stage 1 starts)': model('prealign'),
            'full stage 1': model('stage1'), **adapted}
  slug = lambda name: ''.join(c if c.isalnum() else '_' for c in name.split(' (where')[0])
  results = {name: evaluator(slug(name), path)['metrics'] for name, path in models.items()}
  lines = ['# LoRA stage 1 against full stage 1 (main job corpus)', '',
           f'From the main job\'s pre-alignment, {stage.train.steps} steps of stage 1 each, same '
           f'schedule (peak learning rate {stage.train.learning_rate:g}). LoRA: rank '
           f'{FLAGS.rank}, alpha {FLAGS.alpha:g}, on `{stage.train.lora.targets}`; every '
           'non-LLM leaf stage 1 trains is trained fully. Held-out split: voices train never '
           f'hears, {results["M_0"]["spoken_qa/questions"]} questions a task; text QA asks the '
           'facts M_0 learned in text.', '',
           '| model | ' + ' | '.join(h for _, h, _ in COLUMNS) + ' |',
           '|---|' + '---:|' * len(COLUMNS)]
  for name, metrics in results.items():
    lines.append(f'| {name} | ' + ' | '.join(
        '–' if metrics.get(k) is None else f.format(metrics[k]) for k, _, f in COLUMNS) + ' |')
  full = results['full stage 1']
  kept = lambda m: m['text_qa/accuracy'] / max(results['M_0']['text_qa/accuracy'], 1e-9)
  start_loss = results['prealign (where stage 1 starts)']['speech_eval/loss']
  for name in adapted:
    tuned = results[name]
    lines += ['', f'{name}: text knowledge kept (text QA against M_0\'s) {kept(tuned):.0%} '
              f'against {kept(full):.0%} for full stage 1, so it '
              + ('forgets less' if kept(tuned) > kept(full) else 'does not forget less')
              + f'; held-out WER {tuned["transcription/wer"]:.1%} against '
              f'{full["transcription/wer"]:.1%}; held-out speech loss {start_loss:.3f} at the '
              f'start -> {tuned["speech_eval/loss"]:.3f}. Trained in {seconds[name] / 60:.1f} min '
              '(0 when reused from an earlier run of this benchmark).']
  reports.write_benchmark_report(FLAGS.out, lines, {'models': results, 'rank': FLAGS.rank,
                                                    'alpha': FLAGS.alpha,
                                                    'train_seconds': seconds}, start)


if __name__ == '__main__':
  app.run(main)
