"""The attention kernels behind the entry point, against the dense reference; kernel selection."""

import collections
import logging
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from test_attention import PAD_ID, _brute_force_mask, _random_rows, packed_pair
from tuna2_jax import layout
from tuna2_jax import sharding
from tuna2_jax.data import sequence as seq
from tuna2_jax.kernels import omni_flash, omni_hopper, omni_splash
from tuna2_jax.models import attention as attn_lib


def _info(rows: dict) -> layout.MaskInfo:
  return jax.tree.map(jnp.asarray, layout.row_info(layout.Batch.from_rows(rows)))


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('kind', layout.KINDS)
def test_key_bounds_are_the_omni_mask(seed, kind):
  rows = _random_rows(seed, rows=4)
  lo, hi = map(np.asarray, layout.key_bounds_BT(_info(rows), kind))
  j = np.arange(lo.shape[1])
  interval = (j[None, None] >= lo[..., None]) & (j[None, None] <= hi[..., None])
  np.testing.assert_array_equal(interval, _brute_force_mask(rows['segment_ids'],
                                                            rows['span_ids'], kind))


def _qkv(seed, b, t, h, g, d, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, h, d), dtype), jax.random.normal(kk, (b, t, g, d), dtype),
          jax.random.normal(kv, (b, t, g, d), dtype))


def _check_against_dense(attend, rows, kind, heads, head_dim=16, atol=(2e-5, 5e-5)):
  """attend(q, k, v) against dense attention under the rows' mask: values and q/k/v grads."""
  info = _info(rows)
  b, t = rows['segment_ids'].shape
  q, k, v = _qkv(t, b, t, *heads, head_dim)
  mask = layout.omni_mask_BTS(info, info, kind)
  live = np.asarray(mask.any(-1))  # rows with no keys are padding: the kernels return zeros
  w = jax.random.normal(jax.random.key(100), q.shape) * live[..., None, None]
  dense = lambda q, k, v: attn_lib.dense_attention(q, k, v, mask)
  out_d, out_k = dense(q, k, v), attend(q, k, v)
  np.testing.assert_allclose(np.asarray(out_k)[live], np.asarray(out_d)[live], atol=atol[0])
  assert np.all(np.asarray(out_k)[~live] == 0)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * w)
  grads_d = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
  grads_k = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
  for name, gd, gk in zip('qkv', grads_d, grads_k):
    np.testing.assert_allclose(np.asarray(gk), np.asarray(gd), atol=atol[1], err_msg=f'd{name}')


@pytest.mark.parametrize('seed,kind,heads', [(1, 'omni', (6, 2)), (2, 'span', (4, 4))])
def test_omni_flash_matches_dense_values_and_grads(seed, kind, heads):
  """Blocks of 16 over rows of ~40-70 slots: several key blocks, ragged tails, padding."""
  rows = _random_rows(seed, rows=3)
  info = _info(rows)
  _check_against_dense(
      lambda q, k, v: omni_flash.omni_flash_attention(q, k, v, info, kind=kind, block_q=16,
                                                      block_k=16), rows, kind, heads)


def test_omni_flash_bfloat16_close_to_float32_reference():
  rows = _random_rows(7, rows=2)
  info = _info(rows)
  b, t = rows['segment_ids'].shape
  q, k, v = _qkv(7, b, t, 4, 2, 32)
  mask = layout.omni_mask_BTS(info, info, 'omni')
  live = np.asarray(mask.any(-1))
  ref = attn_lib.dense_attention(q, k, v, mask)
  bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
  out = omni_flash.omni_flash_attention(*bf, info, block_q=16, block_k=16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32)[live], np.asarray(ref)[live], atol=3e-2)


def test_entry_point_runs_the_named_kernel_through_the_model_layer():
  rows = _random_rows(3, rows=2)
  info = _info(rows)
  b, t = rows['segment_ids'].shape
  q, k, v = _qkv(3, b, t, 4, 2, 16)
  live = np.asarray(layout.omni_mask_BTS(info, info).any(-1))
  dense = attn_lib.attention(q, k, v, info, info, impl='dense')
  flash = attn_lib.attention(q, k, v, info, info, impl='omni_flash')
  np.testing.assert_allclose(np.asarray(flash)[live], np.asarray(dense)[live], atol=2e-5)


@pytest.mark.parametrize('impl,backend,dtype,match', [
    ('cudnn', 'cpu', jnp.bfloat16, 'needs a GPU'),
    ('cudnn', 'gpu', jnp.float32, 'bfloat16 or float16'),
    ('splash', 'gpu', jnp.bfloat16, 'Mosaic'),
    ('omni_flash', 'tpu', jnp.bfloat16, 'Triton'),
    ('omni_hopper', 'cpu', jnp.float32, 'bfloat16 or float16'),
])
def test_named_kernel_the_backend_lacks_is_a_clear_error(impl, backend, dtype, match):
  with pytest.raises(ValueError, match=f"impl '{impl}' cannot run here: .*{match}"):
    attn_lib.resolve_impl(impl, dtype=dtype, head_dim=64, self_attention=True, backend=backend)


def test_auto_picks_per_backend_and_falls_back_with_a_warning(caplog):
  kw = dict(dtype=jnp.bfloat16, head_dim=64)
  assert attn_lib.resolve_impl('auto', backend='cpu', self_attention=True, **kw) == 'dense'
  # No GPU on this host: a GPU step targets sm90, where omni_hopper runs.
  assert attn_lib.resolve_impl('auto', backend='gpu', self_attention=True, **kw) == 'omni_hopper'
  assert attn_lib.resolve_impl('auto', backend='tpu', self_attention=True, **kw) == 'splash'
  # KV-cache calls run dense under the kernel, named or picked.
  for impl, backend in (('auto', 'gpu'), ('omni_hopper', 'gpu'), ('omni_flash', 'gpu'),
                        ('auto', 'tpu'), ('splash', 'tpu')):
    assert attn_lib.resolve_impl(impl, backend=backend, self_attention=False, **kw) == 'dense'
  with caplog.at_level(logging.WARNING):
    # float32: omni_hopper cannot, the Triton kernel can.
    assert attn_lib.resolve_impl('auto', backend='gpu', self_attention=True,
                                 dtype=jnp.float32, head_dim=64) == 'omni_flash'
  assert 'omni_hopper unavailable' in caplog.text and 'trying omni_flash' in caplog.text
  # SigLIP's head_dim 72 runs padded to 128.
  assert attn_lib.resolve_impl('auto', backend='gpu', self_attention=True,
                               dtype=jnp.bfloat16, head_dim=72) == 'omni_hopper'
  with caplog.at_level(logging.WARNING):
    # A head_dim neither GPU kernel takes.
    assert attn_lib.resolve_impl('auto', backend='gpu', self_attention=True,
                                 dtype=jnp.bfloat16, head_dim=512) == 'dense'
  assert 'omni_flash unavailable' in caplog.text
  with pytest.raises(ValueError, match="impl 'flash3'"):
    attn_lib.resolve_impl('flash3', backend='gpu', self_attention=True, **kw)


def test_pre_hopper_gpus_get_the_triton_kernel(monkeypatch, caplog):
  """An A100 (sm80): auto falls back to omni_flash with one warning; naming omni_hopper fails."""
  monkeypatch.setattr(attn_lib, 'gpu_compute_capability', lambda backend: '8.0')
  kw = dict(backend='gpu', self_attention=True, dtype=jnp.bfloat16, head_dim=128)
  with caplog.at_level(logging.WARNING):
    assert attn_lib.resolve_impl('auto', **kw) == 'omni_flash'
    assert attn_lib.resolve_impl('auto', **kw) == 'omni_flash'
  assert caplog.text.count('compute capability 8.0') == 1
  with pytest.raises(ValueError, match="impl 'omni_hopper' cannot run here: .*sm90.*8.0"):
    attn_lib.resolve_impl('omni_hopper', **kw)


@pytest.mark.parametrize('dtype,head_dim,match', [
    (jnp.float32, 128, 'bfloat16 or float16 inputs, got float32'),
    (jnp.bfloat16, 192, 'head_dim up to 128, got 192'),
    (jnp.bfloat16, 256, 'got 256'),
])
def test_omni_hopper_refuses_what_it_cannot_run(dtype, head_dim, match):
  with pytest.raises(ValueError, match=f"impl 'omni_hopper' cannot run here: .*{match}"):
    attn_lib.resolve_impl('omni_hopper', backend='gpu', self_attention=True, dtype=dtype,
                          head_dim=head_dim)
  with pytest.raises(ValueError, match='Mosaic GPU only'):
    attn_lib.resolve_impl('omni_hopper', backend='tpu', self_attention=True,
                          dtype=jnp.bfloat16, head_dim=128)


@pytest.mark.parametrize('seed', range(3))
def test_tile_ranges_split_reached_tiles_into_edges_and_interior(seed):
  """Against the brute-force mask, 16-slot blocks: every reached tile is in its range, the
  unreached are not, and tiles in the interior range are visible in full (no mask needed)."""
  rows = _random_rows(seed, rows=4) if seed else _long_rows(0)
  block = 16
  b, t = rows['segment_ids'].shape
  pad = (-t) % block
  rows = {k: np.pad(v, ((0, 0), (0, pad)) + ((0, 0),) * (v.ndim - 2)) for k, v in rows.items()}
  lo, hi = layout.key_bounds_BT(_info(rows))
  q_ranges, k_ranges = map(np.asarray, omni_hopper.tile_ranges(lo, hi, block))
  mask = _brute_force_mask(rows['segment_ids'], rows['span_ids'], 'omni')
  n = (t + pad) // block
  tiles = mask.reshape(b, n, block, n, block)
  reached, full = tiles.any((2, 4)), tiles.all((2, 4))
  for ranges, reach, whole in ((q_ranges, reached, full),
                               (k_ranges, reached.swapaxes(1, 2), full.swapaxes(1, 2))):
    j = np.arange(n)
    first, a, c, stop = (ranges[..., i, None] for i in range(4))
    np.testing.assert_array_equal((j >= first) & (j < stop), reach)
    assert np.all(whole[(j >= a) & (j < c)])
    assert np.all(~whole[reach & ~((j >= a) & (j < c))])  # edges: a mask is needed
  if not seed:  # the long rows hold both kinds
    assert full.any() and (reached & ~full).any()


def _hopper_row() -> dict:
  """One 180-slot row padded to three 64-blocks: a 140-token sample (text, a 9 x 10 image span
  crossing two blocks) so that some tiles are interior, a short second sample, padding."""
  rng = np.random.default_rng(0)

  def sample(grid, prefix):
    gh, gw = grid
    return seq.assemble([seq.Text(rng.integers(8, 100, prefix).tolist()),
                         seq.Image(rng.integers(0, 256, (gh * 2, gw * 2, 3), dtype=np.uint8),
                                   generate=True),
                         seq.Text(rng.integers(8, 100, 5).tolist())], 't2i', img_id=7,
                        patch_size=2)

  row = seq.pack([sample((9, 10), 40), sample((3, 3), 7)], 180, patch_size=2, pad_id=PAD_ID)
  return {k: row[k][None] for k in layout.FIELDS}


def test_omni_hopper_matches_dense_values_and_grads():
  """Mosaic GPU interpret mode: bf16 output and q/k/v grads against float32 dense attention."""
  from benchmarks.attention import check_against_dense
  rows = _hopper_row()
  info = _info(rows)
  lo, hi = layout.key_bounds_BT(info)
  t = rows['segment_ids'].shape[1]
  lo = jnp.pad(lo, ((0, 0), (0, 192 - t)), constant_values=192)
  hi = jnp.pad(hi, ((0, 0), (0, 192 - t)), constant_values=-1)
  q_ranges = np.asarray(omni_hopper.tile_ranges(lo, hi)[0])
  assert (q_ranges[..., 2] > q_ranges[..., 1]).any()  # interior tiles run unmasked
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(5, 1, t, 2, 1, 64))
  check = check_against_dense(
      lambda q, k, v: omni_hopper.omni_hopper_attention(q, k, v, info), q, k, v, info)
  assert check['ok'], check
  out = jax.eval_shape(lambda *a: omni_hopper.omni_hopper_attention(*a, info), q, k, v)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape


def test_a_head_dim_the_kernels_do_not_tile_runs_zero_padded():
  """SigLIP's head_dim 72 (omni_hopper pads it to 128) and 24 (omni_flash: to 32), in the
  kernels' interpret modes: values and q/k/v grads against dense attention at the true scale."""
  from benchmarks.attention import check_against_dense
  rows = _hopper_row()
  info = _info(rows)
  t = rows['segment_ids'].shape[1]
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(6, 1, t, 2, 1, 72))
  check = check_against_dense(
      lambda q, k, v: omni_hopper.omni_hopper_attention(q, k, v, info), q, k, v, info)
  assert check['ok'], check
  assert omni_flash.padded_head_dim(24) == 32 and omni_flash.padded_head_dim(8) == 16
  _check_against_dense(
      lambda q, k, v: omni_flash.omni_flash_attention(q, k, v, info, block_q=64, block_k=64),
      rows, 'omni', (2, 1), head_dim=24)


def test_omni_hopper_lowers_through_mosaic_gpu_for_sm90():
  """From this CPU host: the production call (bf16, head_dim 128, GQA 12 / 2) lowers forward,
  dq and dk/dv to Mosaic GPU kernels (compiled for sm90 on the device)."""
  info, q, kv = _production_call()
  text = _lower_for('cuda', lambda q, k, v: omni_hopper.omni_hopper_attention(
      q, k, v, info, interpret=False), q, kv, kv)
  assert text.count('stablehlo.custom_call @mosaic_gpu') == 3


def _long_rows(seed: int) -> dict:
  """Rows of 260 slots (two 128-slot blocks and a ragged third) whose longest image span
  (a 12 x 12 grid) is longer than a block, beside short spans, a text-only sample and padding."""
  rng = np.random.default_rng(seed)

  def sample(grids):
    pieces = [seq.Text(rng.integers(8, 100, int(rng.integers(3, 40))).tolist())]
    for gh, gw in grids:
      pieces.append(seq.Image(rng.integers(0, 256, (gh * 2, gw * 2, 3), dtype=np.uint8),
                              generate=bool(rng.random() < 0.5)))
      pieces.append(seq.Text(rng.integers(8, 100, int(rng.integers(1, 30))).tolist()))
    return seq.assemble(pieces, 't2i', img_id=7, patch_size=2)

  samples = [[sample([(12, 12)]), sample([(3, 5)])], [sample([(4, 4), (6, 9)])], [sample([])]]
  packed = [seq.pack(row, 260, patch_size=2, pad_id=PAD_ID) for row in samples]
  return {k: np.stack([r[k] for r in packed]) for k in layout.FIELDS}


@pytest.mark.parametrize('kind,heads', [('omni', (4, 2)), ('span', (2, 2))])
def test_omni_splash_matches_dense_values_and_grads(kind, heads):
  """Blocks of 128: the row pads to 384, the bands compiled are 128, 256 and 512 wide, and the
  12 x 12 span needs the 256 one (a 128 band would drop keys)."""
  rows = _long_rows(0)
  lo, hi = layout.key_bounds_BT(_info(rows), kind)
  reach = np.asarray(hi - (lo if kind == 'span' else jnp.arange(260)))
  assert 128 < reach.max() <= 256
  assert omni_splash.band_widths(384, 128) == (128, 256, 512)
  info = _info(rows)
  _check_against_dense(
      lambda q, k, v: omni_splash.omni_splash_attention(q, k, v, info, kind=kind, block=128),
      rows, kind, heads, head_dim=32)


def test_omni_splash_on_text_only_rows_runs_the_causal_part_alone():
  rows = _long_rows(1)
  text = {k: a[2:] for k, a in rows.items()}  # the text-only row
  assert not text['span_ids'].any()
  info = _info(text)
  _check_against_dense(
      lambda q, k, v: attn_lib.attention(q, k, v, info, info, impl='splash'), text, 'omni',
      (4, 1))


@pytest.mark.parametrize('impl', ['omni_flash', 'splash'])
def test_blockwise_kernels_run_per_shard_under_a_mesh(impl):
  """Rows split over data, heads over tensor: each device runs the kernel on its own shard."""
  from tuna2_jax import config_lib, sharding
  mesh = sharding.mesh_from_sizes(data=4, tensor=2)
  rules = config_lib.base(config_lib.shapes_model()).sharding_rules
  rows = _random_rows(11, rows=4)
  info = _info(rows)

  def attend(q, k, v):
    with sharding.activation_sharding(mesh, rules):
      return attn_lib.attention(q, k, v, info, info, impl=impl)

  _check_against_dense(jax.jit(attend), rows, 'omni', (4, 2))


def _lower_for(platform, fn, *args):
  """fn's forward and backward lowered for another platform, from this CPU host."""
  grad = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  return jax.jit(grad).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _production_call(t=2048, heads=(12, 2), d=128):
  """A tuna2_1_5b-shaped bf16 call: one row with a text prefix and a 1025-token image span."""
  span = np.zeros((1, t), np.int32)
  span[0, 100:1125] = 1
  info = layout.MaskInfo(jnp.ones((1, t), jnp.int32), jnp.arange(t)[None], jnp.asarray(span))
  q = jnp.zeros((1, t, heads[0], d), jnp.bfloat16)
  kv = jnp.zeros((1, t, heads[1], d), jnp.bfloat16)
  return info, q, kv


def test_omni_flash_lowers_through_triton_for_gpus():
  """The Pallas Triton lowering runs on this host: the production kernel (bf16, head_dim 128,
  64 x 64 blocks) lowers forward and backward, and a shape Triton cannot take is refused."""
  info, q, kv = _production_call()
  text = _lower_for('cuda', lambda q, k, v: omni_flash.omni_flash_attention(
      q, k, v, info, interpret=False), q, kv, kv)
  assert text.count('__gpu$xla.gpu.triton') == 3  # forward, dq, dk/dv
  with pytest.raises(ValueError, match='power of 2'):
    _lower_for('cuda', lambda q, k, v: omni_flash.omni_flash_attention(
        q, k, v, info, block_q=48, block_k=48, interpret=False), q, kv, kv)


@pytest.mark.parametrize('kind,calls', [('omni', 3 * (1 + 3)), ('span', 3 * 3)])
def test_omni_splash_lowers_through_mosaic_for_tpus(kind, calls):
  """Every compiled band (512, 1024, 2048 at 2048 slots) lowers forward and backward (the
  unfused backward: a dq and a dkv kernel per forward call)."""
  info, q, kv = _production_call()
  text = _lower_for('tpu', lambda q, k, v: omni_splash.omni_splash_attention(
      q, k, v, info, kind=kind, interpret=False), q, kv, kv)
  assert text.count('tpu_custom_call') == calls


@pytest.mark.parametrize('impl', ['omni_flash', 'splash'])
def test_the_model_under_a_blockwise_kernel_matches_dense(impl):
  """Tuna-R on a packed batch (decoder and flow head: omni; its encoder: span attention):
  outputs and every parameter's gradient equal the dense model's."""
  from flax import nnx

  from conftest import load_experiment, perturbed_params
  from tuna2_jax import objectives, train_state

  results = []
  for name in ('dense', impl):
    config = load_experiment('shapes', 'runlocal=True,vision=encoder')
    config.model.attention = name
    model = perturbed_params(train_state.build_model(config))
    batch = packed_pair(config.model.patch_size, 40, ((5, 3, 3, 3), (3, 2, 3, 4)))
    t = np.where(batch['gen_mask'], 0.4, 1.0).astype(np.float32)
    live = batch['segment_ids'] != 0

    def loss(model):
      hidden, x_hat = model(layout.Batch.from_rows(batch),
                            objectives.to_unit_range(batch['patches']), t)
      weights = np.linspace(-1, 1, hidden.shape[-1], dtype=np.float32)
      return jnp.sum((hidden * weights).sum(-1) * live) + jnp.sum(x_hat.sum(-1) * live), (
          hidden, x_hat)

    (_, outputs), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    results.append((outputs, jax.tree.leaves(grads)))
  (ref_out, ref_grads), (out, grads) = results
  for a, b in zip(ref_out, out):
    np.testing.assert_allclose(np.asarray(b)[live], np.asarray(a)[live], atol=1e-4)
  assert len(grads) == len(ref_grads)
  for a, b in zip(ref_grads, grads):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-3)


def _live_kernel_calls(jaxpr, counts=None) -> collections.Counter:
  """Kernel launches (pallas_call, Mosaic GPU's mpmd_map) in a jaxpr and its sub-jaxprs whose
  results something uses: what is left once the compiler drops dead code."""
  counts = collections.Counter() if counts is None else counts
  live = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      kept.append(eqn)
      live.update(v for v in eqn.invars if isinstance(v, jcore.Var))
  for eqn in kept:
    if eqn.primitive.name in ('pallas_call', 'mpmd_map'):
      counts[eqn.primitive.name] += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jcore.ClosedJaxpr):
          _live_kernel_calls(sub.jaxpr, counts)
        elif isinstance(sub, jcore.Jaxpr):
          _live_kernel_calls(sub, counts)
  return counts


@pytest.mark.parametrize('impl,kind', [('omni_flash', 'omni'), ('omni_hopper', 'omni'),
                                       ('splash', 'omni'), ('splash', 'span')])
def test_remat_reruns_a_kernel_forward_only_under_full(impl, kind):
  """A scanned, rematerialised layer: every policy but 'full' keeps the kernel's output and
  log-sum-exp, so the backward pass launches the same kernels as without remat; 'full' reruns
  the forward kernels once more. Traced only (omni_hopper as for a GPU step)."""
  from tuna2_jax.models.transformer import REMAT_POLICIES
  info, q, _ = _production_call(t=256, heads=(4, 2), d=64)
  attend = {'omni_flash': omni_flash.omni_flash_attention,
            'omni_hopper': omni_hopper.omni_hopper_attention,
            'splash': omni_splash.omni_splash_attention}[impl]
  interpret = {} if impl == 'omni_hopper' else {'interpret': True}

  def launches(remat):
    def layer(x, _):
      k, v = jnp.cos(x[:, :, :2]), x[:, :, 2:]  # q, k and v all need gradients
      return x + attend(jnp.sin(x), k, v, info, kind=kind, **interpret), None
    policy = REMAT_POLICIES[remat]
    body = layer if policy is None else jax.checkpoint(layer, policy=policy)
    loss = lambda x: jnp.sum(jax.lax.scan(body, x, None, length=2)[0].astype(jnp.float32))
    with mock.patch.object(sharding, 'target_platform', lambda: 'gpu'):
      return sum(_live_kernel_calls(jax.make_jaxpr(jax.grad(loss))(q).jaxpr).values())

  plain = launches('none')
  forward = {'splash': 2 if kind == 'omni' else 1}.get(impl, 1)  # the before and after parts
  assert plain == 3 * forward  # forward, dq, dk/dv
  for remat in REMAT_POLICIES:
    assert launches(remat) == plain + (forward if remat == 'full' else 0), remat
