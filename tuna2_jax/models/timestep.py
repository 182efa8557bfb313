"""Timestep embedding: sinusoidal features of t -> Linear -> SiLU -> Linear(D)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tuna2_jax.models.transformer import EMBED, dense

ORDERS = ('cos_sin', 'sin_cos')


def sinusoidal_features(t, num_freqs: int, max_period: float = 10_000.0, *,
                        t_scale: float = 1000.0, order: str = 'cos_sin') -> jax.Array:
  """[...] -> [..., num_freqs]: cos and sin of t_scale * t at geometric frequencies.

  t lives in [0, 1]. t_scale 1000 lets the low frequencies resolve small steps; the official
  Tuna-2 embeds raw t (t_scale 1). order: which half comes first.
  """
  if order not in ORDERS:
    raise ValueError(f'timestep embedding order {order!r}: expected one of {ORDERS}')
  half = num_freqs // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t_scale * t.astype(jnp.float32))[..., None] * freqs
  halves = [jnp.cos(args), jnp.sin(args)]
  return jnp.concatenate(halves if order == 'cos_sin' else halves[::-1], axis=-1)


class TimestepEmbedder(nnx.Module):
  def __init__(self, width: int, num_freqs: int, *, rngs: nnx.Rngs, t_scale: float = 1000.0,
               order: str = 'cos_sin', max_period: float = 10_000.0, dtype=jnp.float32,
               param_dtype=jnp.float32):
    if order not in ORDERS:
      raise ValueError(f'timestep embedding order {order!r}: expected one of {ORDERS}')
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias=True,
              init=nnx.initializers.normal(0.02))
    self.num_freqs, self.t_scale, self.order, self.max_period = (num_freqs, t_scale, order,
                                                                 max_period)
    self.fc1 = dense(num_freqs, width, (None, EMBED), **kw)
    self.fc2 = dense(width, width, (EMBED, EMBED), **kw)

  def __call__(self, t_BT) -> jax.Array:
    feats = sinusoidal_features(t_BT, self.num_freqs, self.max_period, t_scale=self.t_scale,
                                order=self.order)
    return self.fc2(jax.nn.silu(self.fc1(feats)))
