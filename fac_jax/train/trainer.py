"""The trainer: one command for every stage (prealign, stage1, stage2, dpo) on any device mesh, with
orbax checkpoints, exact resumption, evaluation and logs; the same command on every host.

  python -m fac_jax.train.trainer --config=configs/tiny.py:prealign --workdir=DIR [--config.data.dir=...]
      [--config.train.init_checkpoint=CKPT] [--multihost [--coordinator_address=host:port
       --num_processes=N --process_id=I]]

DIR/checkpoints/<step>/   orbax steps: parameters, optimizer state, grain iterator state, progress
DIR/final/                the last parameters as a fac_jax checkpoint (init_checkpoint of a stage)
DIR/metrics.jsonl         train and eval metrics by step; DIR/tensorboard/ the same as events
DIR/loss_curves.png       train and eval losses at the end
A rerun with the same DIR resumes from the latest checkpoint (model, optimizer and data position);
SIGTERM saves a checkpoint at the next step boundary and exits.
"""

import dataclasses
import json
import os
import signal
import time

from absl import app, flags, logging
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import config_flags
from orbax.checkpoint.checkpoint_managers import preservation_policy

from fac_jax import sharding
from fac_jax.checkpoints import checkpoint, whisper
from fac_jax.data import input_pipeline
from fac_jax.model import fun_audio_chat
from fac_jax.train import dpo, held_out, optim, steps
class TrainingError(RuntimeError):
  """Training cannot go on (the message says why)."""


def is_main_process() -> bool:
  return jax.process_index() == 0


@dataclasses.dataclass
class TrainState:
  params: dict
  opt_state: object
  step: int = 0
  skipped_in_row: int = 0


class MetricsLog:
  """metrics.jsonl and TensorBoard events, written by process 0 only; entries past a restored step
  (from a run that died after its last checkpoint) are dropped."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.entries = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.entries = [e for e in map(json.loads, f) if e['step'] <= resume_step]
    self.writer = None
    if is_main_process():
      with open(self.path, 'w') as f:
        f.writelines(json.dumps(e) + '\n' for e in self.entries)
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def add(self, step: int, prefix: str, metrics: dict) -> None:
    entry = {'step': step, **{f'{prefix}/{k}': float(v) for k, v in metrics.items()}}
    self.entries.append(entry)
    if self.writer is not None:
      with open(self.path, 'a') as f:
        f.write(json.dumps(entry) + '\n')
      for name, value in entry.items():
        if name != 'step':
          self.writer.add_scalar(name, value, step)

  def plot(self, path: str, names: tuple[str, ...]) -> None:
    """One panel per metric name, train and eval curves in each."""
    if not is_main_process():
      return
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4))
    for ax, name in zip(axes, names):
      for prefix, style in (('train', '-'), ('eval', 'o-')):
        points = [(e['step'], e[f'{prefix}/{name}']) for e in self.entries
                  if f'{prefix}/{name}' in e]
        if points:
          ax.plot(*zip(*points), style, label=prefix, markersize=3)
      ax.set(title=name, xlabel='step')
      ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def checkpoint_manager(workdir: str, train: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Keeps the last `keep_checkpoints` steps and the best by `best_metric` (lower is better for
  losses); saves are asynchronous and committed atomically (a temporary folder renamed)."""
  best = train.best_metric
  policy = preservation_policy.AnyPreservationPolicy([
      preservation_policy.LatestN(n=train.keep_checkpoints),
      preservation_policy.BestN(get_metric_fn=lambda metrics: metrics[best],
                                reverse='loss' in best, n=1,
                                keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=train.async_checkpointing,
      create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options, item_names=('state', 'data', 'progress'))


class Trainer:
  """Holds what a stage needs: mesh, jitted steps, data iterators, checkpoints and logs."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
    self.cfg, self.train, self.workdir = cfg, cfg.train, workdir
    self.mesh = sharding.make_mesh(cfg.mesh)
    abstract = fun_audio_chat.abstract_model(cfg.model)
    self.graphdef, abstract_state = nnx.split(abstract)
    self.abstract_params = nnx.to_pure_dict(abstract_state)  # ShapeDtypeStructs
    self.optimizer = optim.make_optimizer(self.train, self.abstract_params)
    self.param_shardings = sharding.param_shardings(abstract_state, self.mesh)
    self.opt_shardings = steps.optimizer_shardings(
        jax.eval_shape(self.optimizer.init, self.abstract_params), self.param_shardings,
        self.mesh)
    self.is_dpo = self.train.stage == 'dpo'
    dataset = input_pipeline.dpo_dataset if self.is_dpo else input_pipeline.dataset
    self.train_data = iter(dataset(cfg, cfg.data.train_split))
    self.manager = checkpoint_manager(workdir, self.train)
    self.stop_requested = False

  def initial_state(self) -> TrainState:
    """Random (with a pretrained encoder where model.encoder.pretrained says) or
    `init_checkpoint` parameters, fresh optimizer state."""
    init_checkpoint = self.train.init_checkpoint
    if init_checkpoint:
      reader = checkpoint.Reader(init_checkpoint, self.mesh)
      if reader.shapes != jax.tree.map(lambda s: s.shape, self.abstract_params):
        raise TrainingError(f'train.init_checkpoint={init_checkpoint}: its parameter shapes do '
                            'not match config.model')
      params = reader.load(self.cfg.model.param_dtype)
    else:
      _, params, _, _, _ = steps.init_sharded(self.cfg.model, self.optimizer, self.mesh,
                                              self.cfg.seed)
      if self.cfg.model.encoder.pretrained:
        params = whisper.with_pretrained_encoder(params, self.cfg.model.encoder)
    opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)
    return TrainState(params, opt_state)

  def restore(self, step: int) -> TrainState:
    """The state saved at `step`, placed straight into this run's shardings (the saving run may
    have used another mesh), and the data iterator moved to where it was."""
    abstract_opt = jax.eval_shape(self.optimizer.init, self.abstract_params)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    target = {'params': jax.tree.map(with_sharding, self.abstract_params, self.param_shardings),
              'opt_state': jax.tree.map(with_sharding, abstract_opt, self.opt_shardings)}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(self.train_data),
        progress=ocp.args.JsonRestore()))
    progress = restored['progress']
    return TrainState(restored['state']['params'], restored['state']['opt_state'],
                      progress['step'], progress['skipped_in_row'])

  def save(self, state: TrainState, metrics: dict | None, force: bool = False) -> None:
    self.manager.save(state.step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': state.params, 'opt_state': state.opt_state}),
        data=grain.checkpoint.CheckpointSave(self.train_data),
        progress=ocp.args.JsonSave({'step': state.step, 'skipped_in_row': state.skipped_in_row,
                                    'stage': self.train.stage})),
        metrics=metrics, force=force)

  def run(self) -> TrainState:
    train = self.train
    latest = self.manager.latest_step()
    state = self.restore(latest) if latest is not None else self.initial_state()
    log = MetricsLog(self.workdir, state.step)
    if latest is not None and is_main_process():
      print(f'resumed from step {latest} in {self.workdir}', flush=True)

    first = next(self.train_data)
    train_step, evaluate = self._steps(first)
    previous = signal.signal(signal.SIGTERM, self._request_stop)
    last_eval, start, start_step, batch = None, time.time(), state.step, first
    try:
      while state.step < train.steps:
        state.params, state.opt_state, metrics = train_step(state.params, state.opt_state, batch)
        state.step += 1
        metrics = jax.device_get(metrics)
        state.skipped_in_row = state.skipped_in_row + 1 if metrics['skipped'] else 0
        if state.skipped_in_row >= train.max_skipped_in_row:
          raise TrainingError(
              f'{state.skipped_in_row} steps in a row had a non-finite loss or gradient (last at '
              f'step {state.step}); stopping. The parameters are those of the last finite step; '
              'lower the learning rate or check the data.')
        if state.step % train.log_every == 0 or state.step == train.steps:
          log.add(state.step, 'train', metrics)
          self._progress(state, metrics, batch, start, start_step)
        if state.step % train.eval_every == 0 or state.step == train.steps:
          last_eval = {f'eval/{k}': v for k, v in evaluate(state.params).items()}
          log.add(state.step, 'eval', {k[5:]: v for k, v in last_eval.items()})
          if is_main_process():
            print(f'  eval at step {state.step}: ' + '  '.join(
                f'{k[5:]} {v:.4f}' for k, v in last_eval.items()), flush=True)
        preempted = (self.stop_requested or self.manager.reached_preemption(state.step)
                     or state.step - start_step == train.run_steps)
        if state.step % train.checkpoint_every == 0 or state.step == train.steps or preempted:
          self.save(state, last_eval, force=True)
        if preempted:
          self.manager.wait_until_finished()
          if is_main_process():
            print(f'stopped at step {state.step} of {train.steps}; checkpoint saved, a rerun '
                  'resumes', flush=True)
          return state
        batch = next(self.train_data)
      self.manager.wait_until_finished()
      self.export_final(state)
      log.plot(os.path.join(self.workdir, 'loss_curves.png'),
               ('loss', 'accuracy', 'margin') if self.is_dpo
               else ('loss', 'text_loss', 'speech_loss'))
    finally:
      signal.signal(signal.SIGTERM, previous)
      log.close()
      self.manager.close()
    return state

  def _steps(self, first: dict):
    """(train_step(params, opt_state, local batch), evaluate(params)) of this stage: the SFT
    objective, or DPO against the frozen reference model."""
    cfg, train = self.cfg, self.train
    if self.is_dpo:
      dpo_step, eval_step, shardings = dpo.jit_dpo_steps(
          cfg, self.graphdef, self.optimizer, self.mesh, self.param_shardings,
          self.opt_shardings, first)
      reference = self._reference_params()
      return (lambda params, opt_state, batch: dpo_step(
                  params, opt_state, reference, input_pipeline.to_global(batch, shardings)),
              lambda params: dpo.evaluate(cfg, params, reference, eval_step, shardings,
                                          cfg.data.eval_split, train.eval_batches))
    shardings = input_pipeline.global_batch_shardings(first, self.mesh)
    sft_step, _ = steps.jit_train_step(cfg.model, self.graphdef, self.optimizer, self.mesh,
                                       self.param_shardings, self.opt_shardings, first,
                                       train.grad_accum_steps, train.frozen)
    eval_step = held_out.make_eval_step(self.graphdef, self.param_shardings, shardings)
    return (lambda params, opt_state, batch: sft_step(params, opt_state,
                                                      input_pipeline.to_global(batch, shardings)),
            lambda params: held_out.evaluate(cfg, params, eval_step, shardings,
                                               cfg.data.eval_split, train.eval_batches))

  def _reference_params(self) -> dict:
    """DPO's frozen reference: dpo.reference_checkpoint, else the stage's init_checkpoint (its
    own buffers: the policy's are donated at every step)."""
    path = self.cfg.dpo.reference_checkpoint or self.train.init_checkpoint
    if not path:
      raise TrainingError('the dpo stage needs a reference model: set dpo.reference_checkpoint '
                          'or train.init_checkpoint')
    return checkpoint.Reader(path, self.mesh).load(self.cfg.model.param_dtype)

  def export_final(self, state: TrainState) -> None:
    final = os.path.join(self.workdir, 'final')
    if os.path.exists(final):
      return  # written by an earlier run that reached the same last step
    checkpoint.save_params(final, self.cfg.model, state.params)

  def _request_stop(self, signum, frame) -> None:
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint at the next step boundary')
    self.stop_requested = True

  def _progress(self, state: TrainState, metrics: dict, batch: dict, start: float,
                start_step: int) -> None:
    if not is_main_process():
      return
    done = state.step - start_step
    per_step = (time.time() - start) / max(done, 1)
    rows = [batch['chosen'], batch['rejected']] if self.is_dpo else [batch]
    positions = sum(float((b['segment_ids'] > 0).sum()) for b in rows) * jax.process_count()
    eta = per_step * (self.train.steps - state.step)
    details = (f'accuracy {metrics["accuracy"]:.3f}, margin {metrics["margin"]:.4f}'
               if self.is_dpo else
               f'text {metrics["text_loss"]:.4f}, speech {metrics["speech_loss"]:.4f}')
    print(f'step {state.step}/{self.train.steps}  loss {metrics["loss"]:.4f} ({details})  '
          f'grad_norm {metrics["grad_norm"]:.3f}  {positions / per_step:,.0f} positions/s  '
          f'{per_step:.2f} s/step  ETA {eta:,.0f} s'
          + (f'  skipped {state.skipped_in_row} in a row' if state.skipped_in_row else ''),
          flush=True)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """jax.distributed.initialize: explicit arguments, or JAX's detection of the cluster (TPU pod
  metadata, SLURM, ...) when they are None."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info('process %d of %d, %d local of %d devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program."""
  config_flags.DEFINE_config_file('config', None, 'configs/<exp>.py:<stage>')
  flags.DEFINE_string('workdir', None, 'Checkpoints, logs and plots.', required=True)
  flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize first.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (default: detected).')
  flags.DEFINE_integer('num_processes', None, 'Processes in the job (default: detected).')
  flags.DEFINE_integer('process_id', None, 'This process, 0 the coordinator (default: detected).')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.multihost:
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  cfg = FLAGS.config
  if cfg is None:
    raise app.UsageError('--config=configs/<exp>.py:<stage> is required')
  if not cfg.data.dir:
    raise app.UsageError('config.data.dir is empty: point it at a folder made by '
                         'python -m fac_jax.data.prepare')
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if is_main_process():
    with open(os.path.join(FLAGS.workdir, 'config.json'), 'w') as f:
      f.write(cfg.to_json(indent=2))
    print(f'stage {cfg.train.stage}: {jax.device_count()} devices x '
          f'{jax.devices()[0].platform} in {jax.process_count()} process(es); mesh '
          f'{dict(cfg.mesh)}', flush=True)
  try:
    Trainer(cfg, FLAGS.workdir).run()
  except TrainingError as e:
    raise SystemExit(f'error: {e}') from None


def run():
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
