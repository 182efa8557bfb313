"""Building blocks shared by the decoder, the flow head and the vision encoder.

Grouped-query self-attention (optional q/k/v bias and QK-RMSNorm), SwiGLU, parameter helpers
that attach logical axis names, and the scanned, rematerialised layer stack.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tuna2_jax import kernels
from tuna2_jax import layout
from tuna2_jax import sharding
from tuna2_jax.models import attention as attn_lib
from tuna2_jax.models import rope as rope_lib

# Logical axis names carried by parameters; sharding.py maps them to mesh axes.
EMBED, MLP, HEADS, KV_HEADS, VOCAB, PATCH, LAYERS = (
    'embed', 'mlp', 'heads', 'kv_heads', 'vocab', 'patch', 'layers')
# The residual stream between layers; a train step pins it to these axes (sharding.constrain).
RESIDUAL = ('batch', 'activation_length', 'activation_embed')

_policies = jax.checkpoint_policies
# Every policy but 'full' keeps what an attention kernel's backward reads (its output and
# log-sum-exp, kernels.RESIDUALS), so the backward pass does not rerun the kernel's forward.
_kernel_residuals = _policies.save_only_these_names(*kernels.RESIDUALS)
REMAT_POLICIES: dict[str, Any] = {
    'none': None,
    'full': _policies.nothing_saveable,
    'dots': _policies.save_from_both_policies(_policies.dots_saveable, _kernel_residuals),
    'dots_no_batch': _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _kernel_residuals),
    # Keeps the projections feeding attention and the attention output; recomputes the MLP.
    'save_qkv_attn': _policies.save_only_these_names('qkv', *kernels.RESIDUALS),
}


def dtype_of(name: str):
  try:
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[name]
  except KeyError:
    raise ValueError(f'dtype {name!r}: expected float32, bfloat16 or float16') from None


def dense(d_in: int, d_out: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
          bias: bool = False, init=nnx.initializers.lecun_normal(), dtype=jnp.float32,
          param_dtype=jnp.float32) -> nnx.Linear:
  """nnx.Linear whose kernel (and bias) carry logical axis names."""
  return nnx.Linear(
      d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      kernel_init=nnx.with_partitioning(init, axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)))


def rms_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32,
             param_dtype=jnp.float32) -> nnx.RMSNorm:
  return nnx.RMSNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                     scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (None,)))


class SelfAttention(nnx.Module):
  """GQA self-attention over [B, T, D] with RoPE, calling the omni attention entry point."""

  def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               qkv_bias: bool, qk_norm: bool, norm_eps: float, impl: str, rngs: nnx.Rngs,
               out_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32):
    if num_heads % num_kv_heads:
      raise ValueError(f'num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}')
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads, self.num_kv_heads, self.head_dim, self.impl = (
        num_heads, num_kv_heads, head_dim, impl)
    self.q_proj = dense(width, num_heads * head_dim, (EMBED, HEADS), bias=qkv_bias, **kw)
    self.k_proj = dense(width, num_kv_heads * head_dim, (EMBED, KV_HEADS), bias=qkv_bias, **kw)
    self.v_proj = dense(width, num_kv_heads * head_dim, (EMBED, KV_HEADS), bias=qkv_bias, **kw)
    self.o_proj = dense(num_heads * head_dim, width, (HEADS, EMBED), bias=out_bias, **kw)
    self.q_norm = rms_norm(head_dim, norm_eps, **kw) if qk_norm else None
    self.k_norm = rms_norm(head_dim, norm_eps, **kw) if qk_norm else None

  def __call__(self, x_BTD, rope: tuple[jax.Array, jax.Array] | None, q_info: layout.MaskInfo,
               kv_info: layout.MaskInfo, *, kind: str = 'omni',
               cache: dict | None = None) -> tuple[jax.Array, dict | None]:
    """Returns the output [B, T, D] and, with a cache, the cache holding this call's k and v.

    cache: {'k': [B, S, G, K], 'v': [B, S, G, K], 'index': int32 scalar}; this call's keys and
    values are written at slots index..index+T, and kv_info must describe all S slots.
    """
    b, t, _ = x_BTD.shape
    q = self.q_proj(x_BTD).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x_BTD).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x_BTD).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = rope_lib.rotate(q, rope), rope_lib.rotate(k, rope)
    q, k, v = (checkpoint_name(a, 'qkv') for a in (q, k, v))
    if cache is not None:
      start = (0, cache['index'], 0, 0)
      k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), start)
      v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), start)
      cache = dict(cache, k=k, v=v)
    out = attn_lib.attention(q, k, v, q_info, kv_info, kind=kind, impl=self.impl)
    out = checkpoint_name(out, kernels.OUT)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


class SwiGLU(nnx.Module):
  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = dense(width, hidden, (EMBED, MLP), **kw)
    self.up_proj = dense(width, hidden, (EMBED, MLP), **kw)
    self.down_proj = dense(hidden, width, (MLP, EMBED), **kw)

  def __call__(self, x_BTD):
    return self.down_proj(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


def empty_kv_cache(num_layers: int, batch: int, slots: int, num_kv_heads: int, head_dim: int,
                   dtype) -> dict:
  """A run_stack cache: {'k', 'v': [L, B, S, G, K] zeros, 'index': 0}."""
  shape = (num_layers, batch, slots, num_kv_heads, head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
          'index': jnp.zeros((), jnp.int32)}


def make_stack(make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
               rngs: nnx.Rngs) -> nnx.Module:
  """Creates num_layers blocks with parameters stacked on a leading 'layers' axis."""
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
  def make(r):
    return make_block(r)
  return make(rngs)


def run_stack(blocks: nnx.Module, x, body: Callable, *, remat: str = 'none', cache=None):
  """Runs body(block, x, cache_layer) -> (x, cache_layer) over stacked blocks with lax.scan.

  cache, if given, is {'k', 'v': [L, B, S, G, K], 'index': int32 scalar}: each layer gets its
  slice, and the cache with every layer's new keys and values is returned beside x.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat {remat!r}: expected one of {sorted(REMAT_POLICIES)}')

  def step(x, block, cache_l):
    return body(block, sharding.constrain(x, RESIDUAL), cache_l)

  if REMAT_POLICIES[remat] is not None:
    step = nnx.remat(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
  scanned = nnx.scan(step, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                     transform_metadata={nnx.PARTITION_NAME: LAYERS})
  if cache is None:
    return scanned(x, blocks, None)
  num_layers = cache['k'].shape[0]
  per_layer = {'k': cache['k'], 'v': cache['v'],
               'index': jnp.broadcast_to(cache['index'], (num_layers,))}
  x, per_layer = scanned(x, blocks, per_layer)
  return x, dict(cache, k=per_layer['k'], v=per_layer['v'])
