"""Training objectives, kept apart from the networks.

Text: cross-entropy on target tokens only: each device gathers its target tokens and runs the LM
head on them chunk by chunk, so [tokens x vocab] logits are never held at once. Flow: the loss
of flow.py (its t sampling, interpolant and x-prediction loss, configured by config.flow).
Masking: per-sample replacement of patch tokens by the mask token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from tuna2_jax import flow
from tuna2_jax import sharding
from tuna2_jax.layout import flow_targets_BT


def to_unit_range(patches_u8) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1]; normalising on device keeps host batches small."""
  return patches_u8.astype(jnp.float32) / 127.5 - 1.0


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
  picked = flow.draw_per_group(k_pick, shape, seg,
                               lambda k, s: jax.random.uniform(k, s) < masking.sample_prob)
  ratio = flow.draw_per_group(k_ratio, shape, seg,
                              lambda k, s: jax.random.uniform(k, s, maxval=masking.max_ratio))
  drop = jax.random.uniform(k_tok, shape) < ratio
  return batch['is_patch'] & picked & drop & active


def masking_active(step, total_steps: int, masking: ml_collections.ConfigDict):
  return masking.enabled & (step >= int(masking.start_fraction * total_steps))


def compute_loss(model, batch: dict, key, step, config: ml_collections.ConfigDict):
  """Total = text_coeff * text + flow_coeff * flow, with the metrics beside it."""
  obj, flow_cfg = config.objective, config.flow
  k_t, k_noise, k_mask = jax.random.split(key, 3)
  x_BTP = to_unit_range(batch['patches'])
  t_BT = flow.sample_timesteps(k_t, batch, flow_cfg)
  x_t_BTP, _ = flow.add_noise(k_noise, x_BTP, t_BT, flow_cfg.noise_scale)
  drop_BT = None
  if config.masking.enabled:
    drop_BT = sample_patch_drop(k_mask, batch, config.masking,
                                masking_active(step, config.total_steps, config.masking))
  hidden_BTD, x_hat_BTP = model(batch, x_t_BTP, t_BT, drop_BT)
  text, n_text = text_loss(hidden_BTD, model.decoder.lm_head_weight(), batch['targets'],
                           batch['loss_mask'])
  target_BT = flow_targets_BT(batch)
  m = config.model
  flow_term, n_flow = flow.flow_loss(
      x_hat_BTP, flow.flow_target(x_BTP, batch, m.pixel_layout, m.patch_size), t_BT, target_BT,
      flow_cfg.t_eps)
  loss = obj.text_coeff * text + obj.flow_coeff * flow_term
  return loss, {'loss': loss, 'text_loss': text, 'flow_loss': flow_term, 'text_tokens': n_text,
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
