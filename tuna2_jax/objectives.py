"""Training objectives, kept apart from the networks.

Text: cross-entropy on target tokens only: each device gathers its target tokens and runs the LM
head on them chunk by chunk, so [tokens x vocab] logits are never held at once. Flow
(JiT-style): t = sigmoid(n), n ~ N(p_mean, p_std); x_t = t x + (1-t) e with e ~ N(0, I) *
noise_scale; the head predicts x_hat; v_hat = (x_hat - x_t) / max(1 - t, t_eps); loss =
mean |v_hat - (x - e)|^2 over target patches. Masking: per-sample replacement of
patch tokens by the mask token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from tuna2_jax import sharding
from tuna2_jax.layout import TASK_IDS, flow_targets_BT


def to_unit_range(patches_u8) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1]; normalising on device keeps host batches small."""
  return patches_u8.astype(jnp.float32) / 127.5 - 1.0


def per_span(key, shape_BT, span_ids_BT, draw) -> jax.Array:
  """Draws one value per image span (draw(key, [B, T+1])) and spreads it over its tokens."""
  table = draw(key, (shape_BT[0], shape_BT[1] + 1))
  return jnp.take_along_axis(table, span_ids_BT, axis=1)


def sample_timesteps(key, batch: dict, obj: ml_collections.ConfigDict) -> jax.Array:
  """Each token's image t [B, T]: logit-normal for generation targets, 1 for clean images."""
  k_gen, k_noisy, k_amount = jax.random.split(key, 3)
  shape, spans = batch['span_ids'].shape, batch['span_ids']
  t_gen = per_span(k_gen, shape, spans, lambda k, s: jax.nn.sigmoid(
      obj.p_mean + obj.p_std * jax.random.normal(k, s)))
  t = jnp.where(batch['gen_mask'], t_gen, 1.0)
  if obj.mmu_noisy_prob > 0:  # reference code: some understanding images are slightly noisy
    noisy = per_span(k_noisy, shape, spans,
                     lambda k, s: jax.random.uniform(k, s) < obj.mmu_noisy_prob)
    amount = per_span(k_amount, shape, spans,
                      lambda k, s: jax.random.uniform(k, s, maxval=obj.mmu_noisy_max))
    is_mmu = (batch['task'] == TASK_IDS['mmu']) & ~batch['gen_mask']
    t = jnp.where(is_mmu & noisy, 1.0 - amount, t)
  return jnp.where(batch['span_ids'] > 0, t, 1.0)


def interpolate(x_BTP, t_BT, e_BTP) -> jax.Array:
  """x_t = t x + (1 - t) e (t = 1 clean, t = 0 noise), in float32."""
  t = t_BT[..., None].astype(jnp.float32)
  return t * x_BTP + (1.0 - t) * e_BTP


def add_noise(key, x_BTP, t_BT, noise_scale: float) -> tuple[jax.Array, jax.Array]:
  """(x_t, e) with e ~ N(0, I) * noise_scale; tokens with t = 1 stay clean."""
  e_BTP = jax.random.normal(key, x_BTP.shape, jnp.float32) * noise_scale
  return interpolate(x_BTP, t_BT, e_BTP), e_BTP


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


# Target tokens per LM-head chunk. Only chunks holding a target run, so a larger chunk wastes
# more rows in the last one; a smaller one runs more loop steps of a smaller matmul.
TEXT_CHUNK = 1024


def text_loss(hidden_BTD, head_DV, targets_BT, loss_mask_BT,
              chunk_size: int = TEXT_CHUNK) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy over target tokens, #targets); the LM head runs at targets only.

  Under a mesh (sharding.activation_sharding) every device gathers its own rows' target tokens
  (the batch is split over the mesh) and runs the LM head on them chunk by chunk: no collective
  runs per chunk, only one sum of the per-shard totals.
  """
  row_axes = ('batch', 'activation_length')
  per_shard_nll = sharding.per_shard(
      lambda h, w, y, m: _target_nll(h, w, y, m, chunk_size)[None, None],
      (row_axes + ('activation_embed',), (None, None), row_axes, row_axes), row_axes)
  total = jnp.sum(per_shard_nll(hidden_BTD, head_DV.astype(hidden_BTD.dtype), targets_BT,
                                loss_mask_BT.astype(jnp.float32)))
  count = loss_mask_BT.astype(jnp.float32).sum()
  return total / jnp.maximum(count, 1.0), count


def _target_nll(hidden_BTD, head_DV, targets_BT, mask_BT, chunk_size: int) -> jax.Array:
  """Sum of the negative log-likelihoods at the masked (target) tokens of one shard.

  The targets are gathered to the front (in token order) and cut into chunk_size chunks;
  chunks past the last target skip the LM head (lax.cond), forward and backward, so the
  logits cost ceil(#targets / chunk_size) chunks instead of every token's.
  """
  d = hidden_BTD.shape[-1]
  h_ND = hidden_BTD.reshape(-1, d)
  y_N, m_N = targets_BT.reshape(-1), mask_BT.reshape(-1)
  n = h_ND.shape[0]
  chunk = min(chunk_size, n)
  n_padded = n + (-n) % chunk
  order_N = jnp.nonzero(m_N > 0, size=n_padded, fill_value=0)[0]
  is_target_N = jnp.arange(n_padded) < jnp.sum(m_N > 0)
  # Slots past the last target hold zeros, not a copy of some other token's state.
  h_ND = jnp.where(is_target_N[:, None], h_ND[order_N], 0)
  y_N = y_N[order_N]
  w_N = jnp.where(is_target_N, m_N[order_N], 0.0)

  @jax.checkpoint  # backward recomputes each chunk's logits instead of storing them
  def chunk_nll(h_CD, y_C, w_C):
    logits = jnp.dot(h_CD, head_DV, preferred_element_type=jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y_C[:, None], 1)[:, 0]
    return jnp.sum(nll * w_C)

  def body(total, xs):
    has_target = xs[2][0] > 0  # targets come first: a chunk without one at its start has none
    return total + jax.lax.cond(has_target, chunk_nll, lambda *_: jnp.zeros((), jnp.float32),
                                *xs), None

  shape = (-1, chunk)
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (h_ND.reshape(*shape, d), y_N.reshape(shape), w_N.reshape(shape)))
  return total


def sample_patch_drop(key, batch: dict, masking: ml_collections.ConfigDict,
                      active) -> jax.Array:
  """Masked patch tokens [B, T]: chosen samples (prob sample_prob) drop a U(0, max_ratio) share."""
  k_pick, k_ratio, k_tok = jax.random.split(key, 3)
  seg, shape = batch['segment_ids'], batch['segment_ids'].shape
  picked = per_span(k_pick, shape, seg,
                    lambda k, s: jax.random.uniform(k, s) < masking.sample_prob)
  ratio = per_span(k_ratio, shape, seg,
                   lambda k, s: jax.random.uniform(k, s, maxval=masking.max_ratio))
  drop = jax.random.uniform(k_tok, shape) < ratio
  return batch['is_patch'] & picked & drop & active


def masking_active(step, total_steps: int, masking: ml_collections.ConfigDict):
  return masking.enabled & (step >= int(masking.start_fraction * total_steps))


def compute_loss(model, batch: dict, key, step, config: ml_collections.ConfigDict):
  """Total = text_coeff * text + flow_coeff * flow, with the metrics beside it."""
  obj = config.objective
  k_t, k_noise, k_mask = jax.random.split(key, 3)
  x_BTP = to_unit_range(batch['patches'])
  t_BT = sample_timesteps(k_t, batch, obj)
  x_t_BTP, _ = add_noise(k_noise, x_BTP, t_BT, obj.noise_scale)
  drop_BT = None
  if config.masking.enabled:
    drop_BT = sample_patch_drop(k_mask, batch, config.masking,
                                masking_active(step, config.total_steps, config.masking))
  hidden_BTD, x_hat_BTP = model(batch, x_t_BTP, t_BT, drop_BT)
  text, n_text = text_loss(hidden_BTD, model.decoder.head_weight(), batch['targets'],
                           batch['loss_mask'])
  target_BT = flow_targets_BT(batch)
  m = config.model
  flow, n_flow = flow_loss(x_hat_BTP, flow_target(x_BTP, batch, m.pixel_layout, m.patch_size),
                           t_BT, target_BT, obj.t_eps)
  loss = obj.text_coeff * text + obj.flow_coeff * flow
  return loss, {'loss': loss, 'text_loss': text, 'flow_loss': flow, 'text_tokens': n_text,
                'flow_tokens': n_flow}


def sigmoid_contrastive_loss(img_BE, txt_BE, log_temperature,
                             bias) -> tuple[jax.Array, jax.Array]:
  """SigLIP's pairwise sigmoid loss over a batch of matching (image, text) rows.

  logits_ij = exp(t') <img_i, txt_j> + b; every pair is a binary problem, positive iff i = j:
  loss = -(1/B) sum_ij log sigmoid(z_ij logits_ij), z = 2 I - 1. Returns (loss, image->text
  top-1 accuracy within the batch).
  """
  logits = jnp.dot(img_BE, txt_BE.T, preferred_element_type=jnp.float32)
  logits = logits * jnp.exp(log_temperature.astype(jnp.float32)) + bias.astype(jnp.float32)
  z = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  loss = -jnp.sum(jax.nn.log_sigmoid(z * logits)) / logits.shape[0]
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
  return loss, accuracy
