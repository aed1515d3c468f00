"""Benchmark: train step time, tokens/s, model FLOPs (XLA's count and an analytic one), MFU, and
the DRSR saving measured as k=1 against k=5 on the same audio.

  python benchmarks/train_speed.py [--config=configs/tiny.py] [--steps=10] [--batch_size=8]
      [--seq_len=128] [--peak_tflops=989]

One run trains two models from random weights on the same synthetic conversations: the model as
is (speech grouped k=5, the LLM at 5 Hz) and the same model with speech.group_size = 1 (the LLM
at 25 Hz, the speech refined head then predicting one code per position). Both batches carry the
same mel, codes and text; the k=1 rows are as long as their content needs (about 5x the audio
positions). The k=1 assistant speech keeps the 400 ms delay (10 bos codes = 10 groups of 1).

What this measures, and why it is not the report's "DRSR saves about 50 % of GPU hours": FLOPs
per step (XLA's and analytic) and CPU step time of one config, for identical audio. The report
counts GPU hours of whole 8B training runs, which also hold text-only data, other stages, input
pipelines and kernels whose time is not proportional to FLOPs. And the component shares depend on
size. The speech refined head runs 5 sub-positions for every LLM position (text and padding
included) with attention over the whole 25 Hz sequence; on the tiny config it outweighs the
2-layer, d 48 LLM, and since k=1 gives the head one sub-position per LLM position, k=1 can cost
less than k=5 there. At 8B the LLM (36 layers, d 4096) dominates, and k=1 (about 4x the LLM
positions, about 17x its attention pairs) costs several times k=5: the last table gives that
ratio for a typical conversation, analytic only.

XLA's cost analysis counts a while-loop body once whatever its trip count (checked at start-up),
so the scanned layer stacks would be counted as one layer each; we add (layers - 1) x XLA's
count of one layer's forward and backward compiled alone.
"""

import copy
import dataclasses
import math
import os
import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import config as config_lib, sharding  # noqa: E402
from fac_jax.data import conversation, synthetic  # noqa: E402
from fac_jax.model import fun_audio_chat, layers  # noqa: E402
from fac_jax.train import flops, steps  # noqa: E402

GROUPED, UNGROUPED = 5, 1

# A typical 8B training conversation for the analytic DRSR ratio: released SFT context at 5 Hz,
# mostly speech, half of it the user's (read by the encoder in 2 s windows).
CONVERSATION_POSITIONS = 2048
AUDIO_SHARE = 0.8
USER_SHARE_OF_AUDIO = 0.5
FAC_8B_CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'fac_8b.py')


def with_group_size(model_cfg, group_size: int):
  cfg = copy.deepcopy(model_cfg)
  cfg.speech.group_size = group_size
  return cfg


def xla_flops(compiled) -> float:
  return float(compiled.cost_analysis()['flops'])  # a dict in jax 0.10


def while_body_counted_once() -> bool:
  """Whether XLA's cost analysis counts a scanned body once (true of XLA:CPU in jax 0.10)."""
  def scan_cost(length):
    scan = lambda w, x: jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]
    args = jax.ShapeDtypeStruct((length, 16, 16), jnp.float32), jnp.ones((16, 16))
    return xla_flops(jax.jit(scan).lower(*args).compile())
  return scan_cost(4) < 1.5 * scan_cost(2)


def scanned_stacks(cfg, batch_size: int, seq_len: int, num_windows: int) -> list:
  """(stacked layers, number of layers, abstract inputs of one layer) for the encoder, the LLM
  and the refined head: the model's three scans."""
  model = fun_audio_chat.abstract_model(cfg)
  dtype, group = jnp.dtype(cfg.dtype), cfg.speech.group_size
  frames = cfg.encoder.window_frames // 2

  def inputs(rows, length, width, with_positions=True):
    x = jax.ShapeDtypeStruct((rows, length, width), dtype)
    mask = jax.ShapeDtypeStruct((rows, 1, length, length), jnp.bool_)
    positions = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    return (x, positions, mask) if with_positions else (x, mask)

  return [
      (model.continuous_encoder.layers, cfg.encoder.num_layers,
       inputs(batch_size * num_windows, frames, cfg.encoder.hidden_size, False)),
      (model.llm.decoder.layers, cfg.llm.num_layers,
       inputs(batch_size, seq_len, cfg.llm.hidden_size)),
      (model.speech_refined_head.decoder.layers, cfg.speech_refined_head.num_layers,
       inputs(batch_size, group * seq_len, cfg.speech_refined_head.hidden_size)),
  ]


def uncounted_layer_flops(cfg, batch_size: int, seq_len: int, num_windows: int) -> float:
  """XLA's FLOPs of the layers its cost analysis leaves out: (layers - 1) x one layer's forward
  and backward (with the config's rematerialisation), compiled alone on the step's shapes."""
  total = 0.0
  for stacked, num_layers, layer_inputs in scanned_stacks(cfg, batch_size, seq_len,
                                                          num_windows):
    graphdef, state = nnx.split(stacked)
    one_layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), state)

    def layer_sum(params, x, *rest, graphdef=graphdef):
      return nnx.merge(graphdef, params)(x, *rest).astype(jnp.float32).sum()

    if cfg.remat_policy != 'none':
      layer_sum = jax.checkpoint(layer_sum, policy=layers.REMAT_POLICIES[cfg.remat_policy],
                                 prevent_cse=False)
    grad = jax.jit(jax.grad(layer_sum, argnums=(0, 1)))
    total += (num_layers - 1) * xla_flops(grad.lower(one_layer, *layer_inputs).compile())
  return total


def same_text_at_both_rates(pieces: list, group_size: int) -> list:
  """Response text cut to one token per grouped position, where format_conversation cuts it at
  k=5 (at k=1 it would keep more), so both rates read the same words."""
  return [dataclasses.replace(p, text=p.text[:math.ceil(len(p.codes) / group_size)])
          if isinstance(p, conversation.Speech) and p.text is not None else p for p in pieces]


def speech_frames(pieces: list, speech_cfg) -> int:
  """25 Hz frames of speech: user frames plus real assistant codes (not the bos delay)."""
  return sum(len(p.codes) if p.mel is not None else sum(c < speech_cfg.bos_id for c in p.codes)
             for p in pieces if isinstance(p, conversation.Speech))


def drsr_batches(model_cfg, batch_size: int, seq_len: int, num_windows: int, seed: int = 0):
  """The same synthetic conversations packed at k=5 (rows of `seq_len`) and at k=1 (rows as
  long as the longest k=1 row needs, rounded up to 8), with the same conversations per row.

  Returns (k=5 batch, k=1 batch, k=1 model config, 25 Hz speech frames in the batch).
  """
  cfg5, cfg1 = with_group_size(model_cfg, GROUPED), with_group_size(model_cfg, UNGROUPED)
  rng = np.random.default_rng(seed)
  rows, frames = [], 0
  for _ in range(batch_size):
    row, used, windows = [], 0, 0
    while True:
      pieces = same_text_at_both_rates(synthetic.conversation_pieces(rng, cfg5), GROUPED)
      example = conversation.format_conversation(pieces, cfg5)
      used += len(example['input_ids'])
      windows += len(example['mel_lengths'])
      if used > seq_len or windows > num_windows:
        break
      row.append(pieces)
      frames += speech_frames(pieces, cfg5.speech)
    if not row:
      raise ValueError(f'seq_len={seq_len}, num_windows={num_windows} cannot hold one synthetic '
                       'conversation')
    rows.append(row)
  formatted5 = [[conversation.format_conversation(p, cfg5) for p in row] for row in rows]
  formatted1 = [[conversation.format_conversation(p, cfg1) for p in row] for row in rows]
  longest = max(sum(len(e['input_ids']) for e in row) for row in formatted1)
  batch5 = conversation.pack(formatted5, seq_len, num_windows, cfg5)
  batch1 = conversation.pack(formatted1, -(-longest // 8) * 8, num_windows, cfg1)
  return batch5, batch1, cfg1, frames


def run_training(cfg, mesh, batch: dict, num_steps: int, seed: int) -> dict:
  """Compiles the sharded train step, times `num_steps` steps; step times and XLA FLOPs."""
  optimizer = optax.adamw(1e-4)
  graphdef, params, opt_state, param_shardings, opt_shardings = steps.init_sharded(
      cfg, optimizer, mesh, seed)
  train_step, batch_shardings = steps.jit_train_step(cfg, graphdef, optimizer, mesh,
                                                     param_shardings, opt_shardings, batch)
  batch = jax.device_put(batch, batch_shardings)
  compiled = train_step.lower(params, opt_state, batch).compile()
  params, opt_state, metrics = compiled(params, opt_state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(num_steps):
    start = time.perf_counter()
    params, opt_state, metrics = jax.block_until_ready(compiled(params, opt_state, batch))
    times.append(time.perf_counter() - start)
  return {'step_s': statistics.median(times), 'xla_reported': xla_flops(compiled),
          'loss': float(metrics['loss'])}


def drsr_8b_rows() -> tuple:
  """Analytic k=1 / k=5 at the released 8B sizes for one typical conversation (no execution)."""
  cfg = config_lib.load(FAC_8B_CONFIG).model
  audio = round(CONVERSATION_POSITIONS * AUDIO_SHARE)
  text = CONVERSATION_POSITIONS - audio
  user_seconds = audio * USER_SHARE_OF_AUDIO / 5
  windows = math.ceil(user_seconds / (cfg.encoder.window_frames / 100))
  flops5 = flops.analytic_flops(with_group_size(cfg, GROUPED), 1, CONVERSATION_POSITIONS, windows)
  flops1 = flops.analytic_flops(with_group_size(cfg, UNGROUPED), 1, text + GROUPED * audio,
                                windows)
  rows = [('LLM positions', f'{CONVERSATION_POSITIONS}', f'{text + GROUPED * audio}',
           f'{(text + GROUPED * audio) / CONVERSATION_POSITIONS:.2f}')]
  rows += [(name, f'{flops5[name]:.3g}', f'{flops1[name]:.3g}', ratio(flops1[name], flops5[name]))
           for name in flops5]
  total5, total1 = sum(flops5.values()), sum(flops1.values())
  rows.append(('total model FLOPs (causal)', f'{total5:.3g}', f'{total1:.3g}',
               ratio(total1, total5)))
  return rows, text, audio, windows, total1 / total5


def ratio(a: float, b: float) -> str:
  return f'{a / b:.2f}' if b else 'n/a'


def print_table(header: tuple, rows: list) -> None:
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  line = lambda cells: '| ' + ' | '.join(str(c).ljust(w) for c, w in zip(cells, widths)) + ' |'
  print(line(header))
  print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  for row in rows:
    print(line(row))
  print()


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  cfg = FLAGS.config
  batch_size = FLAGS.batch_size or cfg.data.batch_size
  seq_len = FLAGS.seq_len or cfg.data.seq_len
  num_windows = cfg.data.num_windows
  devices = jax.device_count()
  mesh = sharding.make_mesh(cfg.mesh)
  batch5, batch1, cfg1, frames = drsr_batches(cfg.model, batch_size, seq_len, num_windows,
                                              cfg.seed)
  body_once = while_body_counted_once()

  results = {}
  for name, model_cfg, batch in (('k=5', with_group_size(cfg.model, GROUPED), batch5),
                                 ('k=1', cfg1, batch1)):
    shape = (batch_size, batch['input_ids'].shape[1], num_windows)
    result = run_training(model_cfg, mesh, batch, FLAGS.steps, cfg.seed)
    # The compiled step is one device's program: scale to the whole mesh (even split assumed).
    result['xla'] = result['xla_reported'] * devices
    if body_once:
      result['xla'] += uncounted_layer_flops(model_cfg, *shape)
    result['dense'] = flops.analytic_flops(model_cfg, *shape, causal=False)
    result['model'] = flops.analytic_flops(model_cfg, *shape, causal=True)
    result['seq_len'] = shape[1]
    result['positions'] = int((batch['segment_ids'] > 0).sum())
    results[name] = result

  device = jax.devices()[0]
  print(f'\n{devices} x {device.platform} ({device.device_kind}); config '
        f'{config_flags.get_config_filename(FLAGS["config"])}'
        f'; batch {batch_size} rows, {num_windows} mel windows of {cfg.model.encoder.window_frames}'
        f' frames per row; {frames / 25:.1f} s of speech ({frames} frames at 25 Hz) and '
        f'{int(batch5["mel_lengths"].sum())} mel frames per batch, the same at k=5 and k=1; '
        f'median of {FLAGS.steps} steps after compile\n')
  five, one = results['k=5'], results['k=1']
  peak = FLAGS.peak_tflops * 1e12 * devices if FLAGS.peak_tflops else None

  def mfu(result):
    return f'{sum(result["model"].values()) / (result["step_s"] * peak):.1%}' if peak else 'n/a'

  def both(label, key_fn, fmt):
    a, b = key_fn(five), key_fn(one)
    return (label, fmt(a), fmt(b), ratio(b, a))

  dense_total = lambda r: sum(r['dense'].values())
  model_total = lambda r: sum(r['model'].values())
  print_table(('per train step', 'k=5 (LLM at 5 Hz)', 'k=1 (LLM at 25 Hz)', 'k=1 / k=5'), [
      both('LLM positions per row (padded)', lambda r: r['seq_len'], str),
      both('real LLM positions per row (mean)', lambda r: r['positions'] / batch_size,
           lambda v: f'{v:.1f}'),
      both('step time (median)', lambda r: r['step_s'], lambda v: f'{v * 1e3:.1f} ms'),
      both('LLM tokens/s (segment_ids > 0)', lambda r: r['positions'] / r['step_s'],
           lambda v: f'{v:,.0f}'),
      both('speech frames/s (25 Hz, user + assistant)', lambda r: frames / r['step_s'],
           lambda v: f'{v:,.0f}'),
      both('XLA FLOPs, as reported (scans counted once)',
           lambda r: r['xla_reported'] * devices, lambda v: f'{v:.3g}'),
      both('XLA FLOPs, all layers (A)', lambda r: r['xla'], lambda v: f'{v:.3g}'),
      both('analytic FLOPs, dense attention as executed (B)', dense_total, lambda v: f'{v:.3g}'),
      both('analytic model FLOPs, causal attention (C)', model_total, lambda v: f'{v:.3g}'),
      ('A / B (XLA over analytic)', ratio(five['xla'], dense_total(five)),
       ratio(one['xla'], dense_total(one)), ''),
      ('MFU = C / (step time x devices x peak FLOP/s)', mfu(five), mfu(one), ''),
      ('loss after the timed steps', f'{five["loss"]:.3f}', f'{one["loss"]:.3f}', ''),
  ])
  if not peak:
    print('MFU = analytic model FLOPs per step / (step time x devices x peak FLOP/s per device); '
          'n/a without --peak_tflops.\n')

  print_table(('analytic FLOPs by component', 'k=5', 'share', 'k=1', 'share', 'k=1 / k=5'), [
      (name, f'{five["model"][name]:.3g}', f'{five["model"][name] / model_total(five):.0%}',
       f'{one["model"][name]:.3g}', f'{one["model"][name] / model_total(one):.0%}',
       ratio(one['model'][name], five['model'][name])) for name in five['model']])

  rows_8b, text, audio, windows, ratio_8b = drsr_8b_rows()
  print(f'Analytic only, 8B sizes (configs/fac_8b.py): one conversation of '
        f'{CONVERSATION_POSITIONS} positions at 5 Hz, {audio} of them speech ({AUDIO_SHARE:.0%}),'
        f' {text} text; {USER_SHARE_OF_AUDIO:.0%} of the speech is the user\'s ({windows} encoder '
        'windows).\n')
  print_table(('8B, one conversation', 'k=5', 'k=1', 'k=1 / k=5'), rows_8b)
  flops_ratio = model_total(one) / model_total(five)
  time_ratio = one['step_s'] / five['step_s']
  print(f'DRSR on the same audio, k=1 / k=5: this config {flops_ratio:.2f}x the model FLOPs '
        f'(saving {1 - 1 / flops_ratio:.0%}) and {time_ratio:.2f}x the {device.platform} step '
        f'time (saving {1 - 1 / time_ratio:.0%}); 8B analytic {ratio_8b:.2f}x the model FLOPs '
        f'(saving {1 - 1 / ratio_8b:.0%}). A negative saving means k=5 costs more. The report\'s '
        '~50 % counts GPU hours of whole 8B training runs (text-only data, other stages, input '
        'pipeline, kernels not proportional to FLOPs); here it is FLOPs and step time of one '
        'config on identical audio, and the shares of refined head, encoder and LLM depend on '
        'the model size (component table above).')


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program (tests import it)."""
  config_flags.DEFINE_config_file(
      'config', os.path.normpath(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                             'tiny.py')),
      'Experiment config file.')
  flags.DEFINE_integer('steps', 10, 'Timed train steps per model, after one warm-up step.')
  flags.DEFINE_integer('batch_size', None, 'Rows per step (default: the config\'s).')
  flags.DEFINE_integer('seq_len', None, 'LLM positions per k=5 row (default: the config\'s).')
  flags.DEFINE_float('peak_tflops', None, 'Peak dense TFLOP/s of one device, for MFU.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
