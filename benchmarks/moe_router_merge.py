"""Benchmark: does merging an MoE LLM's router matter in Core-Cocktail's merge? On the tiny MoE
config, a text base M_0 (trained on the demo corpus's facts) and M_1 (fine-tuned from it on
speech) are merged linearly over the LLM at each alpha twice: router included, and router kept
from M_1 (`--exclude=moe/router`); both are measured as the merge study measures (knowledge: text
loss and accuracy on the facts; task: text and speech loss on held-out speech).

  python benchmarks/moe_router_merge.py [--workdir=DIR] [--out=DIR] [--steps=40]

Writes <out>/report.md and report.json (command, commit, machine, wall time).
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import config as config_lib, fingerprint  # noqa: E402
from fac_jax.data import prepare, synth  # noqa: E402
from fac_jax.merging import merge_study  # noqa: E402
from fac_jax.pipeline import reports  # noqa: E402
from fac_jax.train import trainer  # noqa: E402

REPO = fingerprint.REPO
flags.DEFINE_string('workdir', '/tmp/moe_router_merge', 'Where the corpus, models and merges go.')
flags.DEFINE_string('out', os.path.join(reports.REPORTS, 'moe_router_merge'), 'Report folder.')
flags.DEFINE_integer('steps', 40, 'Training steps of M_0 and of M_1.')
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
VARIANTS = {'router merged': None, 'router kept from M_1': 'moe/router'}


def main(argv):
  del argv
  start = time.time()
  workdir, steps = flags.FLAGS.workdir, flags.FLAGS.steps
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'tiny.py') + ':stage1,moe')
  cfg.data.update(batch_size=8, seq_len=128, num_windows=24)
  corpus, data = os.path.join(workdir, 'corpus'), os.path.join(workdir, 'prepared')
  synth.synthesise(corpus, num_train=64, num_eval=16, seed=0, use_piper='off')
  prepare.prepare(data, {'train': f'{corpus}/train.jsonl',
                         'validation': f'{corpus}/validation.jsonl',
                         'facts': f'{corpus}/text_facts.jsonl'}, cfg.model)

  def train(name, split, init=''):
    stage = cfg.copy_and_resolve_references()
    stage.data.update(dir=data, train_split=split, eval_split=split)
    stage.train.update(steps=steps, log_every=20, eval_every=steps, checkpoint_every=steps,
                       eval_batches=2, init_checkpoint=init)
    return trainer.train_to_final(stage, os.path.join(workdir, name), 'redo')

  m0 = train('base', 'facts')
  m1 = train('stage1', 'train', m0)
  results = {}
  for variant, exclude in VARIANTS.items():
    print(f'merge, {variant}', flush=True)
    results[variant] = merge_study.sweep(
        cfg, base=m0, finetuned=m1, workdir=os.path.join(workdir, variant.replace(' ', '_')),
        knowledge_data=f'{data}@facts', task_data=f'{data}@validation', alphas=ALPHAS,
        methods=['linear'], include='^llm/', exclude=exclude, eval_batches=2)

  merged, kept = results['router merged'], results['router kept from M_1']
  lines = ['# MoE: merging the router or keeping M_1\'s', '',
           f'Tiny MoE config (`configs/tiny.py:stage1,moe`: {cfg.model.llm.moe.num_experts} '
           f'experts, {cfg.model.llm.moe.experts_per_token} a token), M_0 and M_1 trained '
           f'{steps} steps each; linear merge of `^llm/` at weight alpha on M_1 '
           '(alpha 0 is M_0\'s LLM, 1 is M_1\'s). Knowledge: text facts; task: held-out speech.',
           '',
           '| alpha | knowledge text loss, router merged | router kept | knowledge text accuracy, '
           'router merged | router kept | task speech loss, router merged | router kept |',
           '|---:|---:|---:|---:|---:|---:|---:|']
  for a, b in zip(merged, kept):
    lines.append(f"| {a['alpha']:g} | {a['knowledge_text_loss']:.4f} | "
                 f"{b['knowledge_text_loss']:.4f} | {a['knowledge_text_accuracy']:.3f} | "
                 f"{b['knowledge_text_accuracy']:.3f} | {a['task_speech_loss']:.4f} | "
                 f"{b['task_speech_loss']:.4f} |")
  gaps = [abs(a['knowledge_text_loss'] - b['knowledge_text_loss']) / a['knowledge_text_loss']
          for a, b in zip(merged, kept) if 0 < a['alpha'] < 1]
  lines += ['', f'Largest relative difference in knowledge text loss between the two, over the '
            f'alphas strictly between 0 and 1: {max(gaps):.1%}.']
  reports.write_benchmark_report(flags.FLAGS.out, lines, results, start)


if __name__ == '__main__':
  app.run(main)
