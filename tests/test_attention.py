"""The omni mask, the dense attention reference and RoPE; the mask rules through the real model."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_experiment, perturbed_params
from tuna2_jax import layout, objectives, train_state
from tuna2_jax.data import sequence as seq
from tuna2_jax.models import attention as attn_lib
from tuna2_jax.models import rope as rope_lib

PAD_ID = 0


def _random_sample(rng, patch_size: int) -> dict:
  """One sample of random text runs and random image spans, in a random order."""
  pieces = []
  for _ in range(rng.integers(1, 4)):
    if rng.random() < 0.5:
      pieces.append(seq.Text(rng.integers(8, 100, rng.integers(1, 5)).tolist()))
    else:
      gh, gw = rng.integers(1, 4, 2)
      pixels = rng.integers(0, 256, (gh * patch_size, gw * patch_size, 3), dtype=np.uint8)
      pieces.append(seq.Image(pixels, generate=bool(rng.random() < 0.5)))
  pieces.append(seq.Text(rng.integers(8, 100, rng.integers(1, 3)).tolist()))
  return seq.assemble(pieces, 't2i', img_id=7, patch_size=patch_size)


def _random_rows(seed: int, rows: int = 3, patch_size: int = 2) -> dict:
  """Packed rows of 1..3 random samples each, padded by 0..4 slots (both layouts of sequence.py)."""
  rng = np.random.default_rng(seed)
  samples = [[_random_sample(rng, patch_size) for _ in range(rng.integers(1, 4))]
             for _ in range(rows)]
  seq_len = max(sum(len(s['tokens']) for s in row) for row in samples) + int(rng.integers(0, 5))
  packed = [seq.pack(row, seq_len, patch_size=patch_size, pad_id=PAD_ID) for row in samples]
  return {k: np.stack([r[k] for r in packed]) for k in layout.FIELDS}


def _brute_force_mask(segment_ids, span_ids, kind: str) -> np.ndarray:
  """ARCHITECTURE.md's rule, by slot index: same non-zero segment and (j <= i or same image)."""
  b, t = segment_ids.shape
  mask = np.zeros((b, t, t), bool)
  for r in range(b):
    for i in range(t):
      for j in range(t):
        seg_i, seg_j = segment_ids[r, i], segment_ids[r, j]
        same_segment = seg_i != 0 and seg_i == seg_j
        same_span = span_ids[r, i] != 0 and span_ids[r, i] == span_ids[r, j]
        if kind == 'span':
          mask[r, i, j] = same_segment and same_span
        else:
          mask[r, i, j] = same_segment and (j <= i or same_span)
  return mask


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('kind', layout.KINDS)
def test_omni_mask_matches_brute_force_on_packed_rows(seed, kind):
  batch = _random_rows(seed)
  info = layout.row_info(batch)
  got = np.asarray(layout.omni_mask_BTS(info, info, kind))
  want = _brute_force_mask(batch['segment_ids'], batch['span_ids'], kind)
  np.testing.assert_array_equal(got, want)
  if seed == 0:  # the layouts exercise what the rule distinguishes
    assert (batch['segment_ids'] == 0).any() and batch['segment_ids'].max() > 1
    assert (batch['span_ids'] > 1).any()


def test_omni_mask_on_left_padded_rows():
  rng = np.random.default_rng(11)
  samples = [_random_sample(rng, 2) for _ in range(4)]
  batch = seq.stack_left_padded(samples, patch_size=2, pad_id=PAD_ID)
  assert (batch['segment_ids'][:, 0] == 0).any()  # at least one row really is left-padded
  info = layout.row_info(batch)
  for kind in layout.KINDS:
    np.testing.assert_array_equal(np.asarray(layout.omni_mask_BTS(info, info, kind)),
                                  _brute_force_mask(batch['segment_ids'], batch['span_ids'], kind))


def test_unknown_mask_kind_is_rejected():
  info = layout.MaskInfo(*(np.ones((1, 2), np.int32),) * 3)
  with pytest.raises(ValueError, match='causal'):
    layout.omni_mask_BTS(info, info, 'causal')


def _naive_attention(q, k, v, mask):
  b, t, h, d = q.shape
  g = k.shape[2]
  out = np.zeros_like(q)
  for r in range(b):
    for head in range(h):
      kv_head = head // (h // g)  # consecutive query heads share one key/value head
      logits = q[r, :, head] @ k[r, :, kv_head].T / np.sqrt(d)
      logits = np.where(mask[r], logits, -np.inf)
      with np.errstate(invalid='ignore'):  # a fully masked row is NaN here; callers skip it
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
      out[r, :, head] = probs @ v[r, :, kv_head]
  return out


def test_dense_gqa_attention_matches_naive_per_head():
  rng = np.random.default_rng(0)
  b, t, s, h, g, d = 2, 5, 7, 6, 2, 8
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  k = rng.normal(size=(b, s, g, d)).astype(np.float32)
  v = rng.normal(size=(b, s, g, d)).astype(np.float32)
  mask = rng.random((b, t, s)) < 0.6
  mask[..., 0] = True  # every query sees at least one key
  got = np.asarray(attn_lib.dense_attention(q, k, v, mask))
  np.testing.assert_allclose(got, _naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_fully_masked_query_row_is_finite():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(1, 3, 2, 4)).astype(np.float32)
  k = rng.normal(size=(1, 3, 1, 4)).astype(np.float32)
  v = rng.normal(size=(1, 3, 1, 4)).astype(np.float32)
  mask = np.array([[[True, False, False], [False, False, False], [True, True, True]]])
  out = np.asarray(attn_lib.dense_attention(q, k, v, mask))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[:, [0, 2]], _naive_attention(q, k, v, mask)[:, [0, 2]],
                             rtol=1e-5, atol=1e-5)  # the padded row leaves the others alone


# --- the mask's promises, through the real model ---


def packed_pair(p: int, seq_len: int, layout) -> dict:
  """A batch of one row: a t2i sample then an mmu sample, each [text][image][text], padded.

  layout: per sample (text before, image grid height, width, text after).
  """
  rng = np.random.default_rng(0)
  image = lambda h, w: rng.integers(0, 256, (h * p, w * p, 3), dtype=np.uint8)
  text = lambda n: seq.Text(rng.integers(8, 100, n).tolist())
  samples = [seq.assemble([text(before), seq.Image(image(h, w), generate=task == 't2i'),
                           text(after)], task, img_id=7, patch_size=p)
             for task, (before, h, w, after) in zip(('t2i', 'mmu'), layout)]
  row = seq.pack(samples, seq_len, patch_size=p, pad_id=PAD_ID)
  return {k: v[None] for k, v in row.items()}


@pytest.fixture(scope='module', params=['patch', 'encoder'])
def packed_model(request):
  """A tiny random Tuna-2 / Tuna-R, a jitted forward and a packed batch of two samples + padding.

  Segment 1: [text x4][image 2x2 patches][text x3]; segment 2: [text x3][image 2x3][text x2].
  """
  config = load_experiment('shapes', f'runlocal=True,vision={request.param}')
  model = perturbed_params(train_state.build_model(config))
  batch = packed_pair(config.model.patch_size, 30, ((4, 2, 2, 3), (3, 2, 3, 2)))
  t = np.where(batch['gen_mask'], 0.4, 1.0).astype(np.float32)

  @nnx.jit
  def forward(model, batch):
    return model(batch, objectives.to_unit_range(batch['patches']), t)

  def run(b):
    hidden, x_hat = forward(model, b)
    return np.asarray(hidden)[0], np.asarray(x_hat)[0]

  return run, batch


def _copy(batch):
  return {k: v.copy() for k, v in batch.items()}


def _other_text(ids):
  return (ids - 8 + 7) % 92 + 8  # another id in the same range [8, 100), never the same one


def _unchanged(a, b, where):
  np.testing.assert_allclose(a[where], b[where], rtol=0, atol=1e-6)


def _changed(a, b, where):
  assert np.abs(a[where] - b[where]).max(axis=-1).min() > 1e-4


def test_model_outputs_are_finite_at_padding(packed_model):
  run, batch = packed_model
  hidden, x_hat = run(batch)
  assert (batch['segment_ids'][0] == 0).sum() == 30 - 24
  assert np.isfinite(hidden).all() and np.isfinite(x_hat).all()


def test_later_text_does_not_reach_earlier_tokens(packed_model):
  run, batch = packed_model
  seg = batch['segment_ids'][0]
  last = np.flatnonzero(seg == 1)[-1]  # segment 1's last text token
  assert not batch['span_ids'][0, last]
  other = _copy(batch)
  other['tokens'][0, last] = _other_text(other['tokens'][0, last])
  (h0, x0), (h1, x1) = run(batch), run(other)
  before = np.arange(len(seg)) < last
  _unchanged(h0, h1, before)
  _unchanged(x0, x1, before)
  _changed(h0, h1, [last])


def test_image_span_is_bidirectional(packed_model):
  run, batch = packed_model
  patches = np.flatnonzero(batch['is_patch'][0] & (batch['span_ids'][0] == 1))
  time_token = np.flatnonzero(batch['is_time'][0] & (batch['span_ids'][0] == 1))
  other = _copy(batch)
  other['patches'][0, patches[-1]] = 255 - other['patches'][0, patches[-1]]
  (h0, x0), (h1, x1) = run(batch), run(other)
  earlier = np.concatenate([time_token, patches[:-1]])
  _changed(h0, h1, earlier)
  _changed(x0, x1, patches[:-1])
  _unchanged(h0, h1, np.arange(time_token[0]))  # the prompt before the image stays causal


def test_packed_segments_do_not_see_each_other(packed_model):
  run, batch = packed_model
  seg = batch['segment_ids'][0]
  two = seg == 2
  other = _copy(batch)
  text = two & ~other['is_time'][0] & ~other['is_patch'][0]
  other['tokens'][0, text] = _other_text(other['tokens'][0, text])
  other['patches'][0, two] = 255 - other['patches'][0, two]
  (h0, x0), (h1, x1) = run(batch), run(other)
  _unchanged(h0, h1, seg == 1)
  _unchanged(x0, x1, seg == 1)
  _changed(h0, h1, two)


# --- RoPE ---


def test_1d_rope_matches_the_qwen2_formula():
  pos = np.random.default_rng(0).integers(0, 500, (2, 9)).astype(np.int32)
  cos, sin = rope_lib.rope_tables(pos, 16, 1e4)
  inv_freq = 1e4 ** (-np.arange(0, 16, 2) / 16)
  angles = np.concatenate([pos[..., None] * inv_freq] * 2, axis=-1)
  np.testing.assert_allclose(cos, np.cos(angles), rtol=0, atol=1e-5)
  np.testing.assert_allclose(sin, np.sin(angles), rtol=0, atol=1e-5)


def test_sectioned_rope_rotates_each_section_by_its_coordinate():
  pos = np.random.default_rng(1).integers(0, 50, (1, 4, 3)).astype(np.int32)
  head_dim, theta, sections = 16, 100.0, (4, 6, 6)
  cos, _ = rope_lib.rope_tables(pos, head_dim, theta, sections)
  # frequency pair f -> (coordinate, index inside its section, section dims)
  pairs = [(0, i, 4) for i in range(2)] + [(1, i, 6) for i in range(3)] + \
      [(2, i, 6) for i in range(3)]
  for f, (c, i, dim) in enumerate(pairs):
    angle = pos[..., c] * theta ** (-2 * i / dim)
    np.testing.assert_allclose(cos[..., f], np.cos(angle), atol=1e-5)
    np.testing.assert_allclose(cos[..., f + head_dim // 2], np.cos(angle), atol=1e-5)


def test_rope_sections_must_cover_head_dim():
  with pytest.raises(ValueError, match='head_dim 16'):
    rope_lib.rope_tables(np.zeros((1, 2, 3), np.int32), 16, 1e4, (4, 6, 4))


def test_apply_rope_preserves_norms():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 6, 3, 16)).astype(np.float32)
  cos, sin = rope_lib.rope_tables(rng.integers(0, 1000, (2, 6)), 16, 1e4)
  y = np.asarray(rope_lib.apply_rope(jnp.asarray(x), cos, sin))
  assert not np.allclose(x, y)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize('sections', [None, (4, 6, 6)])
def test_rope_scores_depend_only_on_relative_position(sections):
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  coords = 1 if sections is None else 3

  def score(m, n):
    rot = lambda x, p: rope_lib.apply_rope(x, *rope_lib.rope_tables(
        jnp.asarray(p, jnp.int32).reshape(1, 1, coords), 16, 1e4, sections))
    return float(jnp.sum(rot(q, m) * rot(k, n)))

  m, n = rng.integers(0, 40, (2, coords))
  base = score(m, n)
  for shift in rng.integers(-30, 300, (3, coords)):
    assert score(m + shift, n + shift) == pytest.approx(base, rel=1e-4, abs=1e-4)
  assert abs(score(m + 1, n) - base) > 1e-3  # but the relative offset itself matters
