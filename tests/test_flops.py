"""Analytic FLOPs: the attended-key count matches the mask; the executed (hardware) count and
remat's recompute match XLA's count; model FLOPs leave out padding and unneeded work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_experiment
from test_attention import _brute_force_mask, _random_rows
from tuna2_jax import flops, layout, objectives, train_state
from tuna2_jax.data import sequence as seq
from tuna2_jax.models.transformer import REMAT_POLICIES

typed = layout.Batch.from_rows


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('kind', ['omni', 'span'])
def test_attended_keys_count_the_brute_force_mask(seed, kind):
  batch = _random_rows(seed)
  span_ids = batch['span_ids']
  if kind == 'span':  # the vision encoder's mask: patches see the patches of their image
    span_ids = np.where(batch['is_patch'], span_ids, 0)
  want = _brute_force_mask(batch['segment_ids'], span_ids, kind).sum(-1)
  got = layout.attended_keys_BT(batch['segment_ids'], span_ids, kind)
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


def _one_layer_config(vision: str):
  config = load_experiment('shapes', f'vision={vision}')
  config.model.vocab_size = 512
  # XLA's cost analysis counts a scanned (while-loop) body once, whatever its trip count, so the
  # layer stacks are one layer deep here.
  for part in ('decoder', 'head', 'encoder'):
    config.model[part].num_layers = 1
  return config


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


@pytest.mark.parametrize('vision,shared', [('patch', False), ('encoder', False), ('patch', True)])
def test_hardware_forward_flops_match_xla_cost_analysis(vision, shared):
  """shared: one time embedder for the time tokens and the head (the official convention)."""
  config = _one_layer_config(vision)
  config.model.time_embed_shared = shared
  batch = _one_image_row(config, grid=8)
  batch['loss_mask'] = np.ones_like(batch['loss_mask'])  # logits below run at every token
  batch = layout.Batch.from_rows(batch)
  model = train_state.build_model(config)
  graphdef, params = nnx.split(model, nnx.Param)
  t = jnp.full(batch.segment_ids_BT.shape, 0.5)

  def forward(params, batch):
    m = nnx.merge(graphdef, params)
    hidden, x_hat = m(batch, objectives.to_unit_range(batch.patches_BTP), t)
    return m.decoder.logits(hidden), x_hat

  xla = _xla_flops(forward, params, batch)
  ours = flops.hardware_forward_flops(config.model, batch)
  print(f'\n  {vision}: analytic {ours:.4g} FLOPs, XLA {xla:.4g} ({ours / xla:.3f})')
  # XLA also counts elementwise work (norms, softmax, activations); matmuls dominate here.
  assert 0.88 < ours / xla <= 1.0


def test_remat_recompute_matches_xla_cost_analysis():
  """The backward pass under remat='full' runs the layer stacks' forward once more."""
  config = _one_layer_config('patch')
  # One layer deep, XLA inlines the layer loop and merges the recomputed per-span tables (which
  # do not depend on the residual stream) with the forward's; in a real stack they are rerun.
  # One span per row keeps the tables negligible here.
  config.model.max_spans = 1
  batch = layout.Batch.from_rows(_one_image_row(config, grid=4))
  t = jnp.full(batch.segment_ids_BT.shape, 0.5)

  def step_flops(remat):
    config.model.remat = remat
    graphdef, params = nnx.split(train_state.build_model(config), nnx.Param)

    def loss(params):
      m = nnx.merge(graphdef, params)
      hidden, x_hat = m(batch, objectives.to_unit_range(batch.patches_BTP), t)
      return jnp.sum(hidden.astype(jnp.float32) ** 2) + jnp.sum(x_hat ** 2)
    return _xla_flops(jax.grad(loss), params)

  xla_extra = step_flops('full') - step_flops('none')
  ours = flops.remat_recompute_flops(config.model, batch, 'full')
  print(f'\n  remat full: analytic recompute {ours:.4g} FLOPs, XLA {xla_extra:.4g}')
  assert 0.85 < ours / xla_extra < 1.15


def test_model_flops_count_only_useful_work():
  config = load_experiment('shapes', 'runlocal=True')
  m, d = config.model, config.model.decoder.width
  batch = _random_rows(0, patch_size=m.patch_size)
  base = flops.forward_flops(m, typed(batch))
  # The LM head counts at text targets only: one more target adds exactly one token's head.
  r, i = np.argwhere((batch['segment_ids'] > 0) & (batch['loss_mask'] == 0))[0]
  more = {k: v.copy() for k, v in batch.items()}
  more['loss_mask'][r, i] = 1.0
  assert flops.forward_flops(m, typed(more)) - base == pytest.approx(2 * d * m.vocab_size)
  # Padding slots: hardware work, no model work.
  padded = {k: np.concatenate([v, np.zeros_like(v[:, :7])], axis=1) for k, v in batch.items()}
  assert flops.forward_flops(m, typed(padded)) == pytest.approx(base)
  assert (flops.hardware_forward_flops(m, typed(padded))
          > flops.hardware_forward_flops(m, typed(batch)))
  # Modulation per span (model) vs per token (hardware).
  assert base < flops.hardware_forward_flops(m, typed(batch))


def test_train_step_is_three_forward_passes():
  config = load_experiment('shapes', 'runlocal=True')
  batch = typed(_random_rows(0, patch_size=config.model.patch_size))
  assert flops.train_step_flops(config.model, batch) == pytest.approx(
      3 * flops.forward_flops(config.model, batch))
  assert flops.hardware_step_flops(config.model, batch) == pytest.approx(
      3 * flops.hardware_forward_flops(config.model, batch)
      + flops.remat_recompute_flops(config.model, batch))
  padded = batch.replace(segment_ids_BT=np.zeros_like(batch.segment_ids_BT))
  assert flops.forward_flops(config.model, padded) == 0.0


def test_every_remat_policy_has_a_recompute_count():
  config = load_experiment('shapes', 'runlocal=True')
  batch = typed(_random_rows(0, patch_size=config.model.patch_size))
  assert set(flops.REMAT_RECOMPUTE) == set(REMAT_POLICIES)
  for remat in REMAT_POLICIES:
    extra = flops.remat_recompute_flops(config.model, batch, remat)
    assert (extra == 0) == (remat == 'none'), remat
  with pytest.raises(ValueError, match="remat 'everything'"):
    flops.remat_recompute_flops(config.model, batch, 'everything')


def test_attention_reruns_under_remat_only_where_no_kernel_keeps_its_residuals():
  """The blockwise kernels keep their output and log-sum-exp under every policy but 'full';
  dense attention keeps nothing and reruns under every policy but 'none'."""
  config = load_experiment('shapes', 'runlocal=True')
  batch = typed(_random_rows(0, patch_size=config.model.patch_size))

  def recompute(impl, remat):
    config.model.attention = impl
    return flops.remat_recompute_flops(config.model, batch, remat, backend='cpu')

  attention = recompute('dense', 'dots') - recompute('omni_flash', 'dots')
  assert attention > 0 and recompute('omni_flash', 'dots') == 0
  assert recompute('auto', 'dots') == attention  # auto is dense on a CPU
  for remat in ('dots_no_batch', 'save_qkv_attn'):
    assert recompute('dense', remat) == pytest.approx(recompute('omni_flash', remat) + attention)
  assert recompute('dense', 'full') == recompute('omni_flash', 'full')


@pytest.mark.parametrize('kind, peak', [('NVIDIA H100 80GB HBM3', 989e12), ('TPU v5p', 459e12),
                                        ('TPU v5', 459e12), ('TPU v5 lite', 197e12),
                                        ('TPU v6 lite', 918e12), ('cpu', None)])
def test_peak_flops_by_device_kind(kind, peak):
  assert flops.peak_flops(kind) == peak


def test_a_step_training_some_parts_counts_their_backward_only():
  """Tuna-R alignment (the connector alone): no backward pass through the frozen ViT, input
  gradients through what the connector feeds, weight gradients for the connector only; as XLA
  counts the gradient of the connector's parameters alone."""
  config = _one_layer_config('encoder')
  config.model.max_spans = 1  # the tables at one row per span, as model FLOPs count them
  batch = layout.Batch.from_rows(_one_image_row(config, grid=4))
  _, params = train_state.abstract_model(config)
  assert train_state.trained_parts(config) is None  # optim.trainable='': every part
  config.optim.trainable = 'connector'
  trained = train_state.trained_parts(config, params)
  assert trained == {'connector'}
  parts = flops.forward_flops_by_part(config.model, batch)
  assert sum(parts.values()) == pytest.approx(flops.forward_flops(config.model, batch))
  step = flops.train_step_flops(config.model, batch, trained)
  fed = parts['decoder'] + parts['head'] + parts['lm_head']
  assert step == pytest.approx(sum(parts.values()) + parts['connector'] + fed)
  assert step < flops.train_step_flops(config.model, batch) - 2 * parts['vision']
  config.optim.trainable = '.'  # a pattern that trains everything counts as no pattern
  assert train_state.trained_parts(config, params) is None

  model = train_state.build_model(config)
  graphdef, state = nnx.split(model, nnx.Param)
  labels = train_state.trainable_labels(state, 'connector')
  t = jnp.full(batch.segment_ids_BT.shape, 0.5)

  def loss(trained_params):
    merged = jax.tree.map(lambda l, p, q: p if l == 'train' else q, labels,
                          trained_params, jax.lax.stop_gradient(state))
    m = nnx.merge(graphdef, merged)
    hidden, x_hat = m(batch, objectives.to_unit_range(batch.patches_BTP), t)
    return jnp.sum(hidden.astype(jnp.float32) ** 2) + jnp.sum(x_hat ** 2)

  xla = _xla_flops(jax.grad(loss), state)
  print(f'\n  align step: analytic {step:.4g} FLOPs, XLA {xla:.4g} ({step / xla:.3f})')
  assert 0.85 < step / xla <= 1.05
