"""SigLIP-style image-text model: pretrains Tuna-R's vision encoder in miniature.

Image tower: Tuna-R's ViT itself (models/vision_encoder.py without its connector), its patch
features mean-pooled and projected. Text tower: token + learned position embeddings, the same
pre-LayerNorm blocks, a final LayerNorm, mean pooling over the caption's tokens and a
projection. A learnable temperature and bias scale the cosine similarities for the pairwise
sigmoid loss (objectives.sigmoid_contrastive_loss). After pretraining, `vision` holds exactly
the parameters a Tuna-R model's `vision` loads (convert/vision_ckpt.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tuna2_jax import layout
from tuna2_jax.models.transformer import EMBED, VOCAB, dense, dtype_of, make_stack, run_stack
from tuna2_jax.models.vision_encoder import EncoderBlock, VisionEncoder


def _masked_mean(h_BTE: jax.Array, valid_BT: jax.Array) -> jax.Array:
  w = valid_BT[..., None].astype(h_BTE.dtype)
  return (h_BTE * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


class TextTower(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, *, impl: str,
               remat: str, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.remat = remat
    self.embed = nnx.Embed(vocab_size, cfg.width, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                           embedding_init=nnx.with_partitioning(
                               nnx.initializers.normal(0.02), (VOCAB, EMBED)))
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (cfg.max_len, cfg.width), param_dtype), out_sharding=(None, EMBED))
    self.blocks = make_stack(
        lambda r: EncoderBlock(cfg, impl, rngs=r, dtype=dtype, param_dtype=param_dtype),
        cfg.num_layers, rngs)
    self.norm = nnx.LayerNorm(cfg.width, epsilon=cfg.norm_eps, **kw)

  def __call__(self, tokens_BL: jax.Array, valid_BL: jax.Array) -> jax.Array:
    """Caption token ids [B, L] (valid_BL marks real tokens) -> pooled features [B, Wt]."""
    length = tokens_BL.shape[1]
    h = self.embed(tokens_BL) + self.pos_embed[...][:length].astype(self.embed.dtype)
    info = layout.image_info(valid_BL.astype(jnp.int32))  # every real token sees the others
    h, _ = run_stack(self.blocks, h, lambda block, x, _: (block(x, info), None),
                     remat=self.remat)
    return _masked_mean(self.norm(h), valid_BL)


class Siglip(nnx.Module):
  """(image patches, caption tokens) -> unit-norm embeddings [B, E] of both, plus the loss scale."""

  def __init__(self, model: ml_collections.ConfigDict, text: ml_collections.ConfigDict,
               embed_dim: int, *, rngs: nnx.Rngs):
    dtype, param_dtype = dtype_of(model.dtype), dtype_of(model.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.vision = VisionEncoder(model.encoder, patch_size=model.patch_size, out_width=None,
                                impl=model.attention, remat=model.remat, **kw)
    self.image_norm = nnx.LayerNorm(model.encoder.width, epsilon=model.encoder.norm_eps, **kw)
    self.image_proj = dense(model.encoder.width, embed_dim, (EMBED, None), **kw)
    self.text = TextTower(text, model.vocab_size, impl=model.attention, remat=model.remat, **kw)
    self.text_proj = dense(text.width, embed_dim, (EMBED, None), **kw)
    # SigLIP's initialisation: t' = log 10, b = -10, so that the many negatives start near 0.
    self.log_temperature = nnx.Param(jnp.full((), math.log(10.0), param_dtype))
    self.bias = nnx.Param(jnp.full((), -10.0, param_dtype))

  def embed_images(self, x_BNP: jax.Array, patch_grid_BN4: jax.Array) -> jax.Array:
    """Pixel blocks in [-1, 1], one image per row [B, N, p*p*3] -> unit embeddings [B, E].

    patch_grid_BN4: (row, col, grid rows, grid cols) of each patch.
    """
    info = layout.image_info(jnp.ones(x_BNP.shape[:2], jnp.int32))
    h = self.vision.features(x_BNP, patch_grid_BT4=patch_grid_BN4, info=info)
    z = self.image_proj(self.image_norm(h.mean(axis=1)))
    return z / jnp.linalg.norm(z.astype(jnp.float32), axis=-1, keepdims=True).astype(z.dtype)

  def embed_texts(self, tokens_BL: jax.Array, valid_BL: jax.Array) -> jax.Array:
    z = self.text_proj(self.text(tokens_BL, valid_BL))
    return z / jnp.linalg.norm(z.astype(jnp.float32), axis=-1, keepdims=True).astype(z.dtype)
