"""Qwen2-style decoder: RMSNorm, GQA with q/k/v bias, SwiGLU, 1D RoPE, tied or untied head.

Parameter shapes are Qwen2.5's (kernels transposed to [in, out]) so its weights load as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tuna2_jax import layout
from tuna2_jax.models import rope as rope_lib
from tuna2_jax.models.transformer import (EMBED, VOCAB, SelfAttention, SwiGLU, dense, make_stack,
                                          rms_norm, run_stack)


class DecoderBlock(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, impl: str, *, rngs: nnx.Rngs, dtype,
               param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.input_norm = rms_norm(cfg.width, cfg.norm_eps, **kw)
    self.attn = SelfAttention(cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              qkv_bias=cfg.qkv_bias, qk_norm=False, norm_eps=cfg.norm_eps,
                              impl=impl, **kw)
    self.post_attn_norm = rms_norm(cfg.width, cfg.norm_eps, **kw)
    self.mlp = SwiGLU(cfg.width, cfg.mlp_dim, **kw)

  def __call__(self, x_BTD, rope, q_info, kv_info, cache):
    h, cache = self.attn(self.input_norm(x_BTD), rope, q_info, kv_info, cache=cache)
    x_BTD = x_BTD + h
    return x_BTD + self.mlp(self.post_attn_norm(x_BTD)), cache


class Decoder(nnx.Module):
  """Token embedding, scanned blocks and final norm; `logits` applies the LM head."""

  def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, *, impl: str, remat: str,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f'decoder num_heads {cfg.num_heads} is not a multiple of num_kv_heads '
                       f'{cfg.num_kv_heads}')
    self.cfg, self.remat, self.dtype = cfg, remat, dtype
    self.embed = nnx.Embed(vocab_size, cfg.width, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                           embedding_init=nnx.with_partitioning(
                               nnx.initializers.normal(0.02), (VOCAB, EMBED)))
    self.blocks = make_stack(
        lambda r: DecoderBlock(cfg, impl, rngs=r, dtype=dtype, param_dtype=param_dtype),
        cfg.num_layers, rngs)
    self.norm = rms_norm(cfg.width, cfg.norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.lm_head = None if cfg.tie_embeddings else dense(
        cfg.width, vocab_size, (EMBED, VOCAB), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        init=nnx.initializers.normal(0.02))

  def __call__(self, x_BTD, q_info: layout.MaskInfo, kv_info: layout.MaskInfo | None = None,
               cache: dict | None = None) -> tuple[jax.Array, dict | None]:
    """Input embeddings [B, T, D] -> final-normed hidden states [B, T, D] (and updated cache).

    cache: {'k', 'v': [L, B, S, G, K], 'index': scalar}; kv_info then describes the S slots.
    """
    rope = rope_lib.rope_tables(q_info.positions, self.cfg.head_dim, self.cfg.rope_theta)
    kv_info = q_info if kv_info is None else kv_info

    def body(block, x, cache_l):
      return block(x, rope, q_info, kv_info, cache_l)

    x_BTD, cache = run_stack(self.blocks, x_BTD.astype(self.dtype), body,
                             remat=self.remat, cache=cache)
    return self.norm(x_BTD), cache

  def logits(self, hidden_BTD) -> jax.Array:
    if self.lm_head is None:
      return self.embed.attend(hidden_BTD)
    return self.lm_head(hidden_BTD)

  def lm_head_weight(self) -> jax.Array:
    """The LM head as a [D, V] matrix, for chunked losses that avoid materialising logits."""
    if self.lm_head is None:
      return self.embed.embedding[...].T
    return self.lm_head.kernel[...]
