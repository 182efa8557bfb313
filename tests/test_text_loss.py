"""The text cross-entropy chunks per device under a mesh: same loss and gradients as chunking
the whole batch, and no collective inside the chunk loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tuna2_jax import objectives, sharding

RULES = (('batch', ('data', 'fsdp')), ('activation_length', None), ('activation_embed', None),
         ('embed', 'fsdp'), ('vocab', 'tensor'))


def reference_text_loss(hidden_BTD, head_DV, targets_BT, loss_mask_BT, chunk_size=4096):
  """The loss as computed before per-shard chunking: chunks of the global token axis."""
  d = hidden_BTD.shape[-1]
  h_ND = hidden_BTD.reshape(-1, d)
  y_N, m_N = targets_BT.reshape(-1), loss_mask_BT.reshape(-1).astype(jnp.float32)
  n = h_ND.shape[0]
  chunk = min(chunk_size, n)
  pad = (-n) % chunk
  h_ND = jnp.pad(h_ND, ((0, pad), (0, 0)))
  y_N, m_N = jnp.pad(y_N, (0, pad)), jnp.pad(m_N, (0, pad))

  @jax.checkpoint
  def chunk_nll(h_CD, y_C, m_C):
    logits = jnp.dot(h_CD, head_DV.astype(h_CD.dtype), preferred_element_type=jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y_C[:, None], 1)[:, 0]
    return jnp.sum(nll * m_C)

  def body(total, xs):
    return total + chunk_nll(*xs), None

  shape = (-1, chunk)
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (h_ND.reshape(*shape, d), y_N.reshape(shape), m_N.reshape(shape)))
  count = loss_mask_BT.astype(jnp.float32).sum()
  return total / jnp.maximum(count, 1.0), count


def _inputs(b=8, t=24, d=16, v=40):
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  head = (rng.normal(size=(d, v)) / 4).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  mask = (rng.uniform(size=(b, t)) < 0.6).astype(np.float32)
  return hidden, head, targets, mask


def _loss_and_grads(loss_fn, mesh, args, chunk_size):
  """(jitted value-and-grad, its result) with the inputs split over the mesh as in training."""
  hidden, head, targets, mask = args

  def f(hidden, head):
    with sharding.activation_sharding(mesh, RULES):
      return loss_fn(hidden, head, targets, mask, chunk_size)[0]

  rows = NamedSharding(mesh, P(('data', 'fsdp')))
  fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1)),
               in_shardings=(rows, NamedSharding(mesh, P('fsdp'))))
  return fn, fn(hidden, head)


@pytest.mark.parametrize('mesh_sizes', [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
@pytest.mark.parametrize('chunk_size', [16, 4096])
def test_per_shard_loss_and_grads_equal_the_global_chunking(mesh_sizes, chunk_size):
  mesh = sharding.mesh_from_sizes(**mesh_sizes)
  args = _inputs()
  _, (loss, (d_hidden, d_head)) = _loss_and_grads(objectives.text_loss, mesh, args, chunk_size)
  _, (ref, (ref_hidden, ref_head)) = _loss_and_grads(reference_text_loss, mesh, args,
                                                     chunk_size)
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(d_hidden), np.asarray(ref_hidden), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(d_head), np.asarray(ref_head), rtol=1e-5, atol=1e-7)


def _while_bodies(hlo: str) -> list[str]:
  """The text of every computation that is the body of a while loop in an HLO module."""
  names = set(re.findall(r'body=%?([\w.\-]+)', hlo))
  blocks = re.split(r'\n(?=(?:ENTRY )?%?[\w.\-]+ \()', hlo)
  return [blk for blk in blocks if re.match(r'(?:ENTRY )?%?([\w.\-]+)', blk).group(1) in names]


def test_no_collective_runs_inside_the_chunk_loop():
  mesh = sharding.mesh_from_sizes(fsdp=8)
  args = _inputs()
  fn, _ = _loss_and_grads(objectives.text_loss, mesh, args, chunk_size=16)
  hlo = fn.lower(*args[:2]).compile().as_text()
  bodies = _while_bodies(hlo)
  assert bodies  # forward and backward chunk loops
  for body in bodies:
    assert not re.search(r'all-reduce|all-gather|collective-permute|reduce-scatter', body)
  ref_fn, _ = _loss_and_grads(reference_text_loss, mesh, args, chunk_size=16)
  ref_hlo = ref_fn.lower(*args[:2]).compile().as_text()
  # The check can fail: the global chunking has collectives in its loop.
  assert any(re.search(r'all-reduce|all-gather', b) for b in _while_bodies(ref_hlo))


@pytest.mark.parametrize('target_share, chunk_size', [(0.0, 5), (0.08, 5), (1.0, 64)])
def test_target_gather_equals_every_token_loss(target_share, chunk_size):
  """Sparse targets (a t2i-heavy batch has ~8%), none, all; chunks that do not divide the rows."""
  mesh = sharding.mesh_from_sizes(fsdp=8)
  hidden, head, targets, _ = _inputs()
  mask = (np.random.default_rng(1).uniform(size=targets.shape) < target_share).astype(np.float32)
  args = (hidden, head, targets, mask)
  _, (loss, (d_hidden, d_head)) = _loss_and_grads(objectives.text_loss, mesh, args, chunk_size)
  _, (ref, (ref_hidden, ref_head)) = _loss_and_grads(reference_text_loss, mesh, args,
                                                     chunk_size)
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(d_hidden), np.asarray(ref_hidden), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(d_head), np.asarray(ref_head), rtol=1e-5, atol=1e-7)
  assert not np.any(np.asarray(d_hidden)[mask == 0])


def test_lm_head_never_sees_non_target_tokens():
  """A NaN at a non-target token would poison every-token logits (nan * 0 = nan); gathered
  targets never read it."""
  mesh = sharding.mesh_from_sizes(fsdp=8)
  hidden, head, targets, mask = _inputs()
  hidden = np.where(mask[..., None] > 0, hidden, np.nan).astype(np.float32)
  args = (hidden, head, targets, mask)
  _, (loss, (d_hidden, d_head)) = _loss_and_grads(objectives.text_loss, mesh, args, 16)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(d_head)))
  assert np.all(np.isfinite(np.asarray(d_hidden)))
  _, (ref, _) = _loss_and_grads(reference_text_loss, mesh, args, 16)
  assert np.isnan(float(ref))  # the check can fail: the every-token loss reads them


def test_chunks_without_targets_skip_the_lm_head():
  mesh = sharding.mesh_from_sizes(fsdp=8)
  args = _inputs()
  fn, _ = _loss_and_grads(objectives.text_loss, mesh, args, chunk_size=16)
  bodies = _while_bodies(fn.lower(*args[:2]).compile().as_text())
  # forward and backward chunk loops each branch on whether the chunk holds a target
  assert sum('conditional(' in b for b in bodies) >= 2
