"""The trainer skeleton both trainers (train.py, pretrain_encoder.py) are built from.

A trainer brings its loss, its initial state and its hooks; this module brings the rest:

  make_step / jit_step   loss + optimizer (+ EMA) -> the jitted, sharded, donating update
  state_layout           the abstract state and its shardings, nothing allocated
  restore_or_init        the newest intact checkpoint (checkpoint.py), else the initial state
                         created straight into its shardings
  continue_data          the data iterator set to the checkpoint's position
  eval_params            the parameters evaluations and samples use (EMA or raw), chosen once
  itstime                the one "is it time" predicate of log, eval, samples and checkpoints
  Chrono                 step time without the pauses for evaluation, samples and checkpoints
  StepStats              tokens, model FLOPs, MFU and skipped records of the logged steps

The state is a dict {'step', 'params', 'opt'} plus 'ema' when the step keeps one.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import jax
import ml_collections
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from tuna2_jax import checkpoint as ckpt_lib
from tuna2_jax import sharding
from tuna2_jax.data import packing

# (params, batch, key, step) -> (loss, aux metrics); key is already folded with the step.
LossFn = Callable[[Any, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


# --- step ------------------------------------------------------------------------------------

def make_step(loss_fn: LossFn, tx: optax.GradientTransformation,
              learning_rate: optax.Schedule, *, ema_decay: float | None = None, mesh=None,
              rules=()) -> Callable:
  """(state, batch, key) -> (state, aux): one optimizer step, then the EMA update (ema_decay).

  aux is the loss's metrics plus grad_norm and the step's lr. With a mesh, the model's
  activation constraints (sharding.constrain) follow the rules table while the step is traced.
  """

  def step_fn(state, batch, key):
    with sharding.activation_sharding(mesh, rules):
      key = jax.random.fold_in(key, state['step'])
      (_, aux), grads = jax.value_and_grad(
          lambda params: loss_fn(params, batch, key, state['step']), has_aux=True)(
              state['params'])
      updates, opt = tx.update(grads, state['opt'], state['params'])
      params = optax.apply_updates(state['params'], updates)
      new = {'step': state['step'] + 1, 'params': params, 'opt': opt}
      if ema_decay is not None:
        new['ema'] = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                                  state['ema'], params)
      aux = dict(aux, grad_norm=optax.tree_utils.tree_norm(grads),
                 lr=learning_rate(state['step']))
      return new, aux

  return step_fn


def check_batch(batch_size: int, mesh, rules) -> None:
  """Raises unless the global batch splits evenly over the mesh's batch shards."""
  shards = sharding.batch_shards(mesh, rules)
  if batch_size % shards:
    raise ValueError(f'batch_size={batch_size} is not divisible by the {shards} '
                     f'batch shards of the mesh {dict(mesh.shape)}')


def jit_step(step_fn: Callable, shardings, mesh, rules) -> Callable:
  """make_step's function jitted: the state keeps its shardings and is donated, the batch is
  split over the batch axes, the key and the metrics are replicated."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn,
                 in_shardings=(shardings, sharding.batch_sharding(mesh, rules), replicated),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


# --- state -----------------------------------------------------------------------------------

def state_layout(init_fn: Callable[[], dict], mesh, rules) -> tuple[dict, dict]:
  """(abstract state, its NamedShardings) of init_fn's state under the rules; nothing allocated."""
  abstract = jax.eval_shape(init_fn)
  return abstract, sharding.tree_shardings(abstract, mesh, rules)


def init_into(init_fn: Callable[[], dict], shardings) -> dict:
  """init_fn's state created directly into its shardings (never whole on one device)."""
  return jax.jit(init_fn, out_shardings=shardings)()


def with_shardings(abstract, shardings):
  """The abstract state with each leaf's sharding: what a checkpoint is restored into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def restore_or_init(ckpt: ckpt_lib.Checkpointer, abstract: dict, shardings: dict,
                    init: Callable[[], dict]) -> tuple[int, dict, dict | None, dict]:
  """(step, state, data_state, meta) of the newest intact checkpoint (a damaged newer one is
  logged and skipped); without one, (0, init(), None, {}), init called only then."""
  found = ckpt.restore_latest(with_shardings(abstract, shardings))
  if found is None:
    return 0, init(), None, {}
  start, state, data_state, meta = found
  logging.info('resumed from step %d', start)
  return start, state, data_state, meta or {}


def continue_data(data_iter, data_state, step: int, config: ml_collections.ConfigDict) -> None:
  """Sets the data iterator to the checkpoint's position, or says why it cannot."""
  try:
    data_iter.set_state(data_state)
  except (KeyError, ValueError, TypeError, IndexError) as e:  # grain's own errors
    raise ValueError(
        f'checkpoint step {step}: its data-iterator state does not fit this data pipeline '
        f'({type(e).__name__}: {e}); resume with the data config it was saved with (same '
        f'data.worker_count, now {config.data.worker_count}, and the same sources and weights) '
        'or use a new workdir') from None


def eval_params(state: dict, use_ema: bool):
  """The parameters evaluations and samples see: the EMA (use_ema) or the raw ones."""
  return state['ema' if use_ema else 'params']


# --- loop ------------------------------------------------------------------------------------

def itstime(step: int, every: int, total_steps: int, *, force: bool = False) -> bool:
  """Whether a periodic action runs after `step`: every `every` steps and at the last step
  (every=0: never); `force` (e.g. a stop) makes it run now."""
  return force or (every > 0 and (step % every == 0 or step == total_steps))


class Chrono:
  """Seconds spent stepping, without the pauses (evaluation, samples, checkpoints).

  `lap()` gives the stepping seconds since the previous lap (or since creation) and starts the
  next one; time inside `with chrono.paused():` counts in no lap. `total_s()` is the wall time
  since creation, pauses included. `clock` is injectable for tests.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._created = self._lap_start = clock()
    self._paused_s = 0.0  # in the current lap

  @contextlib.contextmanager
  def paused(self):
    t0 = self._clock()
    try:
      yield
    finally:
      self._paused_s += self._clock() - t0

  def lap(self) -> float:
    now = self._clock()
    seconds = now - self._lap_start - self._paused_s
    self._lap_start, self._paused_s = now, 0.0
    return seconds

  def total_s(self) -> float:
    return self._clock() - self._created


class StepStats:
  """Tokens, model FLOPs and skipped records of the steps since the last log, and their rates.

  `add` takes one step's local batch (this process's rows): it hands the skipped-record counts
  to packing.SkippedRecords (which removes them from the batch) and counts the step's tokens
  and model FLOPs (step_flops(local), e.g. flops.train_step_flops) for every process: all
  processes' rows have the same layout statistics, so local x process count. `log_figures`
  gives tokens_per_s, tflops_per_s_per_device, mfu (when the device's peak is known) and the
  skipped-record totals, and starts the next window; `checkpoint_figures` the totals a
  checkpoint keeps. Every process must call both at the same steps (the counts are gathered).
  """

  def __init__(self, step_flops: Callable[[dict], float], *, process_count: int,
               device_count: int, peak_flops: float | None, resumed: dict | None = None):
    self._step_flops = step_flops
    self._processes, self._devices, self._peak = process_count, device_count, peak_flops
    self.skipped = packing.SkippedRecords(resumed)
    self._tokens = self._flops = 0.0

  def add(self, local: dict) -> tuple[float, float]:
    """(tokens, model FLOPs) of the step, over all processes; the batch loses its counts."""
    self.skipped.take(local)
    tokens = float((local['segment_ids'] > 0).sum()) * self._processes
    flops = self._step_flops(local) * self._processes
    self._tokens += tokens
    self._flops += flops
    return tokens, flops

  def log_figures(self, elapsed_s: float) -> dict[str, float]:
    """The window's rates over `elapsed_s` stepping seconds, and the skipped totals."""
    out = {'tokens_per_s': self._tokens / elapsed_s}
    per_device = self._flops / elapsed_s / self._devices
    out['tflops_per_s_per_device'] = per_device / 1e12
    if self._peak:
      out['mfu'] = per_device / self._peak
    out.update(self.checkpoint_figures())
    self._tokens = self._flops = 0.0
    return out

  def checkpoint_figures(self) -> dict[str, float]:
    """The skipped-record totals since training began ({} for data that carries none)."""
    return self.skipped.figures(self._processes) if self.skipped.seen else {}
