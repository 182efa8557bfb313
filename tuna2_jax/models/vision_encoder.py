"""Tuna-R's visual input: a SigLIP-style ViT on the (possibly noisy) pixels, then a connector.

The ViT runs on the packed sequence itself: each patch token attends only to the patches of its
own image (the 'span' attention kind). Positions, as in SigLIP 2: a learned square table of side
n = encoder.max_grid, resized to each image's patch grid (bilinear, antialiased); each token
computes its own row of the resized table (`grid_positions`), so images of different grids share
one packed row. No post-norm (the paper drops the last layer and the post-norm). Connector:
RMSNorm -> Linear(We -> D) -> GELU -> Linear(D -> D).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tuna2_jax import layout
from tuna2_jax.models.patch_embed import mask_token
from tuna2_jax.models.transformer import (EMBED, MLP, PATCH, SelfAttention, dense, make_stack,
                                          rms_norm, run_stack)


def tap_weights(index_BT: jax.Array, grid_BT: jax.Array, n: int) -> jax.Array:
  """[B, T, n] weights over n table rows (or columns) for position `index` of a `grid`-long axis.

  The antialiased triangle filter of torch's bilinear resize (align_corners=False,
  antialias=True) and jax.image.resize(..., 'linear', antialias=True): sample centre
  (index + 0.5) * n / grid - 0.5, kernel widened by n / grid when shrinking, weights normalised
  over the taps inside the table. grid == n gives the one-hot of `index`.
  """
  grid = jnp.maximum(grid_BT, 1).astype(jnp.float32)[..., None]
  scale = n / grid
  centre = (index_BT.astype(jnp.float32)[..., None] + 0.5) * scale - 0.5
  w = jax.nn.relu(1.0 - jnp.abs(jnp.arange(n, dtype=jnp.float32) - centre) /
                  jnp.maximum(scale, 1.0))
  return w / w.sum(-1, keepdims=True)


def grid_positions(table_ND: jax.Array, patch_grid_BT4: jax.Array) -> jax.Array:
  """Each token's row [B, T, D] of the square table [n*n, D] resized to its image's grid.

  patch_grid_BT4: (row, col, grid rows, grid cols) per token. The separable weights form one
  [B, T, n*n] matrix that multiplies the table, never a [B, T, n, D] intermediate.
  """
  n = math.isqrt(table_ND.shape[0])
  w_h = tap_weights(patch_grid_BT4[..., 0], patch_grid_BT4[..., 2], n)
  w_w = tap_weights(patch_grid_BT4[..., 1], patch_grid_BT4[..., 3], n)
  w_BTN = (w_h[..., :, None] * w_w[..., None, :]).reshape(*w_h.shape[:-1], n * n)
  # Full precision: at a grid equal to the table's, this must return its rows exactly.
  return jnp.matmul(w_BTN, table_ND.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


class EncoderBlock(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, impl: str, *, rngs: nnx.Rngs, dtype,
               param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm_kw = dict(epsilon=cfg.norm_eps, **kw)
    self.norm1 = nnx.LayerNorm(cfg.width, **norm_kw)
    self.attn = SelfAttention(cfg.width, cfg.num_heads, cfg.num_heads,
                              cfg.width // cfg.num_heads, qkv_bias=True, out_bias=True,
                              qk_norm=False, norm_eps=cfg.norm_eps, impl=impl, **kw)
    self.norm2 = nnx.LayerNorm(cfg.width, **norm_kw)
    self.fc1 = dense(cfg.width, cfg.mlp_dim, (EMBED, MLP), bias=True, **kw)
    self.fc2 = dense(cfg.mlp_dim, cfg.width, (MLP, EMBED), bias=True, **kw)

  def __call__(self, x_BTD, info: layout.MaskInfo):
    h, _ = self.attn(self.norm1(x_BTD), None, info, info, kind='span')
    x_BTD = x_BTD + h
    return x_BTD + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x_BTD)), approximate=True))


class VisionEncoder(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, patch_size: int, out_width: int | None,
               impl: str, remat: str, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    """out_width: the decoder width the connector maps to; None builds the ViT alone (the
    encoder pretraining of models/siglip.py)."""
    if cfg.width % cfg.num_heads:
      raise ValueError(f'encoder width {cfg.width} is not divisible by num_heads {cfg.num_heads}')
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.remat, self.dtype = remat, dtype
    self.patch = dense(patch_size * patch_size * 3, cfg.width, (PATCH, EMBED), bias=True, **kw)
    # The learned square position table, max_grid x max_grid, row-major; resized per image.
    self.pos_embed = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (cfg.max_grid * cfg.max_grid, cfg.width),
                                      param_dtype), out_sharding=(None, EMBED))
    self.mask_token = mask_token(cfg.width, rngs, param_dtype)
    self.blocks = make_stack(
        lambda r: EncoderBlock(cfg, impl, rngs=r, dtype=dtype, param_dtype=param_dtype),
        cfg.num_layers, rngs)
    if out_width is not None:
      self.connector_norm = rms_norm(cfg.width, cfg.norm_eps, **kw)
      self.connector_fc1 = dense(cfg.width, out_width, (None, EMBED), bias=True, **kw)
      self.connector_fc2 = dense(out_width, out_width, (EMBED, EMBED), bias=True, **kw)

  def __call__(self, x_BTP: jax.Array, drop_BT: jax.Array | None = None, *,
               patch_grid_BT4: jax.Array, info: layout.MaskInfo) -> jax.Array:
    """Pixel blocks [B, T, p*p*3] -> decoder-width tokens [B, T, D] (meaningful at patches);
    the call of both visual inputs (PatchEmbed's, models/tuna.py calls it once).

    patch_grid_BT4: (row, col, grid rows, grid cols) of each patch in its image.
    info must give patch tokens the span id of their image and every other token span id 0.
    """
    h_BTE = self.features(x_BTP, drop_BT, patch_grid_BT4=patch_grid_BT4, info=info)
    h_BTD = self.connector_fc1(self.connector_norm(h_BTE))
    return self.connector_fc2(jax.nn.gelu(h_BTD, approximate=False))

  def features(self, x_BTP: jax.Array, drop_BT: jax.Array | None = None, *,
               patch_grid_BT4: jax.Array, info: layout.MaskInfo) -> jax.Array:
    """The ViT's last layer's hidden states [B, T, We], before the connector."""
    h_BTE = self.patch(x_BTP)
    if drop_BT is not None:
      h_BTE = jnp.where(drop_BT[..., None], self.mask_token[...].astype(h_BTE.dtype), h_BTE)
    pos_BTE = grid_positions(self.pos_embed[...], patch_grid_BT4)
    h_BTE = (h_BTE + pos_BTE).astype(self.dtype)
    h_BTE, _ = run_stack(self.blocks, h_BTE, lambda block, x, _: (block(x, info), None),
                         remat=self.remat)
    return h_BTE
