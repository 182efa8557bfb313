"""Tuna-2's visual input: a plain p x p patch embedding of raw pixels, then RMSNorm.

No position embedding and no connector. Patches arrive already cut (row-major blocks flattened
as (row, col, channel)), so the p x p stride-p convolution is one matmul; the kernel keeps the
convolution's fan-in for the Xavier-uniform init.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tuna2_jax.layout import MaskInfo
from tuna2_jax.models.transformer import EMBED, PATCH, dense, rms_norm


def mask_token(width: int, rngs: nnx.Rngs, param_dtype) -> nnx.Param:
  """The learnable token that replaces masked patches, initialised N(0, 1) / sqrt(width)."""
  init = nnx.initializers.normal(width ** -0.5)
  return nnx.Param(init(rngs.params(), (width,), param_dtype), out_sharding=(EMBED,))


class PatchEmbed(nnx.Module):
  def __init__(self, patch_size: int, width: int, norm_eps: float, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = dense(patch_size * patch_size * 3, width, (PATCH, EMBED), bias=True,
                      init=nnx.initializers.xavier_uniform(), **kw)
    self.norm = rms_norm(width, norm_eps, **kw)
    self.mask_token = mask_token(width, rngs, param_dtype)

  def __call__(self, x_BTP: jax.Array, drop_BT: jax.Array | None = None, *,
               patch_grid_BT4: jax.Array | None, info: MaskInfo | None) -> jax.Array:
    """Pixel blocks in [-1, 1] (noisy or clean) [B, T, p*p*3] -> tokens [B, T, D].

    The call of both visual inputs (VisionEncoder's, models/tuna.py calls it once);
    patch_grid_BT4 and info are not read: each patch is embedded alone.
    """
    del patch_grid_BT4, info
    h_BTD = self.norm(self.proj(x_BTP))
    if drop_BT is not None:
      h_BTD = jnp.where(drop_BT[..., None], self.mask_token[...].astype(h_BTD.dtype), h_BTD)
    return h_BTD
