"""Multi-controller start-up, barriers with timeouts, and preemption (SIGTERM) handling.

One Python process runs per host (TPU VM worker) or per GPU / GPU node; `initialize` joins them
through jax.distributed before anything touches a device. It always asks JAX's own cluster
detection (`jax.distributed.initialize()`: Cloud TPU pods and multi-slice, SLURM, Open MPI,
Kubernetes / GKE with the `kubernetes` package, JAX_COORDINATOR_ADDRESS), and the flags override
what it finds:
  --coordinator_address=host:port --num_processes=N --process_id=i
(launch/xpk.sh passes them on XPK GPU node pools from the variables XPK sets there). When JAX
detects no cluster and no flag is given, the run is a single process.

`watch_sigterm()` runs first in a tool's main(): from then on a SIGTERM is remembered, so one that
arrives during start-up (restore, compilation) stops the run before its first step, and one in
the loop saves the step and exits (PreemptionWatcher).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
from absl import flags, logging
from jax.experimental import multihost_utils

COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 for jax.distributed; overrides JAX\'s '
    'cluster detection (with --num_processes and --process_id).')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes of the job (override).')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process, 0..N-1 (override).')
EXIT_BARRIER_TIMEOUT = 3


def _slurm_local_devices() -> list[int] | None:
  """All of a node's GPUs for a SLURM job of one task per node (JAX would give it one GPU)."""
  if 'SLURM_JOB_ID' in os.environ and os.environ.get('SLURM_NTASKS_PER_NODE') == '1' and \
      os.environ.get('SLURM_GPUS_ON_NODE'):
    return list(range(int(os.environ['SLURM_GPUS_ON_NODE'])))
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the job's processes (see the module docstring); a single process when none is found."""
  explicit = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
              '--process_id': process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes={num_processes}: expected at least 1')
  if process_id is not None and num_processes is not None and \
      not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id}: expected 0 <= process_id < '
                     f'--num_processes={num_processes}')
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=_slurm_local_devices())
  except ValueError as e:  # JAX raises it when neither detection nor the flags give all three
    if given:
      raise ValueError(f'{", ".join(f"{k}={v}" for k, v in given.items())}: JAX detected no '
                       f'cluster to fill in the rest ({e}); give all three of '
                       f'{", ".join(explicit)}') from None
    logging.info('no cluster detected by jax.distributed: running as a single process')
    return
  logging.info('process %d of %d: %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
  initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)


def barrier(name: str, timeout_s: float) -> None:
  """Waits until every process reached `name`; after timeout_s ends this process (exit code
  EXIT_BARRIER_TIMEOUT) with one line naming the barrier and the processes it waited for.

  Built on public JAX (multihost_utils.sync_global_devices, a device collective). A collective
  cannot be cancelled, so a watchdog thread reports and exits: raising would leave the process
  hung in it, or aborting at exit.
  """
  if jax.process_count() == 1:
    return
  arrived = threading.Event()
  me, others = jax.process_index(), sorted(set(range(jax.process_count())) - {jax.process_index()})

  def watchdog():
    if not arrived.wait(timeout_s):
      message = (f'barrier {name!r}: process {me} waited {timeout_s:g}s; not every process '
                 f'arrived (the missing ones are among {others})')
      logging.error(message)
      print(f'error: {message}', file=sys.stderr, flush=True)
      os._exit(EXIT_BARRIER_TIMEOUT)  # pylint: disable=protected-access

  threading.Thread(target=watchdog, name=f'barrier-{name}', daemon=True).start()
  try:
    multihost_utils.sync_global_devices(name)
  finally:
    arrived.set()


_SIGNALLED = threading.Event()
_PREVIOUS_HANDLER = None


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  logging.warning('SIGTERM: saving a checkpoint after this step (or before the first), then '
                  'exiting')
  _SIGNALLED.set()


def watch_sigterm() -> None:
  """Remembers a SIGTERM from now on (idempotent; only in the main thread)."""
  global _PREVIOUS_HANDLER
  if _PREVIOUS_HANDLER is None and threading.current_thread() is threading.main_thread():
    _PREVIOUS_HANDLER = signal.signal(signal.SIGTERM, _on_sigterm)


def sigterm_received() -> bool:
  return _SIGNALLED.is_set()


class PreemptionWatcher:
  """Tells the loop when to save and stop: after SIGTERM, at the same step on every process.

  One process: the SIGTERM handler of watch_sigterm sets a flag. Several processes:
  jax.distributed's preemption service owns SIGTERM once it started (on TPU also the
  maintenance notices) and agrees on a step for all.
  """

  def __init__(self):
    watch_sigterm()
    self._sync = jax.process_count() > 1

  def should_stop(self, step: int) -> bool:
    """Call once per step on every process."""
    if self._sync:
      # Only the agreed step: a flag of this process alone would stop it without the others.
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is switched off
        self._sync = False
    return sigterm_received()

  def close(self) -> None:
    """Gives SIGTERM back to the handler it had before watch_sigterm."""
    global _PREVIOUS_HANDLER
    if _PREVIOUS_HANDLER is not None:
      signal.signal(signal.SIGTERM, _PREVIOUS_HANDLER)
      _PREVIOUS_HANDLER = None
    _SIGNALLED.clear()
