"""Markdown tables of stored ahead-of-time reports (fac_jax.scale.aot's JSON), so the tables in
README.md, docs/scale.md and reports/aot/report.md are made from the tool's output, never typed:

  python -m fac_jax.scale.aot_table --reports=reports/aot --write=README.md,docs/scale.md

prints the tables, and with --write puts them between the <!-- aot:begin --> and <!-- aot:end -->
lines of those pages. The folder's rows.json lists the rows in order: {"file": one report's
JSON, "code": what code it compiled}. Train rows, DRSR rows (train rows at another speech group
size), LoRA rows (train rows with adapters) and inference rows (decode reports, which carry their
prefill) go to four tables.
"""

import ast
import json
import os
import shlex

from absl import app, flags

from fac_jax import config as config_lib, files, fingerprint

GIB = 1 << 30
H100_BYTES = 80 * GIB
ROWS_FILE = 'rows.json'
FIT_SHARE = 0.9  # the target: fits with 10 % of HBM to spare
BEGIN, END = '<!-- aot:begin -->', '<!-- aot:end -->'


def load_rows(folder: str, root: str) -> list[tuple]:
  """(row entry, report, the config it compiled) for each entry of FOLDER/rows.json; the files
  named there must lie in FOLDER."""
  index = os.path.join(folder, ROWS_FILE)
  try:
    with open(index) as f:
      entries = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{index}: a JSON list of {{"file", "code"}} rows is expected ({e})') from None
  rows = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict) or not {'file', 'code'} <= set(entry):
      raise ValueError(f'{index}: row {i} needs "file" and "code", got {entry!r}')
    if not files.is_plain_name(entry['file']):
      raise ValueError(f'{index}: row {i} "file" must name a file in {folder}, got {entry["file"]!r}')
    with open(os.path.join(folder, entry['file'])) as f:
      report = json.load(f)
    rows.append((entry, report, config_of(report['command'], root)))
  return rows


def config_of(command: str, root: str):
  """The config a report's command compiled: its --config file (relative to `root`, the
  repository) with the command's --config.<field>=<value> overrides applied."""
  config, overrides = None, {}
  for part in shlex.split(command):
    name, _, value = part.partition('=')
    if name == '--config':
      config = config_lib.load(os.path.join(root, value))
    elif name.startswith('--config.'):
      overrides[name[len('--config.'):]] = value
  if config is None:
    raise ValueError(f'{command!r}: no --config=FILE[:stage]')
  for field, value in overrides.items():
    current = config
    *parents, leaf = field.split('.')
    for parent in parents:
      current = current[parent]
    old = current[leaf]
    current[leaf] = value if isinstance(old, str) else type(old)(ast.literal_eval(value))
  return config


def _mesh(report: dict) -> str:
  return ', '.join(f'{axis} {size}' for axis, size in report['mesh'].items() if size > 1) or '1 chip'


def _gib(size: float) -> str:
  return f'{size / GIB:.2f}'


def _memory(report: dict) -> str:
  m = report['memory_per_chip_bytes']
  return f"{_gib(m['total'])} ({_gib(m['arguments'])} + {_gib(m['temporaries'])} + {_gib(m['code'])})"


def _fits(report: dict) -> tuple[str, str]:
  """(share of HBM, fits under the target): a program the compiler refused never fits."""
  fits = report['fits'] and report['hbm_share'] <= FIT_SHARE
  return (f"{100 * report['hbm_share']:.0f} % of {report['hbm_bytes'] / GIB:.0f}",
          'yes' if fits else 'no, refused by the compiler' if report['compiler_refused'] else 'no')


def _mfu(report: dict) -> str:
  if not report['fits']:
    return 'n/a'
  roof = report['roofline_estimate']
  return f"{100 * roof['mfu']:.0f} % ({roof['bound_by']}-bound)"


def _model(report: dict) -> str:
  """The config file a report compiled, e.g. fac_8b."""
  config = next(part for part in shlex.split(report['command']) if part.startswith('--config='))
  return os.path.splitext(os.path.basename(config.split('=', 1)[1].split(':')[0]))[0]


def _step(report: dict) -> str:
  return f"{report['roofline_estimate']['step_s']:.2f} s" if report['fits'] else 'n/a'


def _wall(report: dict) -> str:
  seconds = round(report['compile_seconds'])
  return f'{seconds // 60}:{seconds % 60:02d}'


def train_table(rows) -> str:
  lines = ['| model | slice | code | mesh | remat | micro-batches | rows a chip | per-chip GiB (args + temps'
           ' + code) | of HBM | fits (<= 90 %) | estimated step | estimated MFU | compile wall |',
           '|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|']
  for entry, r, cfg in rows:
    if r['program'] != 'train' or cfg.model.speech.group_size != 5 or cfg.train.lora.rank:
      continue
    share, fits = _fits(r)
    lines.append(f"| {_model(r)} | {r['topology']} | {entry['code']} | {_mesh(r)} | "
                 f"{r['remat_policy']} | "
                 f"{cfg.train.grad_accum_steps} | {r['rows_per_chip']:g} | {_memory(r)} | {share} | {fits} | "
                 f"{_step(r)} | {_mfu(r)} | {_wall(r)} |")
  return '\n'.join(lines)


def drsr_table(rows) -> str:
  """Train rows at group size 1 beside the group-size-5 row of the same slice, code and remat."""
  lines = ['| slice | k (speech codes a LLM position) | LLM positions a row | per-chip GiB | of HBM |'
           ' model FLOPs a step | estimated step | k=1 / k=5 |',
           '|---|---:|---:|---:|---:|---:|---:|---|']
  by_key = {}
  for _, r, cfg in rows:
    if r['program'] == 'train' and cfg.train.grad_accum_steps == 1 and not cfg.train.lora.rank:
      by_key.setdefault((r['topology'], r.get('commit'), r['remat_policy']), {})[
          cfg.model.speech.group_size] = (r, cfg)
  for (topology, _, _), pair in by_key.items():
    if set(pair) != {1, 5}:
      continue
    k5 = pair[5][0]
    for k in (5, 1):
      r, cfg = pair[k]
      ratio = (f"FLOPs x{r['model_flops_per_step'] / k5['model_flops_per_step']:.2f}, memory "
               f"x{r['memory_per_chip_bytes']['total'] / k5['memory_per_chip_bytes']['total']:.2f}"
               if k == 1 else 'baseline')
      lines.append(f"| {topology} | {k} | {cfg.data.seq_len} | {_gib(r['memory_per_chip_bytes']['total'])}"
                   f" | {_fits(r)[0]} | {r['model_flops_per_step']:.3e} | "
                   f"{r['roofline_estimate']['step_s']:.2f} s | {ratio} |")
  return '\n'.join(lines)


def fine_tune_table(rows) -> str:
  """Train rows with LoRA adapters (fac_jax.model.lora), with their share of an 80 GiB H100 for a
  one-chip program (a single device holds the same arrays whatever the chip)."""
  lines = ['| model | slice | code | mesh | adapters | base weights | rows a chip (micro-batch) | '
           'per-chip GiB (args + temps + code) | of HBM | fits (<= 90 %) | one chip: of an '
           "H100's 80 GiB |",
           '|---|---|---|---|---|---|---:|---:|---:|---|---:|']
  for entry, r, cfg in rows:
    lora = cfg.train.lora
    if r['program'] != 'train' or not lora.rank:
      continue
    share, fits = _fits(r)
    base = (cfg.model.param_dtype if lora.base_quantization == 'none' else
            f'{lora.base_quantization} (the adapted projections; the rest {cfg.model.param_dtype})')
    h100 = (f"{100 * r['memory_per_chip_bytes']['total'] / H100_BYTES:.0f} %"
            if r['devices'] == 1 else '')
    lines.append(f"| {_model(r)} | {r['topology']} | {entry['code']} | {_mesh(r)} | rank "
                 f"{lora.rank}, alpha {lora.alpha:g} | {base} | "
                 f"{r['rows_per_chip'] / cfg.train.grad_accum_steps:g} | {_memory(r)} | {share} | "
                 f"{fits} | {h100} |")
  return '\n'.join(lines)


def inference_table(rows) -> str:
  lines = ['| slice | code | mesh | weights | sessions x context | decode per-chip GiB (args + '
           'temps + code) | of HBM | fits (<= 90 %) | of which KV caches | prefill per-chip GiB | HBM bytes a 5 Hz step reads | step floor |'
           ' real-time factor floor | first audio floor |',
           '|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|']
  for entry, r, cfg in rows:
    if r['program'] != 'decode':
      continue
    d, roof = r['decode'], r['roofline_estimate']
    prefill = sum(d['prefill_memory_per_chip_bytes'].values())
    weights = r.get('quantize', 'none')
    weights = cfg.model.param_dtype if weights == 'none' else weights
    lines.append(f"| {r['topology']} | {entry['code']} | {_mesh(r)} | {weights} | "
                 f"{d['sessions']} x {d['context_seconds']:g} s | {_memory(r)} | {' | '.join(_fits(r))} | {_gib(d['state_bytes_per_chip'])} | "
                 f"{_gib(prefill)} | {roof['hbm_bytes_per_step'] / GIB:.2f} GiB | "
                 f"{roof['step_s'] * 1e3:.1f} ms | {d['real_time_factor_floor']:.3f} | "
                 f"{d['first_audio_floor_s'] * 1e3:.0f} ms |")
  return '\n'.join(lines)


def tables(folder: str, root: str = fingerprint.REPO) -> str:
  rows = load_rows(folder, root)
  return '\n\n'.join(['Training at the released settings:', train_table(rows),
                      'DRSR (k = 5 against k = 1, the same conversations):', drsr_table(rows),
                      'Fine-tuning with LoRA and QLoRA (stage 1):', fine_tune_table(rows),
                      'Inference:', inference_table(rows)])


FLAGS = flags.FLAGS


def main(argv):
  del argv
  try:
    text = tables(FLAGS.reports)
    print(text)
    for page in FLAGS.write:
      changed = files.replace_section(page, BEGIN, END, text + '\n')
      print(f"{'updated' if changed else 'unchanged'} {page}")
  except (OSError, ValueError) as e:
    raise app.UsageError(str(e)) from None


def run():
  flags.DEFINE_string('reports', os.path.join(fingerprint.REPO, 'reports', 'aot'),
                      'Folder of stored reports with its rows.json.')
  flags.DEFINE_list('write', [], 'Pages whose aot:begin/aot:end section gets the tables.')
  app.run(main)


if __name__ == '__main__':
  run()
