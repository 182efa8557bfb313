"""The benchmark scripts run end to end on tiny settings and report finite figures."""

import math

import numpy as np
import pytest

from benchmarks import attention, packed_batch, sampling, train_step
from conftest import load_experiment
from tuna2_jax import flops


def test_packed_batch_has_the_training_layout():
  config = load_experiment('tuna2_1_5b', 'runlocal=True')
  batch = packed_batch.packed_batch(config, batch_size=2, seq_len=256)
  assert batch['tokens'].shape == (2, 256)
  assert (batch['segment_ids'] > 0).mean() > 0.5  # rows are filled, not mostly padding
  assert batch['gen_mask'].any() and (batch['loss_mask'] > 0).any()  # both objectives present
  assert flops.train_step_flops(config.model, batch) > 0


def test_train_step_benchmark_runs_tuna_r(capsys):
  out = train_step.main(['--config=experiments/tuna2_1_5b.py:runlocal=True,vision=encoder',
                         '--steps=2', '--warmup=1'])
  assert math.isfinite(out['loss']) and out['tokens_per_s'] > 0 and out['step_s'] > 0
  assert out['hw_tflops_per_device'] >= out['tflops_per_device'] > 0
  printed = capsys.readouterr().out
  assert 'device: cpu' in printed and 'vision=encoder' in printed and 'tokens/s' in printed


@pytest.mark.parametrize('kernel,block', [('omni_flash', '32,32'), ('splash', '128')])
def test_attention_benchmark_runs_the_omni_kernel(capsys, kernel, block):
  rows = attention.main(['--seq_lens=128', '--heads=2,1', '--head_dim=16', f'--block={block}',
                         '--iters=1', f'--kernel={kernel}'])
  assert [r['pass'] for r in rows] == ['check', 'fwd', 'fwd+bwd']
  assert rows[0]['ok'] and 0 < rows[0]['out_err'] < 2e-2  # bf16 kernel vs float32 reference
  assert all(r['omni_s'] > 0 and np.isfinite(r['omni_tflops']) for r in rows[1:])
  printed = capsys.readouterr().out
  assert f'omni kernel {kernel}' in printed and 'no causal baseline' in printed


def test_sampling_benchmark_runs_cached_and_uncached(capsys):
  out = sampling.main(['--config=experiments/tuna2_1_5b.py:runlocal=True', '--batch_sizes=1',
                       '--steps=2', '--new_tokens=2', '--repeats=1', '--prompt_tokens=8'])
  assert out['t2i_b1']['speedup'] > 0 and out['decode_b1'] > 0
  assert 'prompt cache' in capsys.readouterr().out
