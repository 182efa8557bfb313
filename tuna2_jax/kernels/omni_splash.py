"""The omni mask on TPU: splash attention, decomposed onto a causal and a banded span kernel.

Splash attention (jax.experimental.pallas.ops.tpu) skips blocks by a mask fixed at trace time;
its only per-batch input is a pair of segment-id vectors (query i sees key j only when their ids
are equal). The omni rule "same segment and (causal or same image span)" splits per query into
two disjoint key sets, each of which splash can take:

  before  keys not after the query in its segment: a causal mask, segment ids as ids;
  after   keys after the query inside its own image span: a band mask j in [i + 1, i + W], with
          each span's first index as the id (text queries -1, text keys -2: never equal).

Each part returns its output and log-sum-exp; the two softmaxes are merged by their
log-sum-exps. The backward pass runs splash's backward kernels on each part with the merged
output and log-sum-exp, which is exactly the gradient of the merged attention (every
probability is exp(score - merged lse), split over the two parts' keys).

W is static in each compiled kernel, the longest span only known at run time: the kernels for
W = block, 2 block, 4 block, ... up to the row are compiled side by side and lax.switch picks
the narrowest that holds the batch's longest span (or none when the batch has no image span),
so text costs what causal attention costs and images add at most twice their own band.

The "span" kind (the vision encoder: each token sees its own span both ways) is one banded call
j in [i - W, i + W] with span ids. Both kinds keep their output and log-sum-exp for the backward
pass under the names the remat policies save (tuna2_jax/kernels/__init__.py).

On TPU the kernels lower through Mosaic; elsewhere they run in Pallas interpret mode, which is
how the tests check them against models/attention.py:dense_attention. Queries without keys
(padding) return zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp

from tuna2_jax import kernels
from tuna2_jax import layout
from tuna2_jax import sharding
from tuna2_jax.kernels.omni_flash import check_self_attention

_LANES = 128  # splash's block sizes are multiples of a TPU vreg's lane count


def _splash():
  """splash's kernel and mask modules (TPU Pallas imports stay off the other paths)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  return sk, sm


def band_widths(t: int, block: int) -> tuple[int, ...]:
  """The compiled band widths for rows of t slots: block, 2 block, ... until one covers t."""
  widths = [block]
  while widths[-1] < t - 1:
    widths.append(widths[-1] * 2)
  return tuple(widths)


@functools.lru_cache(maxsize=None)
def _kernel(part: str, t: int, heads: int, width: int, block: int, interpret: bool):
  """A splash kernel over [heads, t, d] for one part; cached per static shape."""
  sk, sm = _splash()
  shape = (t, t)
  if part == 'before':
    mask = sm.CausalMask(shape)
  elif part == 'after':
    mask = sm.LocalMask(shape, window_size=(-1, width), offset=0)
  elif part == 'span':
    mask = sm.LocalMask(shape, window_size=(width, width), offset=0)
  else:
    raise ValueError(f'splash part {part!r}')
  # The unfused backward (separate dq and dkv kernels): the fused one keeps a dq partial per
  # key block, [heads, kv_blocks, T, K] per call (14 GiB per layer stack at 7B, 16k tokens).
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block, use_fused_bwd_kernel=False)
  with jax.ensure_compile_time_eval():  # mask tables are constants, also when built in a trace
    return sk.make_splash_mha(sm.MultiHeadMask([mask] * heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret,
                              save_residuals=True)


def _part_backward(kernel, q, k, v, ids, o, lse, do):
  """splash's backward kernels for one part, given the merged output and log-sum-exp."""
  sk, _ = _splash()
  kw = kernel.kwargs
  collapse = lambda info: info._replace(partial_mask_blocks=info.partial_mask_blocks.reshape(
      -1, *info.partial_mask_blocks.shape[-2:])) if info.partial_mask_blocks is not None else info
  # splash's residuals: q, k, v, segment ids, sinks, out, lse, dq and dkv mask infos.
  res = (q, k, v, ids, None, o, lse, collapse(kernel.dq_mask_info),
         collapse(kernel.dkv_mask_info))
  try:
    grads = sk._splash_attention_bwd(  # pylint: disable=protected-access
        False, kw['mask_value'], kw['is_mqa'], kw['block_sizes'], None, kw['mask_function'],
        kw['attn_logits_soft_cap'], kw['interpret'], res, do)
  except (TypeError, ValueError) as e:  # the private signature moved with a JAX release
    raise RuntimeError(
        f'splash attention backward of this JAX ({jax.__version__}) has an unexpected signature '
        f"({e}); use model.attention='dense' on this version") from e
  return tuple(g.astype(x.dtype) for g, x in zip(grads[3:6], (q, k, v)))


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one call: padded row length, query heads, block, interpret mode."""
  t: int
  heads: int
  block: int
  interpret: bool

  @property
  def widths(self) -> tuple[int, ...]:
    return band_widths(self.t, self.block)

  def kernel(self, part: str, width: int = 0):
    return _kernel(part, self.t, self.heads, width, self.block, self.interpret)


def _ids(q_ids, kv_ids):
  return _splash()[0].SegmentIds(q=q_ids, kv=kv_ids)


def _omni_parts(cfg: _Config, q, k, v, seg, q_run, kv_run, band):
  """Both parts per row (vmapped over the batch): (o_before, lse_before, o_after, lse_after)."""
  before = cfg.kernel('before')

  def row(q, k, v, seg, q_run, kv_run):
    o_a, (lse_a,) = before(q, k, v, segment_ids=_ids(seg, seg))
    no_span = lambda: (jnp.zeros_like(o_a), jnp.full_like(lse_a, -jnp.inf))
    branches = [no_span] + [
        lambda w=w: _unpack(cfg.kernel('after', w)(q, k, v, segment_ids=_ids(q_run, kv_run)))
        for w in cfg.widths]
    o_b, lse_b = jax.lax.switch(band, branches)
    return o_a, lse_a, o_b, lse_b

  return jax.vmap(row)(q, k, v, seg, q_run, kv_run)


def _unpack(result):
  out, (lse,) = result
  return out, lse


def _merge(o_a, lse_a, o_b, lse_b):
  lse = jnp.logaddexp(lse_a, lse_b)
  w_a, w_b = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
  # A part whose keys were all masked carries a -inf or -huge lse: weight 0 (and no NaN from it).
  o = (w_a * o_a.astype(jnp.float32) +
       jnp.where(w_b > 0, w_b * o_b.astype(jnp.float32), 0.0))
  return o.astype(o_a.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _omni(cfg, q, k, v, seg, q_run, kv_run, band):
  return _merge(*_omni_parts(cfg, q, k, v, seg, q_run, kv_run, band))[0]


def _omni_fwd(cfg, q, k, v, seg, q_run, kv_run, band):
  o, lse = kernels.keep_for_backward(*_merge(*_omni_parts(cfg, q, k, v, seg, q_run, kv_run,
                                                           band)))
  return o, (q, k, v, seg, q_run, kv_run, band, o, lse)


def _omni_bwd(cfg, res, do):
  q, k, v, seg, q_run, kv_run, band, o, lse = res

  def row(q, k, v, seg, q_run, kv_run, o, lse, do):
    grads_a = _part_backward(cfg.kernel('before'), q, k, v, _ids(seg, seg), o, lse, do)
    zeros = lambda: (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
    branches = [zeros] + [
        lambda w=w: _part_backward(cfg.kernel('after', w), q, k, v, _ids(q_run, kv_run), o, lse,
                                   do)
        for w in cfg.widths]
    grads_b = jax.lax.switch(band, branches)
    return tuple(a + b for a, b in zip(grads_a, grads_b))

  dq, dk, dv = jax.vmap(row)(q, k, v, seg, q_run, kv_run, o, lse, do)
  return dq, dk, dv, None, None, None, None


_omni.defvjp(_omni_fwd, _omni_bwd)


def _span_parts(cfg: _Config, q, k, v, q_run, kv_run, band):
  """The banded kernel per row (vmapped over the batch): (out, lse)."""

  def row(q, k, v, q_run, kv_run):
    ids = _ids(q_run, kv_run)
    branches = [lambda w=w: _unpack(cfg.kernel('span', w)(q, k, v, segment_ids=ids))
                for w in cfg.widths]
    return jax.lax.switch(band, branches)

  return jax.vmap(row)(q, k, v, q_run, kv_run)


# splash's own VJP would keep its residuals unnamed, and remat would rerun the kernel for them.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _span(cfg, q, k, v, q_run, kv_run, band):
  return _span_parts(cfg, q, k, v, q_run, kv_run, band)[0]


def _span_fwd(cfg, q, k, v, q_run, kv_run, band):
  o, lse = kernels.keep_for_backward(*_span_parts(cfg, q, k, v, q_run, kv_run, band))
  return o, (q, k, v, q_run, kv_run, band, o, lse)


def _span_bwd(cfg, res, do):
  q, k, v, q_run, kv_run, band, o, lse = res

  def row(q, k, v, q_run, kv_run, o, lse, do):
    branches = [lambda w=w: _part_backward(cfg.kernel('span', w), q, k, v, _ids(q_run, kv_run),
                                           o, lse, do) for w in cfg.widths]
    return jax.lax.switch(band, branches)

  dq, dk, dv = jax.vmap(row)(q, k, v, q_run, kv_run, o, lse, do)
  return dq, dk, dv, None, None, None


_span.defvjp(_span_fwd, _span_bwd)


def omni_splash_attention(q_BTHK, k_BTGK, v_BTGK, info: layout.MaskInfo, *,
                          kind: str = 'omni', block: int = 512,
                          interpret: bool | None = None) -> jax.Array:
  """Self-attention of a packed row under the omni (or span) mask: [B,T,H,K] -> [B,T,H,K].

  The block is `block`, or T rounded up to 128 for shorter rows; T is padded to a multiple of
  it, and padded tokens see no keys. interpret defaults to True unless the step targets TPU
  devices (the platform of the traced step's mesh, else jax's default backend).
  """
  check_self_attention(q_BTHK, k_BTGK, 'omni splash')
  _, t, h, d = q_BTHK.shape
  if block % _LANES:
    raise ValueError(f'splash block {block} is not a multiple of {_LANES}')
  if interpret is None:
    interpret = sharding.target_platform() != 'tpu'
  block = min(block, -(-t // _LANES) * _LANES)
  pad = (-t) % block
  seg = info.segment_ids
  lo, hi = layout.key_bounds_BT(info, kind)  # checks the kind
  span_lo, span_hi = (lo, hi) if kind == 'span' else layout.key_bounds_BT(info, 'span')
  in_span = span_hi >= 0
  if pad:
    pad_rows = lambda x: jnp.pad(x, ((0, 0), (0, pad)))
    seg, in_span, span_lo = pad_rows(seg), pad_rows(in_span), pad_rows(span_lo)
    pad_tok = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_BTHK, k_BTGK, v_BTGK = pad_tok(q_BTHK), pad_tok(k_BTGK), pad_tok(v_BTGK)
  cfg = _Config(t + pad, h, block, interpret)
  # Span tokens carry their span's first index; text never matches (-1 query, -2 key).
  q_run = jnp.where(in_span, span_lo, -1).astype(jnp.int32)
  kv_run = jnp.where(in_span, span_lo, -2).astype(jnp.int32)
  idx = jnp.arange(t, dtype=jnp.int32)
  valid = hi >= 0
  if kind == 'omni':
    reach = jnp.max(jnp.where(valid, hi - idx, 0))  # keys after a query: the rest of its span
  else:
    reach = jnp.max(jnp.where(valid, hi - lo, 0))  # a span's length - 1, both ways
  fits = jnp.asarray(cfg.widths) >= reach
  band = jnp.argmax(fits).astype(jnp.int32)  # the narrowest band that holds every span

  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # splash runs [heads, T, K] per row
  q = heads_first(q_BTHK * jnp.asarray(d ** -0.5, q_BTHK.dtype))
  k, v = heads_first(k_BTGK), heads_first(v_BTGK)
  if kind == 'omni':
    out = _omni(cfg, q, k, v, seg.astype(jnp.int32), q_run, kv_run,
                jnp.where(reach > 0, band + 1, 0))
  else:
    out = _span(cfg, q, k, v, q_run, kv_run, band)
  out = heads_first(out)[:, :t]
  return jnp.where(valid[:, :, None, None], out, 0).astype(q_BTHK.dtype)
