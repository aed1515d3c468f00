"""Benchmark: the streaming merge (linear, 2 inputs) of two synthetic checkpoints of a few GB
against the I/O floor; prints a markdown table of wall time, peak resident memory and throughput.

  python benchmarks/merge_memory.py [--workdir=/tmp/merge_bench] [--layers=3]

Each checkpoint holds `layers` float32 decoder layers of the 8B widths, stacked as the model
stacks them (736 MiB a layer). Every run is a fresh process started with the inputs evicted from
the page cache. The I/O floor reads both inputs' files and writes one of them again with plain
file calls: the bytes a merge must move, with no decoding, computing or encoding.
"""

import argparse
import json
import os
import shutil
import sys

from convert_memory import REPO, measure

HIDDEN, KV, MLP = 4096, 1024, 12288  # the 8B LLM: 32 query heads and 8 kv heads of 128
KERNELS = {('attention', 'q_proj'): (HIDDEN, HIDDEN), ('attention', 'k_proj'): (HIDDEN, KV),
           ('attention', 'v_proj'): (HIDDEN, KV), ('attention', 'o_proj'): (HIDDEN, HIDDEN),
           ('mlp', 'gate_proj'): (HIDDEN, MLP), ('mlp', 'up_proj'): (HIDDEN, MLP),
           ('mlp', 'down_proj'): (MLP, HIDDEN)}
CHUNK_BYTES = 64 << 20


def write_synthetic(folder: str, layers: int, seed: int) -> None:
  """A checkpoint of random float32 stacked kernels, written leaf by leaf; prints the total and
  largest leaf sizes as JSON."""
  sys.path.insert(0, REPO)
  import jax.numpy as jnp
  import numpy as np
  from fac_jax.checkpoints import checkpoint
  from fac_jax import config as config_lib
  rng = np.random.default_rng(seed)
  writer = checkpoint.Writer(folder, config_lib.default_config().model)
  sizes = []
  for (group, name), shape in KERNELS.items():
    leaf = rng.standard_normal((layers,) + shape, np.float32)
    writer.add(('llm', 'decoder', 'layers', group, name, 'kernel'), jnp.asarray(leaf))
    sizes.append(leaf.nbytes)
    del leaf
  writer.commit()
  print(json.dumps({'total': sum(sizes), 'largest': max(sizes)}))


def files_under(folder: str) -> list[str]:
  return sorted(os.path.join(d, n) for d, _, names in os.walk(folder) for n in names)


def io_floor(first: str, second: str, out: str) -> None:
  """Reads every file of both checkpoints and writes the second's again under `out`."""
  for path in files_under(first):
    with open(path, 'rb') as f:
      while f.read(CHUNK_BYTES):
        pass
  for path in files_under(second):
    target = os.path.join(out, os.path.relpath(path, second))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(path, 'rb') as f, open(target, 'wb') as g:
      while chunk := f.read(CHUNK_BYTES):
        g.write(chunk)


def evict_from_page_cache(folders: list[str]) -> None:
  os.sync()
  for path in (p for folder in folders for p in files_under(folder)):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', default='/tmp/merge_bench')
  parser.add_argument('--layers', type=int, default=3)
  parser.add_argument('--write_synthetic', help=argparse.SUPPRESS)
  parser.add_argument('--seed', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--io_floor', nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.write_synthetic:
    write_synthetic(args.write_synthetic, args.layers, args.seed)
    return
  if args.io_floor:
    io_floor(*args.io_floor)
    return
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  base, finetuned, merged, floor_out, copied = (
      os.path.join(args.workdir, n) for n in ('base', 'finetuned', 'merged', 'floor', 'copied'))
  py, script = sys.executable, os.path.abspath(__file__)
  sizes_file = os.path.join(args.workdir, 'sizes.json')
  for seed, folder in enumerate((base, finetuned)):
    with open(sizes_file, 'w') as out:
      measure([py, script, f'--write_synthetic={folder}', f'--layers={args.layers}',
               f'--seed={seed}'], stdout=out)
  with open(sizes_file) as f:
    sizes = json.loads(f.read().strip().splitlines()[-1])
  total, largest = sizes['total'], sizes['largest']
  on_disk = sum(os.path.getsize(p) for p in files_under(finetuned))

  def timed(argv):
    evict_from_page_cache([base, finetuned])
    return measure(argv)

  start_time, baseline = timed([py, '-c', 'import jax, fac_jax.merging.merge; '
                                'jax.numpy.zeros(1).block_until_ready()'])
  merge_time, merge_rss = timed([py, '-m', 'fac_jax.merging.merge', '--method=linear', '--alpha=0.5',
                                 f'--base={base}', f'--finetuned={finetuned}', f'--out={merged}'])
  floor_time, floor_rss = timed([py, script, '--io_floor', base, finetuned, floor_out])
  copy_time, copy_rss = timed([py, '-c', f'import shutil; shutil.copytree({finetuned!r}, '
                               f'{copied!r})'])

  gib = lambda b: f'{b / 2**30:.2f} GiB'
  print(f'two float32 checkpoints of {gib(total)} each ({gib(on_disk)} on disk), largest leaf '
        f'{gib(largest)}; process with jax and fac_jax.merging.merge imported: {gib(baseline)} RSS, '
        f'{start_time:.1f} s to start\n')
  print('| run | wall time | peak RSS | peak RSS over the baseline, in largest leaves | '
        'bytes read + written | GB/s | time / I/O floor |\n|---|---|---|---|---|---|---|')
  merge_over = f'{gib(merge_rss - baseline)} = {(merge_rss - baseline) / largest:.1f}'
  for name, seconds, rss, over, moved in [
      ('streaming merge (linear, 2 inputs)', merge_time, merge_rss, merge_over, 3 * total),
      ('I/O floor (read both, write one)', floor_time, floor_rss, '', 3 * on_disk),
      ('shutil.copytree of one input', copy_time, copy_rss, '', 2 * on_disk)]:
    print(f'| {name} | {seconds:.1f} s | {gib(rss)} | {over} | {gib(moved)} | '
          f'{moved / seconds / 1e9:.2f} | {seconds / floor_time:.2f} |')
  shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == '__main__':
  main()
