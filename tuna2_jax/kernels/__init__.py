"""The omni mask's attention kernels, behind models/attention.py's one entry point.

Each kernel's forward names the two arrays its backward reads besides q, k and v: its output
and its log-sum-exp (RESIDUALS). The remat policies (models/transformer.py REMAT_POLICIES) save
them, so a rematerialised backward pass reruns the q, k, v projections but never the attention
kernel's forward.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

OUT, LSE = 'attn_out', 'attn_lse'
RESIDUALS = (OUT, LSE)


def keep_for_backward(o: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A kernel forward's output and log-sum-exp, named for the remat policies to save."""
  return checkpoint_name(o, OUT), checkpoint_name(lse, LSE)
