"""Flash attention for the omni mask without a dense T x T mask: a Pallas kernel with one key
interval per query.

In a packed row the omni rule (layout.py) lets query i see exactly one interval of keys
[lo_i, hi_i]: everything before it in its segment, plus the rest of its own image span.
layout.key_bounds_BT turns a MaskInfo into those two integers per token; the kernel walks only
the key blocks a query block can reach and masks the ragged edges, so text rows cost what
causal attention costs and image spans add just their own square. Rows with no keys (padding)
return zeros.

The forward pass keeps an online softmax and saves its log-sum-exp; the backward pass
recomputes probabilities block by block (dq over key blocks, dk/dv over query blocks), as in
FlashAttention-2. On GPU it lowers through Triton; on CPU it runs in Pallas interpret mode,
which is how the tests check it against models/attention.py:dense_attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tuna2_jax import kernels
from tuna2_jax import layout
from tuna2_jax import sharding

# Finite, so an all-masked block leaves exp(m - m_new) = 1 instead of NaN.
_NEG = -1e30


def check_self_attention(q_BTHK, k_BTGK, kernel: str) -> None:
  """The blockwise kernels' call shape: keys of the same rows and length, whole GQA groups."""
  b, t, h, _ = q_BTHK.shape
  g = k_BTGK.shape[2]
  if k_BTGK.shape[:2] != (b, t):
    raise ValueError(f'{kernel} attention is self-attention: keys {k_BTGK.shape} do not match '
                     f'queries {q_BTHK.shape}')
  if h % g:
    raise ValueError(f'{h} query heads are not a multiple of {g} key/value heads')


def padded_head_dim(head_dim: int) -> int:
  """The width the kernel runs at: Triton tiles powers of two, from 16."""
  return max(16, 1 << (head_dim - 1).bit_length())


def _block_mask(lo, hi, start: int | jax.Array, shape):
  cols = start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return (cols >= lo[:, None]) & (cols <= hi[:, None])


def _reaches(lo, hi, start, size):
  """Whether any query of a block (bounds lo, hi) sees a key in [start, start + size)."""
  return (jnp.min(lo) < start + size) & (jnp.max(hi) >= start)


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block_k):
  q = q_ref[...]
  lo, hi = lo_ref[...], hi_ref[...]
  bq, dim = q.shape
  first = jnp.maximum(jnp.min(lo), 0) // block_k
  last = jnp.max(hi) // block_k  # -1 // block_k = -1: no key blocks for an all-padding block

  def body(j, carry):
    acc, m, l = carry
    start = j * block_k
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    mask = _block_mask(lo, hi, start, s.shape)
    s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v,
                                         preferred_element_type=jnp.float32)
    return acc, m_new, l

  init = (jnp.zeros((bq, dim), jnp.float32), jnp.full((bq,), _NEG, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(first, last + 1, body, init)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, block_k):
  q, do = q_ref[...], do_ref[...]
  lo, hi, lse, delta = lo_ref[...], hi_ref[...], lse_ref[...], delta_ref[...]
  first = jnp.maximum(jnp.min(lo), 0) // block_k
  last = jnp.max(hi) // block_k

  def body(j, dq):
    start = j * block_k
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    p = jnp.where(_block_mask(lo, hi, start, s.shape), jnp.exp(s - lse[:, None]), 0.0)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = jax.lax.fori_loop(first, last + 1, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                 *, scale, block_q, num_q_blocks):
  k, v = k_ref[...], v_ref[...]
  block_k = k.shape[0]
  k_start = pl.program_id(2) * block_k

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * block_q, block_q)
    lo, hi = lo_ref[rows], hi_ref[rows]

    def accumulate(carry):
      dk, dv = carry
      q, do = q_ref[rows, :], do_ref[rows, :]
      lse, delta = lse_ref[rows], delta_ref[rows]
      s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
      p = jnp.where(_block_mask(lo, hi, k_start, s.shape), jnp.exp(s - lse[:, None]), 0.0)
      dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
      dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
      ds = p * (dp - delta[:, None])
      dk = dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
      return dk, dv

    return jax.lax.cond(_reaches(lo, hi, k_start, block_k), accumulate, lambda c: c, (dk, dv))

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, num_q_blocks, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(b, t, h, g, d, block_q, whole_rows: bool):
  """BlockSpecs over grid (batch, query head, block): q-side rows blocked or whole."""
  rep = h // g
  rows = t if whole_rows else block_q
  row = (lambda bi, hi, i: (bi, 0, hi, 0)) if whole_rows else (lambda bi, hi, i: (bi, i, hi, 0))
  vec = (lambda bi, hi, i: (bi, hi, 0)) if whole_rows else (lambda bi, hi, i: (bi, hi, i))
  bounds = (lambda bi, hi, i: (bi, 0)) if whole_rows else (lambda bi, hi, i: (bi, i))
  return dict(
      bounds=pl.BlockSpec((None, rows), bounds),
      q=pl.BlockSpec((None, rows, None, d), row),
      kv_all=pl.BlockSpec((None, t, None, d), lambda bi, hi, i: (bi, 0, hi // rep, 0)),
      vec=pl.BlockSpec((None, None, rows), vec))


def _params(block_q, block_k, interpret):
  if interpret:
    return dict(interpret=True)
  from jax.experimental.pallas import triton as pl_triton  # GPU only
  return dict(compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2))


def _forward(q, k, v, lo, hi, block_q, block_k, scale, interpret):
  b, t, h, d = q.shape
  g = k.shape[2]
  spec = _specs(b, t, h, g, d, block_q, whole_rows=False)
  kernel = functools.partial(_fwd_kernel, scale=scale, block_k=block_k)
  return pl.pallas_call(
      kernel, grid=(b, h, t // block_q),
      in_specs=[spec['bounds'], spec['bounds'], spec['q'], spec['kv_all'], spec['kv_all']],
      out_specs=[spec['q'], spec['vec']],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      name='omni_flash_fwd', **_params(block_q, block_k, interpret))(lo, hi, q, k, v)


def _backward(q, k, v, o, lse, do, lo, hi, block_q, block_k, scale, interpret):
  b, t, h, d = q.shape
  g = k.shape[2]
  delta = jnp.einsum('bthd,bthd->bht', o.astype(jnp.float32), do.astype(jnp.float32))
  blocked = _specs(b, t, h, g, d, block_q, whole_rows=False)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_k=block_k), grid=(b, h, t // block_q),
      in_specs=[blocked['bounds'], blocked['bounds'], blocked['q'], blocked['kv_all'],
                blocked['kv_all'], blocked['q'], blocked['vec'], blocked['vec']],
      out_specs=blocked['q'], out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name='omni_flash_dq', **_params(block_q, block_k, interpret)
  )(lo, hi, q, k, v, do, lse, delta)

  whole = _specs(b, t, h, g, d, block_q, whole_rows=True)
  rep = h // g
  # dk and dv per query head, summed over each key/value head's group afterwards.
  key_block = pl.BlockSpec((None, block_k, None, d), lambda bi, hi, j: (bi, j, hi // rep, 0))
  head_block = pl.BlockSpec((None, block_k, None, d), lambda bi, hi, j: (bi, j, hi, 0))
  dk_h, dv_h = pl.pallas_call(
      functools.partial(_dkdv_kernel, scale=scale, block_q=block_q,
                        num_q_blocks=t // block_q),
      grid=(b, h, t // block_k),
      in_specs=[whole['bounds'], whole['bounds'], whole['q'], key_block, key_block, whole['q'],
                whole['vec'], whole['vec']],
      out_specs=[head_block, head_block],
      out_shape=[jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)] * 2,
      name='omni_flash_dkdv', **_params(block_q, block_k, interpret)
  )(lo, hi, q, k, v, do, lse, delta)
  group = lambda x: x.reshape(b, t, g, rep, d).sum(axis=3)
  return dq, group(dk_h).astype(k.dtype), group(dv_h).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, lo, hi, block_q, block_k, scale, interpret):
  return _forward(q, k, v, lo, hi, block_q, block_k, scale, interpret)[0]


def _flash_fwd(q, k, v, lo, hi, block_q, block_k, scale, interpret):
  o, lse = kernels.keep_for_backward(
      *_forward(q, k, v, lo, hi, block_q, block_k, scale, interpret))
  return o, (q, k, v, o, lse, lo, hi)


def _flash_bwd(block_q, block_k, scale, interpret, res, do):
  q, k, v, o, lse, lo, hi = res
  dq, dk, dv = _backward(q, k, v, o, lse, do, lo, hi, block_q, block_k, scale, interpret)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def omni_flash_attention(q_BTHK, k_BTGK, v_BTGK, info: layout.MaskInfo, *,
                         kind: str = 'omni', block_q: int = 64, block_k: int = 64,
                         interpret: bool | None = None) -> jax.Array:
  """Self-attention of a packed row under the omni (or span) mask: [B,T,H,K] -> [B,T,H,K].

  T is padded up to a multiple of the block sizes internally; padded tokens see no keys. A
  head_dim that is not a power of two >= 16 is zero-padded to one (kernels.pad_head_dim).
  interpret defaults to True unless the step targets GPUs (the platform of the traced step's
  mesh, else jax's default backend): Pallas interpret mode, for tests on CPU.
  """
  check_self_attention(q_BTHK, k_BTGK, 'omni flash')
  t = q_BTHK.shape[1]
  if interpret is None:
    interpret = sharding.target_platform() != 'gpu'
  lo, hi = layout.key_bounds_BT(info, kind)
  block = max(block_q, block_k)
  pad = (-t) % block
  if pad:
    pad_tok = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_BTHK, k_BTGK, v_BTGK = pad_tok(q_BTHK), pad_tok(k_BTGK), pad_tok(v_BTGK)
    lo = jnp.pad(lo, ((0, 0), (0, pad)), constant_values=t + pad)
    hi = jnp.pad(hi, ((0, 0), (0, pad)), constant_values=-1)
  d = q_BTHK.shape[-1]
  q_BTHK, k_BTGK, v_BTGK = kernels.pad_head_dim(padded_head_dim(d), q_BTHK, k_BTGK, v_BTGK)
  out = _flash(q_BTHK, k_BTGK, v_BTGK, lo, hi, block_q, block_k, d ** -0.5, interpret)
  return out[:, :t, :, :d]
