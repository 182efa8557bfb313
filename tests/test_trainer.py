"""The trainer skeleton's loop helpers: itstime, Chrono (on a fake clock), StepStats."""

import numpy as np
import pytest

from tuna2_jax import layout, trainer
from tuna2_jax.data import packing


def test_itstime_every_n_steps_the_last_step_and_a_forced_stop():
  due = [s for s in range(1, 11) if trainer.itstime(s, 4, 10)]
  assert due == [4, 8, 10]  # the last step always, though 10 is no multiple of 4
  assert trainer.itstime(3, 4, 10, force=True)  # e.g. a preemption: log and save now
  assert not any(trainer.itstime(s, 0, 10) for s in range(1, 11))  # every=0: off
  assert trainer.itstime(3, 0, 10, force=True)


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_chrono_laps_leave_out_the_pauses():
  clock = _Clock()
  chrono = trainer.Chrono(clock)
  clock.now += 2.0  # stepping
  with chrono.paused():  # e.g. an evaluation
    clock.now += 30.0
  clock.now += 1.0
  assert chrono.lap() == pytest.approx(3.0)
  clock.now += 0.5
  with chrono.paused():  # a checkpoint
    clock.now += 4.0
  assert chrono.lap() == pytest.approx(0.5)  # the earlier pause is not taken off again
  clock.now += 2.0
  assert chrono.lap() == pytest.approx(2.0)
  assert chrono.total_s() == pytest.approx(39.5)  # the run's wall time keeps the pauses


def _batch(tokens_per_row, skipped=None):
  """Two rows (the data pipeline's dict) whose first `tokens_per_row` slots are real tokens,
  with skip counts."""
  batch = {k: np.zeros((2, 8, *layout.trailing_shape(k, 1)), layout.SCHEMA[k].dtype)
           for k in layout.FIELDS}
  batch['segment_ids'][:, :tokens_per_row] = 1
  if skipped is not None:
    for key in packing.SKIPPED_KEYS:
      batch[key] = np.array([skipped.get(key, 0), 0], np.int32)
  return batch


def test_step_stats_rates_and_mfu():
  stats = trainer.StepStats(lambda local: 1e12, process_count=2, device_count=4,
                            peak_flops=2e12)
  batch = _batch(3)
  assert stats.add(batch) == (12.0, 2e12)  # 2 rows x 3 tokens, x 2 processes
  stats.add(_batch(5))
  logged = stats.log_figures(elapsed_s=2.0)
  assert logged == {'tokens_per_s': (12 + 20) / 2.0,
                    'tflops_per_s_per_device': 4e12 / 2.0 / 4 / 1e12,
                    'mfu': 4e12 / 2.0 / 4 / 2e12}  # no skipped keys: the data carries none
  assert stats.checkpoint_figures() == {}
  stats.add(_batch(1))  # the next window starts from zero
  assert stats.log_figures(elapsed_s=1.0)['tokens_per_s'] == 4.0
  no_peak = trainer.StepStats(lambda local: 1.0, process_count=1, device_count=1,
                              peak_flops=None)
  no_peak.add(_batch(1))
  assert 'mfu' not in no_peak.log_figures(1.0)  # an unknown device: no MFU


def test_skipped_records_are_taken_off_the_batch_and_continue_across_a_resume():
  bad, long = packing.SKIPPED_KEYS[0], packing.SKIPPED_KEYS[-1]
  first = trainer.StepStats(lambda local: 0.0, process_count=1, device_count=1, peak_flops=None)
  batch = _batch(2, {bad: 3})
  first.add(batch)
  assert tuple(batch) == layout.FIELDS  # what goes to the devices holds no counts
  first.add(_batch(2, {long: 1}))
  meta = {'train_flops': 5.0, **first.checkpoint_figures()}
  assert meta[bad] == 3.0 and meta[long] == 1.0

  resumed = trainer.StepStats(lambda local: 0.0, process_count=1, device_count=1,
                              peak_flops=None, resumed=meta)
  resumed.add(_batch(2, {bad: 2}))
  logged = resumed.log_figures(1.0)
  assert logged[bad] == 5.0 and logged[long] == 1.0  # since training began, not the restart
  assert sum(logged[k] for k in packing.SKIPPED_KEYS) == 6.0
  # A checkpoint from before the counts were saved: they count from zero.
  old = trainer.StepStats(lambda local: 0.0, process_count=1, device_count=1, peak_flops=None,
                          resumed={'train_flops': 1.0})
  old.add(_batch(2, {bad: 1}))
  assert old.checkpoint_figures()[bad] == 1.0


def test_microbatches_accumulate_the_mean_gradient():
  """Gradient accumulation gives the mean of the microbatches' gradients and losses, which for
  a mean-over-rows loss is the full batch's; counts (*_tokens) add up."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
  params = {'w': jnp.asarray([0.5, -1.0, 2.0])}

  def loss_fn(p, batch, key, step):
    del key, step
    err = batch['x'] @ p['w'] - 1.0
    loss = jnp.mean(err ** 2)
    return loss, {'loss': loss, 'row_tokens': jnp.float32(batch['x'].shape[0])}

  tx = optax.sgd(0.1)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': tx.init(params)}
  lr = lambda step: 0.1
  out = {}
  for n in (1, 2, 4):
    new, aux = jax.jit(trainer.make_step(loss_fn, tx, lr, microbatches=n))(
        state, {'x': x}, jax.random.key(0))
    out[n] = (np.asarray(new['params']['w']), float(aux['loss']), float(aux['row_tokens']))
  for n in (2, 4):
    np.testing.assert_allclose(out[n][0], out[1][0], rtol=1e-6)
    np.testing.assert_allclose(out[n][1], out[1][1], rtol=1e-6)
    assert out[n][2] == 8.0
  # Microbatch j holds rows j, j + n, ...: an even split of each device's block of rows.
  np.testing.assert_array_equal(trainer.microbatch_split(jnp.arange(8), 2), [[0, 2, 4, 6],
                                                                             [1, 3, 5, 7]])


def test_frozen_parameters_are_not_differentiated():
  """trained=...: the trained parameters take the same step as when every parameter is
  differentiated and the optimizer zeroes the frozen ones; the frozen ones get no gradient."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  params = {'w': jnp.asarray([0.5, -1.0, 2.0]), 'b': jnp.asarray(0.3)}

  def loss_fn(p, batch, key, step):
    del key, step
    loss = jnp.mean((batch['x'] @ p['w'] + p['b'] - 1.0) ** 2)
    return loss, {'loss': loss}

  labels = {'w': 'train', 'b': 'freeze'}
  tx = optax.multi_transform({'train': optax.sgd(0.1), 'freeze': optax.set_to_zero()}, labels)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': tx.init(params)}
  lr = lambda step: 0.1
  everything, _ = trainer.make_step(loss_fn, tx, lr)(state, {'x': x}, jax.random.key(0))
  for n in (1, 2):
    step = trainer.make_step(loss_fn, tx, lr, microbatches=n,
                             trained={'w': True, 'b': False})
    new, aux = jax.jit(step)(state, {'x': x}, jax.random.key(0))
    np.testing.assert_allclose(new['params']['w'], everything['params']['w'], rtol=1e-6)
    np.testing.assert_array_equal(new['params']['b'], params['b'])
    w_grad = jax.grad(lambda w: loss_fn(dict(params, w=w), {'x': x}, None, None)[0])(params['w'])
    np.testing.assert_allclose(aux['grad_norm'], jnp.linalg.norm(w_grad), rtol=1e-6)  # w's only
