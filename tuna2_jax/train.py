r"""Trains Tuna-2 / Tuna-R.

  python -m tuna2_jax.train --config=experiments/shapes.py[:args] --workdir=DIR \
      [--config.total_steps=2000 ...]

Sections: config -> mesh -> state (init or resume) -> data -> step -> loop (log, eval,
checkpoint), built from trainer.py's skeleton; this file brings the loss and the eval and
sample hooks. Re-running with the same workdir resumes from its latest checkpoint.

Several processes (pods, clusters; see launch/): every process runs this same command, joined by
jax.distributed (distributed.py). Each loads its share of the batch; only process 0 writes logs,
metrics and samples; all take part in checkpoints. SIGTERM saves at the next step and exits 0;
one that comes before the first step exits 0 without training. The workdir may be a gs:// URL
(paths.py). A damaged newest checkpoint falls back to the newest intact one (checkpoint.py); a
resumed run whose config differs records it as config.<step>.json (config_history.py). The
console shows WARNING and above (--log_level), a bar that moves every step and a closing summary.
`--dry_run` compiles the step for the mesh without allocating and prints per-device memory
(dry_run.py); add `--dry_run_topology=v5p-128` (and `--dry_run_slices=N`) to compile for a TPU
slice from any host with libtpu, or `--dry_run_devices=N` to compile for N fake CPU devices.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import ml_collections
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from tuna2_jax import checkpoint as ckpt_lib
from tuna2_jax import cli
from tuna2_jax import config_history
from tuna2_jax import distributed
from tuna2_jax import dry_run as dry_run_lib
from tuna2_jax import evaluate as eval_lib
from tuna2_jax import flops
from tuna2_jax import metrics as metrics_lib
from tuna2_jax import objectives
from tuna2_jax import paths
from tuna2_jax import sample_grids
from tuna2_jax import sharding
from tuna2_jax import topologies
from tuna2_jax import train_state
from tuna2_jax import trainer
from tuna2_jax.convert import init_from
from tuna2_jax.data import pipeline
from tuna2_jax.data.tokenizer import Tokenizer
from tuna2_jax.models import attention
from tuna2_jax.models.tuna import validate_model_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs, samples).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Compile the train step for the mesh ahead of '
                             'time, print per-device memory and exit; nothing is allocated.')
_DRY_RUN_DEVICES = flags.DEFINE_integer('dry_run_devices', None, 'With --dry_run: compile for '
                                        'this many fake CPU devices instead of the real ones.')
_DRY_RUN_TOPOLOGY = flags.DEFINE_string(
    'dry_run_topology', None, 'With --dry_run: compile for this TPU slice (v5p-8 .. v5p-1024, '
    'v5e-*, v6e-*; needs libtpu) or GPU node (h100-8; needs the CUDA plugin) and compare the '
    'peak with its memory: exit 1 when it does not fit.')
_DRY_RUN_SLICES = flags.DEFINE_integer('dry_run_slices', 1, 'With --dry_run_topology: that '
                                       'many slices (GPU: nodes) joined over DCN.')
_DRY_RUN_STEP_TIME = flags.DEFINE_float('dry_run_step_time', None, 'With --dry_run: a step '
                                        'time in seconds at which to report the MFU.')


def validate_step(config: ml_collections.ConfigDict) -> None:
  """Raises for a config whose train step cannot be built (what a dry run needs: no tokenizer,
  no data)."""
  validate_model_config(config.model, config.data.image_size)
  for key in ('total_steps', 'batch_size', 'seq_len', 'log_every', 'checkpoint_every',
              'keep_checkpoints'):
    if config[key] <= 0:
      raise ValueError(f'{key}={config[key]}: expected a positive integer')
  if config.eval_every < 0:
    raise ValueError(f'eval_every={config.eval_every}: expected 0 (no evaluation) or more')
  train_state.learning_rate(config.optim, config.total_steps)  # raises on an unknown schedule


def validate(config: ml_collections.ConfigDict) -> Tokenizer:
  """Raises for a config that cannot train; returns the run's tokenizer."""
  validate_step(config)
  tok = Tokenizer.for_config(config)  # raises for a pretrained decoder without its tokenizer
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f'the tokenizer has {tok.vocab_size} tokens but model.vocab_size='
                     f'{config.model.vocab_size}')
  pipeline.check_data(config)  # a missing data source stops the run here, before any state
  # So does a stream none of whose first records can train (all skipped, or none fits seq_len).
  pipeline.check_streams(config, tok, process_index=jax.process_index(),
                         process_count=jax.process_count())
  eval_lib.check(config)  # so do held-out streams and sample images that cannot be read
  return tok


def tuna_loss(config: ml_collections.ConfigDict, graphdef) -> trainer.LossFn:
  """Tuna-2's loss (objectives.compute_loss: text CE + flow matching) of the parameters."""

  def loss_fn(params, batch, key, step):
    return objectives.compute_loss(nnx.merge(graphdef, params), batch, key, step, config)

  return loss_fn


def make_train_step(config: ml_collections.ConfigDict, graphdef, tx: optax.GradientTransformation,
                    mesh=None, params: nnx.State | None = None):
  """(state, batch, key) -> (state, metrics): one AdamW step plus the EMA update.

  With a mesh, the model's activation constraints (sharding.constrain) follow its rules table.
  Only optim.trainable's parameters are differentiated, labelled on `params` (the abstract
  parameters; None builds them).
  """
  return trainer.make_step(tuna_loss(config, graphdef), tx,
                           train_state.learning_rate(config.optim, config.total_steps),
                           ema_decay=config.optim.ema_decay, mesh=mesh,
                           rules=config.sharding_rules,
                           microbatches=config.optim.get('microbatches', 1),
                           trained=train_state.trained_mask(config, params))


def setup(config: ml_collections.ConfigDict, mesh):
  """(graphdef, abstract state, shardings, jitted step) after every check of the layout.

  Raises ValueError (before anything is allocated) for a batch that does not split over the
  mesh, head counts the tensor axes do not divide, a rule naming an unknown mesh axis, a mesh
  axis that does not divide the dimension it splits, or too many parameter bytes left whole
  under an fsdp mesh.
  """
  trainer.check_batch(config.batch_size, mesh, config.sharding_rules,
                      config.optim.get('microbatches', 1))
  attention.check_kernel_sharding(config.model, mesh, config.sharding_rules)
  graphdef, _ = train_state.abstract_model(config)
  abstract, shardings = train_state.state_shardings(config, mesh)
  sharding.check_replication(abstract['params'], shardings['params'], mesh,
                             config.max_replicated_fraction)
  tx = train_state.optimizer(config, abstract['params'])
  step_fn = trainer.jit_step(make_train_step(config, graphdef, tx, mesh, abstract['params']),
                             shardings, mesh, config.sharding_rules)
  return graphdef, abstract, shardings, step_fn


def dry_run(config: ml_collections.ConfigDict, devices=None,
            topology: topologies.Topology | None = None,
            step_time_s: float | None = None) -> dict:
  """Compiles the train step for config's mesh over `devices` (default: jax's) on abstract
  inputs; returns the memory report, with HBM and fit for a TPU topology's devices. Neither the
  tokenizer nor the data is needed (validate_step)."""
  validate_step(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  _, abstract, shardings, step_fn = setup(config, mesh)
  report = dry_run_lib.memory_report(step_fn, abstract, shardings,
                                     dry_run_lib.abstract_batch(config, mesh), mesh)
  return dry_run_lib.add_target(report, config, topology, step_time_s)


def _topology_devices(config: ml_collections.ConfigDict) -> tuple[topologies.Topology, list]:
  """The TPU slice of --dry_run_topology, checked against the config before libtpu loads."""
  if _DRY_RUN_DEVICES.value:
    raise app.UsageError('--dry_run_topology and --dry_run_devices exclude each other')
  topology = topologies.get(_DRY_RUN_TOPOLOGY.value)
  dry_run_lib.check_target(config, topology, _DRY_RUN_SLICES.value)
  try:
    topologies.check_compiler(topology)
  except ImportError as e:
    cli.fail(str(e))
  jax.config.update('jax_platforms', 'cpu')  # the host compiles; the plugin describes the target
  return topology, topologies.devices(topology, _DRY_RUN_SLICES.value)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training in workdir; returns the last logged metrics."""
  # --- config ---
  tok = validate(config)
  writes_logs = jax.process_index() == 0
  preemption = distributed.PreemptionWatcher()  # a SIGTERM from here on is honoured
  if distributed.sigterm_received():  # e.g. during start-up: stop before anything is written
    logging.warning('SIGTERM before training started: exiting; the workdir was not touched')
    preemption.close()
    return {}

  # --- mesh: every layout check runs here, before any state exists ---
  mesh = sharding.make_mesh(config.mesh)
  graphdef, abstract, shardings, step_fn = setup(config, mesh)
  rules = config.sharding_rules

  # --- state: resume (the newest intact checkpoint), or initialise into its shardings ---
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                               save_every=config.checkpoint_every)
  config_json = config.to_json_best_effort(indent=2)
  if steps := ckpt.all_steps():  # a change the checkpoint cannot follow stops here, untouched
    config_history.check_resumable(workdir, config_json, steps[-1])
  start, state, data_state, totals = trainer.restore_or_init(
      ckpt, abstract, shardings, lambda: _initial_state(config, mesh, abstract, shardings))
  # Recorded only after the restore: a checkpoint of another model raises there, untouched.
  if writes_logs:
    config_history.record(workdir, config_json, start)
  distributed.barrier('state_ready', config.barrier_timeout_s)

  # --- data ---
  # validate() has run pipeline.check_data: its source checks and warnings are not repeated.
  dataset = pipeline.train_dataset(config, tok, process_index=jax.process_index(),
                                   process_count=jax.process_count(), sources_checked=True)
  data_iter = iter(dataset)
  if data_state is not None:
    trainer.continue_data(data_iter, data_state, start, config)

  # --- loop ---
  sink = None
  if writes_logs and config.wandb.enabled:
    sink = metrics_lib.WandbSink(workdir, config.wandb, config.to_dict())
  writer = metrics_lib.MetricsWriter(workdir, enabled=writes_logs, wandb=sink)
  progress = metrics_lib.Progress(config.total_steps, start, enabled=writes_logs)
  done, samples = start, None
  history = eval_lib.EvalHistory(config, tok, writer, totals)
  # Tokens, model FLOPs and MFU of the logged steps; the skipped-record counts continue the
  # totals of the runs this one resumes (kept in the checkpoints), so the logged counts add up.
  stats = trainer.StepStats(functools.partial(
      flops.train_step_flops, config.model,
      trained=train_state.trained_parts(config, abstract['params'])),
                            process_count=jax.process_count(), device_count=jax.device_count(),
                            peak_flops=flops.peak_flops(jax.devices()[0].device_kind),
                            resumed=totals)  # no peak on CPUs: no MFU then
  key = jax.random.key(config.seed)
  chrono = trainer.Chrono()
  last, total = {}, config.total_steps
  prev_aux, prev_tokens, shown = None, 0.0, {}
  bar_rate = metrics_lib.RateMeter()
  for step in range(start + 1, total + 1):
    if step == start + 1 and distributed.sigterm_received():
      logging.warning('SIGTERM before the first step: exiting without training; the workdir is '
                      'as it was (a restart resumes from step %d)', start)
      break
    local = next(data_iter)
    step_tokens, step_flops = stats.add(local)
    history.add_step_flops(step_flops)
    state, aux = step_fn(state, sharding.global_batch(local, mesh, rules), key)
    # The bar shows the previous step's loss: fetching it waits for that step only, while this
    # one is already queued, so the devices never idle for the console.
    if prev_aux is not None:
      shown['loss'] = float(prev_aux['loss'])
      # That fetch returned when the previous step finished: the bar's rate is over finished
      # steps, not over dispatches (which return at once).
      if bar_rate.add(time.perf_counter(), prev_tokens) is not None:
        shown['tok/s'] = bar_rate.rate
    prev_aux, prev_tokens = aux, step_tokens
    progress.update(step, shown)
    stop = preemption.should_stop(step)
    if trainer.itstime(step, config.log_every, total, force=stop):
      aux = jax.device_get(aux)
      elapsed = chrono.lap()
      last = {k: float(v) for k, v in aux.items()}
      last.update(stats.log_figures(elapsed))
      writer.write_scalars(step, last)
      shown['loss'] = last['loss']
    if not stop and history.due(step):
      with chrono.paused():
        history.evaluate(_eval_model(config, graphdef, state), step)
    if not stop and trainer.itstime(step, config.eval_every, total):
      with chrono.paused():
        # Every process samples (the parameters are spread over all of them); process 0 writes.
        samples = sample_grids.write_samples(_eval_model(config, graphdef, state), tok, config,
                                             workdir, step, writer=writer)
        logging.info('wrote %s', samples)
    if trainer.itstime(step, config.checkpoint_every, total, force=stop):
      with chrono.paused():
        meta = dict(history.totals(), **stats.checkpoint_figures())
        ckpt.save(step, state, data_state=data_iter.get_state(), meta=meta, force=True)
    done = step
    if stop:
      logging.warning('preempted: saved the checkpoint of step %d; exiting', step)
      break
  ckpt.wait()
  saved = ckpt.all_steps()
  ckpt.close()
  preemption.close()
  progress.close()
  writer.close()
  distributed.barrier('train_done', config.barrier_timeout_s)
  if writes_logs:
    print(metrics_lib.summary(
        workdir, start, done, total, chrono.total_s(), last,
        {'checkpoints': paths.join(ckpt.directory, str(saved[-1])) if saved else None,
         'samples': samples and paths.join(workdir, 'samples'),
         'eval history': (paths.join(workdir, eval_lib.HISTORY_FILE)
                          if history.every else None),
         'metrics': paths.join(workdir, metrics_lib.METRICS_FILE),
         'tensorboard': paths.join(workdir, metrics_lib.TENSORBOARD_DIR),
         'config': config_history.recorded(workdir)[-1][1]}), flush=True)
  return last


def _initial_state(config: ml_collections.ConfigDict, mesh, abstract: dict,
                   shardings: dict) -> dict:
  """A fresh run's state: initialised into its shardings, then the configured pretrained
  weights (init_from) loaded over it."""
  init_from.check_required(config)
  state = train_state.create_sharded_state(config, mesh)
  if init_from.wanted(config):
    state = init_from.start_from(state, init_from.pretrained_params(
        config, abstract['params'], shardings['params']))
  return state


def _eval_model(config: ml_collections.ConfigDict, graphdef, state: dict):
  """The model held-out metrics and sample grids are computed with (eval.use_ema)."""
  return nnx.merge(graphdef, trainer.eval_params(state, config.eval.use_ema))


def _use_fake_cpu_devices(count: int) -> None:
  """Makes jax see `count` CPU devices; only effective before its backend first starts."""
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={count}')
  jax.config.update('jax_platforms', 'cpu')


def main(argv):
  del argv
  distributed.watch_sigterm()  # from here on, a SIGTERM stops the run cleanly
  cli.config_file()
  if _DRY_RUN.value:
    topology, devices = None, None
    if _DRY_RUN_TOPOLOGY.value:
      topology, devices = _topology_devices(_CONFIG.value)
    elif _DRY_RUN_DEVICES.value:
      _use_fake_cpu_devices(_DRY_RUN_DEVICES.value)
    try:
      report = dry_run(_CONFIG.value, devices, topology, _DRY_RUN_STEP_TIME.value)
    except dry_run_lib.DoesNotFit as e:
      print(f'DOES NOT FIT: {e}', flush=True)
      sys.exit(1)
    print(dry_run_lib.format_report(report), flush=True)
    if topology is not None and not report['fits']:
      sys.exit(1)
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  paths.check_supported(_WORKDIR.value)
  distributed.initialize_from_flags()
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
