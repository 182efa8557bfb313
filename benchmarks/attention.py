r"""Omni-mask attention against causal flash attention, forward and forward+backward.

  python benchmarks/attention.py [--seq_lens 4096,8192,16384] [--heads 12,2] [--head_dim 128]
      [--kernel auto|omni_hopper|omni_flash|splash]

The omni kernel (GPU: kernels/omni_hopper.py on Hopper, kernels/omni_flash.py before it; TPU:
kernels/omni_splash.py; auto picks as models/attention.py does) runs on the layout of a real
packed row of the tuna2_1_5b mixture at each length (512 px image spans of 1025 tokens among
text, several samples per row, benchmarks/packed_batch.py); the baseline runs plain causal
attention over the same length: cuDNN flash attention on GPU, splash attention's causal kernel
on TPU.

Rows up to --check_max_len are first checked on the same device against dense attention in
float32 (output, and q/k/v grads for a random cotangent); a mismatch prints MISMATCH and the
script exits 1. Throughput is useful attention FLOP/s: 4 * heads * head_dim per (query, visible
key) pair forward, with the backward pass counted as 2.5 times the forward (five matmuls against
two), for both kernels alike; the omni row's visible pairs are counted from its mask
(layout.attended_keys_BT), causal's as T (T + 1) / 2. The last column is the omni kernel's share of
the causal kernel's throughput at the same length. On CPU the baseline is skipped and the omni
kernel runs in Pallas interpret mode (a correctness smoke run, not a speed figure).
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
from tuna2_jax import config_lib  # noqa: E402
from tuna2_jax.kernels import omni_flash, omni_hopper, omni_splash  # noqa: E402
from tuna2_jax.layout import attended_keys_BT, omni_mask_BTS, row_info, text_info  # noqa: E402
from tuna2_jax.models import attention as attn_lib  # noqa: E402

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
  """(forward, gradient of the output's sum, attend itself), the first two jitted."""
  fwd = jax.jit(attend)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)),
                          argnums=(0, 1, 2)))
  return fwd, grad, attend


def check_against_dense(attend, q, k, v, info, out_tol=2e-2, grad_tol=5e-2) -> dict:
  """The kernel's output and q/k/v grads (random cotangent) against dense attention in float32
  on the kernel's own bfloat16 inputs; queries without keys are left out of the output error."""
  mask = omni_mask_BTS(info, info)
  live = mask.any(-1)[..., None, None]
  w = jax.random.normal(jax.random.key(0), q.shape, jnp.float32) * live
  dense = lambda q, k, v: attn_lib.dense_attention(q, k, v, mask)

  def value_and_grads(fn, *args):
    out, vjp = jax.vjp(lambda *a: fn(*a).astype(jnp.float32), *args)
    return out, vjp(w)

  out_k, grads_k = jax.jit(lambda *a: value_and_grads(attend, *a))(q, k, v)
  out_d, grads_d = jax.jit(lambda *a: value_and_grads(dense, *a))(
      *(x.astype(jnp.float32) for x in (q, k, v)))
  result = {'out_err': float(jnp.max(jnp.abs(out_k - out_d) * live))}
  for name, gk, gd in zip(('dq', 'dk', 'dv'), grads_k, grads_d):
    gd = gd.astype(jnp.float32)
    result[name] = float(jnp.max(jnp.abs(gk.astype(jnp.float32) - gd)) / jnp.max(jnp.abs(gd)))
  result['ok'] = result['out_err'] <= out_tol and max(result[n] for n in ('dq', 'dk', 'dv')) <= (
      grad_tol)
  return result


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seq_lens', default='4096,8192,16384')
  parser.add_argument('--heads', default='12,2', help='query heads,key-value heads')
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--kernel', default='auto',
                      choices=('auto', 'omni_hopper', 'omni_flash', 'splash'),
                      help='the omni kernel; auto: as model.attention=auto picks it (CPU: '
                      'omni_flash, in interpret mode)')
  parser.add_argument('--block', default=None,
                      help='omni_flash block_q,block_k (default 64,64); splash: one block '
                      '(default 512)')
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--check_max_len', type=int, default=8192,
                      help='rows up to this length are first checked against dense attention '
                      '(values and q/k/v grads, float32 reference) on the same device')
  args = parser.parse_args(argv)
  h, g = map(int, args.heads.split(','))
  d = args.head_dim
  backend = jax.default_backend()
  kernel = args.kernel
  if kernel == 'auto':
    kernel = attn_lib.resolve_impl('auto', dtype=jnp.bfloat16, head_dim=d, self_attention=True,
                                   backend=backend)
    kernel = 'omni_flash' if kernel == 'dense' else kernel
  baseline = {'gpu': 'cuDNN', 'tpu': 'splash causal'}.get(backend)
  block = args.block or ('512' if kernel == 'splash' else '64,64')
  block_q, block_k = (list(map(int, block.split(','))) * 2)[:2]
  config = config_lib.load(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'experiments', 'tuna2_1_5b.py'))
  print(device_line())
  blocks = {'omni_flash': f'{block_q} x {block_k}', 'splash': f'{block_q}'}.get(
      kernel, f'{omni_hopper.BLOCK} x {omni_hopper.BLOCK}')
  print(f'omni kernel {kernel} (blocks {blocks}), baseline {baseline or "none"}; heads {h} / '
        f'{g} kv, head_dim {d}, bf16; TFLOP/s of visible (query, key) pairs, backward = '
        f'{BACKWARD_FACTOR} x forward')
  print(f'{"T":>6} {"pass":>8} {"omni ms":>9} {"omni TF/s":>10} {"causal ms":>9} '
        f'{"causal TF/s":>11} {"omni/causal":>11}  image tokens')
  rows = []
  for t in map(int, args.seq_lens.split(',')):
    if baseline is None:
      config.data.image_size = min(config.data.image_size, 64)
    layout = packed_batch(config, batch_size=1, seq_len=t, seed=t)
    info = jax.tree.map(jnp.asarray, row_info(layout))
    omni_pairs = float(attended_keys_BT(layout['segment_ids'], layout['span_ids']).sum())
    causal_pairs = t * (t + 1) / 2
    kq, kk, kv = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(kq, (1, t, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (1, t, g, d), jnp.bfloat16)
    v = jax.random.normal(kv, (1, t, g, d), jnp.bfloat16)
    if kernel == 'splash':
      omni = fwd_and_grad(lambda q, k, v: omni_splash.omni_splash_attention(
          q, k, v, info, block=block_q))
    elif kernel == 'omni_hopper':
      omni = fwd_and_grad(lambda q, k, v: omni_hopper.omni_hopper_attention(q, k, v, info))
    else:
      omni = fwd_and_grad(lambda q, k, v: omni_flash.omni_flash_attention(
          q, k, v, info, block_q=block_q, block_k=block_k))
    if baseline == 'cuDNN':
      causal = fwd_and_grad(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation='cudnn'))
    elif baseline:  # one unpacked text row: splash's causal kernel and nothing else
      text = text_info(jnp.ones((1, t), jnp.int32), jnp.arange(t)[None])
      causal = fwd_and_grad(lambda q, k, v: omni_splash.omni_splash_attention(
          q, k, v, text, block=block_q))
    else:
      causal = None
    image_share = float(layout['span_ids'].astype(bool).mean())
    if t <= args.check_max_len:
      check = check_against_dense(omni[2], q, k, v, info)
      print(f'{t:>6} check vs dense: output max error {check["out_err"]:.1e}, grads max relative '
            f'error dq {check["dq"]:.1e} dk {check["dk"]:.1e} dv {check["dv"]:.1e}: '
            f'{"ok" if check["ok"] else "MISMATCH"}')
      rows.append(dict(check, seq_len=t, **{'pass': 'check'}))
    for name, factor, idx in (('fwd', 1.0, 0), ('fwd+bwd', 1.0 + BACKWARD_FACTOR, 1)):
      unit = 4.0 * h * d * factor
      omni_s = timed(omni[idx], q, k, v, iters=args.iters)
      omni_tf = unit * omni_pairs / omni_s / 1e12
      row = {'seq_len': t, 'pass': name, 'omni_s': omni_s, 'omni_tflops': omni_tf}
      if causal:
        causal_s = timed(causal[idx], q, k, v, iters=args.iters)
        row.update(causal_s=causal_s, causal_tflops=unit * causal_pairs / causal_s / 1e12)
        row['ratio'] = omni_tf / row['causal_tflops']
      rows.append(row)
      fmt = lambda key, scale, spec: (format(row[key] * scale, spec) if key in row else 'n/a')
      print(f'{t:>6} {name:>8} {omni_s * 1e3:>9.2f} {omni_tf:>10.1f} '
            f'{fmt("causal_s", 1e3, ">9.2f"):>9} {fmt("causal_tflops", 1, ">11.1f"):>11} '
            f'{fmt("ratio", 100, ">10.1f") + "%" if "ratio" in row else "n/a":>11}  '
            f'{image_share:.0%}')
  if baseline is None:
    print(f'(device {backend}: no causal baseline, the omni kernel ran in Pallas interpret '
          'mode)')
  return rows


if __name__ == '__main__':
  # A kernel that disagrees with dense attention fails the run (its speed means nothing then).
  sys.exit(1 if any(row.get('ok') is False for row in main()) else 0)
