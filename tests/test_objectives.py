"""Training objectives against hand computations: flow loss, chunked text loss, t and masking."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import load_experiment
from tuna2_jax import config_lib, flow, layout, objectives, sampling, train_state
from tuna2_jax.data import sequence as seq


def _flow_numpy(x_hat, x, t, target, t_eps):
  w = 1.0 / np.maximum(1.0 - t, t_eps) ** 2
  per_token = ((x_hat - x) ** 2).mean(-1) * w
  return (per_token * target).sum() / target.sum()


def test_flow_loss_matches_numpy_with_t_eps_clamp():
  rng = np.random.default_rng(0)
  x_hat, x = rng.normal(size=(2, 2, 6, 12)).astype(np.float32)
  t = rng.uniform(0, 1, (2, 6)).astype(np.float32)
  t[0, :3] = [0.97, 0.999, 1.0]  # 1 - t below t_eps: the weight is capped
  target = rng.random((2, 6)) < 0.6
  target[0, :3] = True
  loss, count = flow.flow_loss(x_hat, x, t, target, t_eps=0.05)
  assert float(count) == target.sum()
  np.testing.assert_allclose(float(loss), _flow_numpy(x_hat, x, t, target, 0.05), rtol=1e-5)
  # Non-target tokens do not count, however wrong their prediction.
  x_hat[~target] += 100.0
  np.testing.assert_allclose(float(flow.flow_loss(x_hat, x, t, target, 0.05)[0]),
                             float(loss), rtol=1e-5)


def test_v_loss_equals_weighted_x_loss():
  """mean |v_hat - (x - e)|^2 with v_hat = (x_hat - x_t) / (1 - t), where t_eps does not clamp."""
  rng = np.random.default_rng(1)
  x, x_hat = rng.normal(size=(2, 3, 5, 8))
  e = rng.normal(size=(3, 5, 8)) * 2.0
  t = rng.uniform(0.0, 0.9, (3, 5))
  x_t = t[..., None] * x + (1 - t[..., None]) * e
  v_hat = (x_hat - x_t) / np.maximum(1 - t, 0.05)[..., None]
  v_loss = ((v_hat - (x - e)) ** 2).mean()
  loss, _ = flow.flow_loss(jnp.asarray(x_hat, jnp.float32), jnp.asarray(x, jnp.float32),
                                 jnp.asarray(t, jnp.float32), np.ones((3, 5), bool), t_eps=0.05)
  np.testing.assert_allclose(float(loss), v_loss, rtol=1e-4)


def _ce_numpy(h, w, y, m):
  logits = h.reshape(-1, h.shape[-1]).astype(np.float64) @ w.astype(np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -logp[np.arange(len(logp)), y.reshape(-1)]
  return (nll * m.reshape(-1)).sum() / m.sum()


def _text_case(seed=2, b=2, t=13, d=8, v=11):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(b, t, d)).astype(np.float32)
  w = rng.normal(size=(d, v)).astype(np.float32)
  y = rng.integers(0, v, (b, t)).astype(np.int32)
  m = (rng.random((b, t)) < 0.5).astype(np.float32)
  return h, w, y, m


@pytest.mark.parametrize('chunk_size', [5, 7, 26, 4096])  # 26 tokens: chunks that do not divide
def test_chunked_text_loss_matches_numpy(chunk_size):
  h, w, y, m = _text_case()
  loss, count = objectives.text_loss(h, w, y, m, chunk_size=chunk_size)
  assert float(count) == m.sum()
  np.testing.assert_allclose(float(loss), _ce_numpy(h, w, y, m), rtol=1e-5)


def test_chunked_text_loss_gradient_matches_unchunked():
  h, w, y, m = _text_case(seed=3)

  def direct(h, w):
    logp = jax.nn.log_softmax(h @ w, axis=-1)
    nll = -jnp.take_along_axis(logp, y[..., None], -1)[..., 0]
    return jnp.sum(nll * m) / jnp.sum(m)

  chunked = lambda h, w: objectives.text_loss(h, w, y, m, chunk_size=5)[0]
  got = jax.grad(chunked, argnums=(0, 1))(h, w)
  want = jax.grad(direct, argnums=(0, 1))(h, w)
  for g, r in zip(got, want):
    assert np.abs(np.asarray(r)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


def _span_rows(rows: int, seed: int = 0) -> dict:
  """Rows packing a t2i sample (generated image), an mmu sample and an edit sample (clean source,
  generated target); images of 2x2 patches of size 2."""
  rng = np.random.default_rng(seed)
  img = lambda: rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  txt = lambda: seq.Text(rng.integers(8, 50, 2).tolist())
  samples = [
      seq.assemble([txt(), seq.Image(img(), generate=True), txt()], 't2i', img_id=7,
                   patch_size=2),
      seq.assemble([txt(), seq.Image(img()), txt()], 'mmu', img_id=7, patch_size=2),
      seq.assemble([txt(), seq.Image(img()), txt(), seq.Image(img(), generate=True)], 'edit',
                   img_id=7, patch_size=2)]
  row = seq.pack(samples, 36, patch_size=2, pad_id=0)
  return {k: np.repeat(v[None], rows, 0) for k, v in row.items()}


def _spans(batch):
  """(row, span id) -> token indices, for every image span of the batch."""
  out = {}
  for r, s in zip(*np.nonzero(batch['span_ids'])):
    out.setdefault((r, batch['span_ids'][r, s]), []).append(s)
  return out


def test_sample_timesteps_clean_spans_and_one_t_per_span():
  batch = _span_rows(8)
  t = np.asarray(flow.sample_timesteps(jax.random.key(0), batch, config_lib.flow()))
  for (r, _), idx in _spans(batch).items():
    assert np.all(t[r, idx] == t[r, idx[0]])  # the time token and all patches share one t
    if batch['gen_mask'][r, idx[0]]:
      assert 0 < t[r, idx[0]] < 1
    else:
      assert t[r, idx[0]] == 1.0
  assert np.all(t[batch['span_ids'] == 0] == 1.0)
  gen_t = t[batch['gen_mask'] & batch['is_time']]
  assert len(np.unique(gen_t)) == len(gen_t)  # independent draws per span


def test_sample_timesteps_follow_the_logit_normal():
  batch = _span_rows(300, seed=1)  # 600 generated spans
  obj = config_lib.flow(p_mean=-0.5, p_std=0.7)
  t = np.asarray(flow.sample_timesteps(jax.random.key(1), batch, obj))
  t = t[batch['gen_mask'] & batch['is_time']]
  n = np.log(t / (1 - t))
  assert len(n) == 600
  assert abs(n.mean() - obj.p_mean) < 0.1  # standard error 0.03
  assert abs(n.std() - obj.p_std) < 0.07


def test_noisy_understanding_images_stay_near_clean():
  batch = _span_rows(100, seed=2)
  t = np.asarray(flow.sample_timesteps(
      jax.random.key(2), batch, config_lib.flow(mmu_noisy_prob=0.5, mmu_noisy_max=0.1)))
  mmu = (batch['task'] == layout.TASK_IDS['mmu']) & batch['is_time']
  edit_source = (batch['task'] == layout.TASK_IDS['edit']) & batch['is_time'] & ~batch['gen_mask']
  assert np.all(t[edit_source] == 1.0)  # only understanding images are noised
  noisy = t[mmu] < 1.0
  assert 0.3 < noisy.mean() < 0.7
  assert np.all(t[mmu] >= 0.9)


def test_add_noise_interpolates_and_keeps_clean_tokens():
  rng = np.random.default_rng(3)
  x = rng.uniform(-1, 1, (2, 64, 48)).astype(np.float32)
  t = rng.uniform(0, 1, (2, 64)).astype(np.float32)
  t[0] = 1.0
  t[1, :8] = 0.0
  x_t, e = flow.add_noise(jax.random.key(3), x, t, noise_scale=2.0)
  x_t, e = np.asarray(x_t), np.asarray(e)
  np.testing.assert_array_equal(x_t[0], x[0])  # t = 1: exactly the clean image
  np.testing.assert_allclose(x_t[1, :8], e[1, :8], rtol=1e-6)  # t = 0: pure noise
  np.testing.assert_allclose(x_t, t[..., None] * x + (1 - t[..., None]) * e, rtol=1e-5, atol=1e-6)
  assert abs(e.std() - 2.0) < 0.05 and abs(e.mean()) < 0.05


def _masking(**overrides):
  m = ml_collections.ConfigDict(dict(enabled=True, start_fraction=0.6, sample_prob=0.5,
                                     max_ratio=0.5))
  m.update(overrides)
  return m


def _drop_rows(rows: int) -> dict:
  """Rows of two samples, each with two images of 36 patches (patch size 1)."""
  rng = np.random.default_rng(4)
  img = lambda: seq.Image(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
  sample = lambda: seq.assemble([seq.Text([2, 5]), img(), seq.Text([9, 4]), img(),
                                 seq.Text([9, 3])], 'edit', img_id=7, patch_size=1)
  row = seq.pack([sample(), sample()], 170, patch_size=1, pad_id=0)
  return {k: np.repeat(v[None], rows, 0) for k, v in row.items()}


def test_patch_drop_only_hits_patches_of_whole_chosen_samples():
  batch = _drop_rows(400)  # 800 samples, 1600 images
  drop = np.asarray(objectives.sample_patch_drop(jax.random.key(4), batch, _masking(), True))
  assert not drop[~batch['is_patch']].any()
  seg, span = batch['segment_ids'], batch['span_ids']
  per_sample = [drop[r, seg[r] == s] for r in range(400) for s in (1, 2)]
  hit = np.array([d.any() for d in per_sample])
  # Picked with probability 0.5; a picked sample drops nothing only when its ratio is tiny.
  assert 0.42 < hit.mean() < 0.56
  ratios = np.array([d.sum() / 72 for d in per_sample])[hit]
  assert 0.2 < ratios.mean() < 0.3  # U(0, 0.5) on average, once picked
  assert ratios.std() > 0.08  # each sample draws its own ratio
  # Both images of a sample are picked or left together.
  first, second = ([drop[r, (seg[r] == s) & (span[r] == 2 * s - 1 + k)].any()
                    for r in range(400) for s in (1, 2)] for k in (0, 1))
  assert np.mean(np.array(first) != np.array(second)) < 0.1


def test_patch_drop_off_when_inactive():
  batch = _drop_rows(20)
  drop = objectives.sample_patch_drop(jax.random.key(5), batch, _masking(sample_prob=1.0), False)
  assert not np.asarray(drop).any()
  cfg = _masking(start_fraction=0.5)
  assert not bool(objectives.masking_active(49, 100, cfg))
  assert bool(objectives.masking_active(50, 100, cfg))
  assert not bool(objectives.masking_active(99, 100, _masking(enabled=False)))


def test_compute_loss_combines_text_and_flow():
  config = load_experiment('shapes', 'runlocal=True')
  model = train_state.build_model(config)
  rng = np.random.default_rng(6)
  p = config.model.patch_size
  img = lambda: rng.integers(0, 256, (2 * p, 2 * p, 3), dtype=np.uint8)
  samples = [seq.assemble([seq.Text([2, 20, 21, 4]), seq.Image(img(), generate=True),
                           seq.Text([5, 3])], 't2i', img_id=6, patch_size=p),
             seq.assemble([seq.Text([2, 4]), seq.Image(img()),
                           seq.Text([5, 30, 31]), seq.Text([40, 41, 3], train=True)], 'mmu',
                          img_id=6, patch_size=p)]
  row = seq.pack(samples, 24, patch_size=p, pad_id=0)
  batch = {k: np.repeat(v[None], 2, 0) for k, v in row.items()}

  @nnx.jit(static_argnums=(3,))
  def loss(model, batch, key, coeffs):
    c = config.copy_and_resolve_references()
    c.objective.text_coeff, c.objective.flow_coeff = coeffs
    return objectives.compute_loss(model, batch, key, 0, c)

  key = jax.random.key(7)
  total, aux = loss(model, batch, key, (0.3, 2.5))
  _, unit = loss(model, batch, key, (1.0, 1.0))
  assert float(aux['text_loss']) > 0 and float(aux['flow_loss']) > 0
  np.testing.assert_allclose(float(aux['text_loss']), float(unit['text_loss']), rtol=1e-6)
  np.testing.assert_allclose(float(aux['flow_loss']), float(unit['flow_loss']), rtol=1e-6)
  np.testing.assert_allclose(float(total), 0.3 * float(unit['text_loss']) +
                             2.5 * float(unit['flow_loss']), rtol=1e-5)
  assert float(aux['text_tokens']) == 2 * 3  # the answer's 'train' tokens
  assert float(aux['flow_tokens']) == 2 * 4  # the generated image's 4 patches


class _Identity(nnx.Module):
  """x_hat = x_t: a loss of |x_t - x|^2 / (1 - t)^2 and a sampler that never moves its noise."""

  class decoder:  # noqa: N801  (what compute_loss reads of a model)
    lm_head_weight = staticmethod(lambda: jnp.zeros((4, 8), jnp.float32))

  def __call__(self, batch, x_BTP, t_BT, drop_BT=None):
    return jnp.zeros(x_BTP.shape[:2] + (4,), jnp.float32), x_BTP


def test_loss_and_sampler_read_the_same_flow_config():
  """config.flow.noise_scale scales the loss's noise and the sampler's starting noise alike."""
  config = load_experiment('shapes', 'runlocal=True')
  batch = _span_rows(2)
  gen = {'patches': np.full((2, 3, 12), 127, np.uint8), 'gen_mask': np.ones((2, 3), bool)}
  out = {}
  for scale in (0.1, 0.2):
    config.flow.noise_scale = scale
    _, aux = objectives.compute_loss(_Identity(), batch, jax.random.key(0), 0, config)
    x = sampling.sample_images(_Identity(), gen, jax.random.key(1), config.flow, steps=2,
                               clip=False)
    out[scale] = float(aux['flow_loss']), np.asarray(x)
  # e doubles: the loss (|e - x|^2, x the clean patches) grows; v_hat = 0 keeps the noise.
  assert out[0.2][0] > out[0.1][0] > 0
  np.testing.assert_allclose(out[0.2][1], 2 * out[0.1][1], rtol=1e-6)
