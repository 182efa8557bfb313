"""Rotary position embeddings: 1D for the decoder, sectioned (t, h, w) 3D for the flow head.

Both use the rotate-half layout of Qwen2 so decoder weights load unchanged. The 3D form gives
each section of the head dims its own full frequency ladder (theta^(-2i/d_section)) driven by
one coordinate, so rows and columns are both resolved at every scale; a shared ladder would
hand the last section only the lowest frequencies and leave it nearly blind. Text tokens carry
their 1D position in every coordinate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_tables(pos_BTC: jax.Array, head_dim: int, theta: float,
                sections: tuple[int, ...] | None = None) -> tuple[jax.Array, jax.Array]:
  """cos, sin tables [B, T, head_dim] for integer coordinates pos_BTC (C = len(sections)).

  sections are in head dims (e.g. (16, 24, 24) of 64) and must sum to head_dim; None means one
  section, i.e. plain 1D RoPE with pos_BTC of shape [B, T] or [B, T, 1].
  """
  if pos_BTC.ndim == 2:
    pos_BTC = pos_BTC[..., None]
  sections = tuple(sections or (head_dim,))
  if sum(sections) != head_dim or any(s % 2 for s in sections):
    raise ValueError(f'rope sections {sections} must be even and sum to head_dim {head_dim}')
  if len(sections) != pos_BTC.shape[-1]:
    raise ValueError(f'{len(sections)} rope sections for {pos_BTC.shape[-1]} coordinates')
  angles = []
  for c, dim in enumerate(sections):
    inv_freq = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles.append(pos_BTC[..., c:c + 1].astype(jnp.float32) * inv_freq)
  angles_BTF = jnp.concatenate(angles, axis=-1)
  angles_BTK = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)
  return jnp.cos(angles_BTK), jnp.sin(angles_BTK)


def apply_rope(x_BTHK: jax.Array, cos_BTK: jax.Array, sin_BTK: jax.Array) -> jax.Array:
  half = x_BTHK.shape[-1] // 2
  x1, x2 = x_BTHK[..., :half], x_BTHK[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_BTK[:, :, None, :], sin_BTK[:, :, None, :]
  return (x_BTHK.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_BTHK.dtype)
