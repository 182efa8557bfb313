"""Checkpoints survive restarts, mesh changes and crashes, and never damage another model's run."""

import os

# Eight fake CPU devices for the resharding test; only effective before jax is first imported.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
from PIL import Image

from tuna2_jax import checkpoint, metrics
from tuna2_jax.checkpoint import CheckpointMismatchError, Checkpointer


def _state(seed: float = 0.0) -> dict:
  return {
      'params': {'embed': jnp.arange(12, dtype=jnp.float32).reshape(4, 3) + seed,
                 'layers': {'kernel': jnp.full((2, 3, 5), seed, jnp.float32)}},
      'opt': {'count': jnp.int32(7), 'mu': {'embed': jnp.ones((4, 3), jnp.float32)}},
      'step': jnp.int32(3),
  }


def _abstract(tree, sharding=None):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree)


def _listing(root) -> list[tuple[str, int]]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames:
      out.append((os.path.relpath(os.path.join(dirpath, name), root), -1))
    for name in filenames:
      path = os.path.join(dirpath, name)
      out.append((os.path.relpath(path, root), os.path.getsize(path)))
  return sorted(out)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_round_trip(tmp_path):
  state = _state(1.5)
  with Checkpointer(str(tmp_path), keep=3, save_every=1) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(3, state, data_state={'next_index': 123}, meta={'model': 'tiny'})
  before = _listing(tmp_path)
  with Checkpointer(str(tmp_path), keep=3, save_every=1) as ckpt:  # a restarted run
    assert ckpt.latest_step() == 3
    restored, data_state, meta = ckpt.restore(3, _abstract(state))
  assert _listing(tmp_path) == before  # reading writes nothing
  _assert_trees_equal(restored, state)
  assert data_state == {'next_index': 123}
  assert meta == {'model': 'tiny'}


def test_one_process_saves_whole_arrays_without_a_warning(tmp_path, caplog):
  """No replica-parallel slices in a single process; the handler swap logs nothing."""
  import orbax.checkpoint as ocp
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(),
                                          override=True)  # orbax's default, as at start-up
  caplog.clear()  # that override's own warning
  with caplog.at_level('WARNING'):
    with Checkpointer(str(tmp_path), keep=1, save_every=1) as ckpt:
      ckpt.save(1, _state(2.0))
  assert isinstance(ocp.type_handlers.get_type_handler(jax.Array), checkpoint._WholeArrayHandler)
  assert not [r for r in caplog.records if 'overriding' in r.getMessage()], caplog.text


def test_relative_workdir(tmp_path, monkeypatch):
  # The README's commands pass relative workdirs such as runs/shapes.
  monkeypatch.chdir(tmp_path)
  state = _state(2.0)
  with Checkpointer(os.path.join('runs', 'rel'), keep=2, save_every=1) as ckpt:
    assert ckpt.save(1, state)
  with Checkpointer(os.path.join('runs', 'rel'), keep=2, save_every=1) as ckpt:
    restored, _, _ = ckpt.restore(ckpt.latest_step(), _abstract(state), require_data=False)
  _assert_trees_equal(restored, state)
  assert os.path.isdir(tmp_path / 'runs' / 'rel' / 'checkpoints' / '1')


def test_optional_items_restore_as_none(tmp_path):
  with Checkpointer(str(tmp_path), keep=1, save_every=1, async_save=False) as ckpt:
    ckpt.save(1, _state())
    _, data_state, meta = ckpt.restore(1, _abstract(_state()), require_data=False)
  assert data_state is None and meta is None


def test_keep_latest_and_save_every(tmp_path):
  with Checkpointer(str(tmp_path), keep=2, save_every=3) as ckpt:
    saved = [step for step in range(1, 10) if ckpt.save(step, _state(step))]
    assert saved == [3, 6, 9]
    assert ckpt.latest_step() == 9
    assert ckpt.all_steps() == [6, 9]
    assert not ckpt.save(10, _state())  # not a multiple of save_every
    assert ckpt.save(10, _state(), force=True)
    assert ckpt.all_steps() == [9, 10]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '9']


def test_mismatched_target_raises_and_leaves_checkpoint_untouched(tmp_path):
  with Checkpointer(str(tmp_path), keep=2, save_every=1) as ckpt:
    ckpt.save(5, _state())
  before = _listing(tmp_path)

  target = _abstract(_state())
  target['params']['embed'] = jax.ShapeDtypeStruct((8, 3), jnp.float32)
  del target['opt']['mu']
  with Checkpointer(str(tmp_path), keep=2, save_every=1) as ckpt:
    with pytest.raises(CheckpointMismatchError) as err:
      ckpt.restore(5, target)
    message = str(err.value)
    assert 'params/embed' in message and '(4, 3)' in message and '(8, 3)' in message
    assert 'opt/mu/embed' in message
    assert str(tmp_path) in message and 'left untouched' in message
    # A save of the other model must not delete or add steps either.
    other = _state()
    other['params']['embed'] = jnp.zeros((8, 3))
    with pytest.raises(CheckpointMismatchError):
      ckpt.save(6, other)
  assert _listing(tmp_path) == before


def test_interrupted_save_is_ignored(tmp_path):
  with Checkpointer(str(tmp_path), keep=3, save_every=3) as ckpt:
    ckpt.save(3, _state(3.0), data_state={'next_index': 30})
  # What orbax 0.12.8 leaves when killed while writing step 6: every file written but the step
  # and item directories still under their temporary names, without commit_success.txt.
  root = tmp_path / 'checkpoints'
  partial = root / '6.orbax-checkpoint-tmp'
  shutil.copytree(root / '3', partial)
  for item in ('state', 'data'):
    (partial / item / 'commit_success.txt').unlink()
    (partial / item).rename(partial / f'{item}.orbax-checkpoint-tmp')
  (partial / 'commit_success.txt').unlink()
  shutil.copytree(partial, root / '6.orbax-checkpoint-tmp-1700000000')  # older orbax naming

  with Checkpointer(str(tmp_path), keep=3, save_every=3) as ckpt:
    assert ckpt.latest_step() == 3
    restored, data_state, _ = ckpt.restore(3, _abstract(_state()))
    _assert_trees_equal(restored, _state(3.0))
    assert data_state == {'next_index': 30}
    assert ckpt.save(6, _state(6.0))  # the resumed run writes step 6 again
    assert ckpt.latest_step() == 6
    _assert_trees_equal(ckpt.restore(6, _abstract(_state()), require_data=False)[0],
                        _state(6.0))


def test_crash_before_commit_keeps_previous_step(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  async def crash(self):
    raise RuntimeError('simulated crash before the commit rename')

  with Checkpointer(str(tmp_path), keep=3, save_every=1, async_save=False) as ckpt:
    ckpt.save(1, _state(1.0))
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', crash)
    with pytest.raises(RuntimeError, match='simulated crash'):
      ckpt.save(2, _state(2.0))
  monkeypatch.undo()
  assert '2.orbax-checkpoint-tmp' in os.listdir(tmp_path / 'checkpoints')
  with Checkpointer(str(tmp_path), keep=3, save_every=1) as ckpt:
    assert ckpt.latest_step() == 1
    _assert_trees_equal(ckpt.restore(1, _abstract(_state()), require_data=False)[0],
                        _state(1.0))


def test_restore_onto_other_shardings(tmp_path):
  # conftest asks for 8 CPU devices before jax starts
  assert jax.device_count() >= 8, f'needs 8 devices, got {jax.device_count()}'
  devices = np.array(jax.devices()[:8])
  row_mesh = jax.sharding.Mesh(devices, ('data',))
  values = np.arange(8 * 4 * 6, dtype=np.float32).reshape(8, 4, 6)
  state = {'w': jax.device_put(values, NamedSharding(row_mesh, P('data'))),
           'step': jnp.int32(11)}
  with Checkpointer(str(tmp_path), keep=1, save_every=1) as ckpt:
    ckpt.save(1, state)

  grid_mesh = jax.sharding.Mesh(devices.reshape(2, 4), ('fsdp', 'model'))
  targets = {
      'mesh 2x4': {'w': NamedSharding(grid_mesh, P(None, 'model', 'fsdp')),
                   'step': NamedSharding(grid_mesh, P())},
      'one device': {'w': SingleDeviceSharding(jax.devices()[0]),
                     'step': SingleDeviceSharding(jax.devices()[0])},
  }
  with Checkpointer(str(tmp_path), keep=1, save_every=1) as ckpt:
    for shardings in targets.values():
      target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, shardings)
      restored, _, _ = ckpt.restore(1, target, require_data=False)
      assert restored['w'].sharding == shardings['w']
      np.testing.assert_array_equal(np.asarray(restored['w']), values)
      assert int(restored['step']) == 11


def test_config_round_trip(tmp_path):
  assert checkpoint.read_config(str(tmp_path)) is None
  checkpoint.write_config(str(tmp_path), '{"lr": 1}')
  checkpoint.write_config(str(tmp_path), '{"lr": 2}')
  assert checkpoint.read_config(str(tmp_path)) == '{"lr": 2}'
  assert os.listdir(tmp_path) == ['config.json']  # no temp files left behind


def test_metrics_writer(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write_scalars(10, {'loss': np.float32(2.5), 'lr': jnp.asarray(1e-3)})
  writer.write_scalars(20, {'loss': float('nan')})
  writer.write_jsonl('eval.jsonl', {'step': 20, 'fid': np.float64(31.0)})
  writer.write_image(20, 'samples', np.zeros((8, 8, 3), np.uint8))
  writer.close()
  lines = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert lines[0] == {'step': 10, 'loss': 2.5, 'lr': pytest.approx(1e-3)}
  assert lines[1] == {'step': 20, 'loss': None}
  assert json.loads(open(tmp_path / 'eval.jsonl').read()) == {'step': 20, 'fid': 31.0}
  events = os.listdir(tmp_path / 'tensorboard')
  assert any(name.startswith('events.out.tfevents') for name in events)
  assert all(os.path.getsize(tmp_path / 'tensorboard' / name) > 0 for name in events)


def test_disabled_metrics_writer_writes_nothing(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path / 'run'), enabled=False)
  writer.write_scalars(1, {'loss': 1.0})
  writer.write_jsonl('eval.jsonl', {'step': 1})
  writer.write_image(1, 'samples', np.zeros((4, 4, 3), np.uint8))
  writer.close()
  assert os.listdir(tmp_path) == []


def test_sample_grid(tmp_path):
  images = [np.full((16, 12, 3), 40 * i, np.uint8) for i in range(5)]
  captions = ['a red circle above a blue square on a green background'] + ['x'] * 4
  path = metrics.save_sample_grid(str(tmp_path / 'grid.png'), images, captions, columns=4, scale=2)
  grid = Image.open(path)
  gap = metrics.TILE_GAP
  assert grid.format == 'PNG'
  assert grid.width == 4 * (12 * 2 + gap) + gap
  assert grid.height > 2 * (16 * 2 + gap)  # two rows of images plus caption lines
  pixels = np.asarray(grid)
  np.testing.assert_array_equal(pixels[gap:gap + 32, gap + (24 + gap):gap + (24 + gap) + 24],
                                40)  # second tile, nearest-neighbour upscaled
