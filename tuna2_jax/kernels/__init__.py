"""The omni mask's attention kernels, behind models/attention.py's one entry point.

Each kernel's forward names the two arrays its backward reads besides q, k and v: its output
and its log-sum-exp (RESIDUALS). The remat policies (models/transformer.py REMAT_POLICIES) save
them, so a rematerialised backward pass reruns the q, k, v projections but never the attention
kernel's forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

OUT, LSE = 'attn_out', 'attn_lse'
RESIDUALS = (OUT, LSE)


def keep_for_backward(o: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A kernel forward's output and log-sum-exp, named for the remat policies to save."""
  return checkpoint_name(o, OUT), checkpoint_name(lse, LSE)


def pad_head_dim(width: int, *arrays_BTHK: jax.Array) -> tuple[jax.Array, ...]:
  """q, k, v ([B, T, heads, head_dim]) zero-padded to head_dim `width`, for a kernel that only
  runs some widths. The zeros change no score (q . k) and give zero output columns, so with the
  true head_dim's softmax scale and the output sliced back, attention and its gradients are
  unchanged; the kernel costs what the padded width costs."""
  pad = width - arrays_BTHK[0].shape[-1]
  if pad < 0:
    raise ValueError(f'head_dim {arrays_BTHK[0].shape[-1]} is wider than {width}')
  if not pad:
    return arrays_BTHK
  return tuple(jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, pad),)) for x in arrays_BTHK)
