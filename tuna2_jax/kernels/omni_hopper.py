"""Omni-mask flash attention for Hopper (sm90) GPUs: a Pallas Mosaic GPU kernel trio.

The mask is kernels/omni_flash.py's: query i sees the keys [lo_i, hi_i] (layout.key_bounds_BT).
In a packed row both bounds rise with i, so the key blocks a query block reaches form one range,
and so do the query blocks reaching a key block. `tile_ranges` splits every such range into
[edge, interior, edge): interior tiles lie wholly inside every row's interval and run without a
mask; only the edge tiles (segment starts, the causal diagonal, image-span ends) compute one.

  forward  per (query block, head): the reachable key blocks, online softmax in base 2 (exp2,
           the scale folded into one multiply), K/V blocks double-buffered through TMA, both
           matmuls on WGMMA; saves the base-2 log-sum-exp.
  dq       per (query block, head): the forward's key ranges again.
  dk, dv   per (key block, key/value head): the query ranges reaching the block, for every query
           head of the group in one program, so dK and dV are written once per key/value head in
           the input dtype (no per-query-head float32 copies to sum afterwards).

Blocks are 64 x 64 (one warpgroup's WGMMA height); the kernels run head_dim 64 or 128 (a
multiple of the 128-byte swizzle of a bf16 row, within shared memory), and a head_dim below 128
is zero-padded to the next of them (kernels.pad_head_dim, with the true softmax scale: SigLIP's
72 runs at 128); dtypes bfloat16 or float16. Matmul operands are staged in shared memory (the A
operand too), tiles of K^T, V^T, Q^T and dO^T come from key-major copies made once per call,
and each program is one warpgroup; splitting it into producer and consumer warpgroups is the
next step once the suite measures it on a GPU.
`problem` names what a call cannot meet. On a CPU the kernels run in Mosaic GPU's interpret
mode (simulated shared memory, TMA and barriers), which is how the tests check them against
dense attention; the lowering for sm90 also runs on a CPU host. (The interpreter's callbacks
are ordered effects, which jax.checkpoint cannot partially evaluate: on a CPU the kernels run
outside remat only.)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from tuna2_jax import kernels
from tuna2_jax import sharding
from tuna2_jax.kernels.omni_flash import check_self_attention
from tuna2_jax.layout import MaskInfo, key_bounds_BT

BLOCK = 64  # query and key block: one warpgroup's WGMMA tile height
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The dk/dv kernel double-buffers four [64, head_dim] tiles of queries: 168 KiB of the 227 KiB
# of shared memory an sm90 block may use at head_dim 128; 256 would not fit.
MAX_HEAD_DIM = 128
_LOG2E = math.log2(math.e)
_NEG = -1e30  # finite: a fully masked tile leaves exp2(m - m_new) = 1, not NaN
_SWIZZLE = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def problem(*, dtype, head_dim: int, compute_capability: str | None = None) -> str | None:
  """Why these kernels cannot run a call (None when they can)."""
  if compute_capability is not None and not compute_capability.startswith('9.'):
    return (f'the omni_hopper kernel uses sm90 WGMMA and TMA; this GPU is compute capability '
            f'{compute_capability}')
  if jnp.dtype(dtype) not in DTYPES:
    return f'omni_hopper needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}'
  if head_dim > MAX_HEAD_DIM:
    return f'omni_hopper needs head_dim up to {MAX_HEAD_DIM}, got {head_dim}'
  return None


def _padded_head_dim(head_dim: int) -> int:
  """The width the kernels run at: 64 or 128, whole rows of the 128-byte bf16 swizzle."""
  return 64 if head_dim <= 64 else MAX_HEAD_DIM


def _first_last(reach_XY: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(first True index, last True index + 1) along the last axis; (n, n) where none is True."""
  n = reach_XY.shape[-1]
  any_ = reach_XY.any(-1)
  first = jnp.where(any_, jnp.argmax(reach_XY, -1).astype(jnp.int32), n)
  stop = jnp.where(any_, n - jnp.argmax(reach_XY[..., ::-1], -1).astype(jnp.int32), n)
  return first, stop


def _split(reach, full) -> jax.Array:
  """[..., 4] int32 (first, interior start, interior stop, stop) of each row's reached blocks.

  Both sets are one contiguous range (monotone bounds); without interior blocks the interior
  range is empty at the stop, so the three loops [first, a), [a, c), [c, stop) cover the range.
  """
  first, stop = _first_last(reach)
  first = jnp.where(first == reach.shape[-1], 0, first)
  stop = jnp.where(reach.any(-1), stop, 0)
  a, c = _first_last(full)
  has_full = full.any(-1)
  a, c = jnp.where(has_full, a, stop), jnp.where(has_full, c, stop)
  return jnp.stack([first, a, c, stop], axis=-1).astype(jnp.int32)


def tile_ranges(lo_BT, hi_BT, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
  """Per query block its key blocks [B, NQ, 4], per key block its query blocks [B, NK, 4].

  Each row: (first, interior start, interior stop, stop) in blocks. A tile (query block i, key
  block j) is reached when some query of i sees some key of j, interior when every query of i
  sees every key of j.
  """
  b, t = lo_BT.shape
  n = t // block
  lo_min, lo_max = (f(lo_BT.reshape(b, n, block), -1) for f in (jnp.min, jnp.max))
  hi_min, hi_max = (f(hi_BT.reshape(b, n, block), -1) for f in (jnp.min, jnp.max))
  start = jnp.arange(n, dtype=jnp.int32) * block
  end = start + block - 1
  reach = (lo_min[:, :, None] <= end) & (hi_max[:, :, None] >= start)  # [B, NQ, NK]
  full = (lo_max[:, :, None] <= start) & (hi_min[:, :, None] >= end)
  return _split(reach, full), _split(reach.swapaxes(1, 2), full.swapaxes(1, 2))


def _cast(x, layout, interpret: bool):
  """plgpu.layout_cast, which the interpreter (plain arrays, no register layouts) has no use for."""
  return x if interpret else plgpu.layout_cast(x, layout)


def _iota(shape, dim: int, interpret: bool):
  if interpret:
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _row_mask(lo, hi, k_start, shape, interpret):
  """Query rows x key columns: key k_start + c inside [lo_r, hi_r]."""
  cols = k_start + _iota(shape, 1, interpret)
  lo2 = jax.lax.broadcast_in_dim(lo, shape, [0])
  hi2 = jax.lax.broadcast_in_dim(hi, shape, [0])
  return (cols >= lo2) & (cols <= hi2)


def _col_mask(lo, hi, k_start, shape, interpret):
  """Key rows x query columns (the transposed tile of the dk/dv kernel)."""
  rows = k_start + _iota(shape, 0, interpret)
  lo2 = jax.lax.broadcast_in_dim(lo, shape, [1])
  hi2 = jax.lax.broadcast_in_dim(hi, shape, [1])
  return (rows >= lo2) & (rows <= hi2)


def _matmul(a, b_ref, shape) -> jax.Array:
  """a @ b on WGMMA into a fresh float32 accumulator (a: shared-memory ref or registers)."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a, b_ref)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _stage(x, smem):
  """Registers -> shared memory, fenced for WGMMA's async proxy: the A operand of a matmul.

  (WGMMA could read A from registers; the interpreter the tests run reads it from shared
  memory only, and one code path serves both.)"""
  smem[...] = x.astype(smem.dtype)
  plgpu.commit_smem()
  return smem


def _full(shape, value, layout, interpret):
  return _cast(jnp.full(shape, value, jnp.float32), layout, interpret)


def _pipelined(ranges_ref, row, fetch, bars, body, carry):
  """body(j, slot, carry, masked) over the tile range of `row`, tiles double-buffered.

  ranges_ref[row] = (first, a, c, stop): [first, a) and [c, stop) are edge tiles (masked),
  [a, c) interior ones. fetch(j, slot) issues the TMA copies of tile j, arriving on
  bars.at[slot]; tile j + 1 is fetched while tile j is computed.
  """
  first, a, c, stop = (ranges_ref[row + (n,)] for n in range(4))

  @pl.when(first < stop)
  def _():
    fetch(first, 0)

  def step(j, carry, masked):
    slot = jax.lax.rem(j - first, 2)
    plgpu.barrier_wait(bars.at[slot])

    @pl.when(j + 1 < stop)
    def _():  # the other slot's tile was consumed by the previous step's finished matmuls
      fetch(j + 1, 1 - slot)

    return body(j, slot, carry, masked)

  carry = jax.lax.fori_loop(first, a, functools.partial(step, masked=True), carry)
  carry = jax.lax.fori_loop(a, c, functools.partial(step, masked=False), carry)
  return jax.lax.fori_loop(c, stop, functools.partial(step, masked=True), carry)


def _load(copies, bars):
  """Synchronous TMA copies (src, dst), one barrier each."""
  for n, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[n])
  for n in range(len(copies)):
    plgpu.barrier_wait(bars.at[n])


def _store(copies):
  plgpu.commit_smem()
  for src, dst in copies:
    plgpu.copy_smem_to_gmem(src, dst)
  plgpu.wait_smem_to_gmem(0)


def _fwd_kernel(ranges_ref, lo_ref, hi_ref, q_ref, kt_ref, v_ref, o_ref, lse_ref,
                q_smem, kt_smem, v_smem, p_smem, lo_smem, hi_smem, lse_smem, bars, kv_bars, *,
                rep, sm_scale, interpret):
  b, h, i = (jax.lax.axis_index(n) for n in ('batch', 'heads', 'q_blocks'))
  g, rows = h // rep, pl.ds(i * BLOCK, BLOCK)
  _load([(q_ref.at[b, rows, h], q_smem), (lo_ref.at[b, rows], lo_smem),
         (hi_ref.at[b, rows], hi_smem)], bars)
  red = plgpu.Layout.WGMMA.reduce(1)
  lo, hi = _cast(lo_smem[...], red, interpret), _cast(hi_smem[...], red, interpret)
  d = q_smem.shape[-1]
  scale = sm_scale * _LOG2E

  def fetch(j, slot):
    keys = pl.ds(j * BLOCK, BLOCK)
    plgpu.copy_gmem_to_smem(kt_ref.at[b, g, :, keys], kt_smem.at[slot], kv_bars.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, keys, g], v_smem.at[slot], kv_bars.at[slot])

  def body(j, slot, carry, masked):
    acc, m, l = carry
    s = _matmul(q_smem, kt_smem.at[slot], (BLOCK, BLOCK)) * scale
    if masked:
      mask = _row_mask(lo, hi, j * BLOCK, s.shape, interpret)
      s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - jax.lax.broadcast_in_dim(m_new, s.shape, [0]))
    if masked:
      p = jnp.where(mask, p, 0.0)
    l = l * alpha + p.sum(axis=1)
    pv = _matmul(_stage(p, p_smem), v_smem.at[slot], (BLOCK, d))
    return acc * jax.lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l

  init = (_full((BLOCK, d), 0.0, plgpu.Layout.WGMMA, interpret),
          _full((BLOCK,), _NEG, red, interpret), _full((BLOCK,), 0.0, red, interpret))
  acc, m, l = _pipelined(ranges_ref, (b, i), fetch, kv_bars, body, init)
  empty = l == 0.0  # padding rows see no keys: zeros out, lse 0
  safe_l = jnp.where(empty, 1.0, l)
  q_smem[...] = (acc / jax.lax.broadcast_in_dim(safe_l, acc.shape, [0])).astype(q_smem.dtype)
  lse_smem[...] = jnp.where(empty, 0.0, m + jnp.log2(safe_l))
  _store([(q_smem, o_ref.at[b, rows, h]), (lse_smem, lse_ref.at[b, h, rows])])


def _dq_kernel(ranges_ref, lo_ref, hi_ref, q_ref, do_ref, lse_ref, delta_ref, kt_ref, vt_ref,
               k_ref, dq_ref, q_smem, do_smem, kt_smem, vt_smem, k_smem, ds_smem, lo_smem,
               hi_smem, lse_smem, delta_smem, bars, kv_bars, *, rep, sm_scale, interpret):
  b, h, i = (jax.lax.axis_index(n) for n in ('batch', 'heads', 'q_blocks'))
  g, rows = h // rep, pl.ds(i * BLOCK, BLOCK)
  _load([(q_ref.at[b, rows, h], q_smem), (do_ref.at[b, rows, h], do_smem),
         (lo_ref.at[b, rows], lo_smem), (hi_ref.at[b, rows], hi_smem),
         (lse_ref.at[b, h, rows], lse_smem), (delta_ref.at[b, h, rows], delta_smem)], bars)
  red = plgpu.Layout.WGMMA.reduce(1)
  lo, hi, lse, delta = (_cast(r[...], red, interpret)
                        for r in (lo_smem, hi_smem, lse_smem, delta_smem))
  d = q_smem.shape[-1]
  scale = sm_scale * _LOG2E

  def fetch(j, slot):
    keys = pl.ds(j * BLOCK, BLOCK)
    plgpu.copy_gmem_to_smem(kt_ref.at[b, g, :, keys], kt_smem.at[slot], kv_bars.at[slot])
    plgpu.copy_gmem_to_smem(vt_ref.at[b, g, :, keys], vt_smem.at[slot], kv_bars.at[slot])
    plgpu.copy_gmem_to_smem(k_ref.at[b, keys, g], k_smem.at[slot], kv_bars.at[slot])

  def body(j, slot, dq, masked):
    s = _matmul(q_smem, kt_smem.at[slot], (BLOCK, BLOCK)) * scale
    p = jnp.exp2(s - jax.lax.broadcast_in_dim(lse, s.shape, [0]))
    if masked:
      p = jnp.where(_row_mask(lo, hi, j * BLOCK, s.shape, interpret), p, 0.0)
    dp = _matmul(do_smem, vt_smem.at[slot], (BLOCK, BLOCK))
    ds = p * (dp - jax.lax.broadcast_in_dim(delta, dp.shape, [0]))
    return dq + _matmul(_stage(ds, ds_smem), k_smem.at[slot], (BLOCK, d))

  dq = _pipelined(ranges_ref, (b, i), fetch, kv_bars, body,
                  _full((BLOCK, d), 0.0, plgpu.Layout.WGMMA, interpret))
  q_smem[...] = (dq * sm_scale).astype(q_smem.dtype)
  _store([(q_smem, dq_ref.at[b, rows, h])])


def _dkdv_kernel(ranges_ref, lo_ref, hi_ref, qt_ref, dot_ref, q_ref, do_ref, lse_ref, delta_ref,
                 k_ref, v_ref, dk_ref, dv_ref, k_smem, v_smem, qt_smem, dot_smem, q2_smem,
                 do2_smem, pt_smem, lo_smem, hi_smem, lse_smem, delta_smem, bars, q_bars, *,
                 rep, sm_scale, interpret):
  b, g, j = (jax.lax.axis_index(n) for n in ('batch', 'kv_heads', 'k_blocks'))
  keys = pl.ds(j * BLOCK, BLOCK)
  _load([(k_ref.at[b, keys, g], k_smem), (v_ref.at[b, keys, g], v_smem)], bars)
  d = k_smem.shape[-1]
  scale = sm_scale * _LOG2E
  red = plgpu.Layout.WGMMA.reduce(0)  # per-query vectors run along the tile's columns
  zeros = _full((BLOCK, d), 0.0, plgpu.Layout.WGMMA, interpret)
  carry = (zeros, zeros)
  for r in range(rep):  # every query head of the group, so dk and dv are written once
    h = g * rep + r

    def fetch(i, slot, h=h):
      rows = pl.ds(i * BLOCK, BLOCK)
      bar = q_bars.at[slot]
      for src, dst in ((qt_ref.at[b, h, :, rows], qt_smem), (dot_ref.at[b, h, :, rows], dot_smem),
                       (q_ref.at[b, rows, h], q2_smem), (do_ref.at[b, rows, h], do2_smem),
                       (lo_ref.at[b, rows], lo_smem), (hi_ref.at[b, rows], hi_smem),
                       (lse_ref.at[b, h, rows], lse_smem), (delta_ref.at[b, h, rows],
                                                             delta_smem)):
        plgpu.copy_gmem_to_smem(src, dst.at[slot], bar)

    def body(i, slot, carry, masked):
      dk, dv = carry
      lse, delta = (_cast(ref.at[slot][...], red, interpret) for ref in (lse_smem, delta_smem))
      st = _matmul(k_smem, qt_smem.at[slot], (BLOCK, BLOCK)) * scale  # keys x queries
      pt = jnp.exp2(st - jax.lax.broadcast_in_dim(lse, st.shape, [1]))
      if masked:
        lo, hi = (_cast(ref.at[slot][...], red, interpret) for ref in (lo_smem, hi_smem))
        pt = jnp.where(_col_mask(lo, hi, j * BLOCK, st.shape, interpret), pt, 0.0)
      dv = dv + _matmul(_stage(pt, pt_smem), do2_smem.at[slot], (BLOCK, d))
      dpt = _matmul(v_smem, dot_smem.at[slot], (BLOCK, BLOCK))
      dst = pt * (dpt - jax.lax.broadcast_in_dim(delta, dpt.shape, [1]))
      dk = dk + _matmul(_stage(dst, pt_smem), q2_smem.at[slot], (BLOCK, d))
      return dk, dv

    carry = _pipelined(ranges_ref, (b, j), fetch, q_bars, body, carry)
  dk, dv = carry
  k_smem[...] = (dk * sm_scale).astype(k_smem.dtype)
  v_smem[...] = dv.astype(v_smem.dtype)
  _store([(k_smem, dk_ref.at[b, keys, g]), (v_smem, dv_ref.at[b, keys, g])])


def _keys_major(x_BTGK) -> jax.Array:
  """[B, G, K, T]: tiles of x^T load as plain WGMMA operands (no transposed shared-memory view)."""
  return jnp.transpose(x_BTGK, (0, 2, 3, 1))


def _smem(*shape, dtype, swizzled: bool = True):
  return plgpu.SMEM(shape, dtype, transforms=_SWIZZLE if swizzled else ())


def _vectors(n: int, slots: tuple[int, ...] = ()):
  """n per-token vectors of one block (lo, hi int32; lse, delta float32)."""
  dtypes = (jnp.int32, jnp.int32, jnp.float32, jnp.float32)[:n]
  return tuple(_smem(*slots, BLOCK, dtype=dt, swizzled=False) for dt in dtypes)


def _forward(q, k, v, lo, hi, q_ranges, sm_scale, interpret):
  b, t, h, d = q.shape
  g = k.shape[2]
  kernel = functools.partial(_fwd_kernel, rep=h // g, sm_scale=sm_scale,
                             interpret=interpret is not None)
  dt = q.dtype
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, dt), jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
      scratch_types=(_smem(BLOCK, d, dtype=dt), _smem(2, d, BLOCK, dtype=dt),
                     _smem(2, BLOCK, d, dtype=dt), _smem(BLOCK, BLOCK, dtype=dt),
                     *_vectors(2), _smem(BLOCK, dtype=jnp.float32, swizzled=False),
                     plgpu.Barrier(num_barriers=3),
                     plgpu.Barrier(num_arrivals=2, num_barriers=2)),
      grid=(b, h, t // BLOCK), grid_names=('batch', 'heads', 'q_blocks'),
      interpret=interpret,
  )(q_ranges, lo, hi, q, _keys_major(k), v)


def _backward(q, k, v, o, lse, do, lo, hi, q_ranges, k_ranges, sm_scale, interpret):
  b, t, h, d = q.shape
  g = k.shape[2]
  dt = q.dtype
  flag = interpret is not None
  delta = jnp.einsum('bthd,bthd->bht', o.astype(jnp.float32), do.astype(jnp.float32))
  do = do.astype(dt)
  dq = plgpu.kernel(
      functools.partial(_dq_kernel, rep=h // g, sm_scale=sm_scale, interpret=flag),
      out_type=jax.ShapeDtypeStruct(q.shape, dt),
      scratch_types=(_smem(BLOCK, d, dtype=dt), _smem(BLOCK, d, dtype=dt),
                     _smem(2, d, BLOCK, dtype=dt), _smem(2, d, BLOCK, dtype=dt),
                     _smem(2, BLOCK, d, dtype=dt), _smem(BLOCK, BLOCK, dtype=dt), *_vectors(4),
                     plgpu.Barrier(num_barriers=6),
                     plgpu.Barrier(num_arrivals=3, num_barriers=2)),
      grid=(b, h, t // BLOCK), grid_names=('batch', 'heads', 'q_blocks'),
      interpret=interpret,
  )(q_ranges, lo, hi, q, do, lse, delta, _keys_major(k), _keys_major(v), k)
  dk, dv = plgpu.kernel(
      functools.partial(_dkdv_kernel, rep=h // g, sm_scale=sm_scale, interpret=flag),
      out_type=(jax.ShapeDtypeStruct(k.shape, dt), jax.ShapeDtypeStruct(v.shape, dt)),
      scratch_types=(_smem(BLOCK, d, dtype=dt), _smem(BLOCK, d, dtype=dt),
                     _smem(2, d, BLOCK, dtype=dt), _smem(2, d, BLOCK, dtype=dt),
                     _smem(2, BLOCK, d, dtype=dt), _smem(2, BLOCK, d, dtype=dt),
                     _smem(BLOCK, BLOCK, dtype=dt), *_vectors(4, (2,)),
                     plgpu.Barrier(num_barriers=2),
                     plgpu.Barrier(num_arrivals=8, num_barriers=2)),
      grid=(b, g, t // BLOCK), grid_names=('batch', 'kv_heads', 'k_blocks'),
      interpret=interpret,
  )(k_ranges, lo, hi, _keys_major(q), _keys_major(do), q, do, lse, delta, k, v)
  return dq, dk, dv


def omni_hopper_attention(q_BTHK, k_BTGK, v_BTGK, info: MaskInfo, *, kind: str = 'omni',
                          interpret: bool | None = None) -> jax.Array:
  """Self-attention of a packed row under the omni (or span) mask: [B,T,H,K] -> [B,T,H,K].

  T is padded up to a multiple of the block internally; padded tokens see no keys.
  interpret defaults to True unless the step targets a GPU (the platform of the step's mesh,
  sharding.target_platform: a step compiled for H100s from a CPU host lowers for sm90), Mosaic
  GPU interpret mode, for tests on CPU.
  """
  check_self_attention(q_BTHK, k_BTGK, 'omni hopper')
  why = problem(dtype=q_BTHK.dtype, head_dim=q_BTHK.shape[-1])
  if why:
    raise ValueError(why)
  t = q_BTHK.shape[1]
  if interpret is None:
    interpret = sharding.target_platform() != 'gpu'
  lo, hi = key_bounds_BT(info, kind)
  pad = (-t) % BLOCK
  if pad:
    pad_tok = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_BTHK, k_BTGK, v_BTGK = pad_tok(q_BTHK), pad_tok(k_BTGK), pad_tok(v_BTGK)
    lo = jnp.pad(lo, ((0, 0), (0, pad)), constant_values=t + pad)
    hi = jnp.pad(hi, ((0, 0), (0, pad)), constant_values=-1)
  d = q_BTHK.shape[-1]
  q_BTHK, k_BTGK, v_BTGK = kernels.pad_head_dim(_padded_head_dim(d), q_BTHK, k_BTGK, v_BTGK)
  out = _attend(q_BTHK, k_BTGK, v_BTGK, lo, hi, d ** -0.5, _interpret_params(interpret))
  return out[:, :t, :, :d]


def _interpret_params(interpret: bool):
  if not interpret:
    return None
  # Mosaic GPU's interpreter simulates shared memory, TMA and barriers on the CPU.
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend(q, k, v, lo, hi, sm_scale, interpret):
  q_ranges, _ = tile_ranges(lo, hi)
  return _forward(q, k, v, lo, hi, q_ranges, sm_scale, interpret)[0]


def _attend_fwd(q, k, v, lo, hi, sm_scale, interpret):
  q_ranges, k_ranges = tile_ranges(lo, hi)
  o, lse = kernels.keep_for_backward(*_forward(q, k, v, lo, hi, q_ranges, sm_scale, interpret))
  return o, (q, k, v, o, lse, lo, hi, q_ranges, k_ranges)


def _attend_bwd(sm_scale, interpret, res, do):
  q, k, v, o, lse, lo, hi, q_ranges, k_ranges = res
  dq, dk, dv = _backward(q, k, v, o, lse, do, lo, hi, q_ranges, k_ranges, sm_scale, interpret)
  return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


