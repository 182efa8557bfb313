"""The trainer skeleton's loop helpers: itstime, Chrono (on a fake clock), StepStats."""

import numpy as np
import pytest

from tuna2_jax import trainer
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
  """Two rows whose first `tokens_per_row` slots are real tokens, with skip counts."""
  seg = np.zeros((2, 8), np.int32)
  seg[:, :tokens_per_row] = 1
  batch = {'segment_ids': seg}
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
  assert set(batch) == {'segment_ids'}  # what goes to the devices holds no counts
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
