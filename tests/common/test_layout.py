"""The package layout: every module imports only from its own stage or a stage before it, in the
order fac_jax/__init__.py documents, and every file and folder says what it is for."""

import ast
import os
import re

import paths

import fac_jax

PACKAGE = os.path.join(paths.REPO, 'fac_jax')


def documented_order() -> list[str]:
  """The stages in the order of fac_jax/__init__.py's table: '' is the top-level shared modules."""
  stages = re.findall(r'^  (\(top\)|[a-z_]+/)\s', fac_jax.__doc__, re.M)
  return ['' if s == '(top)' else s.rstrip('/') for s in stages]


def stage_of(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 2 or os.path.isdir(os.path.join(PACKAGE, parts[-1])) else ''


def imports(path: str, module: str) -> list[str]:
  """The fac_jax modules (or packages) `path` imports, absolute."""
  found = []
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found += [a.name for a in node.names if a.name.startswith('fac_jax')]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('fac_jax'):
      for alias in node.names:
        candidate = f'{node.module}.{alias.name}'
        is_module = os.path.exists(os.path.join(paths.REPO, *candidate.split('.')) + '.py') or \
            os.path.isdir(os.path.join(paths.REPO, *candidate.split('.')))
        found.append(candidate if is_module else node.module)
  return found


def all_modules():
  for root, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, paths.REPO)[:-3].replace(os.sep, '.')
        yield path, rel.removesuffix('.__init__')


def test_the_documented_order_names_every_folder():
  folders = sorted(d for d in os.listdir(PACKAGE)
                   if os.path.isfile(os.path.join(PACKAGE, d, '__init__.py')))
  assert sorted(documented_order()[1:]) == folders


def test_no_module_imports_a_later_stage():
  order = documented_order()
  rank = {stage: i for i, stage in enumerate(order)}
  upward = []
  for path, module in all_modules():
    own = rank[stage_of(module)]
    for target in imports(path, module):
      if target == 'fac_jax':
        continue
      if rank[stage_of(target)] > own:
        upward.append(f'{module} imports {target}')
  assert not upward, upward


def test_the_order_check_catches_an_upward_import(tmp_path):
  # The check itself must see an upward import: model/ importing train/.
  source = tmp_path / 'bad.py'
  source.write_text('from fac_jax.train import steps\n')
  targets = imports(str(source), 'fac_jax.model.bad')
  order = documented_order()
  assert order.index(stage_of(targets[0])) > order.index(stage_of('fac_jax.model.bad'))


def test_every_file_starts_with_a_docstring():
  missing = [module for path, module in all_modules()
             if not ast.get_docstring(ast.parse(open(path).read()))]
  assert not missing, missing
