"""Tuna-R's visual input: a SigLIP-style ViT on the (possibly noisy) pixels, then a connector.

The ViT runs on the packed sequence itself: each patch token attends only to the patches of its
own image (the 'span' attention kind), and a learned position table indexed by the patch's
(row, col) stands in for SigLIP's resized position embedding. No post-norm (the paper drops the
last layer and the post-norm). Connector: RMSNorm -> Linear(We -> D) -> GELU -> Linear(D -> D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tuna2_jax.models import attention as attn_lib
from tuna2_jax.models.patch_embed import mask_token
from tuna2_jax.models.transformer import (EMBED, MLP, PATCH, SelfAttention, dense, make_stack,
                                          rms_norm, run_stack)


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

  def __call__(self, x_BTD, info: attn_lib.MaskInfo):
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
    self.max_grid, self.remat, self.dtype = cfg.max_grid, remat, dtype
    self.patch = dense(patch_size * patch_size * 3, cfg.width, (PATCH, EMBED), bias=True, **kw)
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
               patch_hw_BT2: jax.Array, info: attn_lib.MaskInfo) -> jax.Array:
    """Pixel blocks [B, T, p*p*3] -> decoder-width tokens [B, T, D] (meaningful at patches).

    info must give patch tokens the span id of their image and every other token span id 0.
    """
    h_BTE = self.features(x_BTP, drop_BT, patch_hw_BT2=patch_hw_BT2, info=info)
    h_BTD = self.connector_fc1(self.connector_norm(h_BTE))
    return self.connector_fc2(jax.nn.gelu(h_BTD, approximate=False))

  def features(self, x_BTP: jax.Array, drop_BT: jax.Array | None = None, *,
               patch_hw_BT2: jax.Array, info: attn_lib.MaskInfo) -> jax.Array:
    """The ViT's last layer's hidden states [B, T, We], before the connector."""
    h_BTE = self.patch(x_BTP)
    if drop_BT is not None:
      h_BTE = jnp.where(drop_BT[..., None], self.mask_token[...].astype(h_BTE.dtype), h_BTE)
    grid_index_BT = jnp.clip(patch_hw_BT2[..., 0], 0, self.max_grid - 1) * self.max_grid + \
        jnp.clip(patch_hw_BT2[..., 1], 0, self.max_grid - 1)
    h_BTE = (h_BTE + jnp.take(self.pos_embed[...], grid_index_BT, axis=0)).astype(self.dtype)
    h_BTE, _ = run_stack(self.blocks, h_BTE, lambda block, x, _: (block(x, info), None),
                         remat=self.remat)
    return h_BTE
