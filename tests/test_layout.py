"""The packed row's schema and mask forms (layout.py): the dense mask, the key intervals and the
host key counts agree; the MaskInfo constructors; the builders write exactly the schema."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuna2_jax import layout
from tuna2_jax.data import sequence as seq

P = 2  # patch size
T = 128  # one row length for every test, so the jitted forms compile once
_key_bounds_BT = jax.jit(layout.key_bounds_BT, static_argnames='kind')


def _sample(rng) -> dict:
  """Random text runs and images (some to be generated) in a random order, one task."""
  pieces = []
  for _ in range(rng.integers(1, 5)):
    if rng.random() < 0.5:
      pieces.append(seq.Text(rng.integers(8, 100, rng.integers(1, 5)).tolist(),
                             train=bool(rng.random() < 0.5)))
    else:
      gh, gw = rng.integers(1, 4, 2)
      pixels = rng.integers(0, 256, (gh * P, gw * P, 3), dtype=np.uint8)
      pieces.append(seq.Image(pixels, generate=bool(rng.random() < 0.5)))
  task = ('t2i', 'mmu', 'edit', 'text')[rng.integers(4)]
  return seq.assemble(pieces, task, img_id=7, patch_size=P,
                      pixel_layout=('exact', 'official')[rng.integers(2)])


def _packed(seed: int, rows: int = 4) -> dict:
  """Rows of T slots: 1..3 samples each, then padding."""
  rng = np.random.default_rng(seed)
  samples = [[_sample(rng) for _ in range(rng.integers(1, 4))] for _ in range(rows)]
  packed = [seq.pack(row, T, patch_size=P, pad_id=0) for row in samples]
  return {k: np.stack([r[k] for r in packed]) for k in layout.FIELDS}


def _left_padded(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return seq.stack_left_padded([_sample(rng) for _ in range(4)], patch_size=P, pad_id=0,
                               length=T)


def _three_forms_agree(batch: dict, span_ids_BT, kind: str) -> None:
  info = layout.MaskInfo(batch['segment_ids'], batch['positions'], span_ids_BT)
  mask_BTS = np.asarray(layout.omni_mask_BTS(info, info, kind))
  lo_BT, hi_BT = map(np.asarray, _key_bounds_BT(jax.tree.map(jnp.asarray, info), kind=kind))
  j = np.arange(mask_BTS.shape[-1])
  interval_BTS = (j >= lo_BT[..., None]) & (j <= hi_BT[..., None])
  np.testing.assert_array_equal(interval_BTS, mask_BTS)
  counts_BT = layout.attended_keys_BT(batch['segment_ids'], span_ids_BT, kind)
  np.testing.assert_array_equal(counts_BT, mask_BTS.sum(-1))


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('kind', layout.KINDS)
def test_three_forms_of_the_rule_agree_on_packed_rows(seed, kind):
  batch = _packed(seed)
  assert (batch['segment_ids'].max(axis=1) > 1).any() and (batch['span_ids'] > 1).any()
  _three_forms_agree(batch, batch['span_ids'], kind)
  # The vision encoder's mask: spans on the patches only.
  _three_forms_agree(batch, np.asarray(layout.patch_info(batch).span_ids), kind)


@pytest.mark.parametrize('kind', layout.KINDS)
def test_three_forms_of_the_rule_agree_on_left_padded_rows(kind):
  batch = _left_padded(3)
  assert (batch['segment_ids'][:, 0] == 0).any()
  _three_forms_agree(batch, batch['span_ids'], kind)


def test_an_unknown_kind_is_named():
  info = layout.row_info(_packed(0, rows=1))
  for form in (lambda: layout.omni_mask_BTS(info, info, 'causal'),
               lambda: layout.key_bounds_BT(jax.tree.map(jnp.asarray, info), 'causal'),
               lambda: layout.attended_keys_BT(info.segment_ids, info.span_ids, 'causal')):
    with pytest.raises(ValueError, match="'causal'.*'omni', 'span'"):
      form()


def test_constructors_give_what_the_inline_code_gave():
  batch = {k: jnp.asarray(v) for k, v in _packed(1).items()}
  b, t = batch['tokens'].shape
  seg, pos, span = batch['segment_ids'], batch['positions'], batch['span_ids']
  same = lambda info, *want: [np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
                              for g, w in zip((info.segment_ids, info.positions, info.span_ids),
                                              want)]
  same(layout.row_info(batch), seg, pos, span)
  same(layout.patch_info(batch), seg, pos, jnp.where(batch['is_patch'], span, 0))
  # sampling.decode_text: the prompt's keys then max_new_tokens free slots; each step writes one.
  pad_tail = lambda a: jnp.pad(a, ((0, 0), (0, 3)))
  kv = layout.cache_info(layout.row_info(batch), 3)
  same(kv, pad_tail(seg), pad_tail(pos), pad_tail(span))
  new_seg, new_pos = seg[:, -1], pos[:, -1] + 1
  same(layout.with_token(kv, t + 1, new_seg, new_pos), pad_tail(seg).at[:, t + 1].set(new_seg),
       pad_tail(pos).at[:, t + 1].set(new_pos), pad_tail(span))
  q = layout.text_info(new_seg[:, None], new_pos[:, None])
  same(q, new_seg[:, None], new_pos[:, None], jnp.zeros((b, 1), jnp.int32))
  assert q.span_ids.dtype == jnp.int32
  # models/siglip.py: one caption (or image) per row, every valid token sees the others.
  valid = (jnp.arange(t)[None] < jnp.arange(1, b + 1)[:, None]).astype(jnp.int32)
  same(layout.image_info(valid), valid, jnp.broadcast_to(jnp.arange(t), (b, t)), valid)
  assert np.asarray(layout.image_info(valid).positions).dtype == np.int32


def test_take_slots_and_flow_targets():
  batch = _packed(2)
  part = layout.take_slots(dict(batch, extra=np.zeros(3)), 2, 5)
  assert tuple(part) == layout.FIELDS
  assert all(v.shape[1] == 3 for v in part.values())
  np.testing.assert_array_equal(part['patches'], batch['patches'][:, 2:5])
  targets = layout.flow_targets_BT(batch)
  assert targets.any() and not (targets & batch['is_time']).any()
  np.testing.assert_array_equal(targets, batch['gen_mask'] & batch['is_patch'])


def _check_schema(rows: dict, lead: tuple) -> None:
  assert sorted(rows) == sorted(layout.FIELDS)
  for name, field in layout.SCHEMA.items():
    a = rows[name]
    assert a.dtype == np.dtype(field.dtype), (name, a.dtype)
    assert a.shape[len(lead):] == layout.trailing_shape(name, P), (name, a.shape)
    assert a.shape[:len(lead)] == lead, (name, a.shape)


def test_the_builders_write_exactly_the_schema():
  rng = np.random.default_rng(4)
  samples = [_sample(rng) for _ in range(3)]
  for s in samples:
    _check_schema(s, (len(s['tokens']),))
  _check_schema(seq.pack(samples, 200, patch_size=P, pad_id=0), (200,))
  _check_schema(seq.pack([], 16, patch_size=P, pad_id=0), (16,))
  _check_schema(seq.empty_row(16, P, 0), (16,))
  _check_schema(seq.stack_left_padded(samples, patch_size=P, pad_id=0, length=60), (3, 60))
  assert set(layout.TASK_IDS.values()) == set(range(1, len(layout.TASK_IDS) + 1))
  with pytest.raises(ValueError, match="'pixels'"):
    layout.trailing_shape('pixels', P)


def test_the_typed_batch_round_trips():
  import dataclasses
  assert [f.name for f in dataclasses.fields(layout.Batch)] == [layout.batch_name(k)
                                                               for k in layout.FIELDS]
  rows = dict(_packed(5), extra=np.zeros(3))
  typed = layout.Batch.from_rows(rows)
  assert typed.patches_BTP is rows['patches'] and typed.pos3_BT3.shape == (4, T, 3)
  back = typed.rows()
  assert list(back) == list(layout.FIELDS) and all(back[k] is rows[k] for k in layout.FIELDS)
  # A pytree: it crosses jit, and its leaves are the fields in SCHEMA order.
  leaves = jax.tree.leaves(typed)
  assert len(leaves) == len(layout.FIELDS) and leaves[0] is rows['tokens']
  with pytest.raises(ValueError, match=r"\['gen_mask'\]"):
    layout.Batch.from_rows({k: v for k, v in rows.items() if k != 'gen_mask'})
