"""Held-out metrics of a parameter tree on a prepared split: text and speech losses and token
accuracies, each averaged over the split's valid targets."""

import itertools

import jax
import ml_collections

from fac_jax.batch import IGNORE_ID
from fac_jax.data import input_pipeline
from fac_jax.train import steps

METRICS = ('loss', 'text_loss', 'speech_loss', 'text_accuracy', 'speech_accuracy')


def make_eval_step(graphdef, param_shardings, batch_shardings):
  """Jitted (params, global batch) -> metrics of fun_audio_chat.compute_losses, with the batch's
  valid text and speech targets counted as `text_count` and `speech_count`."""
  def eval_step(params, batch):
    metrics = steps.loss_fn(graphdef, params, batch)[1]
    metrics['text_count'] = (batch['text_targets'] != IGNORE_ID).sum()
    metrics['speech_count'] = (batch['speech_targets'] != IGNORE_ID).sum()
    return metrics
  return jax.jit(eval_step, in_shardings=(param_shardings, batch_shardings))


def eval_batches(dataset_fn, cfg: ml_collections.ConfigDict, split: str,
                 max_batches: int | None):
  """The local batches of one evaluation pass over `split` (input_pipeline.dataset or dpo_dataset),
  at most `max_batches`. With several processes every one must run the same number of steps, so
  the split repeats and exactly `max_batches` batches are read."""
  multi_process = jax.process_count() > 1
  if multi_process and max_batches is None:
    raise ValueError('evaluation on several processes needs max_batches')
  batches = dataset_fn(cfg, split, num_epochs=None if multi_process else 1, shuffle=False)
  return itertools.islice(batches, max_batches)


def evaluate(cfg: ml_collections.ConfigDict, params, eval_step, batch_shardings,
             split: str, max_batches: int | None = None) -> dict:
  """One pass over `split` of cfg.data.dir (at most `max_batches`): each channel's loss and
  accuracy weighted by its targets per batch; `loss` is their sum, as in training."""
  totals = {name: 0.0 for name in METRICS if name != 'loss'}
  counts = {'text': 0.0, 'speech': 0.0}
  for batch in eval_batches(input_pipeline.dataset, cfg, split, max_batches):
    metrics = jax.device_get(eval_step(params, input_pipeline.to_global(batch, batch_shardings)))
    batch_counts = {channel: float(metrics[f'{channel}_count']) for channel in counts}
    for name in totals:
      totals[name] += float(metrics[name]) * batch_counts[name.split('_')[0]]
    for channel in counts:
      counts[channel] += batch_counts[channel]
  result = {name: value / max(counts[name.split('_')[0]], 1.0) for name, value in totals.items()}
  result['loss'] = result['text_loss'] + result['speech_loss']
  return result
