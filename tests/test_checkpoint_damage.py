"""A damaged newest checkpoint falls back to the newest intact step, saying what is damaged; a
full disk stops the save in one line and leaves no temporary folder behind.

Each damage is done to a copy of one two-step template (steps 1 and 2, different contents).
"""

import errno
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuna2_jax import checkpoint
from tuna2_jax.checkpoint import (CheckpointDamagedError, CheckpointMismatchError,
                                  CheckpointSaveError, Checkpointer)


def _state(seed: float) -> dict:
  return {'params': {'w': jnp.arange(24, dtype=jnp.float32).reshape(4, 6) * seed,
                     'b': jnp.full((6,), seed, jnp.bfloat16)},
          'step': jnp.int32(int(seed))}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@pytest.fixture(scope='module')
def template(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp('template')
  with Checkpointer(str(root), keep=3, save_every=1, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _state(step), data_state={'next_index': 10 * step}, meta={'wall_s': step})
  return root


def _delete(path: Path) -> None:
  shutil.rmtree(path) if path.is_dir() else path.unlink()


def _truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _flip(path: Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _array_file(step_dir: Path) -> Path:
  """The (merged) file holding the state's array chunks."""
  files = sorted((step_dir / 'state' / 'd').iterdir(), key=lambda p: p.stat().st_size)
  return files[-1]


_FILES = {
    'state metadata': lambda d: d / 'state' / '_METADATA',
    'state manifest': lambda d: d / 'state' / 'manifest.ocdbt',
    'state arrays': _array_file,
    'data-iterator state': lambda d: d / 'data' / 'metadata',
    'meta': lambda d: d / 'meta' / 'metadata',
    'checksums': lambda d: d / 'checksums' / 'metadata',
}
_DAMAGE = [(f'{what} {how.__name__[1:]}', file, how)
           for what, file in _FILES.items() for how in (_delete, _truncate, _flip)]
_DAMAGE += [(f'{item} item deleted', lambda d, item=item: d / item, _delete)
            for item in ('data', 'meta', 'checksums')]


def _swap_state(step_dir: Path) -> None:
  """Step 1's arrays under step 2's name: every file is valid, only the content differs (what a
  flipped byte that still decodes does)."""
  shutil.rmtree(step_dir / 'state')
  shutil.copytree(step_dir.parent / '1' / 'state', step_dir / 'state')


@pytest.mark.parametrize('name,file,how', _DAMAGE + [('state content changed', None, None)],
                         ids=[d[0] for d in _DAMAGE] + ['state content changed'])
def test_damaged_latest_step_falls_back_to_the_older_one(template, tmp_path, caplog, name, file,
                                                         how):
  shutil.copytree(template, tmp_path, dirs_exist_ok=True)
  step_dir = tmp_path / 'checkpoints' / '2'
  if how is None:
    _swap_state(step_dir)
  else:
    how(file(step_dir))
  caplog.set_level(logging.WARNING)
  with Checkpointer(str(tmp_path), keep=3, save_every=1) as ckpt:
    step, state, data_state, meta = ckpt.restore_latest(_abstract(_state(1)))
  assert step == 1
  np.testing.assert_array_equal(np.asarray(state['params']['w']),
                                np.asarray(_state(1)['params']['w']))
  assert data_state == {'next_index': 10} and meta == {'wall_s': 1}
  logged = [r.getMessage() for r in caplog.records if 'falling back to step 1' in r.getMessage()]
  assert len(logged) == 1 and 'step 2' in logged[0], caplog.text[-2000:]


def test_first_save_after_a_fallback_replaces_the_damaged_step(template, tmp_path):
  shutil.copytree(template, tmp_path, dirs_exist_ok=True)
  _flip(tmp_path / 'checkpoints' / '2' / 'checksums' / 'metadata')
  with Checkpointer(str(tmp_path), keep=2, save_every=1, async_save=False) as ckpt:
    assert ckpt.restore_latest(_abstract(_state(1)))[0] == 1
    assert ckpt.all_steps() == [1, 2]  # reading deleted nothing
    ckpt.save(2, _state(5), data_state={'next_index': 50})
    assert ckpt.all_steps() == [1, 2]  # step 1, the intact one, is still kept
    step, state, data_state, _ = ckpt.restore_latest(_abstract(_state(1)))
  assert step == 2 and data_state == {'next_index': 50}
  assert int(state['step']) == 5


def test_every_step_damaged_names_each_and_changes_nothing(template, tmp_path):
  shutil.copytree(template, tmp_path, dirs_exist_ok=True)
  for step in ('1', '2'):
    _delete(tmp_path / 'checkpoints' / step / 'data')
  before = sorted(str(p) for p in tmp_path.rglob('*'))
  with Checkpointer(str(tmp_path), keep=3, save_every=1) as ckpt:
    with pytest.raises(CheckpointDamagedError) as err:
      ckpt.restore_latest(_abstract(_state(1)))
  message = str(err.value)
  assert "step 2: its 'data' item is missing" in message
  assert "step 1: its 'data' item is missing" in message
  assert sorted(str(p) for p in tmp_path.rglob('*')) == before


def test_another_models_checkpoint_does_not_fall_back(template, tmp_path):
  shutil.copytree(template, tmp_path, dirs_exist_ok=True)
  other = _abstract(_state(1))
  other['params']['w'] = jax.ShapeDtypeStruct((5, 6), jnp.float32, sharding=other['step'].sharding)
  with Checkpointer(str(tmp_path), keep=3, save_every=1) as ckpt:
    with pytest.raises(CheckpointMismatchError, match=r'params/w'):
      ckpt.restore_latest(other)


def test_checksums_do_not_depend_on_the_mesh():
  devices = np.array(jax.devices()[:8])
  x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  rows = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ('a',)),
                                    jax.sharding.PartitionSpec('a'))
  grid = jax.sharding.NamedSharding(jax.sharding.Mesh(devices.reshape(2, 4), ('a', 'b')),
                                    jax.sharding.PartitionSpec('b', 'a'))
  sums = [checkpoint.state_checksums({'x': jax.device_put(x, s)}) for s in (rows, grid)]
  assert sums[0] == sums[1]
  y = x.copy()
  y.reshape(-1).view(np.uint8)[77] ^= 1  # one flipped bit
  assert checkpoint.state_checksums({'x': jnp.asarray(y)}) != sums[0]
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same words, other places: the weighted sum sees it
  assert checkpoint.state_checksums({'x': jnp.asarray(swapped)}) != sums[0]


def _tmp_folders(root: Path) -> list[str]:
  return [p.name for p in (root / 'checkpoints').iterdir() if 'tmp' in p.name]


def test_full_disk_stops_before_writing(tmp_path, monkeypatch):
  with Checkpointer(str(tmp_path), keep=3, save_every=1, async_save=False) as ckpt:
    ckpt.save(1, _state(1), data_state={'next_index': 10})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, 'disk_usage',
                        lambda path: usage._replace(free=100))
    with pytest.raises(CheckpointSaveError) as err:
      ckpt.save(2, _state(2), data_state={'next_index': 20})
    assert ckpt.all_steps() == [1]
  message = str(err.value)
  nbytes = 24 * 4 + 6 * 2 + 4
  assert '\n' not in message and str(tmp_path) in message
  assert 'has 100 bytes free' in message and f'about {nbytes} bytes' in message
  assert _tmp_folders(tmp_path) == []


def test_no_space_during_the_write_removes_the_temporary_folder(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  async def no_space(self):  # the disk fills up once the files are written, before the commit
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  with Checkpointer(str(tmp_path), keep=3, save_every=1, async_save=False) as ckpt:
    ckpt.save(1, _state(1), data_state={'next_index': 10})
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', no_space)
    with pytest.raises(CheckpointSaveError) as err:
      ckpt.save(2, _state(2), data_state={'next_index': 20})
    monkeypatch.undo()
    assert ckpt.all_steps() == [1]
  message = str(err.value)
  assert 'no space left' in message and str(tmp_path) in message and 'bytes' in message
  assert 'removed its temporary folder 2.orbax-checkpoint-tmp' in message
  assert _tmp_folders(tmp_path) == []
