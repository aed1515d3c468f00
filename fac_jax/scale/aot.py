"""Ahead-of-time compilation for a TPU slice that is not here: the real jitted train, prefill or
decode program compiled by the TPU compiler (PyPI `libtpu`, requirements-tpu.txt) for a slice's
topology on a CPU-only machine, with the compiler's per-chip memory, the collectives in the
optimised HLO, analytic FLOPs and a roofline estimate of step time and MFU.

  python -m fac_jax.scale.aot --config=configs/fac_8b.py:stage1 --topology=v5p-128 \
      [--program=train|prefill|decode] [--sessions=8 --context_seconds=120] [--out=FILE.json] \
      [--quantize=none|int8|w8a8] \
      [--config.mesh.fsdp=-1 --config.model.remat_policy=full ...]

--topology takes a Cloud accelerator type (v5p-128, v6e-64, v5e-256, v4-32: v5p and v4 count
TensorCores, two a chip; v5e and v6e count chips) or a chip topology (v5p:4x4x4, v6e:8x8).
Set ALLOW_MULTIPLE_LIBTPU_LOAD=1 when other JAX processes run beside it.
"""

import dataclasses
import json
import math
import re
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import qwix
from flax import nnx
from ml_collections import config_flags

from fac_jax import batch as batch_lib, files, fingerprint, sharding
from fac_jax.inference import generate
from fac_jax.model import fun_audio_chat, lora, quantization
from fac_jax.train import flops, optim, steps

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of the Cloud TPU documentation (cloud.google.com/tpu/docs/<generation>)."""
  bf16_tflops: float
  hbm_gib: float  # the documentation writes GB; HBM stacks are sized in binary units
  hbm_gbps: float  # HBM bandwidth, GB/s
  ici_gbps: float  # bidirectional inter-chip interconnect bandwidth, GB/s
  tensor_cores: int  # TensorCores a chip: Cloud names of v4 and v5p count these
  torus_dims: int


CHIPS = {
    'v5p': Chip(bf16_tflops=459, hbm_gib=95, hbm_gbps=2765, ici_gbps=600, tensor_cores=2,
                torus_dims=3),
    'v6e': Chip(bf16_tflops=918, hbm_gib=32, hbm_gbps=1638, ici_gbps=800, tensor_cores=1,
                torus_dims=2),
    'v5e': Chip(bf16_tflops=197, hbm_gib=16, hbm_gbps=819, ici_gbps=400, tensor_cores=1,
                torus_dims=2),
    'v4': Chip(bf16_tflops=275, hbm_gib=32, hbm_gbps=1200, ici_gbps=300, tensor_cores=2,
               torus_dims=3),
}
CLOUD_ALIASES = {'v5litepod': 'v5e'}
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
               'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
CODE_SECONDS = 0.2  # one 5 Hz decode step covers 200 ms of speech
# The streaming detokenizer's first chunk: 15 codes and 3 of look-ahead (fac_jax.inference.streaming).
FIRST_CHUNK_CODES = 15 + 3


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The usual slice shape for a chip count: powers of two as even as can be, smallest first."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f'--topology: {chips} chips; a power of two is expected')
  grid = [1] * dims
  for i in range(int(math.log2(chips))):
    grid[-1 - i % dims] *= 2
  return tuple(sorted(grid))


def parse_topology(name: str) -> tuple[str, tuple[int, ...], str]:
  """(generation, chip grid, how the name was read) for 'v5p-128' or 'v5p:4x4x4'."""
  if ':' in name:
    generation, _, shape = name.partition(':')
    if generation not in CHIPS or not re.fullmatch(r'\d+(x\d+)+', shape):
      raise ValueError(f'--topology={name!r}: expected <generation>:<AxB[xC]> with generation '
                       f'one of {sorted(CHIPS)}, or a Cloud name such as v5p-128')
    grid = tuple(int(d) for d in shape.split('x'))
    if len(grid) != CHIPS[generation].torus_dims:
      raise ValueError(f'--topology={name!r}: {generation} slices are '
                       f'{CHIPS[generation].torus_dims}-dimensional')
    return generation, grid, f'{name}: {math.prod(grid)} {generation} chips'
  match = re.fullmatch(r'(v\w+?)-(\d+)', name)
  generation = CLOUD_ALIASES.get(match.group(1), match.group(1)) if match else None
  if generation not in CHIPS:
    raise ValueError(f'--topology={name!r}: expected a Cloud name such as v5p-128, v6e-64, '
                     f'v5e-256 or v4-32, or a chip topology such as v5p:4x4x4')
  chip = CHIPS[generation]
  count = int(match.group(2))
  if count % chip.tensor_cores:
    raise ValueError(f'--topology={name!r}: {generation} names count {chip.tensor_cores} '
                     'TensorCores a chip')
  grid = chip_grid(count // chip.tensor_cores, chip.torus_dims)
  shape = 'x'.join(map(str, grid))
  unit = 'TensorCores' if chip.tensor_cores > 1 else 'chips'
  return generation, grid, f'{name} ({count} {unit}) = {generation}:{shape}, {math.prod(grid)} chips'


def topology_devices(generation: str, grid: tuple[int, ...]) -> list:
  """The slice's devices as the TPU compiler describes them (no TPU needed)."""
  from jax.experimental import topologies
  host = tuple(min(g, b) for g, b in zip(grid + (1,) * (3 - len(grid)), (2, 2, 1)))
  return list(topologies.get_topology_desc(
      platform='tpu', topology_name=f'{generation}:{"x".join(map(str, grid))}',
      chip_config_name='default', chips_per_host_bounds=host, num_slices=1).devices)


def shard_bytes(tree, shardings) -> int:
  """Bytes one device holds of a tree of arrays (or ShapeDtypeStructs) in these shardings."""
  def one(leaf, s):
    return int(np.prod(s.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
  return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))


def gathered_bytes(tree, shardings) -> int:
  """Bytes one device receives to assemble its working copy of every weight: each leaf sharded
  over the batch's mesh axes (fsdp) is all-gathered over them; tensor- and expert-sharded
  dimensions stay sharded (their activations and tokens move instead, which is not counted)."""
  gathered_axes = (set(sharding.LOGICAL_AXIS_RULES['batch'])
                   - set(sharding.LOGICAL_AXIS_RULES['experts']))
  def one(leaf, s):
    used = [axis for entry in s.spec if entry is not None
            for axis in ((entry,) if isinstance(entry, str) else entry)]
    shards = math.prod(s.mesh.shape[axis] for axis in used if axis in gathered_axes)
    shard = int(np.prod(s.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
    return shard * (shards - 1)
  return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))


def abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def abstract_batch(model_cfg, rows: int, positions: int, windows: int, targets: bool = True):
  """ShapeDtypeStructs of a batch in the layout of fac_jax.batch."""
  sizes = {'B': rows, 'S': positions, 'G': model_cfg.speech.group_size, 'W': windows,
           'F': model_cfg.encoder.window_frames, 'M': model_cfg.encoder.num_mel_bins}
  dtypes = {'mel': jnp.float32, 'audio_mask': jnp.bool_, 'continuous_mask': jnp.bool_,
            'text_mask': jnp.bool_}
  return {name: jax.ShapeDtypeStruct(tuple(sizes[d] for d in dims),
                                     dtypes.get(name, jnp.int32))
          for name, dims in batch_lib.FIELDS.items()
          if targets or not name.endswith('_targets')}


def collectives(hlo_text: str) -> dict:
  """Count and result bytes of each collective in optimised HLO. A scanned layer stack's
  collectives appear once in its loop body: these are ops in the program, not executions."""
  found = {name: {'count': 0, 'bytes': 0} for name in COLLECTIVES}
  pattern = re.compile(r'=\s*(\(?[^=]*?\)?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    shapes = re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', match.group(1))
    sizes = [DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(',') if d)
             for t, dims in shapes]
    found[match.group(2)]['count'] += 1
    found[match.group(2)]['bytes'] += max(sizes, default=0)
  return found


def train_program(cfg: ml_collections.ConfigDict, mesh) -> dict:
  """The trainer's SFT step (fac_jax.train.steps.jit_train_step) for cfg.data's global batch;
  with train.lora the adapted model's (QLoRA: its base stored quantised)."""
  graphdef, state = nnx.split(lora.abstract_model(cfg.model, cfg.train.lora))
  params = nnx.to_pure_dict(state)
  param_shardings = sharding.param_shardings(state, mesh)
  optimizer = optim.make_optimizer(cfg.train, params)
  opt_state = jax.eval_shape(optimizer.init, params)
  opt_shardings = steps.optimizer_shardings(opt_state, param_shardings, mesh)
  batch = abstract_batch(cfg.model, cfg.data.batch_size, cfg.data.seq_len, cfg.data.num_windows)
  step, batch_shardings = steps.jit_train_step(
      cfg.model, graphdef, optimizer, mesh, param_shardings, opt_shardings, batch,
      cfg.train.grad_accum_steps, optim.frozen_patterns(cfg.train))
  model_flops = flops.analytic_flops(cfg.model, cfg.data.batch_size, cfg.data.seq_len,
                                     cfg.data.num_windows)
  return dict(
      jitted=step,
      args=(abstract(params, param_shardings), abstract(opt_state, opt_shardings),
            abstract(batch, batch_shardings)),
      kinds={'parameters': shard_bytes(params, param_shardings),
             'optimizer state': shard_bytes(opt_state, opt_shardings),
             'batch': shard_bytes(batch, batch_shardings)},
      rows=cfg.data.batch_size, model_flops=sum(model_flops.values()),
      flops_by_component=model_flops,
      # Weights read each step: forward, backward and (full remat) the forward again; the 'dots'
      # policies keep the matmul outputs, so only cheap elementwise work is recomputed.
      param_passes=3 if cfg.model.remat_policy == 'full' else 2,
      micro_batches=cfg.train.grad_accum_steps,
      gathered_bytes=gathered_bytes(params, param_shardings))


def quantized_shardings(params, shardings):
  """Shardings of serving weights (fac_jax.model.quantization): an int8 kernel's values as the
  kernel, its scale (1 along the input) the same where its dimensions are not 1."""
  def one(leaf, s):
    if not isinstance(leaf, qwix.QArray):
      return s
    spec = tuple(s.spec) + (None,) * (leaf.scale.ndim - len(s.spec))
    scale_spec = jax.sharding.PartitionSpec(*(None if size == 1 else entry
                                              for size, entry in zip(leaf.scale.shape, spec)))
    return dataclasses.replace(leaf, qvalue=s,
                               scale=jax.sharding.NamedSharding(s.mesh, scale_spec))
  return jax.tree.map(one, params, shardings, is_leaf=lambda x: isinstance(x, qwix.QArray))


def inference_inputs(cfg, mesh, sessions: int, context_seconds: float, quantize: str = 'none'):
  """The serving graph, its parameters (int8 where `quantize` says, as the server holds them)
  with their shardings, and a prompt of `sessions` conversations filling the context."""
  model = fun_audio_chat.abstract_model(cfg.model)
  _, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  param_shardings = sharding.param_shardings(state, mesh)
  graphdef, _ = quantization.quantize(model, {}, quantize)
  if quantize != 'none':
    params = jax.eval_shape(lambda p: quantization.quantize_params(p, quantize), params)
    param_shardings = quantized_shardings(params, param_shardings)
  positions = int(context_seconds / CODE_SECONDS)
  windows = math.ceil(context_seconds * 100 / cfg.model.encoder.window_frames)
  prompt = abstract_batch(cfg.model, sessions, positions, windows, targets=False)
  return graphdef, params, param_shardings, prompt, sharding.batch_shardings(prompt, mesh)


def prefill_program(cfg, mesh, sessions: int, context_seconds: float, new_steps: int,
                    quantize: str = 'none') -> dict:
  """fac_jax.inference.generate.prefill of a whole context, with room for `new_steps` steps."""
  graphdef, params, param_shardings, prompt, prompt_shardings = inference_inputs(
      cfg, mesh, sessions, context_seconds, quantize)
  gen = generate.GenerationConfig(max_new_tokens=new_steps)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(lambda p, x, key: generate.prefill(quantization.merge(graphdef, p), x,
                                                      cfg.model, gen, key),
                   in_shardings=(param_shardings, prompt_shardings, replicated),
                   keep_unused=True)  # a server holds every weight, used this step or not
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  positions = prompt['input_ids'].shape[1]
  model_flops = flops.analytic_flops(cfg.model, sessions, positions, prompt['mel'].shape[1])
  return dict(jitted=jitted, args=(abstract(params, param_shardings),
                                   abstract(prompt, prompt_shardings), key),
              kinds={'parameters': shard_bytes(params, param_shardings),
                     'batch': shard_bytes(prompt, prompt_shardings)},
              rows=sessions, model_flops=sum(model_flops.values()) / 3,  # forward only
              param_passes=1, gathered_bytes=gathered_bytes(params, param_shardings),
              graphdef=graphdef, param_shardings=param_shardings)


def decode_program(cfg, mesh, sessions: int, context_seconds: float, new_steps: int,
                   quantize: str = 'none') -> dict:
  """One 5 Hz step of fac_jax.inference.generate.decode_step with the KV caches of `sessions`
  conversations holding `context_seconds` of history, in the layout prefill leaves them."""
  prefill = prefill_program(cfg, mesh, sessions, context_seconds, new_steps, quantize)
  compiled_prefill = prefill['jitted'].lower(*prefill['args']).compile()
  state_shape = jax.eval_shape(prefill['jitted'], *prefill['args'])
  state_shardings = compiled_prefill.output_shardings
  graphdef, param_shardings = prefill['graphdef'], prefill['param_shardings']
  gen = generate.GenerationConfig(max_new_tokens=new_steps)
  jitted = jax.jit(lambda p, s: generate.decode_step(quantization.merge(graphdef, p), s,
                                                     cfg.model, gen),
                   in_shardings=(param_shardings, state_shardings), donate_argnums=(1,),
                   keep_unused=True)
  params = prefill['args'][0]
  llm, head = cfg.model.llm, cfg.model.speech_refined_head
  d, group = llm.hidden_size, cfg.model.speech.group_size
  per_session = 2 * (flops.decoder_matmul_params(llm) + d * llm.vocab_size + 2 * d * d
                     + group * (flops.decoder_matmul_params(head) + 2 * d * head.hidden_size
                                + d * cfg.model.speech.codebook_size))
  state_bytes = shard_bytes(state_shape, state_shardings)
  return dict(jitted=jitted, args=(params, abstract(state_shape, state_shardings)),
              kinds={'parameters': prefill['kinds']['parameters'],
                     'decoding state (KV caches)': state_bytes},
              rows=sessions, model_flops=sessions * per_session, param_passes=1,
              gathered_bytes=prefill['gathered_bytes'], state_bytes=state_bytes,
              prefill=prefill, prefill_memory=memory_by_kind(compiled_prefill))


def refused_temporaries(message: str) -> int | None:
  """Bytes of temporaries the TPU compiler asked for when it refused a program for HBM, from its
  message (two forms: the temporaries alone exceed HBM, or with the arguments they do); None for
  any other error."""
  needed = (re.search(r'HLO temporaries \(([\d.]+)G\) exceeds available HBM', message)
            or ('Ran out of memory in memory space hbm' in message
                and re.search(r'HLO temp\s+([\d.]+)G', message)))
  return int(float(needed.group(1)) * GIB) if needed else None


def memory_by_kind(compiled) -> dict:
  stats = compiled.memory_analysis()
  return {'arguments': stats.argument_size_in_bytes,
          'outputs': stats.output_size_in_bytes - stats.alias_size_in_bytes,
          'temporaries': stats.temp_size_in_bytes,
          'code': stats.generated_code_size_in_bytes}


def roofline(program: dict, compiled_memory: dict, chip: Chip, chips: int, kind: str) -> dict:
  """Step-time floor from compute, HBM and ICI, each at its peak, and the MFU it implies: an
  estimate, not a measurement."""
  executed = program['model_flops'] * (4 / 3 if kind == 'train' and
                                       program['param_passes'] == 3 else 1)
  compute_s = executed / (chips * chip.bf16_tflops * 1e12)
  if kind == 'decode':
    # Every weight shard and the whole decoding state are read once a step.
    hbm_bytes = compiled_memory['arguments']
  else:
    hbm_bytes = compiled_memory['arguments'] + compiled_memory['outputs'] + \
        2 * compiled_memory['temporaries']
  hbm_s = hbm_bytes / (chip.hbm_gbps * 1e9)
  # Sharded weights gathered in each pass; in training the gradient is reduce-scattered too.
  gathered = program['gathered_bytes']
  # Every micro-batch gathers the weights again; the gradient is reduce-scattered once a step.
  ici_bytes = (gathered * program['param_passes'] * program.get('micro_batches', 1)
               + (gathered if kind == 'train' else 0))
  ici_s = ici_bytes / (chip.ici_gbps * 1e9) if chips > 1 else 0.0
  step_s = max(compute_s, hbm_s, ici_s)
  return {'compute_s': compute_s, 'hbm_s': hbm_s, 'ici_s': ici_s, 'step_s': step_s,
          'bound_by': ('compute', 'HBM', 'ICI')[int(np.argmax([compute_s, hbm_s, ici_s]))],
          'mfu': program['model_flops'] / (step_s * chips * chip.bf16_tflops * 1e12),
          'hbm_bytes_per_step': hbm_bytes}


def compile_report(cfg: ml_collections.ConfigDict, topology: str, program: str,
                   sessions: int = 8, context_seconds: float = 120.0,
                   new_steps: int = 100, quantize: str = 'none') -> dict:
  """Compiles `program` of `cfg` for `topology` and returns the report (see the module doc)."""
  generation, grid, reading = parse_topology(topology)
  chip = CHIPS[generation]
  devices = topology_devices(generation, grid)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  builders = {'train': lambda: train_program(cfg, mesh),
              'prefill': lambda: prefill_program(cfg, mesh, sessions, context_seconds,
                                                 new_steps, quantize),
              'decode': lambda: decode_program(cfg, mesh, sessions, context_seconds, new_steps,
                                               quantize)}
  if program not in builders:
    raise ValueError(f'--program={program!r}: expected one of {sorted(builders)}')
  if quantize != 'none' and program == 'train':
    raise ValueError('--quantize is for serving (prefill, decode); a train step with a '
                     'quantised base is QLoRA: --config.train.lora.base_quantization')
  # v4's compiler exposes each TensorCore as a device: memory and FLOPs are shared between them.
  cores = len(devices) // math.prod(grid)
  chip = dataclasses.replace(chip, bf16_tflops=chip.bf16_tflops / cores,
                             hbm_gib=chip.hbm_gib / cores, hbm_gbps=chip.hbm_gbps / cores,
                             ici_gbps=chip.ici_gbps / cores)
  start = time.time()
  with jax.set_mesh(mesh):  # as the trainer runs it: activation sharding constraints apply
    built = builders[program]()
    try:
      compiled, refusal = built['jitted'].lower(*built['args']).compile(), None
    except jax.errors.JaxRuntimeError as e:
      needed = refused_temporaries(str(e))
      if needed is None:
        raise
      compiled, refusal = None, str(e).splitlines()[0]
  compile_s = time.time() - start
  if compiled is not None:
    memory = memory_by_kind(compiled)
  else:  # arguments as placed; temporaries as the compiler's refusal states them
    memory = {'arguments': sum(built['kinds'].values()), 'outputs': 0,
              'temporaries': needed, 'code': 0}
  total = sum(memory.values())
  hbm = chip.hbm_gib * GIB
  data_shards = sharding.batch_shards(mesh)
  report = {
      'topology': reading, 'generation': generation, 'chips': math.prod(grid),
      'devices': len(devices),
      'device_kind': devices[0].device_kind, 'program': program,
      'mesh': dict(mesh.shape), 'remat_policy': cfg.model.remat_policy,
      'dtype': cfg.model.dtype, 'quantize': quantize, 'global_rows': built['rows'],
      'rows_per_chip': built['rows'] / data_shards,
      'memory_per_chip_bytes': {**memory, 'total': total},
      'arguments_by_kind_bytes': built['kinds'],
      'hbm_bytes': hbm, 'fits': refusal is None and total <= hbm, 'headroom_bytes': hbm - total,
      'hbm_share': total / hbm, 'compile_seconds': compile_s,
      'compiler_refused': refusal,
      'collectives': collectives(compiled.as_text()) if compiled is not None else None,
      'model_flops_per_step': built['model_flops'],
      'roofline_estimate': roofline(built, memory, chip, len(devices), program),
      'device_spec': dataclasses.asdict(chip),
  }
  if program == 'decode':
    step = report['roofline_estimate']['step_s']
    prefill = roofline(built['prefill'], built['prefill_memory'], chip, len(devices), 'prefill')
    # Speech starts delay_groups steps after the text; the detokenizer then waits for its chunk.
    steps_to_audio = cfg.model.speech.delay_groups + math.ceil(
        FIRST_CHUNK_CODES / cfg.model.speech.group_size)
    report['decode'] = {'sessions': sessions, 'context_seconds': context_seconds,
                        'state_bytes_per_chip': built['state_bytes'],
                        'real_time_factor_floor': step / CODE_SECONDS,
                        'prefill_memory_per_chip_bytes': built['prefill_memory'],
                        'prefill_floor_s': prefill['step_s'],
                        'decode_steps_to_first_audio': steps_to_audio,
                        'first_audio_floor_s': prefill['step_s'] + steps_to_audio * step}
  return report


def format_report(report: dict) -> str:
  gib = lambda b: f'{b / GIB:.2f} GiB' if abs(b) >= GIB / 10 else f'{b / (1 << 20):.2f} MiB'
  memory = report['memory_per_chip_bytes']
  roof = report['roofline_estimate']
  lines = [f"{report['program']} on {report['topology']} ({report['device_kind']})",
           f"mesh {report['mesh']}, remat {report['remat_policy']}, {report['dtype']}, "
           f"{report['global_rows']} rows ({report['rows_per_chip']:g} a chip)",
           f"compiled in {report['compile_seconds']:.1f} s",
           'per-chip memory (the compiler\'s):']
  lines += [f'  {kind:<12} {gib(size)}' for kind, size in memory.items()]
  lines += [f'    of the arguments, {kind}: {gib(size)}'
            for kind, size in report['arguments_by_kind_bytes'].items()]
  lines.append(f"  {'fits' if report['fits'] else 'DOES NOT FIT'} in {gib(report['hbm_bytes'])}"
               f" of HBM: {100 * report['hbm_share']:.1f} %, headroom "
               f"{gib(report['headroom_bytes'])}")
  if report['compiler_refused']:
    lines.append(f"  the TPU compiler refused it: {report['compiler_refused']}")
  else:
    lines.append('collectives in the optimised HLO (ops, result bytes; loop bodies once):')
    lines += [f'  {name:<18} {c["count"]:>4}  {gib(c["bytes"])}'
              for name, c in report['collectives'].items()]
  lines.append(f"analytic model FLOPs a step: {report['model_flops_per_step']:.3e}")
  lines.append(f"roofline ESTIMATE: compute {roof['compute_s'] * 1e3:.1f} ms, HBM "
               f"{roof['hbm_s'] * 1e3:.1f} ms, ICI {roof['ici_s'] * 1e3:.1f} ms -> step "
               f"{roof['step_s'] * 1e3:.1f} ms ({roof['bound_by']}-bound), MFU "
               f"{100 * roof['mfu']:.1f} %")
  if 'decode' in report:
    lines.append(f"decode: {report['decode']['sessions']} sessions x "
                 f"{report['decode']['context_seconds']:g} s, real-time factor floor "
                 f"{report['decode']['real_time_factor_floor']:.3f}; first audio after the "
                 f"prefill of the whole context ({report['decode']['prefill_floor_s'] * 1e3:.1f} ms"
                 f") and {report['decode']['decode_steps_to_first_audio']} steps: "
                 f"{report['decode']['first_audio_floor_s'] * 1e3:.1f} ms (floor, detokenizer "
                 "not counted)")
    lines.append('prefill per-chip memory: ' + ', '.join(
        f'{kind} {gib(size)}' for kind, size in
        report['decode']['prefill_memory_per_chip_bytes'].items()))
  return '\n'.join(lines)


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Experiment config, e.g. '
                                  'configs/fac_8b.py:stage1.', lock_config=True)
  flags.DEFINE_string('topology', None, 'v5p-128, v6e-64, v5e-256, v4-32 or v5p:4x4x4, v6e:8x8.')
  flags.DEFINE_enum('program', 'train', ['train', 'prefill', 'decode'], 'What to compile.')
  flags.DEFINE_integer('sessions', 8, 'prefill/decode: conversations decoded together.')
  flags.DEFINE_float('context_seconds', 120.0, 'prefill/decode: conversation length held.')
  flags.DEFINE_integer('new_steps', 100, 'prefill/decode: 5 Hz steps of room after the context.')
  flags.DEFINE_enum('quantize', 'none', list(quantization.MODES), 'prefill/decode: serving '
                    'weights as `python -m fac_jax.serve --quantize` holds them.')
  flags.DEFINE_string('out', 'aot_report.json', 'Where the JSON report is written.')
  flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  del argv
  flags_ = flags.FLAGS
  try:
    report = compile_report(flags_.config, flags_.topology, flags_.program, flags_.sessions,
                            flags_.context_seconds, flags_.new_steps, flags_.quantize)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  report['command'] = ' '.join(['python', *sys.orig_argv[1:]])
  report.update(fingerprint.git_state())
  print(format_report(report))
  files.write_atomically(flags_.out, json.dumps(report, indent=1) + '\n')
  print(f'wrote {flags_.out}')


def run():
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
