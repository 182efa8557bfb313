"""Flow head: modulated transformer blocks over the decoder's hidden states, predicting clean x.

AdaLN-Zero modulation (shift/scale/gate per sublayer) comes from each token's timestep
embedding and applies only at image-span positions; text positions see the identity
(shift 0, scale 0, gate 1). Attention uses QK-RMSNorm, the omni mask and 3D RoPE (t, h, w) on
image tokens, which reduces to 1D RoPE on text. The final layer maps each token to one clean
p x p x 3 pixel block and starts at zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tuna2_jax.models import attention as attn_lib
from tuna2_jax.models import rope as rope_lib
from tuna2_jax.models.timestep import TimestepEmbedder
from tuna2_jax.models.transformer import (EMBED, PATCH, SelfAttention, SwiGLU, dense, make_stack,
                                          rms_norm, run_stack)

_ZEROS = nnx.initializers.zeros_init()


def _modulation(ada: nnx.Linear, c_BTD, is_image_BT, n: int) -> list[jax.Array]:
  """n vectors (shift, scale[, gate] per sublayer), each the identity value at text positions.

  Every third vector is a gate: 1 at text positions, the zero-initialised prediction at image
  positions (AdaLN-Zero); shifts and scales are 0 at text positions.
  """
  mods = jnp.split(ada(jax.nn.silu(c_BTD)), n, axis=-1)
  keep = is_image_BT[..., None]
  return [jnp.where(keep, m, 1.0 if i % 3 == 2 else 0.0) for i, m in enumerate(mods)]


class HeadBlock(nnx.Module):
  def __init__(self, width: int, cfg: ml_collections.ConfigDict, norm_eps: float, impl: str, *,
               rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = rms_norm(width, norm_eps, **kw)
    self.attn = SelfAttention(width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              qkv_bias=False, qk_norm=True, norm_eps=norm_eps, impl=impl, **kw)
    self.norm2 = rms_norm(width, norm_eps, **kw)
    self.mlp = SwiGLU(width, cfg.mlp_dim, **kw)
    self.ada = dense(width, 6 * width, (EMBED, None), bias=True, init=_ZEROS, **kw)

  def __call__(self, x_BTD, c_BTD, is_image_BT, rope, q_info, kv_info, cache):
    shift1, scale1, gate1, shift2, scale2, gate2 = _modulation(self.ada, c_BTD, is_image_BT, 6)
    h, cache = self.attn(self.norm1(x_BTD) * (1 + scale1) + shift1, rope, q_info, kv_info,
                         cache=cache)
    x_BTD = x_BTD + gate1 * h
    x_BTD = x_BTD + gate2 * self.mlp(self.norm2(x_BTD) * (1 + scale2) + shift2)
    return x_BTD, cache


class FlowHead(nnx.Module):
  def __init__(self, width: int, cfg: ml_collections.ConfigDict, *, patch_dim: int,
               time_embed_freqs: int, norm_eps: float, impl: str, remat: str, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f'head num_heads {cfg.num_heads} is not a multiple of num_kv_heads '
                       f'{cfg.num_kv_heads}')
    if sum(cfg.rope_split) != cfg.head_dim:
      raise ValueError(f'head rope_split {tuple(cfg.rope_split)} must sum to head_dim '
                       f'{cfg.head_dim}')
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.cfg, self.remat, self.dtype = cfg, remat, dtype
    self.time_embed = TimestepEmbedder(width, time_embed_freqs, **kw)
    self.blocks = make_stack(
        lambda r: HeadBlock(width, cfg, norm_eps, impl, rngs=r, dtype=dtype,
                            param_dtype=param_dtype), cfg.num_layers, rngs)
    self.final_norm = rms_norm(width, norm_eps, **kw)
    self.final_ada = dense(width, 2 * width, (EMBED, None), bias=True, init=_ZEROS, **kw)
    self.out = dense(width, patch_dim, (EMBED, PATCH), bias=True, init=_ZEROS, **kw)

  def __call__(self, hidden_BTD, t_BT, is_image_BT, pos3_BT3, q_info: attn_lib.MaskInfo,
               kv_info: attn_lib.MaskInfo | None = None,
               cache: dict | None = None) -> tuple[jax.Array, dict | None]:
    """Decoder hidden states [B,T,D] -> predicted clean pixel blocks [B,T,p*p*3] (float32)."""
    c_BTD = self.time_embed(t_BT)
    rope = rope_lib.rope_tables(pos3_BT3, self.cfg.head_dim, self.cfg.rope_theta,
                                tuple(self.cfg.rope_split))
    kv_info = q_info if kv_info is None else kv_info

    def body(block, x, cache_l):
      return block(x, c_BTD, is_image_BT, rope, q_info, kv_info, cache_l)

    x_BTD, cache = run_stack(self.blocks, hidden_BTD.astype(self.dtype), body,
                             remat=self.remat, cache=cache)
    shift, scale = _modulation(self.final_ada, c_BTD, is_image_BT, 2)
    x_BTD = self.final_norm(x_BTD) * (1 + scale) + shift
    return self.out(x_BTD).astype(jnp.float32), cache
