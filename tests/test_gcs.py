"""A gs:// workdir end to end: a short training run writes everything into a local GCS emulator
(no network) and a second run resumes from it; nothing lands on the local disk."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cpu_env

pytest.importorskip('gcsfs', reason="gs:// needs the optional 'gcs' extra (gcsfs)")
pytest.importorskip('gcp_storage_emulator', reason='the GCS emulator (test extra) is not installed')

REPO = Path(__file__).resolve().parents[1]
BUCKET = 'tuna2-test'
_ABSL_INFO = re.compile(r'^I\d{4} ')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def gcs_env():
  port = _free_port()
  server = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'gcs_emulator.py'), str(port),
                             BUCKET], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  assert server.stdout.readline().strip() == 'ready'
  url = f'http://localhost:{port}'
  env = cpu_env(PYTHONPATH=str(REPO),
             STORAGE_EMULATOR_HOST=url,  # gcsfs and google-cloud-storage
             TENSORSTORE_GCS_HTTP_URL=url,  # orbax's arrays
             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false',  # no gRPC bucket-type probe
             GCE_METADATA_HOST='localhost:1', GCE_METADATA_ROOT='localhost:1')  # no metadata server
  yield env
  server.kill()
  server.wait()


def _train(env, cwd, workdir, total_steps) -> subprocess.CompletedProcess:
  proc = subprocess.run(
      [sys.executable, '-m', 'tuna2_jax.train',
       f'--config={REPO / "experiments" / "shapes.py"}:runlocal', f'--workdir={workdir}',
       f'--config.total_steps={total_steps}', '--config.log_every=1',
       '--config.checkpoint_every=1', '--config.eval_every=100', '--config.sampling.steps=2',
       '--config.eval.num_samples_png=2'],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=480)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _gcs(env):
  """A gcsfs file system on the emulator (the plain one: no gRPC bucket-type probe)."""
  from gcsfs.core import GCSFileSystem
  return GCSFileSystem(endpoint_url=env['STORAGE_EMULATOR_HOST'], skip_instance_cache=True)


@pytest.mark.slow
def test_train_into_gcs_and_resume_from_it(gcs_env, tmp_path):
  workdir = f'gs://{BUCKET}/runs/shapes'
  first = _train(gcs_env, tmp_path, workdir, 1)
  second = _train(gcs_env, tmp_path, workdir, 2)
  assert os.listdir(tmp_path) == []  # no local 'gs:' folder, nothing else either

  fs = _gcs(gcs_env)
  root = f'{BUCKET}/runs/shapes'
  names = {p[len(root) + 1:] for p in fs.find(root)}
  assert {'config.json', 'config.1.json', 'metrics.jsonl', 'samples/step_000001.png',
          'samples/step_000002.png'} <= names
  assert sorted({n.split('/')[1] for n in names if n.startswith('checkpoints/')}) == ['1', '2']
  assert len([n for n in names if n.startswith('tensorboard/events.out.tfevents')]) == 2
  lines = [json.loads(line) for line in fs.cat(f'{root}/metrics.jsonl').decode().splitlines()]
  assert [line['step'] for line in lines] == [1, 2]  # the resumed run appended to the first's
  assert json.loads(fs.cat(f'{root}/config.1.json'))['total_steps'] == 2

  # The console: no INFO lines, the summary names the gs:// outputs.
  for proc in (first, second):
    assert not [l for l in proc.stderr.splitlines() if _ABSL_INFO.match(l)], proc.stderr[-2000:]
  assert 'run done: steps 1 -> 2' in second.stdout
  assert re.search(rf'checkpoints +{workdir}/checkpoints/2\n', second.stdout), second.stdout
  assert f'{workdir}/samples' in second.stdout and f'{workdir}/config.1.json' in second.stdout
