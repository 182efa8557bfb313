"""Multi-controller start-up, barriers with timeouts, and preemption (SIGTERM) handling.

One Python process runs per host (TPU VM worker) or per GPU / GPU node; `initialize` joins them
through jax.distributed before anything touches a device:
  - explicit: --coordinator_address=host:port --num_processes=N --process_id=i (any cluster);
  - TPU pods (several workers) and SLURM jobs of several tasks: detected, and JAX reads the
    coordinator and ranks from the environment;
  - otherwise: a single process, nothing to join.
"""

from __future__ import annotations

import os
import signal

import jax
from absl import flags, logging
from jax.experimental import multihost_utils

COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 for jax.distributed (multi-process '
    'runs without TPU or SLURM detection).')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes of the job.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process, 0..N-1.')


def _detected_cluster() -> str | None:
  """'tpu' or 'slurm' when the environment describes a job of several processes."""
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h]) > 1 or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu'
  if int(os.environ.get('SLURM_NTASKS', os.environ.get('SLURM_NPROCS', '1')) or 1) > 1 and \
      'SLURM_JOB_ID' in os.environ:
    return 'slurm'
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the job's processes (see the module docstring); a no-op for a single process."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(f'--coordinator_address={coordinator_address}, --num_processes='
                       f'{num_processes}, --process_id={process_id}: give all three or none')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id}: expected 0 <= process_id < '
                       f'--num_processes={num_processes}')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif (cluster := _detected_cluster()) is not None:
    logging.info('joining a %s job through jax.distributed', cluster)
    local_devices = None
    # JAX gives each SLURM task the one GPU of its local rank; a task per node drives them all.
    if cluster == 'slurm' and os.environ.get('SLURM_NTASKS_PER_NODE') == '1' and \
        os.environ.get('SLURM_GPUS_ON_NODE'):
      local_devices = list(range(int(os.environ['SLURM_GPUS_ON_NODE'])))
    jax.distributed.initialize(local_device_ids=local_devices)
  else:
    return
  logging.info('process %d of %d: %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
  initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)


def _client():
  from jax._src import distributed as dist_state  # the coordination-service client
  return dist_state.global_state.client


def barrier(name: str, timeout_s: float) -> None:
  """Waits until every process reached `name`; raises naming the missing ones after timeout_s."""
  if jax.process_count() == 1:
    return
  client = _client()
  if client is None:  # several processes without jax.distributed: only the device barrier exists
    multihost_utils.sync_global_devices(name)
    return
  # Each process leaves its mark first, so a timed-out one can say who never came.
  client.key_value_set(f'tuna2_barrier/{name}/{jax.process_index()}', 'here')
  try:
    client.wait_at_barrier(name, int(timeout_s * 1000))
  except Exception as e:  # the client raises its own XlaRuntimeError kinds
    try:
      arrived = {int(k.rsplit('/', 1)[-1])
                 for k, _ in client.key_value_dir_get(f'tuna2_barrier/{name}/')}
      missing = sorted(set(range(jax.process_count())) - arrived)
    except Exception:  # the coordinator itself may be gone
      missing = 'unknown (the coordination service did not answer)'
    raise RuntimeError(f'barrier {name!r}: process {jax.process_index()} waited {timeout_s:g}s; '
                       f'processes missing: {missing}') from e


class PreemptionWatcher:
  """Tells the loop when to save and stop: after SIGTERM, at the same step on every process.

  One process: a SIGTERM handler sets a flag. Several processes: jax.distributed's preemption
  service owns SIGTERM (on TPU also the maintenance notices) and agrees on a step for all.
  """

  def __init__(self):
    self._signalled = False
    self._sync = jax.process_count() > 1
    self._previous = None
    if not self._sync:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint after this step, then exiting')
    self._signalled = True

  def should_stop(self, step: int) -> bool:
    """Call once per step on every process."""
    if self._sync:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is switched off
        self._sync = False
        return False
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

