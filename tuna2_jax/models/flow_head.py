"""Flow head: modulated transformer blocks over the decoder's hidden states, predicting clean x.

AdaLN-Zero modulation (shift/scale/gate per sublayer) depends only on each image span's t: it
is computed once per span, from the span's timestep embedding (a [B, S, D] table, row 0 for
text), and gathered per token by span id; image-span positions (time token included) get their
span's values, text positions the identity (shift 0, scale 0, gate 1). Attention uses QK-RMSNorm, the omni mask and rope by
token kind (`head_rope`): image tokens a 3D rope (t, h, w), text tokens a sectioned 3D rope
of their 1D position or a 1D (llama3-scaled) rope, time tokens that of text or none, in the
pairings the config names. The final layer maps each token to one clean p*p*3 pixel block
(pixel_layout decides which pixels, see flow.py) and starts at zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tuna2_jax import layout
from tuna2_jax.models import rope as rope_lib
from tuna2_jax.models.timestep import TimestepEmbedder
from tuna2_jax.models.transformer import (EMBED, PATCH, SelfAttention, SwiGLU, dense, make_stack,
                                          rms_norm, run_stack)

_ZEROS = nnx.initializers.zeros_init()
TEXT_ROPES = ('sectioned', '1d')
IMAGE_ROPE_ORIGINS = ('sample', 'image')


def validate_head_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first impossible model.head setting."""
  if cfg.num_heads % cfg.num_kv_heads:
    raise ValueError(f'model.head.num_heads={cfg.num_heads} is not a multiple of num_kv_heads '
                     f'{cfg.num_kv_heads}')
  if sum(cfg.rope_split) != cfg.head_dim:
    raise ValueError(f'model.head.rope_split={tuple(cfg.rope_split)} must sum to head_dim '
                     f'{cfg.head_dim}')
  for key, allowed in (('text_rope', TEXT_ROPES), ('image_rope_origin', IMAGE_ROPE_ORIGINS),
                       ('text_rope_pairing', rope_lib.PAIRINGS),
                       ('image_rope_pairing', rope_lib.PAIRINGS)):
    if cfg[key] not in allowed:
      raise ValueError(f'model.head.{key}={cfg[key]!r}: expected one of {allowed}')
  if cfg.text_rope_scaling.kind not in rope_lib.SCALINGS:
    raise ValueError(f'model.head.text_rope_scaling.kind={cfg.text_rope_scaling.kind!r}: '
                     f'expected one of {rope_lib.SCALINGS}')


def head_rope(cfg: ml_collections.ConfigDict, batch: layout.Batch):
  """The head's rope for a batch's slots: (cos, sin) tables when every token shares one
  convention (text and time tokens at their 1D position in every section, images at
  (start, start + row, start + col)), else a per-token rope_lib.HeadRope."""
  pos3 = batch.pos3_BT3
  if (cfg.text_rope == 'sectioned' and cfg.image_rope_origin == 'sample' and
      cfg.time_token_rope and cfg.text_rope_pairing == cfg.image_rope_pairing == 'half'):
    return rope_lib.rope_tables(pos3, cfg.head_dim, cfg.rope_theta, tuple(cfg.rope_split))
  is_patch, is_time = batch.is_patch_BT, batch.is_time_BT
  if cfg.image_rope_origin == 'image':  # (0, row, col), restarting at every image
    grid = batch.patch_grid_BT4
    pos3 = jnp.where(is_patch[..., None],
                     jnp.stack([jnp.zeros_like(grid[..., 0]), grid[..., 0], grid[..., 1]], -1),
                     pos3)
  image = rope_lib.rope_angles(pos3, cfg.head_dim, cfg.rope_theta, tuple(cfg.rope_split))
  if cfg.text_rope == '1d':
    scaling = cfg.text_rope_scaling
    text = rope_lib.rope_angles(batch.positions_BT, cfg.head_dim, cfg.text_rope_theta,
                                scaling=scaling)
  else:
    text = rope_lib.rope_angles(batch.pos3_BT3, cfg.head_dim, cfg.rope_theta,
                                tuple(cfg.rope_split))
  text_kind = jnp.where(is_time & (not cfg.time_token_rope), 0, 1)
  kind = jnp.where(is_patch, 2, text_kind).astype(jnp.int32)
  return rope_lib.HeadRope(text, image, kind, cfg.text_rope_pairing, cfg.image_rope_pairing)


def span_modulation(ada: nnx.Linear, c_BSD, n: int) -> list[jax.Array]:
  """n tables [B, S, D] (shift, scale[, gate] per sublayer), one row per image span.

  Row 0 stands for text tokens and holds the identity (shifts and scales 0, gates 1); row s
  the prediction from span s's conditioning, every third table a gate (AdaLN-Zero).
  """
  mods = jnp.split(ada(jax.nn.silu(c_BSD)), n, axis=-1)
  text = (jnp.arange(c_BSD.shape[1]) == 0)[None, :, None]
  return [jnp.where(text, 1.0 if i % 3 == 2 else 0.0, m) for i, m in enumerate(mods)]


def per_token(table_BSD, span_ids_BT) -> jax.Array:
  """Each token's row of a per-span table: [B, S, D] -> [B, T, D] (text: row 0).

  A one-hot contraction rather than a gather: it is split over rows and tokens like the
  activations, and its transpose (the tables' gradient) is another contraction, not a scatter.
  One term of each sum is non-zero, so the result is the row exactly.
  """
  one_hot_BTS = (span_ids_BT[..., None] == jnp.arange(table_BSD.shape[1])).astype(
      table_BSD.dtype)
  return jnp.einsum('bts,bsd->btd', one_hot_BTS, table_BSD)


class HeadBlock(nnx.Module):
  def __init__(self, width: int, cfg: ml_collections.ConfigDict, impl: str, *,
               rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = rms_norm(width, cfg.norm_eps, **kw)
    self.attn = SelfAttention(width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              qkv_bias=False, qk_norm=True, norm_eps=cfg.qk_norm_eps, impl=impl,
                              **kw)
    self.norm2 = rms_norm(width, cfg.norm_eps, **kw)
    self.mlp = SwiGLU(width, cfg.mlp_dim, **kw)
    self.ada = dense(width, 6 * width, (EMBED, None), bias=True, init=_ZEROS, **kw)

  def __call__(self, x_BTD, c_BSD, span_ids_BT, rope, q_info, kv_info, cache):
    """c_BSD: each image span's conditioning (row 0: text); span_ids_BT: row of each token."""
    shift1, scale1, gate1, shift2, scale2, gate2 = (
        per_token(m, span_ids_BT) for m in span_modulation(self.ada, c_BSD, 6))
    h, cache = self.attn(self.norm1(x_BTD) * (1 + scale1) + shift1, rope, q_info, kv_info,
                         cache=cache)
    x_BTD = x_BTD + gate1 * h
    x_BTD = x_BTD + gate2 * self.mlp(self.norm2(x_BTD) * (1 + scale2) + shift2)
    return x_BTD, cache


class FlowHead(nnx.Module):
  def __init__(self, width: int, cfg: ml_collections.ConfigDict, *, patch_dim: int,
               time_embed: ml_collections.ConfigDict | None, impl: str, remat: str,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    """time_embed: the model config, whose time_embed_* keys build the head's own timestep
    embedder; None when the model shares one embedder between time tokens and the head."""
    validate_head_config(cfg)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.cfg, self.remat, self.dtype = cfg, remat, dtype
    self.time_embed = None if time_embed is None else timestep_embedder(width, time_embed, **kw)
    self.blocks = make_stack(
        lambda r: HeadBlock(width, cfg, impl, rngs=r, dtype=dtype, param_dtype=param_dtype),
        cfg.num_layers, rngs)
    self.final_norm = rms_norm(width, cfg.final_norm_eps, **kw)
    self.final_ada = dense(width, 2 * width, (EMBED, None), bias=True, init=_ZEROS, **kw)
    self.out = dense(width, patch_dim, (EMBED, PATCH), bias=True, init=_ZEROS, **kw)

  def __call__(self, hidden_BTD, c_BSD, span_ids_BT, rope, q_info: layout.MaskInfo,
               kv_info: layout.MaskInfo | None = None,
               cache: dict | None = None) -> tuple[jax.Array, dict | None]:
    """Decoder hidden states [B,T,D] -> predicted clean pixel blocks [B,T,p*p*3] (float32).

    c_BSD: the AdaLN conditioning of each image span, row s for span id s (row 0: text);
    span_ids_BT: each token's span id (0 for text); rope: `head_rope`'s.
    """
    kv_info = q_info if kv_info is None else kv_info

    def body(block, x, cache_l):
      return block(x, c_BSD, span_ids_BT, rope, q_info, kv_info, cache_l)

    x_BTD, cache = run_stack(self.blocks, hidden_BTD.astype(self.dtype), body,
                             remat=self.remat, cache=cache)
    return self.final(x_BTD, c_BSD, span_ids_BT), cache

  def final(self, x_BTD, c_BSD, span_ids_BT) -> jax.Array:
    """The final layer: RMSNorm, shift/scale at image-span tokens, Linear -> [B, T, p*p*3]."""
    shift, scale = (per_token(m, span_ids_BT)
                    for m in span_modulation(self.final_ada, c_BSD, 2))
    x_BTD = self.final_norm(x_BTD) * (1 + scale) + shift
    return self.out(x_BTD).astype(jnp.float32)


def timestep_embedder(width: int, model_cfg: ml_collections.ConfigDict, **kw) -> TimestepEmbedder:
  """The timestep embedder the model config's time_embed_* keys describe."""
  return TimestepEmbedder(width, model_cfg.time_embed_freqs, t_scale=model_cfg.time_embed_t_scale,
                          order=model_cfg.time_embed_order,
                          max_period=model_cfg.time_embed_max_period, **kw)
