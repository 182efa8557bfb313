"""The flow head's conditioning runs once per image span: same loss and gradients as per token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_experiment, perturbed_params
from tuna2_jax import layout, objectives, train_state
from tuna2_jax.data import sequence as seq
from tuna2_jax.models import flow_head, tuna


def _batch(p: int) -> layout.Batch:
  """Two rows: a t2i sample and an mmu sample with three spans in all, then padding."""
  rng = np.random.default_rng(3)
  img = lambda: rng.integers(0, 256, (2 * p, 2 * p, 3), dtype=np.uint8)
  samples = [seq.assemble([seq.Text([2, 20, 21, 4]), seq.Image(img(), generate=True),
                           seq.Text([5, 3])], 't2i', img_id=6, patch_size=p),
             seq.assemble([seq.Text([2, 4]), seq.Image(img()), seq.Text([5, 4]),
                           seq.Image(img()), seq.Text([40, 41, 3], train=True)], 'mmu',
                          img_id=6, patch_size=p)]
  rows = [seq.pack(samples, 40, patch_size=p, pad_id=0), seq.pack(samples[::-1], 40,
                                                                   patch_size=p, pad_id=0)]
  return layout.Batch.from_rows({k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]})


class _PerToken:
  """The modulation as the head computed it per token: ada(silu(c)) at every token, the
  identity at text tokens (what span_modulation + per_token replace)."""

  def __init__(self, ada, c_BSD, n, i):
    self.ada, self.c_BSD, self.n, self.i = ada, c_BSD, n, i


def _per_token_modulation(ada, c_BSD, n):
  return [_PerToken(ada, c_BSD, n, i) for i in range(n)]


def _gather(table, span_ids_BT):
  if not isinstance(table, _PerToken):  # the time tokens' embedding
    return jnp.take_along_axis(table, span_ids_BT[..., None], axis=1)
  c_BTD = jnp.take_along_axis(table.c_BSD, span_ids_BT[..., None], axis=1)
  m = jnp.split(table.ada(jax.nn.silu(c_BTD)), table.n, axis=-1)[table.i]
  return jnp.where((span_ids_BT > 0)[..., None], m, 1.0 if table.i % 3 == 2 else 0.0)


def _loss_and_grads(config, model, batch):
  def loss_fn(params):
    m = nnx.merge(graphdef, params)
    return objectives.compute_loss(m, batch, jax.random.key(5), 0, config)[0]

  graphdef, params = nnx.split(model, nnx.Param)
  return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_span_times_reads_each_spans_t():
  span_ids = jnp.asarray([[0, 1, 1, 1, 0, 2, 2, 0], [3, 3, 0, 0, 0, 0, 0, 0]])
  t = jnp.where(span_ids == 1, 0.25, jnp.where(span_ids == 2, 0.5,
                                               jnp.where(span_ids == 3, 0.75, 1.0)))
  np.testing.assert_array_equal(tuna.span_times(t, span_ids, 4),
                                [[1, 0.25, 0.5, 1, 1], [1, 1, 1, 0.75, 1]])


def test_per_span_conditioning_equals_per_token(monkeypatch):
  config = load_experiment('shapes', 'runlocal=True')
  model = perturbed_params(train_state.build_model(config))  # non-zero AdaLN and output
  batch = _batch(config.model.patch_size)
  loss, grads = _loss_and_grads(config, model, batch)
  monkeypatch.setattr(flow_head, 'span_modulation', _per_token_modulation)
  monkeypatch.setattr(flow_head, 'per_token', _gather)
  monkeypatch.setattr(tuna, 'per_token', _gather)
  ref_loss, ref_grads = _loss_and_grads(config, model, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_rows_are_packed_within_max_spans():
  from tuna2_jax.data import packing
  import grain
  p = 8
  img = np.zeros((p, p, 3), np.uint8)
  sample = seq.assemble([seq.Text([2]), seq.Image(img), seq.Image(img)], 'mmu', img_id=6,
                        patch_size=p)  # 2 spans of 2 tokens, 5 tokens
  source = grain.MapDataset.source([sample] * 3).to_iter_dataset()
  rows = list(packing.FirstFitPackIterDataset(source, seq_len=64, num_bins=2, patch_size=p,
                                              pad_id=0, max_spans=4))
  assert [int(r['span_ids'].max()) for r in rows] == [4, 2]  # a third sample would make 6
  with pytest.raises(ValueError, match='max_spans=1'):
    list(packing.FirstFitPackIterDataset(source, seq_len=64, num_bins=2, patch_size=p, pad_id=0,
                                         max_spans=1))
