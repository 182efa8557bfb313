"""The benchmark scripts run end to end on tiny settings and report finite figures."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import attention, packed_batch
from conftest import cpu_env, load_experiment
from tuna2_jax import flops


def test_packed_batch_has_the_training_layout():
  config = load_experiment('tuna2_1_5b', 'runlocal=True')
  batch = packed_batch.packed_batch(config, batch_size=2, seq_len=256)
  assert batch.tokens_BT.shape == (2, 256)
  assert (batch.segment_ids_BT > 0).mean() > 0.5  # rows are filled, not mostly padding
  assert batch.gen_mask_BT.any() and (batch.loss_mask_BT > 0).any()  # both objectives present
  assert flops.train_step_flops(config.model, batch) > 0


@pytest.mark.parametrize('kernel,block', [('splash', '128')])
def test_attention_benchmark_runs_the_omni_kernel(capsys, kernel, block):
  """The TPU kernel's benchmark path (the GPU suite below runs the GPU one)."""
  rows = attention.main(['--seq_lens=128', '--heads=2,1', '--head_dim=16', f'--block={block}',
                         '--iters=1', f'--kernel={kernel}'])
  assert [r['pass'] for r in rows] == ['check', 'fwd', 'fwd+bwd']
  assert rows[0]['ok'] and 0 < rows[0]['out_err'] < 2e-2  # bf16 kernel vs float32 reference
  assert all(r['omni_s'] > 0 and np.isfinite(r['omni_tflops']) for r in rows[1:])
  printed = capsys.readouterr().out
  assert f'omni kernel {kernel}' in printed and 'no causal baseline' in printed


def test_gpu_suite_smoke_runs_every_step_and_writes_one_json(tmp_path):
  """bash benchmarks/gpu_suite.sh --smoke: GEMM, attention (checked against dense), both train
  steps, the train step with command buffers off, sampling; one JSON and one table."""
  out = tmp_path / 'suite.json'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # One CPU device (not the session's eight fake ones): one row per train step, as on one GPU.
  env = cpu_env(PYTHON=sys.executable)
  run = subprocess.run(['bash', os.path.join(root, 'benchmarks', 'gpu_suite.sh'), '--smoke',
                        '--out', str(out)], capture_output=True, text=True, env=env, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['mode'] == 'smoke' and report['backend'] == 'cpu'
  assert report['gemm']['tflops'] > 0
  for shape in ('decoder', 'flow_head'):
    rows = report['attention'][shape]
    assert rows[0]['pass'] == 'check' and rows[0]['ok']
    assert all(r['omni_s'] > 0 for r in rows[1:])
  for name in ('tuna2', 'tuna_r'):
    r = report['train'][name]
    assert math.isfinite(r['loss']) and r['tokens_per_s'] > 0
    assert r['hw_tflops_per_device'] >= r['tflops_per_device'] > 0
  assert report['train_no_command_buffer']['tuna2']['step_s'] > 0
  assert report['sampling']['t2i_b1']['speedup'] > 0 and report['sampling']['decode_b1'] > 0
  printed = run.stdout
  assert 'device: cpu' in printed and 'prompt cache speedup b1' in printed
  assert 'tuna2 train step (command buffers off)' in printed
