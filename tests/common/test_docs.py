"""The documentation runs as written: README.md keeps the set-up commands CI runs; every command in
README.md and docs/*.md that runs a fac_jax module names one with a command line and only flags it
defines (config overrides and config files included); every repository path, fac_jax name and
relative link in them exists."""

import ast
import concurrent.futures
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import paths

README = os.path.join(paths.REPO, 'README.md')
PAGES = [README] + sorted(glob.glob(os.path.join(paths.REPO, 'docs', '*.md')))
# The repository's own top-level folders: a word that starts with one of them is a path in it.
REPO_FOLDERS = ('.ci', 'benchmarks', 'configs', 'docs', 'fac_jax', 'launch', 'notebooks',
                'reports', 'tests')
SETUP_PREFIX = 'apt-get update -qq && '
SHELL_OPERATORS = {'&&', '||', ';', '|', '>', '>>', '<', '2>&1'}
PLACEHOLDER = re.compile(r'[<>*{}]|\.\.\.')
DOTTED_NAME = re.compile(r'\bfac_jax(?:\.\w+)+')
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')

# Run in a fresh interpreter per module: runs it as `python -m` would, with absl.app.run replaced
# so that the flags get defined and nothing runs; then checks each command's flags against them.
CHECKER = r'''
import ast, json, os, re, runpy, sys
from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_lib

module, commands = sys.argv[1], json.loads(sys.argv[2])
entered = []
app.run = lambda main, *args, **kwargs: entered.append(main)
sys.argv = [module]
runpy.run_module(module, run_name='__main__', alter_sys=True)
defined = flags.FLAGS
problems = [] if entered else [f'{module}: running it does not reach absl.app.run']
for where, args in commands:
  config_args = {}
  for arg in (a for a in args if a.startswith('--')):
    name = arg[2:].split('=', 1)[0]
    base = name.split('.', 1)[0]
    if base in defined and config_flags_lib.is_config_flag(defined[base]):
      config_args.setdefault(base, []).append(arg)
    elif name not in defined and not (name.startswith('no') and name[2:] in defined
                                      and defined[name[2:]].boolean):
      problems.append(f'{where}: --{name} is not a flag of {module}')
  for name, given in config_args.items():
    # configs/finetune.py:CKPT reads CKPT's model: the docs' example path stands for a real one.
    given = [re.sub(r'(finetune\.py:)[^,]+', lambda m: m.group(1) + os.environ['DOCS_CHECKPOINT'], a)
             for a in given]
    if not any(a.startswith(f'--{name}=') for a in given):
      given = [f'--{name}={ast.literal_eval(defined[name].default_as_str)}'] + given
    argv = [module] + given
    fresh = flags.FlagValues()
    config_flags.DEFINE_config_file(name, None, flag_values=fresh, sys_argv=argv)
    try:
      fresh(argv)
    except Exception as error:  # whatever stops the config loading stops the command
      problems.append(f'{where}: {" ".join(given)}: {type(error).__name__}: {error}')
print('CHECKED ' + json.dumps(problems))
'''


def fenced_lines(text: str) -> list[tuple[int, str]]:
  """(line number, line) inside ``` blocks, a line ending in a backslash joined with the next."""
  found, inside, pending = [], False, None
  for number, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith('```'):
      inside = not inside
    elif inside:
      start, joined = pending or (number, '')
      joined += line
      if line.endswith('\\'):
        pending = (start, joined[:-1])
      else:
        found.append((start, joined))
        pending = None
  return found


def prose(text: str) -> str:
  """The text outside ``` blocks."""
  return re.sub(r'^\s*```.*?^\s*```[^\n]*$', '', text, flags=re.S | re.M)


def module_command(line: str) -> tuple[str, list[str]] | None:
  """(module, its arguments) when the line runs `python -m fac_jax...` or hands a fac_jax module
  to a launcher in launch/; optional arguments lose their [brackets]."""
  if 'fac_jax' not in line:
    return None
  words = shlex.split(line)
  for i, word in enumerate(words):
    if re.fullmatch(r'fac_jax(\.\w+)*', word) and i and (
        words[i - 1] == '-m' or any(w.startswith('launch/') for w in words[:i])):
      args = []
      for arg in words[i + 1:]:
        if arg in SHELL_OPERATORS:
          break
        args.append(arg.strip('[]'))
      return word, args
  return None


def doc_commands(pages: list[str]) -> dict[str, list[tuple[str, list[str]]]]:
  """Module -> [('file:line', arguments)] of every command in the pages' ``` blocks."""
  commands = {}
  for page in pages:
    for number, line in fenced_lines(open(page).read()):
      found = module_command(line)
      if found:
        where = f'{os.path.relpath(page, paths.REPO)}:{number}'
        commands.setdefault(found[0], []).append((where, found[1]))
  return commands


def is_program(module: str) -> bool:
  """Whether `python -m module` has a file to run: module.py, or a package's __main__.py."""
  path = os.path.join(paths.REPO, *module.split('.'))
  return os.path.isfile(path + '.py') or os.path.isfile(os.path.join(path, '__main__.py'))


def check_commands(module: str, commands: list[tuple[str, list[str]]],
                   checkpoint: str = '') -> list[str]:
  """What is wrong with running `module` with each list of arguments; [] when nothing is.
  `checkpoint` stands for the one a `configs/finetune.py:CKPT` argument names."""
  if not is_program(module):
    return [f'{where}: {module} is not a module with a command line' for where, _ in commands]
  out = subprocess.run([sys.executable, '-c', CHECKER, module, json.dumps(commands)],
                       cwd=paths.REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, DOCS_CHECKPOINT=checkpoint))
  reports = [l for l in out.stdout.splitlines() if l.startswith('CHECKED ')]
  if out.returncode or not reports:
    return [f'{module}: the check failed: {out.stderr[-2000:]}']
  return json.loads(reports[-1][len('CHECKED '):])


def slug(heading: str) -> str:
  """GitHub's anchor of a heading."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(page: str) -> set[str]:
  return {slug(line.lstrip('#')) for line in prose(open(page).read()).splitlines()
          if line.startswith('#')}


def top_level_names(path: str) -> set[str]:
  """Names a module defines or imports at its top level."""
  names = set()
  for node in ast.parse(open(path).read()).body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names.update(t.id for t in targets if isinstance(t, ast.Name))
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split('.')[0] for a in node.names)
  return names


def dotted_name_exists(name: str) -> bool:
  """fac_jax.<package>...<module>[.<top-level name>] names a file, and a name defined in it."""
  path = paths.REPO
  parts = name.split('.')
  for i, part in enumerate(parts):
    if os.path.isdir(os.path.join(path, part)):
      path = os.path.join(path, part)
    elif os.path.isfile(os.path.join(path, part + '.py')):
      module = os.path.join(path, part + '.py')
      return i + 1 == len(parts) or parts[i + 1] in top_level_names(module)
    else:
      init = os.path.join(path, '__init__.py')
      return os.path.isfile(init) and part in top_level_names(init)
  return True


def repo_paths(words: list[str]) -> list[str]:
  """The words that are paths in this repository: flag values included, `:arg` suffixes and
  [brackets] dropped, placeholders skipped."""
  found = []
  for word in words:
    word = word.strip('[]').split('=')[-1].split(':')[0].rstrip('.,;')
    if word.split('/')[0] in REPO_FOLDERS and '/' in word and not PLACEHOLDER.search(word):
      found.append(word)
  return found


def missing_references(text: str, page: str) -> list[str]:
  """Repository paths, fac_jax names and relative links of one page that do not exist."""
  missing = []
  spans = re.findall(r'`([^`\n]+)`', prose(text))
  words = [w for span in spans for w in span.split()]
  words += [w for _, line in fenced_lines(text) for w in line.split()]
  missing += [f'path {p}' for p in repo_paths(words)
              if not os.path.exists(os.path.join(paths.REPO, p))]
  missing += [f'name {n}' for n in sorted(set(DOTTED_NAME.findall(text)))
              if not dotted_name_exists(n)]
  for target in LINK.findall(prose(text)):
    if re.match(r'[a-z]+:', target):
      continue
    file, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
    if not os.path.exists(resolved):
      missing.append(f'link {target}')
    elif anchor and resolved.endswith('.md') and anchor not in anchors(resolved):
      missing.append(f'link {target} (no such heading)')
  return missing


COMMANDS = doc_commands(PAGES)


@pytest.fixture(scope='module')
def command_problems(tmp_path_factory):
  """Every documented module checked, in parallel: module -> problems."""
  from flax import nnx
  from fac_jax import config as config_lib
  from fac_jax.checkpoints import checkpoint
  from fac_jax.model import fun_audio_chat
  cfg = config_lib.load(paths.TINY_CONFIG)
  tiny = checkpoint.save_params(str(tmp_path_factory.mktemp('docs') / 'ckpt'), cfg.model,
                                nnx.to_pure_dict(nnx.state(fun_audio_chat.create(cfg.model))))
  workers = max(2, min(4, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {m: pool.submit(check_commands, m, c, tiny) for m, c in COMMANDS.items()}
    return {m: f.result() for m, f in futures.items()}


def test_readme_has_the_set_up_commands_ci_runs():
  ci = [l for l in open(os.path.join(paths.REPO, '.ci', 'run')).read().splitlines()
        if l.startswith(SETUP_PREFIX)]
  readme = [l for _, l in fenced_lines(open(README).read()) if l.startswith(SETUP_PREFIX)]
  assert len(ci) == 1 and len(readme) == 2, (ci, readme)
  assert readme[1] == ci[0]
  # The main job's set-up installs the same way, without the test requirements.
  assert readme[0].split(' -r ')[0] == readme[1].split(' -r ')[0]
  assert ' -r requirements.txt -e . && ' in readme[0]


def test_readme_marks_the_report_for_regeneration():
  text = open(README).read()
  assert text.count('<!-- report:begin -->') == 1 and text.count('<!-- report:end -->') == 1
  report = text.split('<!-- report:begin -->')[1].split('<!-- report:end -->')[0]
  assert '| model |' in report and 'DPO' in report


def test_the_docs_run_commands():
  assert {'fac_jax.pipeline', 'fac_jax.train.trainer', 'fac_jax.inference.chat'} <= set(COMMANDS)


@pytest.mark.parametrize('module', sorted(COMMANDS))
def test_documented_commands_use_flags_the_module_defines(module, command_problems):
  assert not command_problems[module], '\n'.join(command_problems[module])


def test_the_command_check_reports_what_a_module_does_not_define():
  problems = check_commands('fac_jax.train.trainer', [
      ('a', ['--config=configs/tiny.py:stage1', '--workdir=w', '--made_up_flag=1',
             '--nomultihost', '--noworkdir']),
      ('b', ['--config=configs/tiny.py', '--config.train.made_up_field=1']),
      ('c', ['--config=configs/tiny.py:made_up_stage', '--workdir=w'])])
  assert [p[:2] for p in problems] == ['a:', 'a:', 'b:', 'c:'], problems
  assert 'made_up_flag' in problems[0] and 'noworkdir' in problems[1], problems
  assert 'made_up_field' in problems[2], problems
  assert check_commands('fac_jax.train', [('d', [])]) == [
      'd: fac_jax.train is not a module with a command line']


def test_the_line_parser_finds_commands_and_launchers():
  assert module_command('.venv/bin/python -m fac_jax.duplex --ckpt=C [--seed=0] && ls') == (
      'fac_jax.duplex', ['--ckpt=C', '--seed=0'])
  assert module_command('sbatch --nodes=4 launch/slurm.sbatch fac_jax.train.trainer --x=1') == (
      'fac_jax.train.trainer', ['--x=1'])
  assert module_command('see fac_jax.train.trainer --x=1') is None


@pytest.mark.parametrize('page', PAGES, ids=lambda p: os.path.relpath(p, paths.REPO))
def test_paths_names_and_links_exist(page):
  missing = missing_references(open(page).read(), page)
  assert not missing, missing


def test_the_reference_check_reports_what_is_missing():
  text = ('See `fac_jax/no_such.py`, `fac_jax/train/` and `tests/<stage>/`, '
          '`fac_jax.train.no_such_name`, `fac_jax.train.trainer.run`, [a](no_such.md), '
          '[b](README.md#no-such-heading), [c](training.md#speed) and [d](https://example.com).'
          '\n\n```\n.venv/bin/python benchmarks/no_such.py --config=configs/tiny.py:stage1\n```\n')
  page = os.path.join(paths.REPO, 'docs', 'page.md')
  assert missing_references(text, page) == [
      'path fac_jax/no_such.py', 'path benchmarks/no_such.py', 'name fac_jax.train.no_such_name',
      'link no_such.md', 'link README.md#no-such-heading (no such heading)']
