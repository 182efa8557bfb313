"""Compiling the train step for a TPU slice (or a GPU node) from this CPU host (train.py
--dry_run_topology).

The TPU compile needs libtpu (the 'tpu-aot' extra, also in 'test'), the GPU compile jax's CUDA
plugin (the 'gpu-aot' extra); the checks of the target run before either loads and need nothing.
"""

import dataclasses
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT as REPO, load_experiment
from tuna2_jax import dry_run, sharding, topologies, train


def _tiny(mesh=None, batch_size=4):
  """The runlocal 7B structure, with model.attention='auto' so that the target picks splash."""
  config = load_experiment('tuna2_7b', 'runlocal=True')
  config.model.attention = 'auto'
  config.mesh.update(mesh or dict(data=1, fsdp=-1, tensor=1))
  config.batch_size = batch_size
  return config


def test_topology_table_names_the_slices():
  v5p = topologies.get('v5p-128')
  assert (v5p.topology_name, v5p.num_devices, v5p.device_kind) == ('v5:4x4x4', 64, 'TPU v5')
  assert v5p.wrap == (True, True, True) and not any(topologies.get('v5p-64').wrap)
  assert topologies.get('v6e-256').num_devices == 256
  assert topologies.get('v5e-8').hbm_bytes < topologies.get('v6e-8').hbm_bytes < v5p.hbm_bytes


@pytest.mark.parametrize('change, topology, match', [
    (dict(), 'v5p-3', r"unknown topology 'v5p-3': expected one of v5p-8, "),
    (dict(mesh=dict(data=3, fsdp=-1, tensor=1)), 'v5p-8',
     r'v5p-8 \(4 devices, 4 per slice\).*4 is not divisible by 3'),
    (dict(mesh=dict(data=1, fsdp=8, tensor=1)), 'v5p-8', r'needs 8 devices but 4 are available'),
    (dict(batch_size=6), 'v5p-8', r'batch_size=6 does not split over the 4 batch shards'),
])
def test_bad_target_is_refused_naming_both_numbers(change, topology, match):
  with pytest.raises(ValueError, match=match):
    dry_run.check_target(_tiny(**change), topologies.get(topology), 1)


def test_heads_that_splash_would_split_unevenly_are_refused_before_tracing():
  """Splash runs per shard of the tensor axis: 2 key/value heads over tensor=4 is refused with
  the counts named (dense attention, on the CPU, shards such heads unevenly and runs)."""
  pytest.importorskip('libtpu', reason='libtpu is not installed (the tpu-aot extra)')
  config = _tiny(dict(data=1, fsdp=1, tensor=4))
  mesh = sharding.make_mesh(config.mesh, topologies.devices(topologies.get('v5p-8')))
  with pytest.raises(ValueError, match=r"model.decoder.num_kv_heads=2 is not divisible by mesh "
                                       r"axes \('tensor',\) of size 4 .* splash"):
    train.setup(config, mesh)


def test_multi_slice_mesh_and_batch_are_checked_over_all_slices():
  config = _tiny(dict(data=1, fsdp=-1, tensor=1, dcn_data=2), batch_size=8)
  dry_run.check_target(config, topologies.get('v5p-8'), 2)  # 2 x 4 devices, 8 rows: fine
  config.batch_size = 4
  with pytest.raises(ValueError, match=r'batch_size=4 .* 8 batch shards .* 2 x v5p-8'):
    dry_run.check_target(config, topologies.get('v5p-8'), 2)


def test_fit_compares_the_peak_with_the_chips_hbm():
  report = dict(peak_bytes=10 * topologies.GIB, devices=4, device_kind='TPU v5')
  small = dataclasses.replace(topologies.get('v5p-8'), hbm_bytes=8 * topologies.GIB)
  assert not dry_run.add_target(report, _tiny(), small, None)['fits']
  out = dry_run.add_target(report, _tiny(), topologies.get('v5p-8'), step_time_s=1.0)
  assert out['fits'] and 0 < out['mfu'] < 1


def test_without_libtpu_the_flag_stops_with_the_install_command(tmp_path):
  (tmp_path / 'libtpu.py').write_text("raise ImportError('no libtpu here')\n")
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
  run = subprocess.run(
      [sys.executable, '-m', 'tuna2_jax.train',
       '--config=experiments/tuna2_7b.py:runlocal=True', '--config.mesh.fsdp=-1',
       '--config.batch_size=4', '--dry_run', '--dry_run_topology=v5p-8'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 2
  assert run.stderr.strip().splitlines() == [
      "error: compiling for v5p-8 needs libtpu: pip install -e '.[tpu-aot]'"]


def test_runlocal_step_compiles_for_a_v5p_8_with_splash():
  pytest.importorskip('libtpu', reason='libtpu is not installed (the tpu-aot extra)')
  topology = topologies.get('v5p-8')
  config = _tiny()
  report = train.dry_run(config, topologies.devices(topology), topology, step_time_s=0.01)
  assert report['platform'] == 'tpu' and report['device_kind'] == 'TPU v5'
  assert report['devices'] == 4 and report['mesh']['fsdp'] == 4
  assert report['kernel_calls'] > 0  # auto chose splash for the TPU mesh, lowered by Mosaic
  assert 0 < report['temp_bytes'] < report['peak_bytes'] < topology.hbm_bytes
  assert report['fits'] and report['hbm_bytes'] == topology.hbm_bytes
  assert 0 < report['mfu'] < 1
  text = dry_run.format_report(report)
  assert 'v5p-8: 4 x TPU v5' in text and 'fits: peak is' in text and 'MFU' in text


def test_runlocal_step_compiles_for_an_h100_node_with_omni_flash():
  pytest.importorskip('jax_plugins.xla_cuda12',
                      reason="jax's CUDA plugin is not installed (the gpu-aot extra)")
  topology = topologies.get('h100-8')
  config = _tiny(batch_size=8)
  report = train.dry_run(config, topologies.devices(topology), topology)
  assert report['platform'] == 'gpu' and report['device_kind'] == 'NVIDIA H100 80GB HBM3'
  assert report['kernel_calls'] > 0  # auto chose omni_flash for the GPU mesh, through Triton
  assert report['fits'] and 0 < report['temp_bytes'] < report['peak_bytes']


def test_bf16_runlocal_step_compiles_for_one_h100_with_omni_hopper():
  """bfloat16 and head_dim 64: auto picks the Mosaic GPU kernels for the H100 target (not the
  interpreter the CPU host would run), and they lower for sm90."""
  pytest.importorskip('jax_plugins.xla_cuda12',
                      reason="jax's CUDA plugin is not installed (the gpu-aot extra)")
  topology = topologies.get('h100-1')
  config = _tiny(batch_size=1)
  config.model.dtype = 'bfloat16'
  config.model.decoder.head_dim = 64
  config.model.head.update(head_dim=64, rope_split=(16, 24, 24))
  report = train.dry_run(config, topologies.devices(topology), topology)
  assert report['devices'] == 1 and report['device_kind'] == 'NVIDIA H100 80GB HBM3'
  assert report['kernel_calls'] > 0 and report['fits']


def test_the_dry_run_checks_the_step_without_tokenizer_or_data():
  """A restore config names Hugging Face special tokens: training needs that tokenizer, its
  dry run (validate_step) does not."""
  config = load_experiment('tuna2_7b_restore')
  train.validate_step(config)
  with pytest.raises(ValueError, match='only a Hugging Face'):
    train.validate(config)
