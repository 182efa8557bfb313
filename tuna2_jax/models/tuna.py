"""The unified Tuna-2 / Tuna-R model: one decoder over text and image tokens, plus a flow head.

A packed batch (see layout.py) holds, per token: ids, segment ids, positions, image-span
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

from tuna2_jax import layout
from tuna2_jax import objectives
from tuna2_jax import sharding
from tuna2_jax.models.attention import IMPLS
from tuna2_jax.models.decoder import Decoder
from tuna2_jax.models.flow_head import FlowHead, head_rope, per_token, timestep_embedder
from tuna2_jax.models.patch_embed import PatchEmbed
from tuna2_jax.models.timestep import ORDERS
from tuna2_jax.models.transformer import RESIDUAL, dtype_of, empty_kv_cache
from tuna2_jax.models.vision_encoder import VisionEncoder

VISIONS = ('patch', 'encoder')
PIXEL_LAYOUTS = ('exact', 'official')
MAX_SPANS = 64  # model.max_spans of runs recorded before the key existed


def validate_model_config(cfg: ml_collections.ConfigDict, image_size: int | None = None) -> None:
  """Raises ValueError naming the first impossible setting."""
  if cfg.vision not in VISIONS:
    raise ValueError(f'model.vision={cfg.vision!r}: expected one of {VISIONS}')
  if cfg.attention not in IMPLS:
    raise ValueError(f'model.attention={cfg.attention!r}: expected one of {IMPLS}')
  if cfg.pixel_layout not in PIXEL_LAYOUTS:
    raise ValueError(f'model.pixel_layout={cfg.pixel_layout!r}: expected one of {PIXEL_LAYOUTS}')
  if cfg.time_embed_order not in ORDERS:
    raise ValueError(f'model.time_embed_order={cfg.time_embed_order!r}: expected one of '
                     f'{ORDERS}')
  if cfg.get('max_spans', MAX_SPANS) < 1:
    raise ValueError(f'model.max_spans={cfg.max_spans}: expected at least 1 image span per row')
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


def span_times(t_BT, span_ids_BT, max_spans: int) -> jax.Array:
  """Each image span's t [B, max_spans + 1] from the per-token t (column s: span id s).

  Column 0 stands for text and, like spans absent from a row, holds 1 (clean). The tokens of a
  span share its t, so the maximum over them is that t.
  """
  ids_S = jnp.arange(max_spans + 1)
  t_BTS = jnp.where(span_ids_BT[..., None] == ids_S, t_BT[..., None].astype(jnp.float32),
                    -jnp.inf)
  t_BS = jnp.max(t_BTS, axis=1)
  return jnp.where((ids_S == 0) | ~jnp.isfinite(t_BS), 1.0, t_BS)


class Tuna(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_model_config(cfg)
    self.cfg = cfg
    self.max_spans = cfg.get('max_spans', MAX_SPANS)
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    width = cfg.decoder.width
    self.decoder = Decoder(cfg.decoder, cfg.vocab_size, impl=cfg.attention, remat=cfg.remat, **kw)
    if cfg.vision == 'patch':
      self.vision = PatchEmbed(cfg.patch_size, width, cfg.patch_norm_eps, **kw)
    else:
      self.vision = VisionEncoder(cfg.encoder, patch_size=cfg.patch_size, out_width=width,
                                  impl=cfg.attention, remat=cfg.remat, **kw)
    # time_embed_shared: one embedder gives the time tokens and the head's AdaLN conditioning.
    self.time_token = timestep_embedder(width, cfg, **kw)
    self.head = FlowHead(width, cfg.head, patch_dim=cfg.patch_size ** 2 * 3,
                         time_embed=None if cfg.time_embed_shared else cfg, impl=cfg.attention,
                         remat=cfg.remat, **kw)

  def head_condition(self, t_BS: jax.Array) -> jax.Array:
    """The flow head's AdaLN conditioning [B, S, D]: each image span's timestep embedding."""
    embedder = self.time_token if self.head.time_embed is None else self.head.time_embed
    return embedder(t_BS)

  def run_head(self, hidden_BTD, t_BT, batch: layout.Batch, q_info: layout.MaskInfo,
               kv_info: layout.MaskInfo | None = None, cache: dict | None = None):
    """The flow head over a batch's slots: (x_hat [B, T, p*p*3], cache).

    The conditioning and every block's modulation run once per image span (span_times), not
    per token: they depend only on the span's t.
    """
    t_BS = span_times(t_BT, batch.span_ids_BT, self.max_spans)
    return self.head(hidden_BTD, self.head_condition(t_BS), batch.span_ids_BT,
                     head_rope(self.cfg.head, batch), q_info, kv_info, cache)

  def embed(self, batch: layout.Batch, x_BTP: jax.Array, t_BT: jax.Array,
            drop_BT: jax.Array | None = None) -> jax.Array:
    """Input embeddings [B, T, D]: text ids, visual tokens at patches, t at time tokens.

    x_BTP: pixel blocks in [-1, 1] (noised at generation targets); t_BT: each token's image t.
    """
    h_BTD = self.decoder.embed(batch.tokens_BT)
    v_BTD = self.vision(x_BTP.astype(h_BTD.dtype), drop_BT,
                        patch_grid_BT4=batch.patch_grid_BT4, info=layout.patch_info(batch))
    h_BTD = jnp.where(batch.is_patch_BT[..., None], v_BTD.astype(h_BTD.dtype), h_BTD)
    # One embedding per image span, gathered at its time token.
    t_BS = span_times(t_BT, batch.span_ids_BT, self.max_spans)
    time_BTD = per_token(self.time_token(t_BS), batch.span_ids_BT)
    time_BTD = sharding.constrain(time_BTD, RESIDUAL).astype(h_BTD.dtype)
    return jnp.where(batch.is_time_BT[..., None], time_BTD, h_BTD)

  def __call__(self, batch: layout.Batch, x_BTP: jax.Array, t_BT: jax.Array,
               drop_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Training / full-sequence forward: (decoder hidden [B,T,D], x_hat [B,T,p*p*3])."""
    info = layout.row_info(batch)
    # Split like the rows, so that the per-token time embeddings [B, T, D] computed from t (time
    # tokens, the head's conditioning) are too, not replicated with all-reduces.
    t_BT = sharding.constrain(t_BT, RESIDUAL[:2])
    hidden_BTD, _ = self.decoder(self.embed(batch, x_BTP, t_BT, drop_BT), info)
    x_hat_BTP, _ = self.run_head(hidden_BTD, t_BT, batch, info)
    return hidden_BTD, x_hat_BTP

  def prefill(self, batch: layout.Batch, length: int, slots_total: int) -> dict:
    """Decoder and head KV caches [L, B, slots_total, G, K] holding slots [0, length).

    The prefix is clean (t = 1) and, under the omni mask, cannot see anything after it, so its
    keys and values serve every later call of `extend` unchanged (the prompt cache of
    text -> image sampling).
    """
    pre = layout.take_slots(batch, 0, length)
    kv_info = layout.row_info(layout.take_slots(batch, 0, slots_total))
    b = batch.tokens_BT.shape[0]
    ones_BT = jnp.ones(pre.tokens_BT.shape, jnp.float32)
    h_BTD = self.embed(pre, objectives.to_unit_range(pre.patches_BTP), ones_BT)
    dec, head = self.decoder, self.head
    dec_cache = empty_kv_cache(dec.cfg.num_layers, b, slots_total, dec.cfg.num_kv_heads,
                               dec.cfg.head_dim, dec.dtype)
    head_cache = empty_kv_cache(head.cfg.num_layers, b, slots_total, head.cfg.num_kv_heads,
                                head.cfg.head_dim, head.dtype)
    pre_info = layout.row_info(pre)
    hidden_BTD, dec_cache = dec(h_BTD, pre_info, kv_info, dec_cache)
    _, head_cache = self.run_head(hidden_BTD, ones_BT, pre, pre_info, kv_info, head_cache)
    return {'decoder': dec_cache, 'head': head_cache}

  def extend(self, batch: layout.Batch, x_BSP: jax.Array, t_BS: jax.Array, caches: dict,
             start: int, stop: int) -> jax.Array:
    """x_hat [B, S, p*p*3] at slots [start, stop) on top of `prefill`'s caches of [0, start)."""
    suffix = layout.take_slots(batch, start, stop)
    q_info = layout.row_info(suffix)
    kv_info = layout.row_info(layout.take_slots(batch, 0, stop))
    at = lambda c: dict(c, index=jnp.asarray(start, jnp.int32))
    hidden_BSD, _ = self.decoder(self.embed(suffix, x_BSP, t_BS), q_info, kv_info,
                                 at(caches['decoder']))
    x_hat_BSP, _ = self.run_head(hidden_BSD, t_BS, suffix, q_info, kv_info, at(caches['head']))
    return x_hat_BSP
