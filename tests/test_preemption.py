"""Preemption: SIGTERM saves at the next step and exits cleanly; SIGKILL in the middle of a
save leaves the previous checkpoint restorable.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import cpu_env

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
  return cpu_env(PYTHONUNBUFFERED='1')  # one CPU device


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      out = proc.stdout.read() if proc.stdout else ''
      pytest.fail(f'process ended (rc {proc.returncode}) before {what}:\n{out[-3000:]}')
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'timed out waiting for {what}')
    time.sleep(0.2)


def _steps_logged(workdir: Path) -> list[int]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  text = path.read_text()
  complete = text[:text.rfind('\n') + 1]  # a line still being written is left out
  return [json.loads(line)['step'] for line in complete.splitlines() if line.strip()]


@pytest.mark.slow
def test_sigterm_saves_the_next_step_and_exits_cleanly(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'tuna2_jax.train', '--config=experiments/shapes.py:runlocal=True',
       f'--workdir={workdir}', '--config.total_steps=1000', '--config.log_every=1',
       '--config.checkpoint_every=500', '--config.eval_every=1000'],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for(lambda: len(_steps_logged(workdir)) >= 2, proc, 240, 'two logged steps')
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  steps = _steps_logged(workdir)
  assert 2 <= steps[-1] < 1000
  assert steps == list(range(1, steps[-1] + 1))
  # The checkpoint is of the last step taken, so a restart continues right after it.
  assert os.listdir(workdir / 'checkpoints') == [str(steps[-1])]
  assert 'preempted' in out


_KILLED_MID_SAVE = textwrap.dedent('''
    import sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from tuna2_jax.checkpoint import Checkpointer

    def state(v):
      return {'w': jnp.full((1024, 1024), v, jnp.float32), 'step': jnp.int32(v)}

    ckpt = Checkpointer(sys.argv[1], keep=3, save_every=1)
    ckpt.save(1, state(1.0))
    ckpt.wait()

    async def stall(self):  # the commit of step 2 never comes before the kill
      time.sleep(600)

    atomicity.AtomicRenameTemporaryPath.finalize = stall
    ckpt.save(2, state(2.0))
    print('saving step 2', flush=True)
    time.sleep(600)
''')


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from tuna2_jax.checkpoint import Checkpointer

  proc = subprocess.Popen([sys.executable, '-c', _KILLED_MID_SAVE, str(tmp_path)], cwd=REPO,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  root = tmp_path / 'checkpoints'
  _wait_for(lambda: any(p.name.startswith('2.') for p in root.glob('2*')), proc, 120,
            'the save of step 2 to start')
  time.sleep(1.0)  # let it write some of the arrays
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert '2' not in os.listdir(root)  # never committed
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {'w': jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=device),
            'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=device)}
  with Checkpointer(str(tmp_path), keep=3, save_every=1) as ckpt:
    assert ckpt.latest_step() == 1
    restored, _, _ = ckpt.restore(1, target, require_data=False)
  np.testing.assert_array_equal(np.asarray(restored['w']), 1.0)
  assert int(restored['step']) == 1
