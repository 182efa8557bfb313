"""Meshes and sharding: the sharded step computes the single-device losses, runs resume on
other meshes, bad layouts are refused before anything runs, and the 7B dry run compiles.

All on the 8 fake CPU devices of conftest.py.
"""

import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
import pytest

from conftest import load_experiment, train_losses
from tuna2_jax import checkpoint as ckpt_lib
from tuna2_jax import dry_run, layout, sharding, train, train_state
from tuna2_jax.data import sequence as seq


def _config(**overrides):
  c = load_experiment('shapes', 'runlocal=True')
  c.batch_size = 8
  c.optim.schedule = 'constant'  # the lr of a step does not depend on total_steps
  # No evaluation (samples, shapes metrics): these tests are about the step and its state.
  c.update(dict(total_steps=4, log_every=1, checkpoint_every=2, eval_every=0), **overrides)
  return c


def _mesh_cfg(**sizes):
  return ml_collections.ConfigDict(dict(dict(data=1, fsdp=1, tensor=1), **sizes))


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def single_device_losses():
  config = _config()
  return train_losses(config, sharding.mesh_from_sizes(devices=jax.devices()[:1]), 4)


# --- meshes ---
def test_mesh_sizes_fill_and_hybrid_shapes():
  assert sharding.mesh_shape(_mesh_cfg(data=2, fsdp=-1, tensor=2), 8) == ((2, 2, 2), (1, 1, 1))
  # 4 slices of 64 chips: fsdp inside a slice, data across slices.
  cfg = _mesh_cfg(data=1, fsdp=-1, tensor=1, dcn_data=-1)
  assert sharding.mesh_shape(cfg, 256, num_slices=4) == ((1, 64, 1), (4, 1, 1))
  cfg = _mesh_cfg(data=2, fsdp=8, tensor=4, dcn_fsdp=2)
  assert sharding.mesh_shape(cfg, 128, num_slices=2) == ((2, 8, 4), (1, 2, 1))
  mesh = sharding.make_mesh(_mesh_cfg(data=2, fsdp=-1, tensor=2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}


@pytest.mark.parametrize('sizes, match', [
    (dict(data=3), 'needs 3 devices but 8 are available'),
    (dict(data=-1, fsdp=3), '8 is not divisible by 3'),
    (dict(data=-1, fsdp=-1), 'at most one -1'),
    (dict(data=-1, dcn_data=2), 'needs 2 slices but 1 are available'),
])
def test_bad_mesh_is_refused(sizes, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(_mesh_cfg(**sizes), 8)
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(_mesh_cfg(**sizes))


# --- the numbers ---
def test_data_fsdp_tensor_losses_equal_single_device(single_device_losses):
  config = _config()
  mesh = sharding.make_mesh(_mesh_cfg(data=2, fsdp=2, tensor=2))
  losses = train_losses(config, mesh, 3)
  print(f'\n  single device {single_device_losses[:3]}\n  (2, 2, 2)     {losses}')
  np.testing.assert_allclose(losses, single_device_losses[:3], rtol=1e-5)
  assert losses[0] != losses[2]


@pytest.mark.slow
def test_resume_on_another_mesh_continues_the_losses(tmp_path, single_device_losses):
  workdir = str(tmp_path)
  saved = _config(total_steps=2)
  saved.mesh.update(data=1, fsdp=8, tensor=1)
  train.train(saved, workdir)
  resumed = _config(total_steps=4)
  resumed.mesh.update(data=2, fsdp=1, tensor=4)
  train.train(resumed, workdir)
  lines = _metrics(workdir)
  assert [line['step'] for line in lines] == [1, 2, 3, 4]
  np.testing.assert_allclose([line['loss'] for line in lines], single_device_losses, rtol=1e-5)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert not os.path.exists(os.path.join(workdir, 'samples'))  # eval_every=0: no evaluation


# --- refusals before any step, checkpoints untouched ---
def _listing(root):
  return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize('change, match', [
    (lambda c: c.mesh.update(data=1, fsdp=1, tensor=3), 'needs 3 devices but 8'),
    (lambda c: c.mesh.update(data=4, fsdp=1, tensor=2) or c.model.update(vocab_size=133),
     r'decoder/embed/embedding.*\(133, 64\).*not divisible by mesh axes \(\'tensor\',\) of '
     r'size 2'),

    (lambda c: c.update(sharding_rules=c.sharding_rules + (('mlp', 'model'),)),
     "names mesh axis 'model'"),
    (lambda c: c.model.decoder.update(width=96), 'does not match the model'),
])
def test_bad_layout_is_refused_before_any_step(tmp_path, change, match):
  workdir = str(tmp_path)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  config = _config()
  abstract, _ = train_state.state_shardings(config, sharding.make_mesh(config.mesh))
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  with ckpt_lib.Checkpointer(workdir, keep=2, save_every=1, async_save=False) as ckpt:
    ckpt.save(1, state, data_state={'next_index': 1})
  before = _listing(ckpt_dir)
  bad = _config(total_steps=3)
  change(bad)
  with pytest.raises(ValueError, match=match):
    train.train(bad, workdir)
  assert _listing(ckpt_dir) == before
  assert not os.path.exists(os.path.join(workdir, 'metrics.jsonl'))


def test_fsdp_leaves_little_replicated_and_the_check_fails_otherwise():
  config = load_experiment('tuna2_7b')
  mesh = sharding.mesh_from_sizes(fsdp=8)
  abstract, shardings = train_state.state_shardings(config, mesh)
  fraction = sharding.check_replication(abstract['params'], shardings['params'], mesh,
                                        config.max_replicated_fraction)
  print(f'\n  7B on fsdp=8: {fraction:.4%} of parameter bytes not split over fsdp')
  assert fraction < 0.001
  config.sharding_rules = tuple((k, None if k == 'embed' else v)
                                for k, v in config.sharding_rules)
  abstract, shardings = train_state.state_shardings(config, mesh)
  with pytest.raises(ValueError, match=r'not split over fsdp=8 .*max_replicated_fraction'):
    sharding.check_replication(abstract['params'], shardings['params'], mesh,
                               config.max_replicated_fraction)


def test_global_batch_turns_the_pipeline_dict_into_a_split_layout_batch():
  rows = {k: np.stack([v] * 4) for k, v in seq.empty_row(6, 2, 0).items()}
  rows['tokens'] = np.arange(24, dtype=np.int32).reshape(4, 6)
  mesh = sharding.mesh_from_sizes(data=2, fsdp=2, devices=jax.devices()[:4])
  batch = sharding.global_batch(dict(rows, skipped=np.zeros(4)), mesh)  # non-row keys left out
  assert isinstance(batch, layout.Batch)
  assert batch.patches_BTP.shape == (4, 6, 12) and batch.pos3_BT3.dtype == np.int32
  assert all(x.sharding.spec[0] == ('data', 'fsdp') for x in jax.tree.leaves(batch))
  np.testing.assert_array_equal(batch.tokens_BT, rows['tokens'])


def test_same_rules_shard_params_optimizer_and_ema():
  config = _config()
  mesh = sharding.make_mesh(_mesh_cfg(data=2, fsdp=2, tensor=2))
  _, shardings = train_state.state_shardings(config, mesh)
  kernel = lambda tree: tree['decoder']['blocks']['mlp']['up_proj']['kernel']
  want = jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')  # (layers, embed, mlp)
  assert kernel(shardings['params']).spec == want
  assert kernel(shardings['ema']).spec == want
  mu = [s for p, s in jax.tree_util.tree_flatten_with_path(shardings['opt'])[0]
        if 'mu' in jax.tree_util.keystr(p) and 'up_proj' in jax.tree_util.keystr(p)]
  assert mu and all(s.spec == want for s in mu)


# --- dry run ---
def test_dry_run_of_the_7b_config_on_8_devices_allocates_nothing(capsys):
  config = load_experiment('tuna2_7b')
  config.mesh.update(data=1, fsdp=8, tensor=1)
  config.batch_size = 16  # 2 rows per device: the config's 2 microbatches of one row each
  config.seq_len = 1024
  # Scanned layers compile like one; two of each keeps the CPU compile short.
  config.model.decoder.num_layers = 2
  config.model.head.num_layers = 2
  live_before = len(jax.live_arrays())
  t0 = time.perf_counter()
  report = train.dry_run(config)
  elapsed = time.perf_counter() - t0
  assert len(jax.live_arrays()) <= live_before  # abstract only: nothing was allocated
  abstract = train_state.abstract_state(config)
  param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize
                    for x in jax.tree.leaves(abstract['params']))
  assert report['params_bytes'] == pytest.approx(param_bytes / 8, rel=0.01)
  assert report['ema_bytes'] == report['params_bytes']
  assert report['opt_bytes'] == pytest.approx(2 * param_bytes / 8, rel=0.01)  # AdamW mu, nu
  assert report['temp_bytes'] > 0 and report['argument_bytes'] >= 4 * report['params_bytes']
  with capsys.disabled():
    print(f'\n  dry run ({elapsed:.0f}s):\n' + dry_run.format_report(report))
