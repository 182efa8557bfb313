"""Timestep embedding: sinusoidal features of t -> Linear -> SiLU -> Linear(D)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tuna2_jax.models.transformer import EMBED, dense


def sinusoidal_features(t, num_freqs: int, max_period: float = 10_000.0) -> jax.Array:
  """[...] -> [..., num_freqs]: cos and sin of t at geometrically spaced frequencies.

  t lives in [0, 1]; it is scaled by 1000 so the low frequencies still resolve small steps.
  """
  half = num_freqs // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (1000.0 * t.astype(jnp.float32))[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
  def __init__(self, width: int, num_freqs: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias=True,
              init=nnx.initializers.normal(0.02))
    self.num_freqs = num_freqs
    self.fc1 = dense(num_freqs, width, (None, EMBED), **kw)
    self.fc2 = dense(width, width, (EMBED, EMBED), **kw)

  def __call__(self, t_BT) -> jax.Array:
    return self.fc2(jax.nn.silu(self.fc1(sinusoidal_features(t_BT, self.num_freqs))))
