r"""Omni-mask attention against cuDNN causal flash attention, forward and forward+backward.

  python benchmarks/attention.py [--seq_lens 4096,8192,16384] [--heads 12,2] [--head_dim 128]

The omni kernel (kernels/omni_flash.py) runs on the layout of a real packed row of the
tuna2_1_5b mixture at each length (512 px image spans of 1025 tokens among text, several
samples per row, benchmarks/packed_batch.py); cuDNN runs plain causal attention over the same
length. Throughput is useful attention FLOP/s: 4 * heads * head_dim per (query, visible key)
pair forward, with the backward pass counted as 2.5 times the forward (five matmuls against
two), for both kernels alike; the omni row's visible pairs are counted from its mask
(flops.attended_keys), causal's as T (T + 1) / 2. The last column is the omni kernel's share of
cuDNN's throughput at the same length. Off GPU, cuDNN is skipped and the omni kernel runs in
Pallas interpret mode (a correctness smoke run, not a speed figure).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.packed_batch import device_line, packed_batch  # noqa: E402
from tuna2_jax import config_lib, flops  # noqa: E402
from tuna2_jax.kernels import omni_flash  # noqa: E402
from tuna2_jax.models.attention import MaskInfo  # noqa: E402

BACKWARD_FACTOR = 2.5


def timed(fn, *args, iters: int) -> float:
  """Median seconds per call after one compiling call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def fwd_and_grad(attend):
  fwd = jax.jit(attend)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)),
                          argnums=(0, 1, 2)))
  return fwd, grad


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seq_lens', default='4096,8192,16384')
  parser.add_argument('--heads', default='12,2', help='query heads,key-value heads')
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--block', default='64,64', help='omni kernel block_q,block_k')
  parser.add_argument('--iters', type=int, default=10)
  args = parser.parse_args(argv)
  h, g = map(int, args.heads.split(','))
  block_q, block_k = map(int, args.block.split(','))
  d = args.head_dim
  on_gpu = jax.default_backend() == 'gpu'
  config = config_lib.load(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'experiments', 'tuna2_1_5b.py'))
  print(device_line())
  print(f'heads {h} / {g} kv, head_dim {d}, bf16; omni blocks {block_q} x {block_k}; '
        f'TFLOP/s of visible (query, key) pairs, backward = {BACKWARD_FACTOR} x forward')
  print(f'{"T":>6} {"pass":>8} {"omni ms":>9} {"omni TF/s":>10} {"cudnn ms":>9} '
        f'{"cudnn TF/s":>11} {"omni/cudnn":>10}  image tokens')
  rows = []
  for t in map(int, args.seq_lens.split(',')):
    if not on_gpu:
      config.data.image_size = min(config.data.image_size, 64)
    layout = packed_batch(config, batch_size=1, seq_len=t, seed=t)
    info = MaskInfo(*(jnp.asarray(layout[k]) for k in ('segment_ids', 'positions', 'span_ids')))
    omni_pairs = float(flops.attended_keys(layout['segment_ids'], layout['span_ids']).sum())
    causal_pairs = t * (t + 1) / 2
    kq, kk, kv = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(kq, (1, t, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (1, t, g, d), jnp.bfloat16)
    v = jax.random.normal(kv, (1, t, g, d), jnp.bfloat16)
    omni = fwd_and_grad(lambda q, k, v: omni_flash.omni_flash_attention(
        q, k, v, info, block_q=block_q, block_k=block_k))
    cudnn = fwd_and_grad(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation='cudnn')) if on_gpu else None
    image_share = float(layout['span_ids'].astype(bool).mean())
    for name, factor, idx in (('fwd', 1.0, 0), ('fwd+bwd', 1.0 + BACKWARD_FACTOR, 1)):
      unit = 4.0 * h * d * factor
      omni_s = timed(omni[idx], q, k, v, iters=args.iters)
      omni_tf = unit * omni_pairs / omni_s / 1e12
      row = {'seq_len': t, 'pass': name, 'omni_s': omni_s, 'omni_tflops': omni_tf}
      if cudnn:
        cudnn_s = timed(cudnn[idx], q, k, v, iters=args.iters)
        row.update(cudnn_s=cudnn_s, cudnn_tflops=unit * causal_pairs / cudnn_s / 1e12)
        row['ratio'] = omni_tf / row['cudnn_tflops']
      rows.append(row)
      fmt = lambda key, scale, spec: (format(row[key] * scale, spec) if key in row else 'n/a')
      print(f'{t:>6} {name:>8} {omni_s * 1e3:>9.2f} {omni_tf:>10.1f} '
            f'{fmt("cudnn_s", 1e3, ">9.2f"):>9} {fmt("cudnn_tflops", 1, ">11.1f"):>11} '
            f'{fmt("ratio", 100, ">9.1f") + "%" if "ratio" in row else "n/a":>10}  '
            f'{image_share:.0%}')
  if not on_gpu:
    print('(not a GPU: cuDNN skipped, the omni kernel ran in Pallas interpret mode)')
  return rows


if __name__ == '__main__':
  main()
