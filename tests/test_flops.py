"""Analytic model FLOPs: the attended-key count matches the mask, the total matches XLA's count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_experiment
from test_attention import _brute_force_mask, _random_rows
from tuna2_jax import flops, objectives, train_state
from tuna2_jax.data import sequence as seq


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('kind', ['omni', 'span'])
def test_attended_keys_count_the_brute_force_mask(seed, kind):
  batch = _random_rows(seed)
  span_ids = batch['span_ids']
  if kind == 'span':  # the vision encoder's mask: patches see the patches of their image
    span_ids = np.where(batch['is_patch'], span_ids, 0)
  want = _brute_force_mask(batch['segment_ids'], span_ids, kind).sum(-1)
  got = flops.attended_keys(batch['segment_ids'], span_ids, kind)
  if kind == 'span':
    want = np.where(span_ids > 0, want, 0)
  np.testing.assert_array_equal(got, want)


def _one_image_row(config, grid: int) -> dict:
  """A row that is one image span and nothing else: the dense kernel computes exactly the
  attention the analytic count sees (all of it bidirectional)."""
  p = config.model.patch_size
  pixels = np.random.default_rng(0).integers(0, 256, (grid * p, grid * p, 3), dtype=np.uint8)
  row = seq.assemble([seq.Image(pixels, generate=True)], 't2i', img_id=7, patch_size=p)
  return {k: v[None] for k, v in row.items()}


@pytest.mark.parametrize('vision', ['patch', 'encoder'])
def test_forward_flops_match_xla_cost_analysis(vision):
  config = load_experiment('shapes', f'vision={vision}')
  config.model.vocab_size = 512
  # XLA's cost analysis counts a scanned (while-loop) body once, whatever its trip count, so the
  # layer stacks are one layer deep here.
  for part in ('decoder', 'head', 'encoder'):
    config.model[part].num_layers = 1
  batch = _one_image_row(config, grid=8)
  model = train_state.build_model(config)
  graphdef, params = nnx.split(model, nnx.Param)
  t = jnp.full(batch['segment_ids'].shape, 0.5)

  def forward(params, batch):
    m = nnx.merge(graphdef, params)
    hidden, x_hat = m(batch, objectives.to_unit_range(batch['patches']), t)
    return m.decoder.logits(hidden), x_hat

  compiled = jax.jit(forward).lower(params, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost['flops'])
  ours = flops.forward_flops(config.model, batch)
  print(f'\n  {vision}: analytic {ours:.4g} FLOPs, XLA {xla:.4g} ({ours / xla:.3f})')
  # XLA also counts elementwise work (norms, softmax, activations) and, for the encoder, runs
  # the ViT at the time token too; matmuls dominate at these widths.
  assert 0.88 < ours / xla <= 1.0


def test_train_step_is_three_forward_passes():
  config = load_experiment('shapes', 'runlocal=True')
  batch = _random_rows(0, patch_size=config.model.patch_size)
  assert flops.train_step_flops(config.model, batch) == pytest.approx(
      3 * flops.forward_flops(config.model, batch))
  padded = dict(batch, segment_ids=np.zeros_like(batch['segment_ids']))
  assert flops.forward_flops(config.model, padded) == 0.0


@pytest.mark.parametrize('kind, peak', [('NVIDIA H100 80GB HBM3', 989e12), ('TPU v5p', 459e12),
                                        ('TPU v5', 459e12), ('TPU v5 lite', 197e12),
                                        ('TPU v6 lite', 918e12), ('cpu', None)])
def test_peak_flops_by_device_kind(kind, peak):
  assert flops.peak_flops(kind) == peak
