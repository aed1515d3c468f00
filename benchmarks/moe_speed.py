"""Benchmark: the MoE LLM's cost on CPU, side by side in one run. The tiny MoE model
(configs/tiny.py:moe: 8 experts of width 128, 2 a token) against the dense tiny model of the
same active parameters (one feed-forward of width 256): train step of the whole model and forward
+ backward of the LLM alone. Then the MoE block itself: dropless ragged-dot routing (what the
model runs) against the dense-masked reference (every expert on every token, weighted by the
routing), forward + backward. Last, jax.lax.ragged_dot alone over the same rows split into more
and more groups: XLA:CPU runs it as one dot per group over all the rows, so on CPU its cost grows
with the number of experts and the dropless block does not beat the dense-masked one; a grouped
kernel (megablox on TPU) computes each group's rows only. Ratios only; nothing is asserted.

  python benchmarks/moe_speed.py [--steps=10] [--batch_size=8] [--seq_len=128]
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fac_jax import config as config_lib  # noqa: E402
from fac_jax.data import synthetic  # noqa: E402
from fac_jax.model import fun_audio_chat, moe  # noqa: E402
from fac_jax.train import steps  # noqa: E402
from train_speed import print_table  # noqa: E402  (this folder is on the path of a script run)

TINY = os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py')


def median_seconds(fn, args, repeats: int) -> float:
  """Median wall time of fn(*args) after one call that compiles."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def parameter_counts(model_cfg) -> tuple[int, int]:
  """(all LLM parameters, those a token uses): an MoE layer's token uses k of its E experts."""
  _, state = nnx.split(fun_audio_chat.abstract_model(model_cfg))
  llm = nnx.to_pure_dict(state)['llm']
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(llm))
  layers = llm['decoder']['layers']
  if 'moe' not in layers:
    return total, total
  experts = sum(int(np.prod(layers['moe'][name].shape))
                for name in ('gate_proj', 'up_proj', 'down_proj'))
  moe_cfg = model_cfg.llm.moe
  return total, total - experts + experts * moe_cfg.experts_per_token // moe_cfg.num_experts


def train_step_seconds(model_cfg, batch, repeats: int) -> float:
  graphdef, state = nnx.split(fun_audio_chat.create(model_cfg))
  params = nnx.to_pure_dict(state)
  optimizer = optax.adam(1e-3)
  step = jax.jit(steps.make_train_step(graphdef, optimizer))
  return median_seconds(lambda p, o: step(p, o, batch)[2]['loss'],
                        (params, optimizer.init(params)), repeats)


def llm_seconds(model_cfg, input_ids, repeats: int) -> float:
  """Forward and backward of the LLM alone on token ids (the mean logit as the objective)."""
  graphdef, state = nnx.split(fun_audio_chat.create(model_cfg).llm)
  params = nnx.to_pure_dict(state)
  grad = jax.jit(jax.grad(lambda p, ids: nnx.merge(graphdef, p)(ids).mean()))
  return median_seconds(grad, (params, input_ids), repeats)


def dense_masked(params: dict, x, experts_per_token: int, norm_topk_prob: bool):
  """Every expert on every token, each output weighted by the token's routing weight (0 where
  the expert was not chosen)."""
  tokens = x.reshape(-1, x.shape[-1])
  logits = tokens.astype(jnp.float32) @ params['router']['kernel']
  weights, chosen = moe.route(logits, experts_per_token, norm_topk_prob)
  routing = jnp.zeros_like(logits).at[jnp.arange(len(tokens))[:, None], chosen].set(weights)
  gate = jnp.einsum('nd,edf->nef', tokens, params['gate_proj'])
  up = jnp.einsum('nd,edf->nef', tokens, params['up_proj'])
  every = jnp.einsum('nef,efd->ned', jax.nn.silu(gate) * up, params['down_proj'])
  return jnp.einsum('ne,ned->nd', routing, every).reshape(x.shape)


def block_seconds(llm_cfg, tokens: int, repeats: int) -> tuple[float, float]:
  """(ragged-dot block, dense-masked reference): forward and backward over `tokens` tokens."""
  block = moe.SparseMoe(llm_cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(block)
  params = nnx.to_pure_dict(state)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, tokens, llm_cfg.hidden_size)),
                  jnp.float32)
  ragged = lambda p, x: nnx.merge(graphdef, p)(x)[0]
  reference = lambda p, x: dense_masked(p, x, llm_cfg.moe.experts_per_token,
                                        llm_cfg.moe.norm_topk_prob)
  timed = lambda f: median_seconds(jax.jit(jax.grad(lambda p, x: f(p, x).sum(), argnums=(0, 1))),
                                   (params, x), repeats)
  return timed(ragged), timed(reference)


def ragged_dot_seconds(rows: int, groups: int, width: int, repeats: int) -> float:
  """jax.lax.ragged_dot of (rows, width) by (groups, width, width), rows split evenly."""
  x = jnp.ones((rows, width), jnp.float32)
  weights = jnp.ones((groups, width, width), jnp.float32)
  sizes = jnp.full((groups,), rows // groups, jnp.int32)
  return median_seconds(jax.jit(jax.lax.ragged_dot), (x, weights, sizes), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--steps', type=int, default=10, help='timed repeats of each measurement')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=128)
  args = parser.parse_args()
  dense_cfg = config_lib.load(TINY).model
  moe_cfg = config_lib.load(f'{TINY}:moe').model
  cfg_data = config_lib.load(TINY).data
  rng = np.random.default_rng(0)
  batch = synthetic.batch(rng, dense_cfg, args.batch_size, args.seq_len, cfg_data.num_windows)

  counts = {name: parameter_counts(cfg) for name, cfg in (('dense', dense_cfg), ('moe', moe_cfg))}
  train = {name: train_step_seconds(cfg, batch, args.steps)
           for name, cfg in (('dense', dense_cfg), ('moe', moe_cfg))}
  llm = {name: llm_seconds(cfg, batch['input_ids'], args.steps)
         for name, cfg in (('dense', dense_cfg), ('moe', moe_cfg))}
  moe_width = moe_cfg.llm.moe
  device = jax.devices()[0]
  print(f'\n{jax.device_count()} x {device.platform}; batch {args.batch_size} rows x '
        f'{args.seq_len} LLM positions; median of {args.steps} runs after compile\n')
  ms = lambda s: f'{s * 1e3:.1f} ms'
  print_table(('tiny LLM', f'dense (mlp_dim {dense_cfg.llm.mlp_dim})',
               f'MoE ({moe_width.num_experts} x {moe_width.moe_mlp_dim}, '
               f'{moe_width.experts_per_token} a token)', 'MoE / dense'), [
      ('LLM parameters', f'{counts["dense"][0]:,}', f'{counts["moe"][0]:,}',
       f'{counts["moe"][0] / counts["dense"][0]:.2f}'),
      ('LLM parameters a token uses', f'{counts["dense"][1]:,}', f'{counts["moe"][1]:,}',
       f'{counts["moe"][1] / counts["dense"][1]:.2f}'),
      ('train step, whole model', ms(train['dense']), ms(train['moe']),
       f'{train["moe"] / train["dense"]:.2f}'),
      ('LLM alone, forward + backward', ms(llm['dense']), ms(llm['moe']),
       f'{llm["moe"] / llm["dense"]:.2f}'),
  ])
  rows = []
  for tokens in (args.batch_size * args.seq_len, 4 * args.batch_size * args.seq_len):
    ragged, reference = block_seconds(moe_cfg.llm, tokens, args.steps)
    rows.append((f'{tokens} tokens', ms(ragged), ms(reference), f'{ragged / reference:.2f}'))
  print_table(('MoE block, forward + backward', 'ragged dot (dropless, sorted)',
               'dense-masked (every expert)', 'ragged / dense'), rows)
  slots, width = args.batch_size * args.seq_len * moe_width.experts_per_token, 128
  by_groups = {groups: ragged_dot_seconds(slots, groups, width, args.steps)
               for groups in (1, 2, moe_width.num_experts, 4 * moe_width.num_experts)}
  print_table((f'ragged_dot alone, {slots} x {width} rows by {width} x {width}', 'time',
               'over one group'),
              [(f'{groups} groups', ms(seconds), f'{seconds / by_groups[1]:.2f}')
               for groups, seconds in by_groups.items()])


if __name__ == '__main__':
  main()
