"""The trainer: one command for every stage (prealign, stage1, stage2, dpo) on any device mesh, with
orbax checkpoints, exact resumption, evaluation and logs; the same command on every host.

  python -m fac_jax.train.trainer --config=configs/tiny.py:prealign --workdir=DIR
      [--config.data.dir=...] [--config.train.init_checkpoint=CKPT] [--on_mismatch=refuse|redo]
      [--multihost [--coordinator_address=host:port --num_processes=N --process_id=I]]

DIR/checkpoints/<step>/   orbax steps: parameters, optimizer state, grain iterator state, progress
DIR/final/                the last parameters as a fac_jax checkpoint (init_checkpoint of a stage),
                          with what `python -m fac_jax.inference.chat` needs (chat_assets)
DIR/metrics.jsonl         train and eval metrics by step; DIR/tensorboard/ the same as events
DIR/loss_curves.png       train and eval losses at the end
DIR/fingerprint.json      what the checkpoints were made from (`settings`); final/ has its own
DIR/profile/              a jax.profiler trace of train.profile_steps, for TensorBoard
A rerun with the same DIR resumes from the latest checkpoint (model, optimizer and data position),
one with more train.steps continues to them and replaces final/; checkpoints made with other
settings are refused, naming them, or with --on_mismatch=redo deleted and trained anew. The
prepared data's properties are checked against the config before the first step. SIGTERM saves a
checkpoint at the next step boundary and exits.
"""

import dataclasses
import json
import os
import shutil
import signal
import time

from absl import app, flags, logging
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags
from orbax.checkpoint.checkpoint_managers import preservation_policy

from fac_jax import cli, fingerprint, sharding
from fac_jax.checkpoints import adapters, checkpoint, whisper
from fac_jax.data import input_pipeline, prepare
from fac_jax.model import fun_audio_chat, lora as lora_lib
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


def _metrics_entry(line: str) -> dict | None:
  try:
    entry = json.loads(line)
  except json.JSONDecodeError:
    return None
  return entry if isinstance(entry, dict) and isinstance(entry.get('step'), int) else None


def read_metrics(path: str) -> list[dict]:
  """The entries of a metrics.jsonl. A torn last line (the run died while writing it) is left
  out; any other line that is no entry raises TrainingError naming it."""
  with open(path, encoding='utf-8') as f:
    *lines, last = f.read().split('\n')  # `last` is '' unless the last line was cut
  entries = []
  for number, line in enumerate(lines, start=1):
    entry = _metrics_entry(line)
    if entry is None:
      raise TrainingError(f'{path}:{number}: not a metrics entry (a JSON object with a "step"); '
                          'remove the line to resume')
    entries.append(entry)
  torn = last and _metrics_entry(last)
  if torn:
    entries.append(torn)  # complete, only its newline missing
  elif last:
    logging.warning('%s:%d: left out a torn last line', path, len(lines) + 1)
  return entries


class MetricsLog:
  """metrics.jsonl and TensorBoard events, written by process 0 only; entries past a restored step
  (from a run that died after its last checkpoint) are dropped."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.entries = []
    if os.path.exists(self.path):
      self.entries = [e for e in read_metrics(self.path) if e['step'] <= resume_step]
    self.writer = None
    if is_main_process():
      with open(self.path, 'w') as f:
        f.writelines(json.dumps(e) + '\n' for e in self.entries)
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def add(self, step: int, prefix: str, metrics: dict) -> None:
    """Scalars as numbers. Arrays (an MoE router's per-layer metrics) as nested lists in
    metrics.jsonl and, in TensorBoard, a scalar per entry of a vector (name/<layer>) and a
    histogram per row of a matrix (name/<layer>: the spread of the experts' shares)."""
    entry = {'step': step, **{f'{prefix}/{k}': float(v) if np.ndim(v) == 0 else
                              np.asarray(v, np.float64).tolist() for k, v in metrics.items()}}
    self.entries.append(entry)
    if self.writer is not None:
      with open(self.path, 'a') as f:
        f.write(json.dumps(entry) + '\n')
      for name, value in entry.items():
        if name == 'step':
          continue
        value = np.asarray(value)
        if value.ndim == 0:
          self.writer.add_scalar(name, value, step)
        elif value.ndim == 1:
          for index, part in enumerate(value):
            self.writer.add_scalar(f'{name}/{index}', part, step)
        else:
          for index, row in enumerate(value):
            self.writer.add_histogram(f'{name}/{index}', row, step)

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


class StepProfiler:
  """A jax.profiler trace of train.profile_steps = (first, count): steps first to
  first + count - 1, numbered as logged, in DIR/profile for TensorBoard's profile tab (each
  process traces its own host). A run resumed inside those steps traces the rest of them."""

  def __init__(self, workdir: str, profile_steps: tuple[int, int]):
    first, count = profile_steps
    if count < 0 or (count and first < 1):
      raise ValueError(f'train.profile_steps={tuple(profile_steps)}: expected (first step, '
                       'count) with steps numbered from 1 and count >= 0')
    self.steps = range(first, first + count)
    self.path = os.path.join(workdir, 'profile')
    self.tracing = False

  def before_step(self, step: int) -> None:
    if step in self.steps and not self.tracing:
      jax.profiler.start_trace(self.path)
      self.tracing = True

  def after_step(self, step: int) -> None:
    """Once step `step`'s results are on the host."""
    if step + 1 not in self.steps:
      self.stop()

  def stop(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def chat_assets(cfg: ml_collections.ConfigDict) -> checkpoint.ChatAssets:
  """The data's text and speech tokenizers and the tasks of the training split, then those of
  train.init_checkpoint that the split lacks (a stage keeps its lineage's system prompts)."""
  assets = prepare.chat_assets(cfg.data.dir, cfg.data.train_split)
  init = cfg.train.init_checkpoint
  inherited = checkpoint.chat_settings(init).get('tasks', {}) if init else {}
  return dataclasses.replace(assets, tasks={**assets.tasks, **{
      name: task for name, task in inherited.items() if name not in assets.tasks}})


# Trainer settings that change neither the parameters nor the updates that lead to them; `steps`
# counts in final/'s fingerprint only, so that a run with more steps continues the same run.
UNTRACKED = ('steps', 'run_steps', 'log_every', 'eval_every', 'eval_batches', 'checkpoint_every',
             'keep_checkpoints', 'best_metric', 'async_checkpointing', 'max_skipped_in_row',
             'init_checkpoint', 'profile_steps')
TRACKED_DATA = ('train_split', 'batch_size', 'seq_len', 'num_windows')
RUN_OUTPUTS = ('checkpoints', 'final', 'metrics.jsonl', 'tensorboard', 'loss_curves.png',
               'profile')


def settings(cfg: ml_collections.ConfigDict) -> dict:
  """What a run's checkpoints depend on: the model, batch and update settings, and the
  fingerprints of its training split and of the checkpoints it starts from (and, for DPO,
  compares with)."""
  # Without adapters the LoRA fields change nothing: left out, runs from before they existed match.
  untracked = UNTRACKED if lora_lib.enabled(cfg.train.lora) else (*UNTRACKED, 'lora')
  config = {'model': cfg.model, 'seed': cfg.seed,
            'train': {k: v for k, v in cfg.train.items() if k not in untracked},
            'data': {k: cfg.data[k] for k in TRACKED_DATA}}
  inputs = {'data': prepare.split_fingerprint(cfg.data.dir, cfg.data.train_split)}
  if cfg.train.init_checkpoint:
    inputs['init_checkpoint'] = fingerprint.of_folder(cfg.train.init_checkpoint)
  if cfg.train.stage == 'dpo':
    config['dpo'] = {k: v for k, v in cfg.dpo.items() if k != 'reference_checkpoint'}
    inputs['reference'] = fingerprint.of_folder(cfg.dpo.reference_checkpoint
                                                or cfg.train.init_checkpoint)
  return {'config': config, 'inputs': inputs}


def final_settings(cfg: ml_collections.ConfigDict) -> dict:
  """What final/ depends on: the run's settings and its number of steps."""
  made = settings(cfg)
  made['config']['train']['steps'] = cfg.train.steps
  return made


def train_to_final(cfg: ml_collections.ConfigDict, workdir: str, on_mismatch: str) -> str:
  """`workdir`/final made with cfg's settings: reused when it is, else trained (a run with more
  steps than before continues it; one with other settings is redone or refused)."""
  final = os.path.join(workdir, 'final')
  made = final_settings(cfg)
  if fingerprint.differences(fingerprint.read(os.path.join(final, fingerprint.FILE)), made):
    Trainer(cfg, workdir, on_mismatch).run()
  if fingerprint.differences(fingerprint.read(os.path.join(final, fingerprint.FILE)), made):
    raise SystemExit(f'{workdir} stopped before its last step; rerun to resume')
  return final


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

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, on_mismatch: str = 'refuse'):
    self.cfg, self.train, self.workdir = cfg, cfg.train, workdir
    prepare.check_dataset(cfg.data.dir, cfg.model)
    self._claim_workdir(on_mismatch)
    self.mesh = sharding.make_mesh(cfg.mesh)
    self.lora = lora_lib.enabled(self.train.lora)
    if self.lora and not self.train.init_checkpoint:
      raise TrainingError('train.lora.rank > 0 trains adapters of a base model: set '
                          'train.init_checkpoint to it')
    abstract = lora_lib.abstract_model(cfg.model, self.train.lora)
    self.graphdef, abstract_state = nnx.split(abstract)
    self.abstract_params = nnx.to_pure_dict(abstract_state)  # ShapeDtypeStructs
    # What checkpoints hold: with LoRA only the trained leaves (the base is init_checkpoint).
    self.saved_mask = (optim.trainable_mask(self.abstract_params,
                                            optim.frozen_patterns(self.train))
                       if self.lora else jax.tree.map(lambda _: True, self.abstract_params))
    self.optimizer = optim.make_optimizer(self.train, self.abstract_params)
    self.param_shardings = sharding.param_shardings(abstract_state, self.mesh)
    self.opt_shardings = steps.optimizer_shardings(
        jax.eval_shape(self.optimizer.init, self.abstract_params), self.param_shardings,
        self.mesh)
    self.is_dpo = self.train.stage == 'dpo'
    dataset = input_pipeline.dpo_dataset if self.is_dpo else input_pipeline.dataset
    self.train_data = iter(dataset(cfg, cfg.data.train_split))
    self.chat_assets = chat_assets(cfg)
    self.manager = checkpoint_manager(workdir, self.train)
    self.stop_requested = False

  def _claim_workdir(self, on_mismatch: str) -> None:
    """Records the run's settings in DIR/fingerprint.json. Checkpoints made with other settings,
    or past train.steps, are removed ('redo') or refused; a run with more steps continues."""
    record = os.path.join(self.workdir, fingerprint.FILE)
    run = settings(self.cfg)
    checkpoints = os.path.join(self.workdir, 'checkpoints')
    reached = max((int(name) for name in os.listdir(checkpoints) if name.isdigit()),
                  default=0) if os.path.isdir(checkpoints) else 0
    found = []
    if reached or os.path.exists(os.path.join(self.workdir, 'final')):
      found = fingerprint.differences(fingerprint.read(record), run)
      if reached > self.train.steps:
        found.append(f'config.train.steps: {reached} reached -> {self.train.steps}')
    keep = fingerprint.decide(found, on_mismatch, self.workdir)
    multihost_utils.sync_global_devices(f'workdir checked: {self.workdir}')
    if is_main_process():
      for name in () if keep else RUN_OUTPUTS:
        path = os.path.join(self.workdir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.exists(path):
          os.remove(path)
      os.makedirs(self.workdir, exist_ok=True)
      fingerprint.write(record, run)
    multihost_utils.sync_global_devices(f'workdir claimed: {self.workdir}')

  def initial_state(self) -> TrainState:
    """Random (with a pretrained encoder where model.encoder.pretrained says) or
    `init_checkpoint` parameters, fresh optimizer state."""
    if self.train.init_checkpoint:
      params = self._base_params()
      if self.lora:
        params = self._adapted(params, self._initial_adapters())
    else:
      _, params, _, _, _ = steps.init_sharded(self.cfg.model, self.optimizer, self.mesh,
                                              self.cfg.seed)
      if self.cfg.model.encoder.pretrained:
        params = whisper.with_pretrained_encoder(params, self.cfg.model.encoder)
    opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)
    return TrainState(params, opt_state)

  def _base_params(self) -> dict:
    """train.init_checkpoint's parameters (an adapter checkpoint folded onto its base)."""
    path = self.train.init_checkpoint
    try:
      params = adapters.load_params(path, self.mesh, self.cfg.model.param_dtype)
    except (adapters.AdapterError, FileNotFoundError, ValueError) as e:
      raise TrainingError(f'train.init_checkpoint={path}: {e}') from None
    plain = fun_audio_chat.abstract_model(self.cfg.model)
    if (jax.tree.map(lambda x: x.shape, params)
        != jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(plain)))):
      raise TrainingError(f'train.init_checkpoint={path}: its parameter shapes do not match '
                          'config.model')
    return params

  def _adapted(self, plain: dict, trained: dict) -> dict:
    """The adapted model's parameters in this run's shardings: a plain model's, with `trained`
    (adapters, fully trained leaves) in place and, for QLoRA, the base kernels quantised."""
    adapt = lambda p, t: lora_lib.quantize_base(lora_lib.insert(p, t), self.train.lora)
    return jax.jit(adapt, out_shardings=self.param_shardings)(plain, trained)

  def _initial_adapters(self) -> dict:
    """The adapters at initialisation (B = 0), made in their shardings."""
    adapter_shardings = lora_lib.adapter_leaves(self.param_shardings)
    make = lambda: lora_lib.adapter_leaves(nnx.to_pure_dict(nnx.state(
        lora_lib.create(self.cfg.model, self.train.lora, self.cfg.seed))))
    return jax.jit(make, out_shardings=adapter_shardings)()

  def restore(self, step: int) -> TrainState:
    """The state saved at `step`, placed straight into this run's shardings (the saving run may
    have used another mesh), and the data iterator moved to where it was."""
    abstract_opt = jax.eval_shape(self.optimizer.init, self.abstract_params)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    saved = optim.select(jax.tree.map(with_sharding, self.abstract_params, self.param_shardings),
                         self.saved_mask)
    target = {'params': saved,
              'opt_state': jax.tree.map(with_sharding, abstract_opt, self.opt_shardings)}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(self.train_data),
        progress=ocp.args.JsonRestore()))
    progress = restored['progress']
    params = restored['state']['params']
    if self.lora:
      params = self._adapted(self._base_params(), params)
    return TrainState(params, restored['state']['opt_state'],
                      progress['step'], progress['skipped_in_row'])

  def save(self, state: TrainState, metrics: dict | None, force: bool = False) -> None:
    self.manager.save(state.step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': optim.select(state.params, self.saved_mask),
                                     'opt_state': state.opt_state}),
        data=grain.checkpoint.CheckpointSave(self.train_data),
        progress=ocp.args.JsonSave({'step': state.step, 'skipped_in_row': state.skipped_in_row,
                                    'stage': self.train.stage})),
        metrics=metrics, force=force)

  def run(self) -> TrainState:
    with jax.set_mesh(self.mesh):  # activation sharding constraints apply only under a mesh
      return self._run()

  def _run(self) -> TrainState:
    train = self.train
    latest = self.manager.latest_step()
    state = self.restore(latest) if latest is not None else self.initial_state()
    profiler = StepProfiler(self.workdir, train.profile_steps)
    log = MetricsLog(self.workdir, state.step)
    if latest is not None and is_main_process():
      print(f'resumed from step {latest} in {self.workdir}', flush=True)

    first = next(self.train_data)
    train_step, evaluate = self._steps(first)
    previous = signal.signal(signal.SIGTERM, self._request_stop)
    last_eval, start, start_step, batch = None, time.time(), state.step, first
    try:
      while state.step < train.steps:
        profiler.before_step(state.step + 1)
        state.params, state.opt_state, metrics = train_step(state.params, state.opt_state, batch)
        state.step += 1
        metrics = jax.device_get(metrics)
        profiler.after_step(state.step)
        state.skipped_in_row = state.skipped_in_row + 1 if metrics['skipped'] else 0
        if state.skipped_in_row >= train.max_skipped_in_row:
          raise TrainingError(
              f'{state.skipped_in_row} steps in a row had a non-finite loss or gradient (last at '
              f'step {state.step}); stopping. The parameters are those of the last finite step; '
              'lower the learning rate or check the data.')
        if state.step % train.log_every == 0 or state.step == train.steps:
          log.add(state.step, 'train', {**metrics, 'dropped': self.train_data.dropped})
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
      if is_main_process():
        print(f'finished at step {state.step} in {self.workdir}; '
              f'{self.train_data.dropped} {"pairs" if self.is_dpo else "conversations"} read fit '
              f'no row of data.seq_len={self.cfg.data.seq_len} positions and '
              f'data.num_windows={self.cfg.data.num_windows} mel windows and were left out',
              flush=True)
    finally:
      profiler.stop()
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
                                       train.grad_accum_steps,
                                       optim.frozen_patterns(train))
    eval_step = held_out.make_eval_step(self.graphdef, self.param_shardings, shardings)
    return (lambda params, opt_state, batch: sft_step(params, opt_state,
                                                      input_pipeline.to_global(batch, shardings)),
            lambda params: held_out.evaluate(cfg, params, eval_step, shardings,
                                               cfg.data.eval_split, train.eval_batches))

  def _reference_params(self) -> dict:
    """DPO's frozen reference: dpo.reference_checkpoint, else the stage's init_checkpoint (its
    own buffers: the policy's are donated at every step); an adapter checkpoint folded."""
    path = self.cfg.dpo.reference_checkpoint or self.train.init_checkpoint
    if not path:
      raise TrainingError('the dpo stage needs a reference model: set dpo.reference_checkpoint '
                          'or train.init_checkpoint')
    reference = adapters.load_params(path, self.mesh, self.cfg.model.param_dtype)
    if self.lora:  # the adapted model's graph with zero adapters computes the reference itself
      reference = self._adapted(reference, jax.tree.map(jnp.zeros_like,
                                                        self._initial_adapters()))
    return reference

  def export_final(self, state: TrainState) -> None:
    """final/ with its fingerprint; one of an earlier, shorter run is replaced. With LoRA, final/
    is an adapter checkpoint of train.init_checkpoint (fac_jax.checkpoints.adapters)."""
    final = os.path.join(self.workdir, 'final')
    record, made = os.path.join(final, fingerprint.FILE), final_settings(self.cfg)
    if os.path.exists(final):
      if not fingerprint.differences(fingerprint.read(record), made):
        return  # written by an earlier run that reached the same last step
      if is_main_process():
        shutil.rmtree(final)
      multihost_utils.sync_global_devices(f'stale final removed: {final}')
    if self.lora:
      adapters.save(final, self.cfg.model, optim.select(state.params, self.saved_mask),
                    self.train.lora, self.train.init_checkpoint, self.chat_assets)
    else:
      checkpoint.save_params(final, self.cfg.model, state.params, self.chat_assets)
    if is_main_process():  # last: a final/ without it is remade
      fingerprint.write(record, made)

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
          + (f'  skipped {state.skipped_in_row} in a row' if state.skipped_in_row else '')
          + (f'  {self.train_data.dropped} fit no row' if self.train_data.dropped else ''),
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
  flags.DEFINE_enum('on_mismatch', 'refuse', fingerprint.ON_MISMATCH, 'Checkpoints in --workdir '
                    'made with other settings: refuse them, or delete them and train anew.')


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
  if is_main_process():
    print(f'stage {cfg.train.stage}: {jax.device_count()} devices x '
          f'{jax.devices()[0].platform} in {jax.process_count()} process(es); mesh '
          f'{dict(cfg.mesh)}', flush=True)
  try:
    trainer = Trainer(cfg, FLAGS.workdir, FLAGS.on_mismatch)
    if is_main_process():  # once the workdir is this run's
      with open(os.path.join(FLAGS.workdir, 'config.json'), 'w') as f:
        f.write(cfg.to_json(indent=2))
    trainer.run()
  except (TrainingError, prepare.DatasetError, fingerprint.Mismatch) as e:
    raise SystemExit(f'error: {e}') from None


def run():
  """Console-script entry point."""
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
