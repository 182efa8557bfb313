r"""Train-step speed: step time, tokens/s, model and hardware TFLOP/s per device, MFU, memory.

  python benchmarks/train_step.py --config=experiments/tuna2_1_5b.py [--attention=auto]
  python benchmarks/train_step.py --config=experiments/tuna2_1_5b.py:vision=encoder

Runs the real jitted train step of tuna2_jax/train.py (AdamW, EMA, both losses, the config's
remat and dtypes) on synthetic packed batches of the config's layout (benchmarks/packed_batch.py)
over every local device (batch split over the mesh). Tokens/s counts non-padding tokens; model
FLOPs are tuna2_jax/flops.py's analytic count of useful work (image spans bidirectional, text
causal, LM head at text targets, modulation per image, no padding, no recomputation), so MFU =
model FLOP/s / (devices x peak bf16); hardware FLOPs add padding, whole LM-head chunks,
per-token modulation and remat's recompute. The last line compares tokens/s
with the reference PyTorch implementation's best figure at the same size on one H100 (5.6k
non-padding tokens/s on 8k packed tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.packed_batch import device_line, packed_batch  # noqa: E402
from tuna2_jax import config_lib, flops, sharding, train, train_state  # noqa: E402

REFERENCE_TOKENS_PER_S = 5.6e3  # PyTorch reference, 1.5B dims, 8k packed tokens, one H100


def peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2 ** 30


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='experiment file[:args]')
  parser.add_argument('--batch_size', type=int, help='global rows (default: one per device)')
  parser.add_argument('--seq_len', type=int)
  parser.add_argument('--attention', help='override model.attention')
  parser.add_argument('--remat', help='override model.remat')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  args = parser.parse_args(argv)

  config = config_lib.load(args.config)
  config.batch_size = args.batch_size or jax.device_count()
  if args.seq_len:
    config.seq_len = args.seq_len
  if args.attention:
    config.model.attention = args.attention
  if args.remat:
    config.model.remat = args.remat
  print(device_line())
  print(f'config: {args.config} vision={config.model.vision} attention={config.model.attention} '
        f'remat={config.model.remat} dtype={config.model.dtype} batch={config.batch_size} x '
        f'{config.seq_len} tokens')

  mesh = sharding.make_mesh(config.mesh)
  _, _, _, step_fn = train.setup(config, mesh)
  state = train_state.create_sharded_state(config, mesh)
  host = packed_batch(config)
  batch = sharding.global_arrays(host, mesh, config.sharding_rules)
  tokens = int((host.segment_ids_BT > 0).sum())
  step_flops = flops.train_step_flops(config.model, host)
  hw_flops = flops.hardware_step_flops(config.model, host)

  key = jax.random.key(0)
  t0 = time.perf_counter()
  for i in range(args.warmup):
    state, metrics = step_fn(state, batch, jax.random.fold_in(key, i))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch, jax.random.fold_in(key, args.warmup + i))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise SystemExit(f'the loss is {loss}: the timing is of a broken step')

  n = jax.device_count()
  tflops = step_flops / step_s / n / 1e12
  peak = flops.peak_flops(jax.devices()[0].device_kind)
  out = {'step_s': step_s, 'tokens_per_s': tokens / step_s, 'tflops_per_device': tflops,
         'hw_tflops_per_device': hw_flops / step_s / n / 1e12,
         'mfu': None if peak is None else tflops * 1e12 / peak, 'peak_memory_gib':
         peak_memory_gib(), 'loss': loss, 'warmup_s': compile_s}
  print(f'non-padding tokens/step: {tokens} of {config.batch_size * config.seq_len}; '
        f'model TFLOP/step: {step_flops / 1e12:.2f}, hardware {hw_flops / 1e12:.2f}')
  print(f'step: {step_s * 1e3:.1f} ms (median of {args.steps}; first {args.warmup} with compile '
        f'{compile_s:.1f} s)  loss {loss:.3f}')
  print(f'tokens/s: {out["tokens_per_s"]:,.0f}  TFLOP/s/device: model {tflops:.1f}, hardware '
        f'{out["hw_tflops_per_device"]:.1f}  MFU (model FLOPs): ' +
        ('n/a (no bf16 peak for this device)' if peak is None else f'{out["mfu"]:.1%}'))
  mem = out['peak_memory_gib']
  print('peak memory: ' + ('n/a on this backend' if mem is None else f'{mem:.1f} GiB/device'))
  print(f'vs reference PyTorch (5.6k tokens/s, 1 x H100): {out["tokens_per_s"] / n / REFERENCE_TOKENS_PER_S:.2f}x per device')
  return out


if __name__ == '__main__':
  main()
