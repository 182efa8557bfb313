"""Training: the step learns, a run writes its outputs, resuming is exact, other models are refused.

Every run here uses one tiny config (shapes.py:runlocal=True with one row per fake device), so
after the first compilation the session's compilation cache serves the rest.
"""

import hashlib
import json
import os

import jax
import numpy as np
import pytest

from conftest import load_experiment
from tuna2_jax import checkpoint as ckpt_lib
from tuna2_jax import evaluate as eval_lib
from tuna2_jax import flops, sharding, train, train_state, trainer
from tuna2_jax.data import pipeline
from tuna2_jax.data.tokenizer import Tokenizer

METRIC_KEYS = {'step', 'loss', 'text_loss', 'flow_loss', 'grad_norm', 'lr', 'tokens_per_s'}


def _config(**overrides):
  c = load_experiment('shapes', 'runlocal=True')
  c.batch_size = jax.device_count()  # one row per (fake) device
  # Constant after warm-up: the learning rate at a step does not depend on total_steps, so a
  # run cut short and resumed sees the same schedule as an uninterrupted one.
  c.optim.schedule = 'constant'
  c.update(dict(total_steps=4, log_every=1, checkpoint_every=2), **overrides)
  return c


def _history_config(**overrides):
  """_config with held-out metrics at steps 2 and 4 (eval_history.jsonl)."""
  c = _config(**overrides)
  c.eval.metrics_every = 2
  return c


def _history(workdir):
  with open(os.path.join(workdir, eval_lib.HISTORY_FILE)) as f:
    return [json.loads(line) for line in f]


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _file_digests(root):
  out = {}
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_steps_on_a_fixed_batch_reduce_the_loss():
  """Built as train.train builds it, so the compiled step is shared with the runs below."""
  config = _config()
  mesh = sharding.make_mesh(config.mesh)
  graphdef, _ = train_state.abstract_model(config)
  abstract, shardings = train_state.state_shardings(config, mesh)
  state = train_state.create_sharded_state(config, mesh)
  tx = train_state.optimizer(config, abstract['params'])
  step_fn = jax.jit(train.make_train_step(config, graphdef, tx),
                    in_shardings=(shardings, sharding.batch_sharding(mesh), None),
                    out_shardings=(shardings, None), donate_argnums=(0,))
  batch = sharding.global_batch(next(iter(pipeline.train_dataset(config, Tokenizer.load()))),
                                mesh)
  key = jax.random.key(0)
  history = []
  for _ in range(20):
    state, aux = step_fn(state, batch, key)
    history.append(jax.device_get(aux))
  assert int(state['step']) == 20
  first, last = history[0], history[-1]
  assert all(np.isfinite(h['loss']) for h in history)
  assert last['loss'] < 0.75 * first['loss'], [float(h['loss']) for h in history]
  assert last['text_loss'] < 0.75 * first['text_loss']


@pytest.fixture(scope='module')
def uninterrupted_run(tmp_path_factory):
  """4 steps in one go, checkpoints at 2 and 4."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  last = train.train(_history_config(), workdir)
  return workdir, last


@pytest.mark.slow
def test_train_runs_end_to_end_and_writes_its_outputs(uninterrupted_run):
  workdir, last = uninterrupted_run
  lines = _metrics(workdir)
  assert [line['step'] for line in lines] == [1, 2, 3, 4]
  for line in lines:
    assert METRIC_KEYS <= set(line), sorted(line)
    assert all(np.isfinite(v) for v in line.values())
  assert last['loss'] == pytest.approx(lines[-1]['loss'])
  # Logged lr is the one each step used: linear warm-up over 2 steps, then constant.
  lr = _config().optim.lr
  assert [line['lr'] for line in lines] == pytest.approx([0.0, lr / 2, lr, lr])
  for line in lines:
    assert line['loss'] == pytest.approx(line['text_loss'] + line['flow_loss'], rel=1e-5)
  events = os.listdir(os.path.join(workdir, 'tensorboard'))
  assert any(name.startswith('events.out.tfevents') for name in events)
  samples = sorted(os.listdir(os.path.join(workdir, 'samples')))
  assert samples == ['step_000004.json', 'step_000004.png']  # the grid and its captions, marks
  assert os.path.getsize(os.path.join(workdir, 'samples', samples[1])) > 0
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  saved = json.loads(ckpt_lib.read_config(workdir))
  assert saved['total_steps'] == 4 and saved['model']['decoder']['width'] == 64


@pytest.mark.slow
def test_resume_continues_exactly(uninterrupted_run, tmp_path):
  reference, _ = uninterrupted_run
  workdir = str(tmp_path / 'resumed')
  train.train(_history_config(total_steps=2), workdir)

  # The checkpoint of the short run holds the parameters of the uninterrupted run's step 2.
  config = _config()
  mesh = sharding.make_mesh(config.mesh)
  abstract, shardings = train_state.state_shardings(config, mesh)
  target = trainer.with_shardings(abstract, shardings)
  restored = []
  for run in (workdir, reference):
    with ckpt_lib.Checkpointer(run, keep=2, save_every=2) as ckpt:
      restored.append(ckpt.restore(2, target)[0])
  leaves = [jax.tree.leaves(r['params']) for r in restored]
  assert len(leaves[0]) > 10
  for a, b in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  train.train(_history_config(total_steps=4), workdir)  # resumes from step 2
  resumed = _metrics(workdir)
  assert [line['step'] for line in resumed] == [1, 2, 3, 4]  # steps 1-2 logged once, not redone
  want = {line['step']: line for line in _metrics(reference)}
  assert want[3]['loss'] != want[1]['loss']
  for line in resumed:
    for key in ('loss', 'text_loss', 'flow_loss', 'grad_norm'):
      assert line[key] == pytest.approx(want[line['step']][key], rel=1e-5, abs=1e-5)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  # The FLOP count continues from the checkpoint rather than restarting at zero.
  history, want_history = _history(workdir), _history(reference)
  assert [h['step'] for h in history] == [2, 4]
  for got, want in zip(history, want_history):
    assert got['train_flops'] == pytest.approx(want['train_flops'], rel=1e-12)
  assert history[1]['wall_s'] > history[0]['wall_s'] > 0


@pytest.mark.slow
def test_eval_history_is_written_at_the_configured_steps(uninterrupted_run):
  workdir, _ = uninterrupted_run
  config = _history_config()
  history = _history(workdir)
  assert [h['step'] for h in history] == [2, 4]
  batches = iter(pipeline.train_dataset(config, Tokenizer.load()))
  per_step = [flops.train_step_flops(config.model, next(batches)) for _ in range(4)]
  assert history[0]['train_flops'] == pytest.approx(sum(per_step[:2]))
  assert history[1]['train_flops'] == pytest.approx(sum(per_step))
  assert 0 < history[0]['wall_s'] < history[1]['wall_s']
  digest = eval_lib.eval_set_digest(eval_lib.eval_sets(config))
  for h in history:
    assert h['eval_set'] == digest
    for key in ('vqa_accuracy', 'vqa_accuracy_count', 'vqa_accuracy_position', 'gen_accuracy',
                'caption_exact'):
      assert 0.0 <= h[f'shapes/{key}'] <= 1.0, key
  # Training throughput in model FLOPs is logged beside tokens/s.
  assert all(line['tflops_per_s_per_device'] > 0 for line in _metrics(workdir))


@pytest.mark.slow
def test_other_model_shape_is_refused_and_workdir_untouched(uninterrupted_run):
  workdir, _ = uninterrupted_run
  before = _file_digests(workdir)
  other = _config(total_steps=6)
  other.model.decoder.width = 96
  with pytest.raises(ValueError) as err:
    train.train(other, workdir)
  message = str(err.value)  # refused off the recorded config, before any array is read
  assert 'model.decoder.width: 64 -> 96' in message and workdir in message
  assert '--config.model.decoder.width=64' in message
  assert _file_digests(workdir) == before
  # Without the recorded config the checkpoint's shapes still refuse it.
  os.rename(os.path.join(workdir, 'config.json'), os.path.join(workdir, 'hidden.json'))
  try:
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match='96'):
      train.train(other, workdir)
  finally:
    os.rename(os.path.join(workdir, 'hidden.json'), os.path.join(workdir, 'config.json'))
  assert _file_digests(workdir) == before


def test_batch_that_does_not_split_over_the_mesh_is_refused(tmp_path):
  config = _config(batch_size=jax.device_count() + 2)
  with pytest.raises(ValueError, match=f'batch_size={jax.device_count() + 2}'):
    train.train(config, str(tmp_path))
