"""Multi-task DPO over both output channels (DESIGN.md section 2, step 5): the loss, pure train and
eval steps against a frozen reference model, and the metrics of a preference split.

Per pair i (row i of batch['chosen'] and batch['rejected'], fac_jax.data.input_pipeline.dpo_dataset) and
channel c in (text, speech):

  logp_c(y)    sum over the answer's valid targets (!= IGNORE_ID) of log softmax(logits)[target];
               only the answer has targets, the prompt is context
  reward_c(y)  beta * (logp_c(y) under the policy - logp_c(y) under the reference): DPO's implicit
               reward (Rafailov et al. 2023)
  margin_c     reward_c(chosen) - reward_c(rejected)
  loss_c       -(1 - eps) log sigmoid(margin_c) - eps log sigmoid(-margin_c); eps is the label
               smoothing of conservative DPO (the share of pairs taken to be flipped)
  loss_i       sum_c w_c h_c loss_c / sum_c w_c h_c, with w_c = dpo.text_weight / speech_weight and
               h_c = 1 when either answer has a target in channel c (a text-only pair: text only)
  margin_i     the same weighted mean of margin_c; a pair is preferred correctly when margin_i > 0
               (strictly: a policy equal to its reference has margin 0 and accuracy 0)

  dpo_loss = sum_i v_i loss_i / sum_i v_i, v_i = dpo.task_weights[task of pair i] (0: empty row)
  loss     = dpo_loss + dpo.sft_weight * sft_loss, sft_loss the chosen answers' text + speech
             cross-entropy, each a mean over its targets (as fun_audio_chat.compute_losses);
             with an MoE LLM + router_loss, the policy's load-balancing term over both answers'
             rows (fac_jax.model.moe.router_metrics, whose metrics the train step reports too)

`<channel>_likelihood_accuracy`, the share of pairs whose chosen answer the policy itself finds
more likely than the rejected one (no reference), shows where the policy starts as well as where DPO
takes it.

Each channel has its own sigmoid: the speech channel has 5 targets per text position, so its
log-ratios are larger, and a shared sigmoid would let it decide every pair. Metrics other than the
losses are plain means over the pairs (margins and rewards over the pairs with targets in that
channel), and the same per task: `<task>/loss`, `<task>/margin`, `<task>/accuracy` and
`<task>/pairs` (0 where the batch holds none of the task).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections
import optax

from fac_jax import batch as batch_lib
from fac_jax.batch import IGNORE_ID
from fac_jax.data import input_pipeline, preference
from fac_jax.train import held_out, optim, steps

CHANNELS = ('text', 'speech')


def sequence_logps(per_target: dict) -> dict:
  """{'text': (B,), 'speech': (B,)}: each row's summed log-probability of its valid targets, from
  both channels' per-target (nll, hits) (fun_audio_chat.target_nll's)."""
  return {channel: -per_target[channel][0].sum(axis=-1) for channel in CHANNELS}


def target_counts(batch: dict) -> dict:
  """'<answer>_<channel>_count': (B,) valid targets of each answer in each channel."""
  rows = batch['task_ids'].shape[0]
  return {f'{answer}_{channel}_count':
          (batch[answer][f'{channel}_targets'] != IGNORE_ID).reshape(rows, -1).sum(axis=-1)
          for answer in preference.ANSWER_FIELDS for channel in CHANNELS}


def answer_logps_and_router(graphdef: nnx.GraphDef, params: dict,
                            batch: dict) -> tuple[dict, dict]:
  """answer_logps, and the router metrics of an MoE LLM over both answers' rows ({} when the
  LLM is dense)."""
  both = jax.tree.map(lambda c, r: jnp.stack([c, r], axis=1).reshape((-1,) + c.shape[1:]),
                      batch['chosen'], batch['rejected'])
  per_target = nnx.merge(graphdef, params).target_nll(both)
  logps = sequence_logps(per_target)
  return ({f'{answer}_{channel}': logps[channel].reshape(-1, 2)[:, k]
           for k, answer in enumerate(preference.ANSWER_FIELDS) for channel in CHANNELS},
          per_target.get('router', {}))


def answer_logps(graphdef: nnx.GraphDef, params: dict, batch: dict) -> dict:
  """'<answer>_<channel>': (B,) sequence log-probabilities of both answers under `params`, from
  one forward pass over 2B rows (pair i's chosen answer in row 2i, rejected in 2i + 1, so that
  with the batch axis sharded every device keeps its own pairs). Also the form of precomputed
  reference log-probabilities (batch['reference_logps'])."""
  return answer_logps_and_router(graphdef, params, batch)[0]


def _positions(batch: dict) -> jax.Array:
  """Non-padding positions of both answers: what an MoE router's metrics are averaged over."""
  return sum((batch[answer]['segment_ids'] > 0).sum() for answer in preference.ANSWER_FIELDS)


def pair_weights(task_ids: jax.Array, dpo_cfg: ml_collections.ConfigDict) -> jax.Array:
  """(B,) weight of each pair in the DPO loss: its task's weight, 0 for an empty row (id -1)."""
  weights = jnp.asarray(dpo_cfg.task_weights, jnp.float32)[jnp.maximum(task_ids, 0)]
  return jnp.where(task_ids >= 0, weights, 0.0)


def pair_statistics(policy: dict, reference: dict, batch: dict,
                    dpo_cfg: ml_collections.ConfigDict) -> dict:
  """Per-pair (B,) arrays from the answers' log-probabilities (answer_logps' form): the pair's
  loss and margin, each channel's rewards and margin, and what `summarise` needs to weight them."""
  beta, smoothing = dpo_cfg.beta, dpo_cfg.label_smoothing
  counts = target_counts(batch)
  stats = {'task_ids': batch['task_ids'], 'pair_weight': pair_weights(batch['task_ids'], dpo_cfg)}
  loss = margin = total_weight = 0.0
  for channel, weight in zip(CHANNELS, (dpo_cfg.text_weight, dpo_cfg.speech_weight)):
    rewards = {answer: beta * (policy[f'{answer}_{channel}'] - reference[f'{answer}_{channel}'])
               for answer in preference.ANSWER_FIELDS}
    channel_margin = rewards['chosen'] - rewards['rejected']
    channel_loss = (-(1 - smoothing) * jax.nn.log_sigmoid(channel_margin)
                    - smoothing * jax.nn.log_sigmoid(-channel_margin))
    present = (counts[f'chosen_{channel}_count'] + counts[f'rejected_{channel}_count']) > 0
    channel_weight = weight * present
    loss += channel_weight * channel_loss
    margin += channel_weight * channel_margin
    total_weight += channel_weight
    stats.update({f'{channel}_margin': channel_margin, f'has_{channel}': present,
                  f'{channel}_chosen_reward': rewards['chosen'],
                  f'{channel}_rejected_reward': rewards['rejected'],
                  f'{channel}_logp_margin': (policy[f'chosen_{channel}']
                                             - policy[f'rejected_{channel}']),
                  f'chosen_{channel}_nll': -policy[f'chosen_{channel}'],
                  f'chosen_{channel}_count': counts[f'chosen_{channel}_count']})
  total_weight = jnp.maximum(total_weight, 1e-12)
  stats.update(loss=loss / total_weight, margin=margin / total_weight)
  return stats


def _normalisers(stats: dict) -> dict:
  """Denominators of the loss over a whole batch: summed pair weights and chosen targets."""
  return {name: jnp.maximum(stats[name].sum(), floor) for name, floor in (
      ('pair_weight', 1e-12), ('chosen_text_count', 1), ('chosen_speech_count', 1))}


def _losses(stats: dict, normalisers: dict) -> tuple[jax.Array, jax.Array]:
  """(dpo_loss, sft_loss) of the pairs in `stats` over the given denominators: a sum over pairs,
  so the losses of row slices with the whole batch's denominators add up to the batch's."""
  dpo_loss = (stats['pair_weight'] * stats['loss']).sum() / normalisers['pair_weight']
  sft_loss = sum(stats[f'chosen_{channel}_nll'].sum() / normalisers[f'chosen_{channel}_count']
                 for channel in CHANNELS)
  return dpo_loss, sft_loss


def _mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.where(mask, values, 0.0).sum() / jnp.maximum(mask.sum(), 1)


def summarise(stats: dict, dpo_cfg: ml_collections.ConfigDict) -> dict:
  """Scalar metrics of the pairs in `stats` (pair_statistics' arrays, of one batch or of a
  whole split concatenated); see the module docstring."""
  dpo_loss, sft_loss = _losses(stats, _normalisers(stats))
  real = stats['task_ids'] >= 0
  metrics = {'loss': dpo_loss + dpo_cfg.sft_weight * sft_loss, 'dpo_loss': dpo_loss,
             'sft_loss': sft_loss, 'pairs': real.sum(), 'margin': _mean(stats['margin'], real),
             'accuracy': _mean(stats['margin'] > 0, real)}
  for channel in CHANNELS:
    present = real & stats[f'has_{channel}']
    for name in ('margin', 'chosen_reward', 'rejected_reward'):
      metrics[f'{channel}_{name}'] = _mean(stats[f'{channel}_{name}'], present)
    metrics[f'{channel}_accuracy'] = _mean(stats[f'{channel}_margin'] > 0, present)
    metrics[f'{channel}_likelihood_accuracy'] = _mean(stats[f'{channel}_logp_margin'] > 0,
                                                      present)
  for task_id, task in enumerate(dpo_cfg.tasks):
    of_task = stats['task_ids'] == task_id
    metrics.update({f'{task}/loss': _mean(stats['loss'], of_task),
                    f'{task}/margin': _mean(stats['margin'], of_task),
                    f'{task}/accuracy': _mean(stats['margin'] > 0, of_task),
                    f'{task}/pairs': of_task.sum()})
  return metrics


def check_config(dpo_cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the config.dpo field that cannot be used."""
  if len(dpo_cfg.task_weights) != len(dpo_cfg.tasks):
    raise ValueError(f'dpo.task_weights has {len(dpo_cfg.task_weights)} entries for '
                     f'{len(dpo_cfg.tasks)} dpo.tasks; give one weight per task')
  if dpo_cfg.beta <= 0:
    raise ValueError(f'dpo.beta={dpo_cfg.beta} must be positive')
  if not 0 <= dpo_cfg.label_smoothing < 0.5:
    raise ValueError(f'dpo.label_smoothing={dpo_cfg.label_smoothing} must be in [0, 0.5)')
  if min(dpo_cfg.text_weight, dpo_cfg.speech_weight) < 0 or (
      dpo_cfg.text_weight + dpo_cfg.speech_weight <= 0):
    raise ValueError('dpo.text_weight and dpo.speech_weight must not be negative, nor both 0')


def _reference_logps(graphdef, ref_params, batch) -> dict:
  """The frozen reference's log-probabilities: computed, or precomputed in the batch when
  ref_params is None."""
  if ref_params is None:
    return batch['reference_logps']
  return jax.lax.stop_gradient(answer_logps(graphdef, ref_params, batch))


def make_dpo_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                  dpo_cfg: ml_collections.ConfigDict, grad_accum_steps: int = 1,
                  frozen=()) -> Callable:
  """(params, opt_state, ref_params, batch) -> (params, opt_state, metrics); pure.

  The reference log-probabilities come from a forward pass of `ref_params` in the same step
  (never differentiated), or, with ref_params None, from batch['reference_logps'] (answer_logps'
  form, precomputed). With grad_accum_steps > 1 the pairs are processed in that many row slices,
  each loss over the whole batch's denominators, so the summed gradient is the batch's exactly
  (an MoE router's terms: each slice's own, weighted by its share of the positions).
  A step whose loss or gradient is not finite changes nothing and reports `skipped` = 1, as
  steps.make_train_step does. `frozen` path patterns are not differentiated.
  """
  check_config(dpo_cfg)

  def objective(params, batch, reference, normalisers):
    params = optim.stop_frozen_gradients(params, frozen)
    logps, router = answer_logps_and_router(graphdef, params, batch)
    stats = pair_statistics(logps, reference, batch, dpo_cfg)
    dpo_loss, sft_loss = _losses(stats, normalisers)
    share = _positions(batch) / normalisers['positions']
    router = {name: value * share for name, value in router.items()}
    return dpo_loss + dpo_cfg.sft_weight * sft_loss + router.get('router_loss', 0.0), (stats,
                                                                                       router)

  def gradients(params, ref_params, batch, normalisers):
    reference = _reference_logps(graphdef, ref_params, batch)
    (_, (stats, router)), grads = optim.value_and_grad(objective)(
        params, batch, reference, normalisers)
    return grads, stats, router

  def dpo_step(params, opt_state, ref_params, batch):
    normalisers = _normalisers({**target_counts(batch),
                                'pair_weight': pair_weights(batch['task_ids'], dpo_cfg)})
    normalisers['positions'] = jnp.maximum(_positions(batch), 1)
    if grad_accum_steps == 1:
      grads, stats, router = gradients(params, ref_params, batch, normalisers)
    else:
      rows = batch['task_ids'].shape[0]
      if rows % grad_accum_steps:
        raise ValueError(f'batch of {rows} pairs does not split into {grad_accum_steps} slices')
      slices = jax.tree.map(
          lambda x: x.reshape((grad_accum_steps, rows // grad_accum_steps) + x.shape[1:]), batch)

      def add_slice(summed, batch_slice):
        grads, stats, router = gradients(params, ref_params, batch_slice, normalisers)
        return jax.tree.map(jnp.add, summed, grads), (stats, router)

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      grads, (stats, router) = jax.lax.scan(add_slice, zeros, slices)
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
      stats = jax.tree.map(lambda x: x.reshape(rows), stats)
      router = jax.tree.map(lambda x: x.sum(axis=0), router)
    metrics = {**summarise(stats, dpo_cfg), **router}
    metrics['loss'] += router.get('router_loss', 0.0)
    return steps.guarded_update(optimizer, params, opt_state, grads, metrics)
  return dpo_step


def make_dpo_eval_step(graphdef: nnx.GraphDef, dpo_cfg: ml_collections.ConfigDict) -> Callable:
  """(params, ref_params, batch) -> per-pair statistics (pair_statistics); `summarise` turns them
  into the batch's metrics, `evaluate` those of a whole split. Jit it with replicated outputs
  (B numbers per statistic) so that every process can read them, as jit_dpo_steps does."""
  check_config(dpo_cfg)

  def eval_step(params, ref_params, batch):
    reference = _reference_logps(graphdef, ref_params, batch)
    return pair_statistics(answer_logps(graphdef, params, batch), reference, batch, dpo_cfg)
  return eval_step


def jit_dpo_steps(cfg: ml_collections.ConfigDict, graphdef, optimizer, mesh: jax.sharding.Mesh,
                  param_shardings, opt_shardings, batch_example: dict):
  """(train_step, eval_step, batch_shardings): make_dpo_step (cfg.train.grad_accum_steps) and
  make_dpo_eval_step jitted with explicit shardings, the reference's parameters laid out as the
  policy's, metrics and statistics replicated. The train step donates params and optimizer state,
  so the reference must not share their buffers. `batch_example`, a local dpo_dataset batch,
  fixes the layout; its chosen batch is checked against fac_jax.batch first."""
  batch_lib.check(batch_example['chosen'], cfg.model)
  batch_shardings = input_pipeline.global_batch_shardings(batch_example, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  train_step = jax.jit(make_dpo_step(graphdef, optimizer, cfg.dpo, cfg.train.grad_accum_steps,
                                     optim.frozen_patterns(cfg.train)),
                       in_shardings=(param_shardings, opt_shardings, param_shardings,
                                     batch_shardings),
                       out_shardings=(param_shardings, opt_shardings, replicated),
                       donate_argnums=(0, 1))
  eval_step = jax.jit(make_dpo_eval_step(graphdef, cfg.dpo),
                      in_shardings=(param_shardings, param_shardings, batch_shardings),
                      out_shardings=replicated)
  return train_step, eval_step, batch_shardings


def evaluate(cfg: ml_collections.ConfigDict, params, ref_params, eval_step: Callable,
             batch_shardings: dict, split: str, max_batches: int | None = None) -> dict:
  """Metrics of one pass over the preference split `split` of cfg.data.dir (at most
  `max_batches` batches): the pairs of every batch summarised together, so each pair counts
  once whatever batch it was in. `eval_step` and `batch_shardings` as jit_dpo_steps returns them;
  batches as held_out.eval_batches reads them."""
  collected = [jax.device_get(eval_step(params, ref_params, input_pipeline.to_global(batch,
                                                                             batch_shardings)))
               for batch in held_out.eval_batches(input_pipeline.dpo_dataset, cfg, split,
                                                    max_batches)]
  stats = jax.tree.map(lambda *values: jnp.concatenate(values), *collected)
  return {name: float(value) for name, value in summarise(stats, cfg.dpo).items()}
