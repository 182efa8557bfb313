"""Omni attention: the single attention entry point of the project.

Every attention layer (decoder, flow head, vision encoder) calls `attention` with q, k, v and a
description of the mask rather than a dense mask, so faster kernels can plug in behind it. The
dense implementation here is the reference the other kernels are tested against.

Mask rule ("omni"): query i may attend key j iff both are in the same packed segment (segment
id != 0) and either j is not after i (causal, by position) or both lie in the same image span
(bidirectional inside an image, time token included). The "span" kind drops the causal part:
tokens only see their own span (the vision encoder, which runs per image).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

KINDS = ('omni', 'span')
IMPLS = ('dense',)
# Finite so that fully masked rows (padding) give a uniform softmax instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@struct.dataclass
class MaskInfo:
  """Per-token mask description for one side (queries or keys) of attention.

  segment_ids_BT: 0 marks padding; tokens attend only inside their own segment.
  positions_BT: order inside a segment; causality compares positions, so it also holds for a
    KV cache whose slots are not in sequence order.
  span_ids_BT: 0 for text; tokens sharing a non-zero id attend to each other both ways.
  """
  segment_ids: jax.Array
  positions: jax.Array
  span_ids: jax.Array


def omni_mask(q: MaskInfo, kv: MaskInfo, kind: str = 'omni') -> jax.Array:
  """Boolean mask [B, T, S]: True where query t may attend key s."""
  if kind not in KINDS:
    raise ValueError(f'attention kind {kind!r}: expected one of {KINDS}')
  q_seg, kv_seg = q.segment_ids[:, :, None], kv.segment_ids[:, None, :]
  same_segment = (q_seg == kv_seg) & (q_seg != 0)
  q_span, kv_span = q.span_ids[:, :, None], kv.span_ids[:, None, :]
  same_span = (q_span == kv_span) & (q_span != 0)
  if kind == 'span':
    return same_segment & same_span
  causal = kv.positions[:, None, :] <= q.positions[:, :, None]
  return same_segment & (causal | same_span)


def dense_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS) -> jax.Array:
  """Reference grouped-query attention with an explicit [B, T, S] mask; softmax in float32."""
  b, t, h, d = q_BTHK.shape
  g = k_BSGK.shape[2]
  if h % g:
    raise ValueError(f'{h} query heads are not a multiple of {g} key/value heads')
  q_BTGRK = q_BTHK.reshape(b, t, g, h // g, d)
  logits = jnp.einsum('btgrk,bsgk->bgrts', q_BTGRK, k_BSGK,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  logits = jnp.where(mask_BTS[:, None, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSGK.dtype)
  out = jnp.einsum('bgrts,bsgk->btgrk', probs, v_BSGK)
  return out.reshape(b, t, h, d)


def attention(q_BTHK, k_BSGK, v_BSGK, q_info: MaskInfo, kv_info: MaskInfo, *,
              kind: str = 'omni', impl: str = 'dense') -> jax.Array:
  """The attention entry point: [B,T,H,K] queries against [B,S,G,K] keys/values -> [B,T,H,K]."""
  if impl == 'dense':
    return dense_attention(q_BTHK, k_BSGK, v_BSGK, omni_mask(q_info, kv_info, kind))
  raise ValueError(f'attention impl {impl!r}: expected one of {IMPLS}')
