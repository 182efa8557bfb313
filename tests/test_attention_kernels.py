"""The attention kernels behind the entry point, against the dense reference; kernel selection."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_attention import _brute_force_mask, _random_rows
from tuna2_jax.kernels import omni_flash
from tuna2_jax.models import attention as attn_lib


def _info(rows) -> attn_lib.MaskInfo:
  return attn_lib.MaskInfo(jnp.asarray(rows['segment_ids']), jnp.asarray(rows['positions']),
                           jnp.asarray(rows['span_ids']))


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('kind', attn_lib.KINDS)
def test_key_bounds_are_the_omni_mask(seed, kind):
  rows = _random_rows(seed, rows=4)
  lo, hi = map(np.asarray, omni_flash.key_bounds(_info(rows), kind))
  j = np.arange(lo.shape[1])
  interval = (j[None, None] >= lo[..., None]) & (j[None, None] <= hi[..., None])
  np.testing.assert_array_equal(interval, _brute_force_mask(rows['segment_ids'],
                                                            rows['span_ids'], kind))


def _qkv(seed, b, t, h, g, d, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, h, d), dtype), jax.random.normal(kk, (b, t, g, d), dtype),
          jax.random.normal(kv, (b, t, g, d), dtype))


@pytest.mark.parametrize('seed,kind,heads', [(1, 'omni', (6, 2)), (2, 'span', (4, 4))])
def test_omni_flash_matches_dense_values_and_grads(seed, kind, heads):
  """Blocks of 16 over rows of ~40-70 slots: several key blocks, ragged tails, padding."""
  rows = _random_rows(seed, rows=3)
  info = _info(rows)
  b, t = rows['segment_ids'].shape
  q, k, v = _qkv(seed, b, t, *heads, 16)
  mask = attn_lib.omni_mask(info, info, kind)
  live = np.asarray(mask.any(-1))  # rows with no keys are padding: any output is fine there
  w = jax.random.normal(jax.random.key(seed + 100), q.shape) * live[..., None, None]

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * w)

  dense = lambda q, k, v: attn_lib.dense_attention(q, k, v, mask)
  flash = lambda q, k, v: omni_flash.omni_flash_attention(q, k, v, info, kind=kind, block_q=16,
                                                          block_k=16)
  out_d, out_f = dense(q, k, v), flash(q, k, v)
  np.testing.assert_allclose(np.asarray(out_f)[live], np.asarray(out_d)[live], atol=2e-5)
  assert np.all(np.asarray(out_f)[~live] == 0)
  grads_d = jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2))(q, k, v)
  grads_f = jax.grad(lambda *a: loss(flash, *a), argnums=(0, 1, 2))(q, k, v)
  for name, gd, gf in zip('qkv', grads_d, grads_f):
    np.testing.assert_allclose(np.asarray(gf), np.asarray(gd), atol=5e-5, err_msg=f'd{name}')


def test_omni_flash_bfloat16_close_to_float32_reference():
  rows = _random_rows(7, rows=2)
  info = _info(rows)
  b, t = rows['segment_ids'].shape
  q, k, v = _qkv(7, b, t, 4, 2, 32)
  mask = attn_lib.omni_mask(info, info, 'omni')
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
  live = np.asarray(attn_lib.omni_mask(info, info).any(-1))
  dense = attn_lib.attention(q, k, v, info, info, impl='dense')
  flash = attn_lib.attention(q, k, v, info, info, impl='omni_flash')
  np.testing.assert_allclose(np.asarray(flash)[live], np.asarray(dense)[live], atol=2e-5)


@pytest.mark.parametrize('impl,backend,dtype,match', [
    ('cudnn', 'cpu', jnp.bfloat16, 'needs a GPU'),
    ('cudnn', 'gpu', jnp.float32, 'bfloat16 or float16'),
    ('splash', 'gpu', jnp.bfloat16, 'static masks'),
    ('omni_flash', 'tpu', jnp.bfloat16, 'Triton'),
])
def test_named_kernel_the_backend_lacks_is_a_clear_error(impl, backend, dtype, match):
  with pytest.raises(ValueError, match=f"impl '{impl}' cannot run here: .*{match}"):
    attn_lib.resolve_impl(impl, dtype=dtype, head_dim=64, self_attention=True, backend=backend)


def test_auto_picks_per_backend_and_falls_back_with_a_warning(caplog):
  kw = dict(dtype=jnp.bfloat16, head_dim=64)
  assert attn_lib.resolve_impl('auto', backend='cpu', self_attention=True, **kw) == 'dense'
  assert attn_lib.resolve_impl('auto', backend='gpu', self_attention=True, **kw) == 'omni_flash'
  # KV-cache calls run dense under the kernel, named or picked.
  for impl in ('auto', 'omni_flash'):
    assert attn_lib.resolve_impl(impl, backend='gpu', self_attention=False, **kw) == 'dense'
  with caplog.at_level(logging.WARNING):
    # The omni mask on TPU, where splash cannot take it; a head_dim Triton blocks cannot tile.
    assert attn_lib.resolve_impl('auto', backend='tpu', self_attention=True, **kw) == 'dense'
    assert attn_lib.resolve_impl('auto', backend='gpu', self_attention=True,
                                 dtype=jnp.bfloat16, head_dim=72) == 'dense'
  assert 'splash unavailable' in caplog.text and 'omni_flash unavailable' in caplog.text
  with pytest.raises(ValueError, match="impl 'flash3'"):
    attn_lib.resolve_impl('flash3', backend='gpu', self_attention=True, **kw)


def test_omni_flash_runs_per_shard_under_a_mesh():
  """Rows split over data, heads over tensor: each device runs the kernel on its own shard."""
  from tuna2_jax import config_lib, sharding
  mesh = sharding.mesh_from_sizes(data=4, tensor=2)
  rules = config_lib.base(config_lib.shapes_model()).sharding_rules
  rows = _random_rows(11, rows=4)
  info = _info(rows)
  b, t = rows['segment_ids'].shape
  q, k, v = _qkv(11, b, t, 4, 2, 16)
  mask = attn_lib.omni_mask(info, info)
  live = np.asarray(mask.any(-1))

  def loss(q, k, v):
    with sharding.activation_sharding(mesh, rules):
      out = attn_lib.attention(q, k, v, info, info, impl='omni_flash')
    return jnp.sum(out * live[..., None, None]), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  dense_loss = lambda q, k, v: jnp.sum(attn_lib.dense_attention(q, k, v, mask) *
                                       live[..., None, None])
  np.testing.assert_allclose(np.asarray(out)[live],
                             np.asarray(attn_lib.dense_attention(q, k, v, mask))[live], atol=2e-5)
  for gf, gd in zip(grads, jax.grad(dense_loss, argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(gf), np.asarray(gd), atol=5e-5)
