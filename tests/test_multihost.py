"""Two real processes (localhost coordinator, 2 CPU devices each) train and save; one process
with one device resumes, and every loss equals an uninterrupted single-device run's. A barrier
that one process never reaches ends the waiting one, naming the other.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import cpu_env, load_experiment, train_losses
from tuna2_jax import sharding

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ['--config.batch_size=4', '--config.optim.schedule=constant', '--config.log_every=1',
             '--config.checkpoint_every=2']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _train(workdir, total_steps: int, devices: int, *extra, cache: bool = False
           ) -> subprocess.Popen:
  """cache: use the session's compilation cache (never for concurrent processes)."""
  env = cpu_env(devices)
  if not cache:
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return subprocess.Popen(
      [sys.executable, '-m', 'tuna2_jax.train', '--config=experiments/shapes.py:runlocal=True',
       f'--workdir={workdir}', f'--config.total_steps={total_steps}', *OVERRIDES, *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f'process timed out:\n{out[-3000:]}')
  assert proc.returncode == 0, out[-3000:]
  return out


def _data_item(step_dir: Path) -> dict:
  """The JSON that orbax wrote for the checkpoint's 'data' item."""
  for path in (step_dir / 'data').iterdir():
    try:
      value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, IsADirectoryError):
      continue
    if isinstance(value, dict) and 'per_process' in value:
      return value
  raise AssertionError(f'no data item under {step_dir}')


@pytest.mark.slow
def test_two_processes_train_save_and_one_device_resumes(tmp_path):
  workdir = tmp_path / 'run'
  port = _free_port()
  procs = [_train(workdir, 2, 2, f'--coordinator_address=localhost:{port}',
                  '--num_processes=2', f'--process_id={i}') for i in range(2)]
  for proc in procs:
    _finish(proc)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']
  assert _data_item(workdir / 'checkpoints' / '2')['process_count'] == 2
  # process 0 only: the grid and its captions
  assert sorted(os.listdir(workdir / 'samples')) == ['step_000002.json', 'step_000002.png']

  # One process, one device, no samples; what it compiles, train_losses below reuses.
  _finish(_train(workdir, 4, 1, '--config.eval_every=0', cache=True))
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines] == [1, 2, 3, 4]

  config = load_experiment('shapes', 'runlocal=True')
  config.update(batch_size=4, log_every=1, checkpoint_every=2, total_steps=4)
  config.optim.schedule = 'constant'
  want = train_losses(config, sharding.mesh_from_sizes(devices=jax.devices()[:1]), 4)
  got = [line['loss'] for line in lines]
  print(f'\n  2 processes x 2 devices, then 1 device: {got}\n  uninterrupted 1 device:  {want}')
  np.testing.assert_allclose(got, want, rtol=1e-5)


_LONELY_BARRIER = '''
import sys, time
from tuna2_jax import distributed
port, pid = sys.argv[1], int(sys.argv[2])
distributed.initialize(f'localhost:{port}', 2, pid)
if pid == 0:
  distributed.barrier('lonely', timeout_s=3)
else:
  time.sleep(6)  # alive, but never at the barrier
'''


def test_barrier_timeout_names_the_missing_process():
  from tuna2_jax.distributed import EXIT_BARRIER_TIMEOUT
  port = str(_free_port())
  env = cpu_env()
  procs = [subprocess.Popen([sys.executable, '-c', _LONELY_BARRIER, port, str(i)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  out, _ = procs[0].communicate(timeout=120)
  assert procs[0].returncode == EXIT_BARRIER_TIMEOUT, out[-2000:]
  # Process 1 ends too: jax.distributed stops a process whose coordinator (process 0) is gone.
  procs[1].communicate(timeout=120)
  assert ("error: barrier 'lonely': process 0 waited 3s; not every process arrived (the missing "
          'ones are among [1])') in out, out[-2000:]
