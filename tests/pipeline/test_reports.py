"""Stored reports (fac_jax.pipeline.reports) on a fake finished main-job workdir and a scratch git
checkout: what a stored report records, the results it refuses as possibly stale, and the README
section generated from it, between its markers only."""

import os
import platform
import subprocess
import sys
import time

import pytest

import paths

from fac_jax.pipeline import reports

COMMAND = ['/some/venv/bin/python', '-m', 'fac_jax.pipeline', '--workdir=run']
RESULTS = {
    'columns': [['speech_eval/loss', 'held-out speech loss', '{:.3f}'],
                ['transcription/wer', 'transcription WER', '{:.1%}']],
    'models': {'M_0': {'speech_eval/loss': 13.536, 'transcription/wer': 0.995},
               'stage2': {'speech_eval/loss': 1.314, 'transcription/wer': 0.471,
                          'preference/text_likelihood_accuracy': 0.9,
                          'preference/speech_likelihood_accuracy': 0.783},
               'dpo': {'speech_eval/loss': 1.478, 'transcription/wer': 0.5,
                       'preference/accuracy': 0.767, 'preference/text_likelihood_accuracy': 0.883,
                       'preference/speech_likelihood_accuracy': 0.767}},
    'baseline': {'transcription/wer': 0.881},
    'merge_sweep': [{'method': 'linear', 'alpha': 0.0, 'knowledge_text_loss': 0.1398},
                    {'method': 'linear', 'alpha': 1.0, 'knowledge_text_loss': 2.9014}],
}
REPORT = ('# fac_jax pipeline report\n\nCompute time 1.5 min.\n\n![stages](stages.png)\n'
          '[q1](samples/q1_question.wav) [escape](../outside.png) [web](https://example.org)\n')


def git(repo, *args) -> str:
  return subprocess.run(['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t',
                         '-c', 'commit.gpgsign=false', *args], check=True, capture_output=True,
                        text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
  """A scratch checkout with one commit and a clean tree."""
  path = tmp_path / 'repo'
  path.mkdir()
  git(path, 'init', '-q')
  (path / 'code.py').write_text('x = 1\n')
  git(path, 'add', 'code.py')
  git(path, 'commit', '-qm', 'first')
  return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
  """A main-job workdir whose report links to two files inside it and one outside."""
  monkeypatch.setattr(sys, 'orig_argv', COMMAND)
  path = tmp_path / 'run'
  (path / 'samples').mkdir(parents=True)
  (path / 'stages.png').write_bytes(b'png')
  (path / 'samples' / 'q1_question.wav').write_bytes(b'wav')
  (tmp_path / 'outside.png').write_bytes(b'not part of the run')
  (path / 'report.md').write_text(REPORT)
  return path


def finish(workdir, repo, seconds_ago: float = 100.0, compute_seconds: float = 90.0) -> dict:
  """What the main job does last: results.json beside its report.md."""
  return reports.write_results(str(workdir), RESULTS, time.time() - seconds_ago, compute_seconds,
                               repo=str(repo))


def store(workdir, repo, tmp_path, **kw) -> str:
  return reports.store(str(workdir), 'main_job', str(tmp_path / 'reports'), str(repo), **kw)


def test_a_stored_report_records_command_commit_machine_and_wall_time(workdir, repo, tmp_path):
  finish(workdir, repo)
  stored = store(workdir, repo, tmp_path)
  record = reports.load(stored)
  assert record['command'] == ['python', *COMMAND[1:]]
  assert record['commit'] == git(repo, 'rev-parse', 'HEAD') and record['dirty'] is False
  assert record['machine']['cpus'] == os.cpu_count()
  assert record['machine']['machine'] == platform.machine()
  assert record['machine']['memory_gib'] > 0
  assert 100 <= record['wall_seconds'] < 160 and record['compute_seconds'] == 90
  assert record['results'] == RESULTS
  with open(os.path.join(stored, 'report.md')) as f:
    text = f.read()
  header = (f'Stored run: `python -m fac_jax.pipeline --workdir=run` at commit '
            f'`{record["commit"][:12]}`')
  assert text.startswith(f'# fac_jax pipeline report\n\n{header}')
  assert text.endswith(REPORT.partition('\n')[2]) and 'wall time 1.7 min.' in text
  # Linked files inside the workdir come along; a link out of it is not followed.
  assert open(os.path.join(stored, 'samples', 'q1_question.wav')).read() == 'wav'
  assert sorted(os.listdir(stored)) == ['report.json', 'report.md', 'samples', 'stages.png']
  assert not os.path.exists(tmp_path / 'reports' / 'outside.png')


def test_an_unfinished_run_is_refused(workdir, repo, tmp_path):
  with pytest.raises(reports.StaleResults, match='has not finished'):
    store(workdir, repo, tmp_path)


def test_a_report_rewritten_after_the_results_is_refused(workdir, repo, tmp_path):
  finish(workdir, repo)
  (workdir / 'report.md').write_text(REPORT + 'numbers of a later, unfinished rerun\n')
  with pytest.raises(reports.StaleResults, match='is not the report written with'):
    store(workdir, repo, tmp_path)


def test_a_run_made_at_another_commit_is_refused(workdir, repo, tmp_path):
  finish(workdir, repo)
  made_at = git(repo, 'rev-parse', 'HEAD')
  (repo / 'code.py').write_text('x = 2\n')
  git(repo, 'commit', '-qam', 'second')
  with pytest.raises(reports.StaleResults, match=f'made at commit {made_at}'):
    store(workdir, repo, tmp_path)


def test_a_run_with_uncommitted_changes_is_refused(workdir, repo, tmp_path):
  (repo / 'new_module.py').write_text('y = 1\n')
  finish(workdir, repo)
  with pytest.raises(reports.StaleResults, match='uncommitted changes'):
    store(workdir, repo, tmp_path)


def test_a_run_that_reused_earlier_invocations_needs_allow_resumed(workdir, repo, tmp_path):
  # The rerun that skipped every finished stage: 12 s of wall time, 900 s of stages.
  finish(workdir, repo, seconds_ago=12, compute_seconds=900)
  with pytest.raises(reports.StaleResults, match='earlier invocations'):
    store(workdir, repo, tmp_path)
  stored = store(workdir, repo, tmp_path, allow_resumed=True)
  with open(os.path.join(stored, 'report.md')) as f:
    assert '15.0 min summed over resumed invocations' in f.read()


def test_a_report_name_that_is_a_path_is_refused(workdir, repo, tmp_path):
  finish(workdir, repo)
  with pytest.raises(ValueError, match="report name '../main_job'"):
    reports.store(str(workdir), '../main_job', str(tmp_path / 'reports'), str(repo))
  assert not os.path.exists(tmp_path / 'main_job')


def test_a_run_not_newer_than_the_stored_one_is_refused(workdir, repo, tmp_path):
  finish(workdir, repo)
  store(workdir, repo, tmp_path)
  with pytest.raises(reports.StaleResults, match='already holds a run finished'):
    store(workdir, repo, tmp_path)
  newer = finish(workdir, repo)
  assert reports.load(store(workdir, repo, tmp_path))['finished'] == newer['finished']


def test_readme_section_is_regenerated_between_its_markers_only(workdir, repo, tmp_path):
  finish(workdir, repo)
  stored = store(workdir, repo, tmp_path)
  readme = tmp_path / 'README.md'
  before, after = 'Intro, 73 % from scratch.\n\n', '\n\nRead honestly: 42 %.\n'
  readme.write_text(f'{before}{reports.BEGIN}\n| M_0 | 9.999 | 12.3% |\n{reports.END}{after}')
  assert reports.update_readme(str(readme), stored)
  text = readme.read_text()
  assert text.startswith(before + reports.BEGIN + '\n') and text.endswith(reports.END + after)
  section = text[len(before + reports.BEGIN):-len(reports.END + after)]
  assert '9.999' not in section
  assert '[reports/main_job](reports/main_job/report.md)' in section
  for row in ('| model | held-out speech loss | transcription WER |',
              '| M_0 | 13.536 | 99.5% |', '| dpo | 1.478 | 50.0% |',
              '| chance (most common answer) | – | 88.1% |',
              '| method | alpha | knowledge_text_loss |', '| linear | 1.0000 | 2.9014 |'):
    assert f'\n{row}\n' in section, row
  # 1.478 / 1.314 - 1 = +12.48 %.
  assert ('reward accuracy 76.7% on the held-out pairs, the chosen answer more likely than the '
          'rejected one in text 90.0% -> 88.3% and in speech 78.3% -> 76.7%; held-out SFT loss '
          '1.314 -> 1.478 (+12.5%).') in section
  assert not reports.update_readme(str(readme), stored)
  assert readme.read_text() == text


@pytest.mark.parametrize('markers', [
    [reports.BEGIN], [reports.END], [reports.END, reports.BEGIN],
    [reports.BEGIN, reports.BEGIN, reports.END]])
def test_readme_without_one_pair_of_markers_is_refused(workdir, repo, tmp_path, markers):
  finish(workdir, repo)
  stored = store(workdir, repo, tmp_path)
  readme = tmp_path / 'README.md'
  readme.write_text('\n'.join(['Intro.', *markers, 'Outro.']))
  with pytest.raises(ValueError, match='needs one <!-- report:begin --> line and one'):
    reports.update_readme(str(readme), stored)
  assert readme.read_text() == '\n'.join(['Intro.', *markers, 'Outro.'])


def test_readme_command_line(workdir, repo, tmp_path):
  finish(workdir, repo)
  store(workdir, repo, tmp_path)
  readme = tmp_path / 'README.md'
  readme.write_text(f'{reports.BEGIN}\nold\n{reports.END}\n')
  cli = lambda *args: subprocess.run(
      [sys.executable, '-m', 'fac_jax.pipeline.reports', 'readme', f'--readme={readme}',
       f'--reports={tmp_path / "reports"}', *args], capture_output=True, text=True,
      cwd=paths.REPO)
  out = cli('--check')
  assert out.returncode == 1 and 'is out of date' in out.stderr
  assert cli().returncode == 0 and '| M_0 | 13.536 | 99.5% |' in readme.read_text()
  assert cli('--check').returncode == 0
  readme.write_text('no markers\n')
  out = cli()
  assert out.returncode == 1 and 'error:' in out.stderr and 'Traceback' not in out.stderr
