"""Samplers: the flow ODE recovers a known distribution; CFG; KV-cached decoding = recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_experiment, perturbed_params
from tuna2_jax import config_lib, objectives, sampling, train_state
from tuna2_jax.data import sequence as seq
from tuna2_jax.data import tasks
from tuna2_jax.data.tokenizer import Tokenizer


class GaussianPosterior(nnx.Module):
  """The exact x-predictor E[x | x_t] for data x ~ N(mu, sigma^2) and noise e ~ N(0, s^2).

  x_t = t x + (1 - t) e is Gaussian jointly with x, so conditioning gives
  E[x | x_t] = mu + t sigma^2 / (t^2 sigma^2 + (1 - t)^2 s^2) * (x_t - t mu).
  """

  def __init__(self, mu: float, sigma: float, noise_scale: float):
    self.mu, self.sigma, self.s = mu, sigma, noise_scale

  def __call__(self, batch, x_BTP, t_BT):
    t = t_BT[..., None]
    gain = t * self.sigma ** 2 / (t ** 2 * self.sigma ** 2 + (1 - t) ** 2 * self.s ** 2)
    return None, self.mu + gain * (x_BTP - t * self.mu)


def _noise_batch(rows: int, tokens: int, dim: int) -> dict:
  """What sample_images reads: the pixel blocks' shape and which tokens to generate."""
  return {'patches': np.zeros((rows, tokens, dim), np.uint8),
          'gen_mask': np.ones((rows, tokens), bool)}


@pytest.mark.slow
@pytest.mark.parametrize('sampler, steps', [('euler', 200), ('heun', 50)])
def test_sampler_recovers_gaussian_data(sampler, steps):
  mu, sigma, s = 0.2, 0.25, 2.0  # data well inside [-1, 1], so the final clip changes nothing
  x = sampling.sample_images(GaussianPosterior(mu, sigma, s), _noise_batch(4, 16, 64),
                             jax.random.key(0), config_lib.flow(noise_scale=s, t_eps=1e-4),
                             steps=steps, sampler=sampler)
  x = np.asarray(x)
  assert x.size == 4096
  assert abs(x.mean() - mu) < 0.05 * sigma  # standard error 0.016 sigma
  assert abs(x.std() / sigma - 1) < 0.04  # standard error 1.1%


def test_too_few_euler_steps_do_not_recover_gaussian_data():
  """The check above can fail: 2 Euler steps land far from the data's spread."""
  mu, sigma, s = 0.2, 0.25, 2.0
  x = sampling.sample_images(GaussianPosterior(mu, sigma, s), _noise_batch(4, 16, 64),
                             jax.random.key(0), config_lib.flow(noise_scale=s, t_eps=1e-4),
                             steps=2, sampler='euler')
  assert abs(np.asarray(x).std() / sigma - 1) > 0.2


class RowConstant(nnx.Module):
  """Predicts a constant clean image per row: (token id of the row's first slot) / 100.

  Under dx/dt = (x_hat - x_t) / (1 - t) the last Euler step lands exactly on x_hat, so the
  output of a sampler is the (guided) prediction itself.
  """

  def __call__(self, batch, x_BTP, t_BT):
    c = batch['tokens'][:, :1, None].astype(jnp.float32) / 100.0
    return None, jnp.broadcast_to(c, x_BTP.shape) + 0.0 * x_BTP


def _cfg_batch():
  b = _noise_batch(4, 3, 12)
  b['tokens'] = np.array([[30], [20], [10], [15]], np.int32).repeat(3, 1)  # cond x2, uncond x2
  return b


def test_cfg_guides_with_scale():
  x = np.asarray(sampling.sample_images(RowConstant(), _cfg_batch(), jax.random.key(1),
                                        config_lib.flow(), steps=4, cfg_scale=3.0))
  np.testing.assert_allclose(x[0], 0.10 + 3.0 * (0.30 - 0.10), rtol=1e-5)  # x_u + s (x_c - x_u)
  np.testing.assert_allclose(x[1], 0.15 + 3.0 * (0.20 - 0.15), rtol=1e-5)
  np.testing.assert_array_equal(x[2:], x[:2])  # the unconditional half repeats the result
  # Outside cfg_interval the conditional prediction is used as it is.
  x = np.asarray(sampling.sample_images(RowConstant(), _cfg_batch(), jax.random.key(1),
                                        config_lib.flow(), steps=4, cfg_scale=3.0,
                                        cfg_interval=(0.0, 0.5)))
  np.testing.assert_allclose(x[:2, 0, 0], [0.30, 0.20], rtol=1e-5)


def test_cfg_at_scale_one_equals_no_cfg():
  """Guidance switched off by the interval (scale 1 inside the CFG path) = the unguided path."""
  config = load_experiment('shapes', 'runlocal=True')
  model = perturbed_params(train_state.build_model(config))
  tok = Tokenizer.load()
  size, p = (32, 32), config.model.patch_size
  rows = [tasks.generation_prompt('a red circle', tok, size, p),
          tasks.generation_prompt('', tok, size, p)]
  batch = seq.stack_left_padded(rows, patch_size=p, pad_id=tok.pad_id)
  run = lambda **kw: np.asarray(sampling.sample_images(
      model, batch, jax.random.key(2), config.flow, steps=3, sampler='heun', **kw))
  plain = run(cfg_scale=1.0)
  off = run(cfg_scale=3.0, cfg_interval=(2.0, 3.0))
  target = batch['gen_mask'][0] & batch['is_patch'][0]
  assert np.abs(plain[0, target]).max() > 1e-2  # the (perturbed) head predicts something
  np.testing.assert_allclose(off[0, target], plain[0, target], rtol=0, atol=1e-5)
  # Clean (non-generated) slots hold the input pixels.
  np.testing.assert_array_equal(
      plain[0, ~batch['gen_mask'][0]],
      np.asarray(objectives.to_unit_range(batch['patches'][0, ~batch['gen_mask'][0]])))


def test_unknown_sampler_is_rejected():
  with pytest.raises(ValueError, match='rk4'):
    sampling.sample_images(RowConstant(), _cfg_batch(), jax.random.key(0), config_lib.flow(),
                           steps=2, sampler='rk4')


def _greedy_by_recomputation(model, tok, examples, p, steps):
  """Greedy decoding that reruns every whole sequence (prompt + tokens so far) for each token.

  Sequences are left-padded to one length so that a single compiled forward serves all steps.
  """
  forward = nnx.jit(lambda m, b: m.decoder.logits(m(b, objectives.to_unit_range(b['patches']),
                                                    jnp.ones(b['tokens'].shape))[0][:, -1]))
  prefixes = [tasks.to_pieces(dict(ex, task='mmu', answer=''), tok)[:-1] for ex in examples]
  length = max(len(seq.assemble(x, 'mmu', img_id=tok.img_id, patch_size=p)['tokens'])
               for x in prefixes) + steps
  outs = [[] for _ in examples]
  for _ in range(steps):
    samples = [seq.assemble(x + [seq.Text(out)], 'mmu', img_id=tok.img_id, patch_size=p)
               for x, out in zip(prefixes, outs)]
    batch = seq.stack_left_padded(samples, patch_size=p, pad_id=tok.pad_id, length=length)
    logits = np.asarray(forward(model, batch))
    for out, row in zip(outs, logits):
      top2 = np.sort(row)[-2:]
      assert top2[1] - top2[0] > 1e-4, 'a near tie would make the comparison flaky'
      done = tok.eos_id in out
      out.append(tok.pad_id if done else int(row.argmax()))
  return outs


def test_kv_cached_greedy_decoding_equals_recomputation():
  config = load_experiment('shapes', 'runlocal=True')
  model = perturbed_params(train_state.build_model(config), scale=0.1)
  tok = Tokenizer.load()
  p = config.model.patch_size
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (2 * p, 2 * p, 3), dtype=np.uint8) for _ in range(2)]
  questions = ['what colour is the circle?', 'how many objects are there in the grid?']
  prompts = [tasks.understanding_prompt(im, q, tok, p) for im, q in zip(images, questions)]
  assert len(prompts[0]['tokens']) != len(prompts[1]['tokens'])
  batch = seq.stack_left_padded(prompts, patch_size=p, pad_id=tok.pad_id)
  steps = 5
  got = np.asarray(sampling.decode_text(model, batch, jax.random.key(0), max_new_tokens=steps,
                                        eos_id=tok.eos_id, pad_id=tok.pad_id))
  want = _greedy_by_recomputation(
      model, tok, [{'image': im, 'question': q} for im, q in zip(images, questions)], p, steps)
  np.testing.assert_array_equal(got, np.array(want))
  assert got[0].tolist() != got[1].tolist()  # the two prompts are really decoded apart


@pytest.mark.parametrize('vision', ['patch', 'encoder'])
def test_prompt_cache_equals_full_recomputation(vision):
  """Text->image and editing rows with CFG: caching the prompt changes no generated pixel."""
  config = load_experiment('shapes', f'runlocal=True,vision={vision}')
  model = perturbed_params(train_state.build_model(config), scale=0.1)
  tok = Tokenizer.load()
  size, p = (32, 32), config.model.patch_size
  source = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
  rows = [tasks.generation_prompt('a red circle', tok, size, p),
          tasks.generation_prompt('make the circle blue.', tok, size, p, source=source),
          tasks.generation_prompt('', tok, size, p),
          tasks.generation_prompt('', tok, size, p, source=source)]
  batch = seq.stack_left_padded(rows, patch_size=p, pad_id=tok.pad_id)
  run = lambda cache: np.asarray(sampling.sample_images(
      model, batch, jax.random.key(3), config.flow, steps=3, sampler='heun', cfg_scale=2.0,
      prompt_cache=cache))
  cached, full = run(True), run(False)
  target = batch['gen_mask'] & batch['is_patch']
  assert np.abs(full[target]).max() > 1e-2
  np.testing.assert_allclose(cached, full, rtol=0, atol=5e-4)  # float32 rounding; a wrong cache is O(1) off


def test_prompt_cache_needs_one_shared_target_span():
  gen = np.zeros((2, 8), bool)
  gen[0, 4:8], gen[1, 5:8] = True, True
  with pytest.raises(ValueError, match='rows generate different slots'):
    sampling.generated_slots(gen)
  with pytest.raises(ValueError, match='no generated'):
    sampling.generated_slots(np.zeros((2, 8), bool))
  assert sampling.generated_slots(np.tile(gen[:1], (2, 1))) == (4, 8)
