"""The ahead-of-time tool (fac_jax.scale.aot): Cloud names read as chip topologies, collectives
counted from HLO text, and the tiny config's train and decode programs compiled by the TPU
compiler (libtpu) for a 4-chip v5p slice, with a report whose parts agree with each other; and
the tables made from stored reports (fac_jax.scale.aot_table)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

import paths

from fac_jax import files, sharding
from fac_jax.scale import aot, aot_table


@pytest.mark.parametrize('name, generation, grid', [
    ('v5p-128', 'v5p', (4, 4, 4)), ('v6e-64', 'v6e', (8, 8)), ('v5e-256', 'v5e', (16, 16)),
    ('v5litepod-16', 'v5e', (4, 4)), ('v4-32', 'v4', (2, 2, 4)), ('v6e:2x4', 'v6e', (2, 4)),
    ('v5p:2x2x1', 'v5p', (2, 2, 1))])
def test_cloud_names_become_chip_topologies(name, generation, grid):
  parsed_generation, parsed_grid, reading = aot.parse_topology(name)
  assert (parsed_generation, parsed_grid) == (generation, grid)
  assert f'{math.prod(grid)} chips' in reading or f'{math.prod(grid)} {generation} chips' in reading


@pytest.mark.parametrize('name', ['v7x-8', 'v5p-3', 'v5p:4x4', 'tpu', 'v6e-48'])
def test_unknown_or_odd_topologies_are_refused(name):
  with pytest.raises(ValueError, match='--topology'):
    aot.parse_topology(name)


def test_collectives_are_counted_with_their_result_bytes():
  hlo = '\n'.join([
      '  %ag = bf16[64,128]{1,0} all-gather(bf16[16,128]{1,0} %p), dimensions={0}',
      '  %ags = (f32[8]{0}, f32[32]{0}) all-gather-start(f32[8]{0} %q), dimensions={0}',
      '  %agd = f32[32]{0} all-gather-done((f32[8]{0}, f32[32]{0}) %ags)',
      '  %rs = f32[4,4]{1,0} reduce-scatter(f32[16,4]{1,0} %g), dimensions={0}',
      '  %ar = f32[] all-reduce(f32[] %l), to_apply=%add',
      '  %mul = f32[4,4]{1,0} multiply(f32[4,4]{1,0} %a, f32[4,4]{1,0} %b)'])
  found = aot.collectives(hlo)
  assert found['all-gather'] == {'count': 2, 'bytes': 64 * 128 * 2 + 32 * 4}
  assert found['reduce-scatter'] == {'count': 1, 'bytes': 4 * 4 * 4}
  assert found['all-reduce'] == {'count': 1, 'bytes': 4}
  assert found['all-to-all']['count'] == found['collective-permute']['count'] == 0


TINY_SEQ_LEN = 128  # configs/tiny.py's data.seq_len


@pytest.fixture(scope='module')
def reports(tmp_path_factory):
  """The tool run as a user runs it, for train and for decode, on the tiny config."""
  out = tmp_path_factory.mktemp('aot')
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD='1', JAX_PLATFORMS='cpu')
  results = {}
  # DRSR off: one speech code a LLM position, so the same conversations take 5 x the positions.
  no_drsr = ['--config.model.speech.group_size=1', f'--config.data.seq_len={5 * TINY_SEQ_LEN}']
  # The MoE LLM with its experts over 2 chips: megablox's kernel inside the expert shard_map.
  moe = ['--config.mesh.data=1', '--config.mesh.fsdp=2', '--config.mesh.expert=2']
  for name, config, program, extra in (
      ('train', 'stage1', 'train', []),
      ('decode', 'stage1', 'decode', ['--sessions=4', '--context_seconds=20']),
      ('train_k1', 'stage1', 'train', no_drsr),
      ('train_moe', 'stage1,moe', 'train', moe),
      ('train_qlora', 'stage1', 'train', ['--config.train.lora.rank=4',
                                          '--config.train.lora.base_quantization=int8']),
      ('decode_int8', 'stage1', 'decode', ['--sessions=4', '--context_seconds=20',
                                           '--quantize=int8'])):
    path = out / f'{name}.json'
    run = subprocess.run(
        [sys.executable, '-m', 'fac_jax.scale.aot', f'--config={paths.TINY_CONFIG}:{config}',
         '--topology=v5p:2x2x1', f'--program={program}', f'--out={path}', *extra],
        capture_output=True, text=True, env=env, cwd=paths.REPO, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'roofline ESTIMATE' in run.stdout
    results[name] = json.loads(path.read_text())
  results['folder'] = out
  return results


@pytest.mark.parametrize('program', ['train', 'decode'])
def test_report_parts_agree(reports, program):
  report = reports[program]
  assert report['device_kind'].startswith('TPU v5') and report['devices'] == report['chips'] == 4
  assert math.prod(report['mesh'].values()) == report['devices']  # every chip in the mesh
  memory = report['memory_per_chip_bytes']
  assert memory['total'] == sum(v for k, v in memory.items() if k != 'total')
  assert all(v >= 0 for v in memory.values()) and memory['temporaries'] > 0
  # What we place, shard by shard, is what the compiler counts, give or take its layouts: TPU
  # layouts pad each array's last two dims to (8, 128) tiles, which at tiny widths (48) adds up
  # to a third (measured 1.31 on the train step); never less.
  placed = sum(report['arguments_by_kind_bytes'].values())
  assert placed <= memory['arguments'] <= 1.5 * placed
  assert report['fits'] and report['headroom_bytes'] == report['hbm_bytes'] - memory['total']
  shards = report['mesh']['data'] * report['mesh']['fsdp']
  assert report['rows_per_chip'] * shards == report['global_rows']
  roof = report['roofline_estimate']
  assert roof['step_s'] == max(roof['compute_s'], roof['hbm_s'], roof['ici_s']) > 0
  assert 0 < roof['mfu'] <= 1


def test_qlora_holds_moments_of_the_adapters_only_and_an_int8_base(reports):
  full, qlora = reports['train']['arguments_by_kind_bytes'], reports['train_qlora'][
      'arguments_by_kind_bytes']
  # Adam's two moments of every weight against those of rank-4 adapters on the LLM alone.
  assert qlora['optimizer state'] < 0.1 * full['optimizer state']
  # The adapted LLM projections in int8 (plus their scales and the adapters): fewer bytes.
  assert qlora['parameters'] < full['parameters']
  assert reports['train_qlora']['fits']


def test_int8_serving_weights_take_fewer_bytes_than_the_stored_ones(reports):
  plain, int8 = reports['decode'], reports['decode_int8']
  assert int8['quantize'] == 'int8' and plain['quantize'] == 'none'
  assert int8['arguments_by_kind_bytes']['parameters'] < \
      0.7 * plain['arguments_by_kind_bytes']['parameters']
  # The same caches either way: only the weights change.
  assert int8['decode']['state_bytes_per_chip'] == plain['decode']['state_bytes_per_chip']


def test_experts_split_over_chips_exchange_tokens(reports):
  report = reports['train_moe']
  assert report['mesh']['expert'] == 2 and report['fits']
  assert report['collectives']['all-to-all']['count'] > 0


def test_the_train_step_reduces_gradients_across_chips(reports):
  # Data parallel over 4 chips: the gradient (or its pieces) must cross chips.
  found = reports['train']['collectives']
  assert found['all-reduce']['count'] + found['reduce-scatter']['count'] > 0


def test_decode_holds_the_caches_of_every_session(reports):
  decode = reports['decode']
  state = decode['arguments_by_kind_bytes']['decoding state (KV caches)']
  assert state == decode['decode']['state_bytes_per_chip'] > 0
  assert decode['decode']['real_time_factor_floor'] == \
      decode['roofline_estimate']['step_s'] / aot.CODE_SECONDS
  assert decode['decode']['first_audio_floor_s'] > decode['decode']['prefill_floor_s'] > 0
  assert sum(decode['decode']['prefill_memory_per_chip_bytes'].values()) > 0


def test_reports_record_the_commit_they_compiled(reports):
  head = subprocess.run(['git', '-C', paths.REPO, 'rev-parse', 'HEAD'], capture_output=True,
                        text=True)
  assert reports['train']['commit'] == (head.stdout.strip() or None)


def test_tables_rebuild_each_rows_config_and_pair_drsr_rows(reports):
  folder = reports['folder']
  (folder / 'rows.json').write_text(json.dumps(
      [{'file': f'{name}.json', 'code': f'code of {name}'} for name in
       ('train', 'train_k1', 'train_qlora', 'decode', 'decode_int8')]))
  rows = aot_table.load_rows(str(folder), paths.REPO)
  configs = {entry['file']: cfg for entry, _, cfg in rows}
  assert configs['train_k1.json'].model.speech.group_size == 1
  assert configs['train_k1.json'].data.seq_len == 5 * TINY_SEQ_LEN
  assert configs['train.json'].model.speech.group_size == 5
  text = aot_table.tables(str(folder), paths.REPO)
  train, drsr, fine_tune, inference = (part for part in text.split('\n\n')
                                       if part.startswith('|'))
  assert 'code of train |' in train and 'code of train_k1' not in train
  assert 'code of train_qlora' not in train + drsr
  assert 'code of train_qlora' in fine_tune and 'rank 4, alpha 16 | int8 (the adapted' in fine_tune
  assert 'code of decode |' in inference and '4 x 20 s' in inference
  int8_row = [line for line in inference.splitlines() if 'code of decode_int8' in line]
  assert len(int8_row) == 1 and '| int8 |' in int8_row[0]
  k1_row = [line for line in drsr.splitlines() if line.startswith('| ') and '| 1 |' in line]
  assert len(k1_row) == 1 and f'| {5 * TINY_SEQ_LEN} |' in k1_row[0]
  # The LLM at 25 Hz meets every speech code: more FLOPs for the same conversations.
  flops_ratio = float(k1_row[0].split('FLOPs x')[1].split(',')[0])
  assert flops_ratio > 1


@pytest.mark.parametrize('rows', ['[{"file": "../train.json", "code": "x"}]',
                                  '[{"file": "train.json"}]', 'not json'])
def test_bad_rows_files_are_refused_naming_the_index(tmp_path, rows):
  (tmp_path / 'rows.json').write_text(rows)
  with pytest.raises(ValueError, match='rows.json'):
    aot_table.load_rows(str(tmp_path), paths.REPO)


@pytest.mark.parametrize('kept_sharded', ['tensor', 'expert'])
def test_only_weights_sharded_over_fsdp_are_gathered(kept_sharded):
  devices = aot.topology_devices('v5p', (2, 2, 1))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      {**{axis: 1 for axis in sharding.MESH_AXES}, 'fsdp': 2, kept_sharded: 2}), devices)
  spec = jax.sharding.PartitionSpec
  leaves = {'fsdp_and_other': jax.ShapeDtypeStruct((8, 4), jnp.float32),
            'other_only': jax.ShapeDtypeStruct((8, 4), jnp.float32),
            'replicated': jax.ShapeDtypeStruct((6,), jnp.bfloat16)}
  shardings = {'fsdp_and_other': jax.sharding.NamedSharding(mesh, spec(kept_sharded, 'fsdp')),
               'other_only': jax.sharding.NamedSharding(mesh, spec(None, kept_sharded)),
               'replicated': jax.sharding.NamedSharding(mesh, spec())}
  # A (4, 2) float32 shard, fetched from the one other fsdp shard; nothing else moves.
  assert aot.gathered_bytes(leaves, shardings) == 4 * 2 * 4


def test_pages_show_the_tables_of_the_stored_reports():
  tables = aot_table.tables(os.path.join(paths.REPO, 'reports', 'aot'), paths.REPO) + '\n'
  for page in ('README.md', 'docs/scale.md', 'reports/aot/report.md'):
    stale = files.replace_section(os.path.join(paths.REPO, page), aot_table.BEGIN, aot_table.END,
                                  tables, write=False)
    assert not stale, (f'{page}: run python -m fac_jax.scale.aot_table --reports=reports/aot '
                       f'--write={page}')


@pytest.mark.parametrize('message, gib', [
    ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries '
     '(50.17G) exceeds available HBM (31.25G).', 50.17),
    ('RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of '
     'memory in memory space hbm. Used 31.25G of 31.25G hbm. Exceeded hbm capacity by 6.45M.\n\n'
     'Total hbm usage >= 31.51G:\n    reserved        260.02M \n    program          20.14G \n'
     '    arguments        11.11G \n\nProgram hbm requirement 20.14G:\n    reserved          5.16M\n'
     '    HLO temp         20.12G (87.0% utilization: Unpadded (7.52G) Padded (8.65G))', 20.12),
    ('INTERNAL: something else (HLO temp 3.0G)', None)])
def test_the_compilers_hbm_refusals_give_the_temporaries_it_asked_for(message, gib):
  needed = aot.refused_temporaries(message)
  assert needed == (None if gib is None else int(gib * aot.GIB))
