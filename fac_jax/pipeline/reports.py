"""Stored runs behind the README's numbers. reports/<name>/ holds a finished main job's report.md
(with a header saying where it comes from, and the files it links to) and report.json: the
command, the git commit and whether the tree had uncommitted changes, the machine, the wall time
and the results. The README's section between <!-- report:begin --> and <!-- report:end --> is
generated from reports/main_job.

  python -m fac_jax.pipeline.reports store --workdir=DIR [--name=main_job] [--allow_resumed]
  python -m fac_jax.pipeline.reports readme [--name=main_job] [--readme=README.md] [--check]
  (both: [--reports=reports])

The main job writes DIR/results.json with its report (write_results). `store` refuses results
that could be stale or misattributed: a run that has not finished, a report.md other than the one
written with the results, a run made at another commit than the checkout's or with uncommitted
changes, one that reused parts of an earlier invocation (whose code may differ; --allow_resumed
accepts it), or one not newer than the report already stored under that name.
"""

import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time

from absl import app, flags
import jax

from fac_jax import files, fingerprint

REPO = fingerprint.REPO
REPORTS = os.path.join(REPO, 'reports')
RESULTS_FILE = 'results.json'
BEGIN, END = '<!-- report:begin -->', '<!-- report:end -->'
# Relative targets of markdown links and images: what a stored report.md needs beside it.
LINK = re.compile(r'\]\(([^)\s:]+)\)')


class StaleResults(ValueError):
  """The workdir's results cannot be stored as a report of the checkout's code."""


def machine() -> dict:
  uname = platform.uname()
  memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return {'system': uname.system, 'release': uname.release, 'machine': uname.machine,
          'cpus': os.cpu_count(), 'memory_gib': round(memory / 2**30, 1),
          'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}'}


def write_benchmark_report(out: str, lines: list[str], results, started: float) -> dict:
  """<out>/report.md (`lines`, then a line with the commit, machine, wall time and command) and
  <out>/report.json (the same with `results`) of a benchmark started at `started`; the record."""
  record = {'command': [os.path.basename(sys.orig_argv[0]), *sys.orig_argv[1:]],
            **fingerprint.git_state(), 'machine': machine(),
            'wall_seconds': time.time() - started, 'results': results}
  lines = lines + ['', f'Commit {record["commit"]}'
                   f'{" (uncommitted changes)" if record["dirty"] else ""}, '
                   f'{record["machine"]["cpus"]} CPUs, {record["wall_seconds"]:.0f} s: '
                   f'`{" ".join(record["command"])}`.']
  os.makedirs(out, exist_ok=True)
  files.write_atomically(os.path.join(out, 'report.json'), json.dumps(record, indent=1) + '\n')
  files.write_atomically(os.path.join(out, 'report.md'), '\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return record


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def write_results(workdir: str, results: dict, started: float, compute_seconds: float,
                  repo: str = REPO) -> dict:
  """DIR/results.json, beside the DIR/report.md just written: `results` with the command, commit,
  machine, wall time of this invocation (from `started`, a time.time()) and compute time of every
  stage summed over the invocations that made them."""
  finished = time.time()
  record = {'command': [os.path.basename(sys.orig_argv[0]), *sys.orig_argv[1:]],
            **fingerprint.git_state(repo), 'machine': machine(), 'started': started,
            'finished': finished, 'wall_seconds': finished - started, 'compute_seconds': compute_seconds,
            'report_sha256': _sha256(os.path.join(workdir, 'report.md')), 'results': results}
  # default=float: metrics may be numpy scalars.
  files.write_atomically(os.path.join(workdir, RESULTS_FILE),
                         json.dumps(record, indent=1, default=float))
  return record


def load(report_dir: str) -> dict:
  with open(os.path.join(report_dir, 'report.json')) as f:
    return json.load(f)


def check_results(workdir: str, name: str, reports_dir: str = REPORTS, repo: str = REPO,
                  allow_resumed: bool = False) -> dict:
  """DIR/results.json, if it may be stored as reports_dir/<name>; raises StaleResults if not."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    raise StaleResults(f'no {path}: the main job has not finished in {workdir} (or ran before '
                       f'it wrote {RESULTS_FILE}); run it to the end')
  with open(path) as f:
    record = json.load(f)
  report = os.path.join(workdir, 'report.md')
  if not os.path.exists(report) or _sha256(report) != record['report_sha256']:
    raise StaleResults(f'{report} is not the report written with {path}')
  head = fingerprint.git_state(repo)['commit']
  if record['commit'] is None:
    raise StaleResults(f'{workdir} was not made in a git checkout: no commit to store it under')
  if record['commit'] != head:
    raise StaleResults(f'{workdir} was made at commit {record["commit"]}, the checkout {repo} '
                       f'is at {head}: rerun the main job at {head}')
  if record['dirty']:
    raise StaleResults(f'{workdir} was made with uncommitted changes to {record["commit"]}: '
                       'commit them and rerun the main job')
  if record['compute_seconds'] > record['wall_seconds'] and not allow_resumed:
    raise StaleResults(
        f'{workdir}: its stages took {record["compute_seconds"]:.0f} s but this run only '
        f'{record["wall_seconds"]:.0f} s, so parts were made by earlier invocations, whose code '
        'or config may differ; rerun in a new workdir, or pass --allow_resumed if they did not')
  stored = os.path.join(reports_dir, name)
  if os.path.exists(os.path.join(stored, 'report.json')):
    previous = load(stored)['finished']
    if previous >= record['finished']:
      raise StaleResults(f'{stored} already holds a run finished at {_date(previous)}, not older '
                         f'than this one ({_date(record["finished"])})')
  return record


def _date(timestamp: float) -> str:
  return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')


def _provenance(record: dict) -> str:
  m = record['machine']
  resumed = (f', {record["compute_seconds"] / 60:.1f} min summed over resumed invocations'
             if record['compute_seconds'] > record['wall_seconds'] else '')
  return (f'`{shlex.join(record["command"])}` at commit `{record["commit"][:12]}`, finished '
          f'{_date(record["finished"])} on {m["system"]} {m["machine"]}, {m["cpus"]} CPUs, '
          f'{m["memory_gib"]} GiB, {m["devices"]}: wall time '
          f'{record["wall_seconds"] / 60:.1f} min{resumed}.')


def store(workdir: str, name: str, reports_dir: str = REPORTS, repo: str = REPO,
          allow_resumed: bool = False) -> str:
  """reports_dir/<name>/ from a finished main-job workdir (check_results first); replaces the one
  there. report.md gets a provenance header, and the files it links to inside DIR are copied."""
  if not files.is_plain_name(name):
    raise ValueError(f'report name {name!r}: a folder name inside {reports_dir}, not a path')
  record = check_results(workdir, name, reports_dir, repo, allow_resumed)
  final = os.path.join(reports_dir, name)
  work = f'{final}.incomplete'
  shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work)
  with open(os.path.join(workdir, 'report.md')) as f:
    title, _, body = f.read().partition('\n')
  root = os.path.realpath(workdir)
  for target in dict.fromkeys(LINK.findall(body)):
    source = os.path.realpath(os.path.join(root, target))
    if source.startswith(root + os.sep) and os.path.isfile(source):
      os.makedirs(os.path.dirname(os.path.join(work, target)), exist_ok=True)
      shutil.copy(source, os.path.join(work, target))
  files.write_atomically(os.path.join(work, 'report.md'),
                         f'{title}\n\nStored run: {_provenance(record)}\n{body}')
  files.write_atomically(os.path.join(work, 'report.json'),
                         json.dumps(dict(record, name=name, stored=time.time()), indent=1))
  shutil.rmtree(final, ignore_errors=True)
  os.rename(work, final)
  return final


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ['| ' + ' | '.join(header) + ' |', '|---|' + '---:|' * (len(header) - 1),
          *('| ' + ' | '.join(row) + ' |' for row in rows)]


def readme_section(report_dir: str, link: str) -> str:
  """The README's generated section from a stored main-job report; `link`: its folder as the
  README reaches it."""
  record = load(report_dir)
  results = record['results']
  columns, models = results['columns'], results['models']
  cell = lambda metrics, key, fmt: '–' if metrics.get(key) is None else fmt.format(metrics[key])
  lines = [f'<!-- generated by `python -m fac_jax.pipeline.reports readme` from {link}/report.json'
           ' -->',
           f'Stored run [{link}]({link}/report.md): {_provenance(record)}', '']
  lines += _table(['model', *(heading for _, heading, _ in columns)],
                  [[name, *(cell(metrics, k, f) for k, _, f in columns)]
                   for name, metrics in [*models.items(), ('chance (most common answer)',
                                                           results['baseline'])]])
  stage2, tuned = models['stage2'], models['dpo']
  loss, tuned_loss = stage2['speech_eval/loss'], tuned['speech_eval/loss']
  likelihood = ' and in speech '.join(
      f'{stage2[key]:.1%} -> {tuned[key]:.1%}' for key in (
          'preference/text_likelihood_accuracy', 'preference/speech_likelihood_accuracy'))
  lines += ['', f'DPO against stage 2: reward accuracy {tuned["preference/accuracy"]:.1%} on the '
            f'held-out pairs, the chosen answer more likely than the rejected one in text '
            f'{likelihood}; held-out SFT loss {loss:.3f} -> {tuned_loss:.3f} '
            f'({tuned_loss / loss - 1:+.1%}).', '',
            'What the merge buys (M_0 merged with stage 1 on the LLM weights; alpha 1 is stage 1 '
            'alone): knowledge is the text facts, task the held-out speech conversations.', '']
  sweep = results['merge_sweep']
  lines += _table(list(sweep[0]), [[f'{v:.4f}' if isinstance(v, float) else str(v)
                                    for v in row.values()] for row in sweep])
  return '\n'.join(lines) + '\n'


def update_readme(readme: str, report_dir: str, write: bool = True) -> bool:
  """Regenerates `readme`'s section between BEGIN and END (marker lines kept) from report_dir;
  whether it changed. Raises ValueError unless each marker is there once, BEGIN first."""
  link = os.path.relpath(report_dir, os.path.dirname(os.path.abspath(readme)))
  return files.replace_section(readme, BEGIN, END, readme_section(report_dir, link), write)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'store: the finished main job\'s workdir.')
  flags.DEFINE_string('name', 'main_job', 'The stored report: <reports>/<name>.')
  flags.DEFINE_string('reports', REPORTS, 'Where stored reports are.')
  flags.DEFINE_bool('allow_resumed', False, 'store: accept a run that reused parts of earlier '
                    'invocations of the main job.')
  flags.DEFINE_string('readme', os.path.join(REPO, 'README.md'), 'readme: the file to update.')
  flags.DEFINE_bool('check', False, 'readme: change nothing; exit 1 if the section is out of date.')


def main(argv):
  if len(argv) != 2 or argv[1] not in ('store', 'readme'):
    raise app.UsageError('usage: python -m fac_jax.pipeline.reports store --workdir=DIR | readme')
  report_dir = os.path.join(FLAGS.reports, FLAGS.name)
  try:
    if argv[1] == 'store':
      if not FLAGS.workdir:
        raise app.UsageError('store needs --workdir')
      print(f'stored {store(FLAGS.workdir, FLAGS.name, FLAGS.reports, REPO, FLAGS.allow_resumed)}')
    elif update_readme(FLAGS.readme, report_dir, write=not FLAGS.check):
      if FLAGS.check:
        raise SystemExit(f'{FLAGS.readme} is out of date with {report_dir}: run '
                         'python -m fac_jax.pipeline.reports readme')
      print(f'{FLAGS.readme}: regenerated from {report_dir}')
    else:
      print(f'{FLAGS.readme} is up to date with {report_dir}')
  except (ValueError, OSError) as e:
    raise SystemExit(f'error: {e}') from None


def run():
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
