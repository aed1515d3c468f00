"""Benchmark: import and export of a synthetic official checkpoint of a few GB; prints wall time
and peak resident memory of each run next to the size of the largest tensor, and checks that the
export gives back the original tensors bit for bit.

  python benchmarks/convert_memory.py [--workdir=/tmp/convert_bench] [--layers=2]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def official_config(layers: int) -> dict:
  """The 8B widths (DESIGN.md) with few layers, stored in bfloat16."""
  from fac_jax import config as config_lib
  from fac_jax.checkpoints import official_layout
  template = os.path.join(REPO, 'tests', 'testdata', 'official_tiny', 'config.json')
  with open(template) as f:
    hf = json.load(f)
  cfg = config_lib.default_config().model
  for stack in (cfg.llm, cfg.speech_refined_head, cfg.encoder):
    stack.num_layers = layers
  hf = official_layout.config_to_official(cfg, hf)
  hf['text_config'].update(eos_token_id=cfg.tokens.endoftext, bos_token_id=cfg.tokens.endoftext)
  hf['torch_dtype'] = 'bfloat16'
  return hf


def write_synthetic(folder: str, layers: int) -> None:
  """Random bfloat16 tensors in the official layout, written one at a time; prints the total and
  largest tensor sizes as JSON."""
  import ml_dtypes
  import numpy as np
  from flax import nnx
  from fac_jax import config as config_lib
  from fac_jax.checkpoints import official_layout, safetensors_io
  from fac_jax.model import fun_audio_chat
  os.makedirs(folder)
  hf = official_config(layers)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(hf, f)
  cfg = official_layout.config_from_official(hf, config_lib.default_config().model)
  _, state = nnx.split(fun_audio_chat.abstract_model(cfg))
  shapes = nnx.to_pure_dict(state)
  plan = []
  for m in official_layout.fun_audio_chat_maps(cfg):
    shape = official_layout.at_path(shapes, m.path).shape
    plan += [(k, official_layout.official_shape(shape, m), np.dtype(ml_dtypes.bfloat16))
             for k in m.keys]
  rng = np.random.default_rng(0)
  arrays = (rng.integers(0, 0x3F80, size=shape, dtype=np.uint16).view(ml_dtypes.bfloat16)
            for _, shape, _ in plan)
  safetensors_io.write_sharded(folder, safetensors_io.plan_shards(plan, 2 << 30), arrays)
  sizes = [int(np.prod(shape)) * 2 for _, shape, _ in plan]
  print(json.dumps({'total': sum(sizes), 'largest': max(sizes)}))


def round_trip_differences(original: str, exported: str) -> tuple[int, list[str]]:
  """The number of tensors in `original`, and those that `exported` lacks or holds with another
  dtype, shape or bytes; both are read with the `safetensors` library, not the code measured."""
  import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which the library's reader needs)
  from safetensors import safe_open

  def tensors(folder):
    with open(os.path.join(folder, 'model.safetensors.index.json')) as f:
      weight_map = json.load(f)['weight_map']
    files = {name: safe_open(os.path.join(folder, name), 'np') for name in set(weight_map.values())}
    return {key: files[name] for key, name in weight_map.items()}

  theirs, ours = tensors(original), tensors(exported)
  differ = []
  for key, file in sorted(theirs.items()):
    a = file.get_tensor(key)
    b = ours[key].get_tensor(key) if key in ours else None
    if b is None or a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
      differ.append(key)
  return len(theirs), differ


def measure(argv: list[str], stdout=subprocess.DEVNULL) -> tuple[float, int]:
  """Wall seconds and peak RSS bytes of a child process. This parent imports nothing heavy, so
  the child's peak is its own (a forked child starts with its parent's resident pages)."""
  start = time.time()
  process = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.DEVNULL, cwd=REPO)
  _, status, usage = os.wait4(process.pid, 0)
  if status:
    raise SystemExit(f'{" ".join(argv)} failed with status {status}')
  return time.time() - start, usage.ru_maxrss * 1024


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', default='/tmp/convert_bench')
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--write_synthetic', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.write_synthetic:
    sys.path.insert(0, REPO)
    write_synthetic(args.write_synthetic, args.layers)
    return
  shutil.rmtree(args.workdir, ignore_errors=True)
  hf_dir, ckpt, exported = (os.path.join(args.workdir, n) for n in ('hf', 'ckpt', 'exported'))
  py = sys.executable
  sizes_file = os.path.join(args.workdir + '.sizes.json')
  with open(sizes_file, 'w') as out:
    measure([py, os.path.abspath(__file__), f'--write_synthetic={hf_dir}',
             f'--layers={args.layers}'], stdout=out)
  with open(sizes_file) as f:
    sizes = json.loads(f.read().strip().splitlines()[-1])
  os.remove(sizes_file)
  total, largest = sizes['total'], sizes['largest']
  _, baseline = measure([py, '-c', 'import jax, orbax.checkpoint, fac_jax.checkpoints.convert; '
                         'jax.numpy.zeros(1).block_until_ready()'])
  convert = [py, '-m', 'fac_jax.checkpoints.convert']
  import_time, import_rss = measure(convert + ['import', f'--hf_dir={hf_dir}', f'--out={ckpt}'])
  export_time, export_rss = measure(convert + ['export', f'--ckpt={ckpt}', f'--out={exported}'])
  # Read here, after every measured child has exited: the parent's memory no longer matters.
  count, differ = round_trip_differences(hf_dir, exported)
  gb = lambda b: f'{b / 2**30:.2f} GiB'
  rows = [('checkpoint (bfloat16)', gb(total)), ('largest tensor', gb(largest)),
          ('process baseline RSS (jax + fac_jax imported)', gb(baseline)),
          ('import wall time', f'{import_time:.1f} s'), ('import peak RSS', gb(import_rss)),
          ('import peak RSS - baseline', gb(import_rss - baseline)),
          ('export wall time', f'{export_time:.1f} s'), ('export peak RSS', gb(export_rss)),
          ('export peak RSS - baseline', gb(export_rss - baseline)),
          ('round trip: tensors exported bit for bit', f'{count - len(differ)} of {count}')]
  width = max(len(r[0]) for r in rows)
  print(f'| {"what".ljust(width)} | value |\n|{"-" * (width + 2)}|-------|')
  for name, value in rows:
    print(f'| {name.ljust(width)} | {value} |')
  shutil.rmtree(args.workdir, ignore_errors=True)
  if differ:
    raise SystemExit(f'{len(differ)} tensors differ after import and export, first: {differ[:5]}')


if __name__ == '__main__':
  main()
