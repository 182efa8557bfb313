"""Rotary position embeddings: 1D for the decoder, sectioned (t, h, w) 3D for the flow head.

Both default to the rotate-half layout of Qwen2 so decoder weights load unchanged. The 3D form
gives each section of the head dims its own full frequency ladder (theta^(-2i/d_section)) driven
by one coordinate, so rows and columns are both resolved at every scale; a shared ladder would
hand the last section only the lowest frequencies and leave it nearly blind.

The flow head can mix conventions per token (`HeadRope`), as the official Tuna-2 head does:
text tokens a 1D rope (optionally llama3-scaled) in the rotate-half layout, image tokens the 3D
rope as interleaved pairs (2i, 2i+1) rotated by minus the angle, and time tokens none.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

PAIRINGS = ('half', 'interleaved')
SCALINGS = ('none', 'llama3')


def inv_frequencies(dim: int, theta: float,
                    scaling: ml_collections.ConfigDict | None = None) -> jax.Array:
  """[dim / 2] float32 inverse frequencies theta^(-2i/dim), optionally llama3-rescaled.

  llama3 (scaling.kind='llama3', with factor, low_freq_factor, high_freq_factor,
  original_max_position): wavelengths above original / low are divided by factor, those below
  original / high are kept, and the band between is interpolated smoothly.
  """
  inv = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  kind = 'none' if scaling is None else scaling.kind
  if kind not in SCALINGS:
    raise ValueError(f'rope scaling kind {kind!r}: expected one of {SCALINGS}')
  if kind == 'none':
    return inv
  factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
  original = scaling.original_max_position
  wavelength = 2 * math.pi / inv
  smooth = (original / wavelength - low) / (high - low)
  mid = (1 - smooth) * inv / factor + smooth * inv
  out = jnp.where(wavelength > original / low, inv / factor, inv)
  between = (wavelength <= original / low) & (wavelength >= original / high)
  return jnp.where(between, mid, out).astype(jnp.float32)


def rope_angles(pos_BTC: jax.Array, head_dim: int, theta: float,
                sections: tuple[int, ...] | None = None,
                scaling: ml_collections.ConfigDict | None = None) -> jax.Array:
  """Angles [B, T, head_dim / 2] for integer coordinates pos_BTC (C = len(sections))."""
  if pos_BTC.ndim == 2:
    pos_BTC = pos_BTC[..., None]
  sections = tuple(sections or (head_dim,))
  if sum(sections) != head_dim or any(s % 2 for s in sections):
    raise ValueError(f'rope sections {sections} must be even and sum to head_dim {head_dim}')
  if len(sections) != pos_BTC.shape[-1]:
    raise ValueError(f'{len(sections)} rope sections for {pos_BTC.shape[-1]} coordinates')
  angles = []
  for c, dim in enumerate(sections):
    inv_freq = inv_frequencies(dim, theta, scaling)
    angles.append(pos_BTC[..., c:c + 1].astype(jnp.float32) * inv_freq)
  return jnp.concatenate(angles, axis=-1)


def rope_tables(pos_BTC: jax.Array, head_dim: int, theta: float,
                sections: tuple[int, ...] | None = None,
                scaling: ml_collections.ConfigDict | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """cos, sin tables [B, T, head_dim] (rotate-half layout) for integer coordinates pos_BTC.

  sections are in head dims (e.g. (16, 24, 24) of 64) and must sum to head_dim; None means one
  section, i.e. plain 1D RoPE with pos_BTC of shape [B, T] or [B, T, 1].
  """
  angles_BTF = rope_angles(pos_BTC, head_dim, theta, sections, scaling)
  angles_BTK = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)
  return jnp.cos(angles_BTK), jnp.sin(angles_BTK)


def apply_rope(x_BTHK: jax.Array, cos_BTK: jax.Array, sin_BTK: jax.Array) -> jax.Array:
  """Rotate-half rope: x cos + [-x2, x1] sin, pairs (i, i + K/2)."""
  half = x_BTHK.shape[-1] // 2
  x1, x2 = x_BTHK[..., :half], x_BTHK[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_BTK[:, :, None, :], sin_BTK[:, :, None, :]
  return (x_BTHK.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_BTHK.dtype)


def apply_interleaved(x_BTHK: jax.Array, angles_BTF: jax.Array) -> jax.Array:
  """Interleaved-pair rope by minus the angle: pair (a, b) = (x[2i], x[2i+1]) becomes
  (a cos + b sin, -a sin + b cos) (the official Tuna-2 image rope, a row vector times the
  rotation matrix)."""
  b, t, h, k = x_BTHK.shape
  pairs = x_BTHK.astype(jnp.float32).reshape(b, t, h, k // 2, 2)
  a, c = pairs[..., 0], pairs[..., 1]
  cos, sin = jnp.cos(angles_BTF)[:, :, None], jnp.sin(angles_BTF)[:, :, None]
  out = jnp.stack([a * cos + c * sin, c * cos - a * sin], axis=-1)
  return out.reshape(b, t, h, k).astype(x_BTHK.dtype)


def rotate(x_BTHK: jax.Array, rope) -> jax.Array:
  """Applies a rope: a rotate-half (cos, sin) pair, or a per-token `HeadRope`."""
  if isinstance(rope, HeadRope):
    return rope.apply(x_BTHK)
  return apply_rope(x_BTHK, *rope)


@struct.dataclass
class HeadRope:
  """Per-token rope of the flow head: tokens pick one of two rotations or none.

  text: angles [B, T, K/2] of the text rope, applied in `text_pairing`; image: angles of the
  image rope, applied in `image_pairing`; kind_BT: 0 = no rope, 1 = text, 2 = image.
  """
  text_angles: jax.Array
  image_angles: jax.Array
  kind_BT: jax.Array
  text_pairing: str = struct.field(pytree_node=False, default='half')
  image_pairing: str = struct.field(pytree_node=False, default='half')

  def _one(self, x_BTHK, angles_BTF, pairing):
    if pairing not in PAIRINGS:
      raise ValueError(f'rope pairing {pairing!r}: expected one of {PAIRINGS}')
    if pairing == 'interleaved':
      return apply_interleaved(x_BTHK, angles_BTF)
    angles_BTK = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)
    return apply_rope(x_BTHK, jnp.cos(angles_BTK), jnp.sin(angles_BTK))

  def apply(self, x_BTHK: jax.Array) -> jax.Array:
    text = self._one(x_BTHK, self.text_angles, self.text_pairing)
    image = self._one(x_BTHK, self.image_angles, self.image_pairing)
    kind = self.kind_BT[:, :, None, None]
    return jnp.where(kind == 1, text, jnp.where(kind == 2, image, x_BTHK))
