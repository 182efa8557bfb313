"""Running jobs: config history, the W&B sink, cluster start-up, SIGTERM before the first step,
the console's log level."""

import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CPU_XLA_FLAGS, load_experiment
from tuna2_jax import config_history, distributed, metrics

REPO = Path(__file__).resolve().parents[1]


def _config_json(**changes) -> str:
  c = load_experiment('shapes', 'runlocal')
  for key, value in changes.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c.to_json_best_effort(indent=2)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_config_history_records_changes_beside_the_first(tmp_path, caplog):
  workdir = str(tmp_path)
  first = _config_json()
  assert config_history.record(workdir, first, 0) == str(tmp_path / 'config.json')
  assert _mode(tmp_path / 'config.json') == 0o644
  assert config_history.record(workdir, first, 5) is None  # same config: nothing new
  caplog.set_level(logging.WARNING)
  changed = _config_json(**{'optim.lr': 3e-4, 'data.weights.t2i': 0.7})
  config_history.check_resumable(workdir, changed, 5)  # allowed
  path = config_history.record(workdir, changed, 5)
  assert path == str(tmp_path / 'config.5.json') and _mode(path) == 0o644
  assert (tmp_path / 'config.json').read_text() == first  # the first is kept as it was
  assert 'optim.lr: 0.002 -> 0.0003' in caplog.text and 'data.weights.t2i' in caplog.text
  assert config_history.read(workdir) == changed
  assert [s for s, _ in config_history.recorded(workdir)] == [0, 5]
  assert sorted(os.listdir(tmp_path)) == ['config.5.json', 'config.json']  # no temp files


@pytest.mark.parametrize('key,value,flag', [
    ('model.decoder.num_layers', 3, '--config.model.decoder.num_layers=2'),
    ('model.vision', 'encoder', "--config.model.vision=patch"),
    ('data.worker_count', 2, '--config.data.worker_count=0'),
])
def test_config_change_that_cannot_resume_is_refused_by_key(tmp_path, key, value, flag):
  config_history.record(str(tmp_path), _config_json(), 0)
  with pytest.raises(ValueError) as err:
    config_history.check_resumable(str(tmp_path), _config_json(**{key: value}), 4)
  message = str(err.value)
  assert f'{key}:' in message and flag in message and 'resumes from step 4' in message
  if key == 'data.worker_count':
    assert 'per worker' in message
  assert os.listdir(tmp_path) == ['config.json']


class _FakeWandb:
  """The part of the wandb module the sink uses, recording every call."""

  class Image:
    def __init__(self, array):
      self.array = array

  def __init__(self):
    self.calls = []

  def init(self, **kwargs):
    self.calls.append(('init', kwargs))
    return self

  def log(self, values, step):
    self.calls.append(('log', step, values))

  def finish(self):
    self.calls.append(('finish',))


def _wandb_config(**overrides):
  c = load_experiment('shapes', 'runlocal').wandb
  c.update(enabled=True, **overrides)
  return c


def test_wandb_sink_gets_what_the_writer_writes(tmp_path):
  fake = _FakeWandb()
  sink = metrics.WandbSink(str(tmp_path / 'run'), _wandb_config(mode='offline'), {'lr': 1},
                           module=fake)
  writer = metrics.MetricsWriter(str(tmp_path / 'run'), wandb=sink)
  writer.write_scalars(3, {'loss': 2.5})
  writer.write_tensorboard(4, {'eval/acc': 0.5})
  writer.write_image(4, 'samples', np.zeros((4, 4, 3), np.uint8))
  writer.close()
  (_, init), *rest = fake.calls
  assert init['mode'] == 'offline' and init['config'] == {'lr': 1} and init['resume'] == 'allow'
  assert init['name'] == 'run' and init['dir'] == str(tmp_path / 'run')
  again = _FakeWandb()  # a resumed run continues the same W&B run
  metrics.WandbSink(str(tmp_path / 'run'), _wandb_config(), {}, module=again)
  assert again.calls[0][1]['id'] == init['id']
  assert rest[:2] == [('log', 3, {'loss': 2.5}), ('log', 4, {'eval/acc': 0.5})]
  assert rest[2][:2] == ('log', 4) and rest[2][2]['samples'].array.shape == (4, 4, 3)
  assert rest[3] == ('finish',)
  with pytest.raises(ValueError, match="wandb.mode='cloud'"):
    metrics.WandbSink(str(tmp_path), _wandb_config(mode='cloud'), {}, module=fake)


def test_wandb_offline_run(tmp_path):
  pytest.importorskip('wandb', reason='the optional wandb extra is not installed')
  sink = metrics.WandbSink(str(tmp_path), _wandb_config(mode='offline', run_id='tuna2test'),
                           {'lr': 1.0})
  writer = metrics.MetricsWriter(str(tmp_path), wandb=sink)
  writer.write_scalars(1, {'loss': 2.25})
  writer.write_image(1, 'samples', np.zeros((4, 4, 3), np.uint8))
  writer.close()
  runs = list((tmp_path / 'wandb').glob('offline-run-*-tuna2test'))
  assert len(runs) == 1, os.listdir(tmp_path / 'wandb')
  record = runs[0] / 'run-tuna2test.wandb'
  deadline = time.monotonic() + 30  # wandb's service may still be writing after finish()
  while b'loss' not in record.read_bytes() and time.monotonic() < deadline:
    time.sleep(0.5)
  assert b'loss' in record.read_bytes()
  assert list((runs[0] / 'files' / 'media' / 'images').glob('samples_1_*.png'))


def _python(code: str, *args, env=None) -> subprocess.CompletedProcess:
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(('SLURM_', 'OMPI_', 'TPU_', 'MEGASCALE_', 'KUBERNETES_',
                                'JAX_COORDINATOR'))}
  clean.update(JAX_PLATFORMS='cpu', XLA_FLAGS=CPU_XLA_FLAGS, **(env or {}))
  return subprocess.run([sys.executable, '-c', code, *args], cwd=REPO, env=clean,
                        capture_output=True, text=True, timeout=120)


def test_no_cluster_means_one_process_and_partial_flags_are_named():
  proc = _python('from tuna2_jax import distributed; distributed.initialize(); import jax; '
                 'print("processes", jax.process_count())')
  assert proc.returncode == 0 and 'processes 1' in proc.stdout, proc.stderr[-2000:]
  proc = _python('from tuna2_jax import distributed; distributed.initialize(process_id=0)')
  assert proc.returncode != 0
  assert '--process_id=0: JAX detected no cluster' in proc.stderr, proc.stderr[-2000:]
  with pytest.raises(ValueError, match='--process_id=2: expected 0 <= process_id'):
    distributed.initialize('localhost:1', 2, 2)


def test_sigterm_before_training_exits_without_touching_the_workdir(tmp_path, caplog):
  from tuna2_jax import train
  config = load_experiment('shapes', 'runlocal')
  config.batch_size = 8  # one row per fake device
  distributed.watch_sigterm()  # what train.main does first
  os.kill(os.getpid(), signal.SIGTERM)  # as during start-up, before train() is reached
  try:
    assert distributed.sigterm_received()
    assert train.train(config, str(tmp_path / 'run')) == {}
  finally:
    distributed.PreemptionWatcher().close()
  assert not distributed.sigterm_received()
  assert signal.getsignal(signal.SIGTERM) is not distributed._on_sigterm  # handed back
  assert not (tmp_path / 'run').exists()
  assert 'SIGTERM before training started' in caplog.text


def test_log_level_hides_library_info_lines_by_default():
  code = ('from absl import app, logging\nfrom tuna2_jax import cli\n'
          'def main(argv):\n  logging.info("an info line")\n  logging.warning("a warning line")\n'
          'cli.run(main)\n')
  quiet = _python(code)
  assert quiet.returncode == 0, quiet.stderr[-2000:]
  assert 'a warning line' in quiet.stderr and 'an info line' not in quiet.stderr
  loud = _python(code, '--log_level=info')
  assert 'an info line' in loud.stderr
  assert 'an info line' in _python(code, '--verbosity=0').stderr  # absl's own flag still wins


def test_a_data_position_the_pipeline_cannot_take_says_what_to_do():
  from tuna2_jax import trainer

  class _Iterator:  # what grain raises for a state saved with another worker count
    def set_state(self, state):
      raise KeyError('exhausted')

  config = load_experiment('shapes', 'runlocal')
  with pytest.raises(ValueError) as err:
    trainer.continue_data(_Iterator(), {'workers': []}, 12, config)
  message = str(err.value)
  assert 'checkpoint step 12' in message and "KeyError: 'exhausted'" in message
  assert 'data.worker_count, now 0' in message and 'new workdir' in message


def test_bar_rate_counts_finished_steps_over_a_sliding_window():
  rate = metrics.RateMeter(window=2)
  assert rate.add(10.0, 100.0) is None  # one finished step: no interval yet
  assert rate.add(11.0, 100.0) == pytest.approx(100.0)
  assert rate.add(12.0, 300.0) == pytest.approx(200.0)  # (100 + 300) tokens over 2 s
  assert rate.add(16.0, 100.0) == pytest.approx(80.0)  # the first step left the window
