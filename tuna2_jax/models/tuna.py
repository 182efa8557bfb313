"""The unified Tuna-2 / Tuna-R model: one decoder over text and image tokens, plus a flow head.

A packed batch (see data/sequence.py) holds, per token: ids, segment ids, positions, image-span
ids, patch/time-token flags, 3D RoPE coordinates and the patch's (row, col). The model embeds
text with the token table, patches with the visual input ('patch' = Tuna-2, 'encoder' = Tuna-R)
and each span's time token with the timestep embedding of that image's t, runs the decoder, and
the flow head turns the decoder's hidden states into clean pixel blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tuna2_jax.models.attention import MaskInfo
from tuna2_jax.models.decoder import Decoder
from tuna2_jax.models.flow_head import FlowHead
from tuna2_jax.models.patch_embed import PatchEmbed
from tuna2_jax.models.timestep import TimestepEmbedder
from tuna2_jax.models.transformer import dtype_of
from tuna2_jax.models.vision_encoder import VisionEncoder

VISIONS = ('patch', 'encoder')


def validate_model_config(cfg: ml_collections.ConfigDict, image_size: int | None = None) -> None:
  """Raises ValueError naming the first impossible setting."""
  if cfg.vision not in VISIONS:
    raise ValueError(f'model.vision={cfg.vision!r}: expected one of {VISIONS}')
  dec, head = cfg.decoder, cfg.head
  for name, c in (('decoder', dec), ('head', head)):
    if c.num_heads % c.num_kv_heads:
      raise ValueError(f'model.{name}.num_heads={c.num_heads} is not a multiple of '
                       f'num_kv_heads={c.num_kv_heads}')
  if dec.width % dec.num_heads:
    raise ValueError(f'model.decoder.num_heads={dec.num_heads} does not divide the width '
                     f'{dec.width}')
  if dec.width % head.num_heads:
    raise ValueError(f'model.head.num_heads={head.num_heads} does not divide the width '
                     f'{dec.width}')
  if cfg.vision == 'encoder' and cfg.encoder.width % cfg.encoder.num_heads:
    raise ValueError(f'model.encoder.num_heads={cfg.encoder.num_heads} does not divide the '
                     f'encoder width {cfg.encoder.width}')
  if image_size is not None:
    if image_size % cfg.patch_size:
      raise ValueError(f'image size {image_size} is not divisible by model.patch_size='
                       f'{cfg.patch_size}')
    grid = image_size // cfg.patch_size
    if cfg.vision == 'encoder' and grid > cfg.encoder.max_grid:
      raise ValueError(f'image grid {grid} exceeds model.encoder.max_grid={cfg.encoder.max_grid}')


def mask_info(batch: dict) -> MaskInfo:
  return MaskInfo(batch['segment_ids'], batch['positions'], batch['span_ids'])


class Tuna(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_model_config(cfg)
    self.cfg = cfg
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    width = cfg.decoder.width
    self.decoder = Decoder(cfg.decoder, cfg.vocab_size, impl=cfg.attention, remat=cfg.remat, **kw)
    if cfg.vision == 'patch':
      self.vision = PatchEmbed(cfg.patch_size, width, cfg.decoder.norm_eps, **kw)
    else:
      self.vision = VisionEncoder(cfg.encoder, patch_size=cfg.patch_size, out_width=width,
                                  impl=cfg.attention, remat=cfg.remat, **kw)
    self.time_token = TimestepEmbedder(width, cfg.time_embed_freqs, **kw)
    self.head = FlowHead(width, cfg.head, patch_dim=cfg.patch_size ** 2 * 3,
                         time_embed_freqs=cfg.time_embed_freqs, norm_eps=cfg.decoder.norm_eps,
                         impl=cfg.attention, remat=cfg.remat, **kw)

  def embed(self, batch: dict, x_BTP: jax.Array, t_BT: jax.Array,
            drop_BT: jax.Array | None = None) -> jax.Array:
    """Input embeddings [B, T, D]: text ids, visual tokens at patches, t at time tokens.

    x_BTP: pixel blocks in [-1, 1] (noised at generation targets); t_BT: each token's image t.
    """
    h_BTD = self.decoder.embed(batch['tokens'])
    patch_info = MaskInfo(batch['segment_ids'], batch['positions'],
                          jnp.where(batch['is_patch'], batch['span_ids'], 0))
    v_BTD = self.vision(x_BTP.astype(h_BTD.dtype), drop_BT, patch_hw_BT2=batch['patch_hw'],
                        info=patch_info)
    h_BTD = jnp.where(batch['is_patch'][..., None], v_BTD.astype(h_BTD.dtype), h_BTD)
    time_BTD = self.time_token(t_BT).astype(h_BTD.dtype)
    return jnp.where(batch['is_time'][..., None], time_BTD, h_BTD)

  def __call__(self, batch: dict, x_BTP: jax.Array, t_BT: jax.Array,
               drop_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Training / full-sequence forward: (decoder hidden [B,T,D], x_hat [B,T,p*p*3])."""
    info = mask_info(batch)
    hidden_BTD, _ = self.decoder(self.embed(batch, x_BTP, t_BT, drop_BT), info)
    x_hat_BTP, _ = self.head(hidden_BTD, t_BT, batch['span_ids'] > 0, batch['pos3'], info)
    return hidden_BTD, x_hat_BTP
