"""The packed row: what each token slot of a batch holds, and the attention mask it implies.

Every row (data/sequence.py builds them) is a dict of arrays over T token slots, one entry per
`SCHEMA` field; a batch stacks rows into [B, T, ...]. Rows keep every packed sample (segment)
and every image span contiguous, with positions rising along the slots; padding has segment 0
and sits after the samples (packed training rows) or before them (left-padded prompts,
sequence.stack_left_padded).

Attention sees a row through a `MaskInfo` (segment ids, positions, span ids of the queries or
of the keys), built here from a batch (`row_info`, `patch_info`) or for a KV cache
(`cache_info`, `with_token`, `text_info`).

Mask rule ("omni"): query i may attend key j iff both are in the same packed segment (segment
id != 0) and either j is not after i (causal, by position) or both lie in the same image span
(bidirectional inside an image, time token included). The "span" kind drops the causal part:
tokens only see their own span (the vision encoder, which runs per image). The rule exists in
three forms, all here: `omni_mask_BTS` (the dense [B, T, S] mask: any key order, KV caches),
`key_bounds_BT` (one key interval per query of a packed row: what the blockwise kernels read)
and `attended_keys_BT` (the count of keys per query on the host: what flops.py counts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

TASK_IDS = {'t2i': 1, 'mmu': 2, 'edit': 3, 'text': 4}


@dataclasses.dataclass(frozen=True)
class Field:
  """One per-token field of a row: [T, *trailing] of dtype; 'P' in trailing is p*p*3."""
  name: str
  dtype: type
  trailing: tuple
  meaning: str


SCHEMA = {f.name: f for f in (
    Field('tokens', np.int32, (), 'token ids; image slots hold the image placeholder id'),
    Field('targets', np.int32, (), 'the next token (what position i predicts)'),
    Field('loss_mask', np.float32, (), '1 where targets[i] is a trained text target'),
    Field('segment_ids', np.int32, (), '1..n for the packed samples, 0 for padding'),
    Field('positions', np.int32, (), '1D position inside the sample (image tokens included)'),
    Field('span_ids', np.int32, (), "k >= 1 on the tokens of the row's k-th image span, else 0"),
    Field('is_time', np.bool_, (), 'the time token heading a span'),
    Field('is_patch', np.bool_, (), 'patch tokens'),
    Field('gen_mask', np.bool_, (),
          'tokens of spans to be generated (noised; their patches trained by the flow loss)'),
    Field('task', np.int32, (), 'TASK_IDS of the sample (0 for padding)'),
    Field('patches', np.uint8, ('P',),
          'the pixel block of each patch token (raster order, (row, col, ch)); the data '
          'pipeline gives uint8, tests and references may give floats'),
    Field('pos3', np.int32, (3,), 'flow-head RoPE coordinates (t, h, w); text (p, p, p)'),
    Field('patch_grid', np.int32, (4,),
          '(row, col, grid rows, grid cols) of a patch in its image; 0 elsewhere'),
)}
FIELDS = tuple(SCHEMA)


def batch_name(name: str) -> str:
  """A field's name with its batch shape as suffix: 'tokens' -> 'tokens_BT', 'patches' ->
  'patches_BTP', 'pos3' -> 'pos3_BT3' (the names of `Batch`)."""
  if name not in SCHEMA:
    raise ValueError(f'row field {name!r}: expected one of {FIELDS}')
  return f"{name}_BT{''.join(str(d) for d in SCHEMA[name].trailing)}"


@struct.dataclass
class Batch:
  """A batch of rows [B, T, ...] as typed, shape-named fields (a pytree), one per SCHEMA field;
  `from_rows` builds it from the data pipeline's {field: array} dict, `rows` gives that back."""
  tokens_BT: jax.Array
  targets_BT: jax.Array
  loss_mask_BT: jax.Array
  segment_ids_BT: jax.Array
  positions_BT: jax.Array
  span_ids_BT: jax.Array
  is_time_BT: jax.Array
  is_patch_BT: jax.Array
  gen_mask_BT: jax.Array
  task_BT: jax.Array
  patches_BTP: jax.Array
  pos3_BT3: jax.Array
  patch_grid_BT4: jax.Array

  @classmethod
  def from_rows(cls, batch: dict) -> 'Batch':
    """The typed view of a {field: [B, T, ...]} batch; keys outside SCHEMA are left out."""
    missing = [k for k in FIELDS if k not in batch]
    if missing:
      raise ValueError(f'batch lacks the row fields {missing}; it has {sorted(batch)}')
    return cls(**{batch_name(k): batch[k] for k in FIELDS})

  def rows(self) -> dict:
    """The {field: [B, T, ...]} dict the data pipeline yields (the same arrays)."""
    return {k: getattr(self, batch_name(k)) for k in FIELDS}


def trailing_shape(name: str, patch_size: int) -> tuple[int, ...]:
  """The shape of field `name` after its [T] (or [B, T]) axes, for patches of patch_size."""
  if name not in SCHEMA:
    raise ValueError(f'row field {name!r}: expected one of {FIELDS}')
  return tuple(patch_size * patch_size * 3 if d == 'P' else d for d in SCHEMA[name].trailing)


def take_slots(batch: dict, start: int, stop: int) -> dict:
  """The per-token fields of a batch at slots [start, stop): [B, T, ...] -> [B, stop-start, ...]."""
  return {k: v[:, start:stop] for k, v in batch.items() if k in FIELDS}


def flow_targets_BT(batch: dict):
  """The tokens the flow loss trains [B, T] bool: the patches of spans to be generated.

  The time token of a generated span is generated too (gen_mask) but predicts no pixels.
  """
  return batch['gen_mask'] & batch['is_patch']


# --- Mask descriptions -------------------------------------------------------------------------

KINDS = ('omni', 'span')


def check_kind(kind: str) -> None:
  """Raises ValueError unless `kind` is an attention kind (KINDS)."""
  if kind not in KINDS:
    raise ValueError(f'attention kind {kind!r}: expected one of {KINDS}')


@struct.dataclass
class MaskInfo:
  """Per-token mask description for one side (queries or keys) of attention, each [B, T].

  segment_ids: 0 marks padding; tokens attend only inside their own segment.
  positions: order inside a segment; causality compares positions, so it also holds for a
    KV cache whose slots are not in sequence order.
  span_ids: 0 for text; tokens sharing a non-zero id attend to each other both ways.
  """
  segment_ids: jax.Array
  positions: jax.Array
  span_ids: jax.Array


def row_info(batch: dict) -> MaskInfo:
  """The omni mask's description of a batch's rows [B, T] (decoder and flow head)."""
  return MaskInfo(batch['segment_ids'], batch['positions'], batch['span_ids'])


def patch_info(batch: dict) -> MaskInfo:
  """A batch's rows [B, T] with spans on the patch tokens only (time tokens are text to it):
  what the vision encoder attends over, under the 'span' kind each image's patches."""
  return MaskInfo(batch['segment_ids'], batch['positions'],
                  jnp.where(batch['is_patch'], batch['span_ids'], 0))


def image_info(valid_BT) -> MaskInfo:
  """Rows that each hold one bidirectional span over their valid tokens (1 = valid, int32
  [B, T]): one image or one caption per row, padding after it (SigLIP's towers)."""
  b, t = valid_BT.shape
  return MaskInfo(valid_BT, jnp.broadcast_to(jnp.arange(t), (b, t)), valid_BT)


def text_info(segment_ids_BT, positions_BT) -> MaskInfo:
  """Text tokens (no image span) [B, T] at the given segments and positions: causal only."""
  return MaskInfo(segment_ids_BT, positions_BT, jnp.zeros(segment_ids_BT.shape, jnp.int32))


def cache_info(info: MaskInfo, free_slots: int) -> MaskInfo:
  """A KV cache's keys [B, T + free_slots]: `info`'s slots, then free ones (segment 0, seen by
  no query) that decoding fills with `with_token`."""
  pad_tail = lambda a: jnp.pad(a, ((0, 0), (0, free_slots)))
  return MaskInfo(pad_tail(info.segment_ids), pad_tail(info.positions), pad_tail(info.span_ids))


def with_token(kv_info: MaskInfo, slot, segment_ids_B, positions_B) -> MaskInfo:
  """kv_info [B, S] with a text token written at `slot` of every row (its segment, position)."""
  return MaskInfo(kv_info.segment_ids.at[:, slot].set(segment_ids_B),
                  kv_info.positions.at[:, slot].set(positions_B), kv_info.span_ids)


# --- The omni rule in its three forms ----------------------------------------------------------

def omni_mask_BTS(q: MaskInfo, kv: MaskInfo, kind: str = 'omni'):
  """Boolean mask [B, T, S]: True where query t may attend key s, i.e. same non-zero segment
  and (key position <= query position, or same non-zero span); 'span': same segment and span.

  Pairwise, so it holds for any key order (KV caches); numpy or jax arrays in, the same out.
  """
  check_kind(kind)
  q_seg, kv_seg = q.segment_ids[:, :, None], kv.segment_ids[:, None, :]
  same_segment = (q_seg == kv_seg) & (q_seg != 0)
  q_span, kv_span = q.span_ids[:, :, None], kv.span_ids[:, None, :]
  same_span = (q_span == kv_span) & (q_span != 0)
  if kind == 'span':
    return same_segment & same_span
  causal = kv.positions[:, None, :] <= q.positions[:, :, None]
  return same_segment & (causal | same_span)


@dataclasses.dataclass(frozen=True)
class _ArrayOps:
  """The array module the interval form runs on: jax (kernels) or numpy (host counts)."""
  xp: object
  cummax: object  # running maximum along the slots
  cummin_reversed: object  # running minimum along the slots, from the end


_JAX = _ArrayOps(jnp, lambda x: jax.lax.cummax(x, axis=1),
                 lambda x: jax.lax.cummin(x, axis=1, reverse=True))
_NUMPY = _ArrayOps(np, lambda x: np.maximum.accumulate(x, axis=1),
                   lambda x: np.minimum.accumulate(x[:, ::-1], axis=1)[:, ::-1])


def _runs(ids_BT, ops: _ArrayOps):
  """(first index, last index) [B, T] of the run of equal values each token sits in."""
  xp = ops.xp
  b, t = ids_BT.shape
  idx = xp.broadcast_to(xp.arange(t, dtype=xp.int32), (b, t))
  change = ids_BT[:, 1:] != ids_BT[:, :-1]
  starts = xp.concatenate([xp.ones((b, 1), bool), change], axis=1)
  ends = xp.concatenate([change, xp.ones((b, 1), bool)], axis=1)
  first = ops.cummax(xp.where(starts, idx, 0))
  last = ops.cummin_reversed(xp.where(ends, idx, t - 1))
  return first, last


def _key_bounds(segment_ids_BT, span_ids_BT, kind: str, ops: _ArrayOps):
  """The interval form of the rule on `ops`' arrays; see key_bounds_BT."""
  check_kind(kind)
  xp = ops.xp
  seg, span = segment_ids_BT, span_ids_BT
  b, t = seg.shape
  idx = xp.broadcast_to(xp.arange(t, dtype=xp.int32), (b, t))
  seg_start, _ = _runs(seg, ops)
  # A run of one span id never crosses a segment boundary, even when two segments reuse ids.
  span_start, span_end = _runs(seg * (t + 1) + span, ops)
  in_span = span != 0
  if kind == 'omni':
    valid = seg != 0
    lo = seg_start
    hi = xp.where(in_span, xp.maximum(idx, span_end), idx)
  else:
    valid = (seg != 0) & in_span
    lo, hi = span_start, span_end
  return (xp.where(valid, lo, t).astype(xp.int32), xp.where(valid, hi, -1).astype(xp.int32))


def key_bounds_BT(info: MaskInfo, kind: str = 'omni') -> tuple[jax.Array, jax.Array]:
  """Each query's allowed keys as an inclusive slot interval (lo_BT, hi_BT), int32.

  In a packed row (segments and spans contiguous, positions rising) the rule "same segment and
  (causal or same span)" is exactly the keys [segment start, max(i, end of i's span)]; 'span':
  [start, end] of i's span. Self-attention only; queries with no keys get lo = T, hi = -1.
  """
  return _key_bounds(info.segment_ids, info.span_ids, kind, _JAX)


def attended_keys_BT(segment_ids_BT: np.ndarray, span_ids_BT: np.ndarray,
                     kind: str = 'omni') -> np.ndarray:
  """Keys each query of a packed row attends to, int64 [B, T], computed with numpy on the host:
  the length of its `key_bounds_BT` interval (0 for queries without keys)."""
  seg = np.asarray(segment_ids_BT, np.int64)
  span = np.asarray(span_ids_BT, np.int64)
  lo, hi = _key_bounds(seg, span, kind, _NUMPY)
  return np.where(hi >= 0, hi.astype(np.int64) - lo + 1, 0)
