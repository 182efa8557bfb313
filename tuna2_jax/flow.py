"""The flow (JiT-style x-prediction flow matching): its conventions, stated once.

Time runs from noise to data: t = 0 is pure noise, t = 1 the clean image. Every image token
carries its image's t; tokens that are not generated (text, prompts, understanding images) sit
at t = 1.

  t ~ sigmoid(N(p_mean, p_std))          one t per generated image (`sample_timesteps`)
  x_t = t x + (1 - t) e,  e ~ N(0, I) * noise_scale               (`interpolate`, `add_noise`)
  v_hat = (x_hat - x_t) / max(1 - t, t_eps)   the head predicts x_hat (`velocity`)
  loss = mean |v_hat - (x - e)|^2 = mean |x_hat - x|^2 / max(1 - t, t_eps)^2 over target
         patches (`flow_loss`; x is `flow_target`, the image in the head's pixel layout)

The sampler (sampling.py) integrates dx/dt = v_hat from t = 0 to 1 with `euler_step` and
`heun_step`. Training and sampling read the same keys, config.flow (config_lib.flow): p_mean,
p_std, mmu_noisy_prob, mmu_noisy_max (t sampling), noise_scale and t_eps (both).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from tuna2_jax.layout import TASK_IDS


def draw_per_group(key, shape_BT, group_ids_BT, draw) -> jax.Array:
  """Draws one value per group id (draw(key, [B, T+1])) and spreads it over the group's tokens.

  group_ids_BT: image span ids (one t per image) or segment ids (one choice per packed sample);
  a row has at most T groups, so a [B, T+1] table indexed by id covers them all.
  """
  table = draw(key, (shape_BT[0], shape_BT[1] + 1))
  return jnp.take_along_axis(table, group_ids_BT, axis=1)


def sample_timesteps(key, batch: dict, flow_cfg: ml_collections.ConfigDict) -> jax.Array:
  """Each token's image t [B, T]: logit-normal for generation targets, 1 for clean images.

  With mmu_noisy_prob > 0 (the reference code), that share of understanding images is slightly
  noisy instead: t = 1 - U(0, mmu_noisy_max).
  """
  k_gen, k_noisy, k_amount = jax.random.split(key, 3)
  shape, spans = batch['span_ids'].shape, batch['span_ids']
  t_gen = draw_per_group(k_gen, shape, spans, lambda k, s: jax.nn.sigmoid(
      flow_cfg.p_mean + flow_cfg.p_std * jax.random.normal(k, s)))
  t = jnp.where(batch['gen_mask'], t_gen, 1.0)
  if flow_cfg.mmu_noisy_prob > 0:
    noisy = draw_per_group(k_noisy, shape, spans,
                           lambda k, s: jax.random.uniform(k, s) < flow_cfg.mmu_noisy_prob)
    amount = draw_per_group(k_amount, shape, spans,
                            lambda k, s: jax.random.uniform(k, s, maxval=flow_cfg.mmu_noisy_max))
    is_mmu = (batch['task'] == TASK_IDS['mmu']) & ~batch['gen_mask']
    t = jnp.where(is_mmu & noisy, 1.0 - amount, t)
  return jnp.where(batch['span_ids'] > 0, t, 1.0)


def interpolate(x_BTP, t_BT, e_BTP) -> jax.Array:
  """x_t = t x + (1 - t) e, in float32."""
  t = t_BT[..., None].astype(jnp.float32)
  return t * x_BTP + (1.0 - t) * e_BTP


def add_noise(key, x_BTP, t_BT, noise_scale: float) -> tuple[jax.Array, jax.Array]:
  """(x_t, e) with e ~ N(0, I) * noise_scale; tokens with t = 1 stay clean."""
  e_BTP = jax.random.normal(key, x_BTP.shape, jnp.float32) * noise_scale
  return interpolate(x_BTP, t_BT, e_BTP), e_BTP


def velocity(x_hat_BTP, x_t_BTP, t, t_eps: float) -> jax.Array:
  """v_hat = (x_hat - x_t) / max(1 - t, t_eps): the velocity of the predicted clean image."""
  return (x_hat_BTP - x_t_BTP) / jnp.maximum(1.0 - t, t_eps)


def official_source_slots(patch_grid_BT4, p: int, *,
                          to_strips: bool) -> tuple[jax.Array, jax.Array]:
  """(slot [B, T, P], entry [B, T, P]) that each patch token's entries come from when moving
  pixels between the two layouts of model.pixel_layout (P = p*p*3, channels minor).

  Block layout (data/sequence.py patchify): the token at grid (gy, gx) holds the p x p block
  there. Strip layout (the official unpatchify): token k holds raster pixels k*p*p ..
  (k+1)*p*p - 1 of its image. to_strips: gather strips from blocks, where the image's last
  block sits in the span's time slot (official training spans leave out the last patch,
  data/sequence.py); else gather blocks from strips (every patch token present).
  """
  gy, gx, gh, gw = (patch_grid_BT4[..., i][..., None] for i in range(4))
  e = jnp.arange(p * p * 3, dtype=jnp.int32)
  c, q = e % 3, e // 3  # channel, pixel inside the token
  k = gy * gw + gx  # the token's index in its image
  first = -k  # slot offset of the image's first patch token
  width = gw * p
  if to_strips:
    f = k * p * p + q
    y, x = f // width, f % width
    block = (y // p) * gw + x // p
    entry = ((y % p) * p + x % p) * 3 + c
    slot = jnp.where(block == gh * gw - 1, first - 1, first + block)
  else:
    f = (gy * p + q // p) * width + gx * p + q % p
    slot = first + f // (p * p)
    entry = (f % (p * p)) * 3 + c
  t = jnp.arange(patch_grid_BT4.shape[1], dtype=jnp.int32)[None, :, None]
  return t + slot, entry


def relayout(x_BTP, patch_grid_BT4, is_patch_BT, p: int, *, to_strips: bool) -> jax.Array:
  """x_BTP with every patch token's pixels moved between block and strip layout
  (`official_source_slots`); other tokens keep theirs."""
  slot, entry = official_source_slots(patch_grid_BT4, p, to_strips=to_strips)
  b, t, n = x_BTP.shape
  slot = jnp.clip(slot, 0, t - 1)
  flat = jnp.take_along_axis(x_BTP.reshape(b, t * n), (slot * n + entry).reshape(b, t * n),
                             axis=1).reshape(b, t, n)
  return jnp.where(is_patch_BT[..., None], flat, x_BTP)


def flow_target(x_BTP, batch: dict, pixel_layout: str, p: int) -> jax.Array:
  """What each token's x_hat is compared with: its own block ('exact'), or its strip of the
  image ('official')."""
  if pixel_layout == 'exact':
    return x_BTP
  return relayout(x_BTP, batch['patch_grid'], batch['is_patch'], p, to_strips=True)


def prediction_blocks(x_hat_BTP, batch: dict, pixel_layout: str, p: int) -> jax.Array:
  """x_hat in block layout (each patch token its own block), for the sampler."""
  if pixel_layout == 'exact':
    return x_hat_BTP
  return relayout(x_hat_BTP, batch['patch_grid'], batch['is_patch'], p, to_strips=False)


def flow_loss(x_hat_BTP, x_BTP, t_BT, target_BT, t_eps: float) -> tuple[jax.Array, jax.Array]:
  """(mean |x_hat - x|^2 / max(1 - t, t_eps)^2 over target patches and pixels, #targets)."""
  weight_BT = 1.0 / jnp.maximum(1.0 - t_BT, t_eps) ** 2
  sq_BT = jnp.mean(jnp.square(x_hat_BTP.astype(jnp.float32) - x_BTP), axis=-1)
  mask = target_BT.astype(jnp.float32)
  count = mask.sum()
  return jnp.sum(sq_BT * weight_BT * mask) / jnp.maximum(count, 1.0), count


Velocity = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t) -> v_hat


def euler_step(v: Velocity, x_BTP, t, dt) -> jax.Array:
  """x_{t+dt} = x_t + dt v(x_t, t)."""
  return x_BTP + dt * v(x_BTP, t)


def heun_step(v: Velocity, x_BTP, t, t_next, dt) -> jax.Array:
  """Heun's (trapezoidal) step: Euler to t_next, then the mean of both ends' velocities."""
  v_now = v(x_BTP, t)
  v_next = v(x_BTP + dt * v_now, t_next)
  return x_BTP + 0.5 * dt * (v_now + v_next)
