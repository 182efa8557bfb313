"""Omni attention: the single attention entry point of the project.

Every attention layer (decoder, flow head, vision encoder) calls `attention` with q, k, v and a
description of the mask (layout.MaskInfo) rather than a dense mask, so faster kernels can plug
in behind it. The dense implementation here is the reference the other kernels are tested
against. The mask rule ("omni", and the per-image "span" kind) and its forms live in layout.py.

Kernels (config `model.attention`):
  dense       the reference below: an explicit [B, T, S] mask; any backend, any layout (KV cache).
  omni_hopper kernels/omni_hopper.py: the omni mask's flash attention for Hopper (sm90) on
              Pallas Mosaic GPU: only reachable key blocks, masks only on edge tiles, forward
              and backward; bfloat16 / float16, head_dim up to 128 (padded to 64 or 128);
              Mosaic GPU interpret mode on CPU for tests. KV-cache calls run dense under it.
  omni_flash  kernels/omni_flash.py: Pallas flash attention with one key interval per query, no
              T x T mask, head_dim up to 256 (padded to a power of two); GPUs before Hopper
              (Triton), or Pallas interpret mode on CPU for tests.
              Calls with a KV cache (decoding, the sampler's prompt cache) run dense under it.
  cudnn       cuDNN fused attention (jax.nn.dot_product_attention) given the omni mask as a
              boolean mask; GPU, bfloat16 / float16 only.
  splash      kernels/omni_splash.py: TPU splash attention, the omni mask decomposed onto a
              causal kernel and a banded image-span kernel merged by log-sum-exp (splash masks
              are static; the batch's spans arrive as segment ids); Pallas interpret mode on
              CPU for tests. KV-cache calls run dense under it.
  auto        per backend (the platform of the step's mesh, else jax's default backend):
              on GPU omni_hopper, else (pre-Hopper GPU, float32, head_dim over 128) omni_flash;
              splash on TPU; dense on CPU. A preferred kernel that cannot serve a call falls
              back to the next (finally dense) with one warning per reason.
Naming a kernel the backend or call cannot use raises ValueError instead of falling back.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from tuna2_jax import layout
from tuna2_jax import sharding

# Logical axes of attention's inputs, for kernels run per shard (sharding.per_shard).
QUERY_AXES = ('batch', 'activation_length', 'heads', None)
KV_AXES = ('batch', 'activation_length', 'kv_heads', None)
IMPLS = ('auto', 'dense', 'omni_hopper', 'omni_flash', 'cudnn', 'splash')
BLOCKWISE = ('omni_hopper', 'omni_flash', 'splash')  # self-attention kernels over packed rows
STACKS = ('decoder', 'head', 'encoder')  # the model's layer stacks (config model.<stack>)
# auto's preference per backend, best first; dense always serves.
AUTO_ORDER = {'gpu': ('omni_hopper', 'omni_flash'), 'tpu': ('splash',)}
# Finite so that fully masked rows (padding) give a uniform softmax instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dense_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS) -> jax.Array:
  """Reference grouped-query attention with an explicit [B, T, S] mask; softmax in float32."""
  b, t, h, d = q_BTHK.shape
  g = k_BSGK.shape[2]
  if h % g:
    raise ValueError(f'{h} query heads are not a multiple of {g} key/value heads')
  q_BTGRK = q_BTHK.reshape(b, t, g, h // g, d)
  logits = jnp.einsum('btgrk,bsgk->bgrts', q_BTGRK, k_BSGK,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  logits = jnp.where(mask_BTS[:, None, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSGK.dtype)
  out = jnp.einsum('bgrts,bsgk->btgrk', probs, v_BSGK)
  return out.reshape(b, t, h, d)


def kernel_problem(impl: str, *, backend: str, dtype, head_dim: int) -> str | None:
  """Why `impl` cannot run this call (None when it can)."""
  if impl == 'dense':
    return None
  if impl == 'splash':
    if backend not in ('tpu', 'cpu'):
      return f'splash attention lowers through Mosaic (TPU) only (backend is {backend})'
    return None
  if impl == 'cudnn':
    if backend != 'gpu':
      return f'cuDNN attention needs a GPU (backend is {backend})'
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return f'cuDNN attention needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}'
    return None
  if impl == 'omni_hopper':
    if backend not in ('gpu', 'cpu'):
      return f'the omni_hopper kernel lowers through Mosaic GPU only (backend is {backend})'
    from tuna2_jax.kernels import omni_hopper  # Pallas imports stay off the reference path
    return omni_hopper.problem(dtype=dtype, head_dim=head_dim,
                               compute_capability=gpu_compute_capability(backend))
  if impl == 'omni_flash':
    if backend not in ('gpu', 'cpu'):
      return f'the omni_flash kernel lowers through Triton (GPU) only (backend is {backend})'
    if head_dim > 256:
      return f'omni_flash needs head_dim up to 256, got {head_dim}'
    return None
  raise ValueError(f'attention impl {impl!r}: expected one of {IMPLS}')


def gpu_compute_capability(backend: str) -> str | None:
  """The compute capability of this host's GPUs ('9.0'), or None: no GPU here (a step compiled
  for GPUs from a CPU host targets sm90, as Mosaic GPU's lowering does)."""
  if backend != 'gpu':
    return None
  try:
    devices = jax.devices('gpu')
  except RuntimeError:
    return None
  return getattr(devices[0], 'compute_capability', None) if devices else None


_warned: set[tuple[str, str]] = set()


def resolve_impl(impl: str, *, dtype, head_dim: int, self_attention: bool,
                 backend: str | None = None) -> str:
  """The kernel that runs a call: `impl` itself, or auto's pick for this backend and call.

  The backend defaults to the platform of the mesh the step is traced for
  (sharding.target_platform), so a TPU step compiled from a CPU host picks TPU kernels.
  """
  backend = backend or sharding.target_platform()
  if impl not in IMPLS:
    raise ValueError(f'attention impl {impl!r}: expected one of {IMPLS}')
  kw = dict(backend=backend, dtype=dtype, head_dim=head_dim)
  if (impl == 'auto' or impl in BLOCKWISE) and not self_attention:
    return 'dense'  # KV-cache calls (decoding, the prompt cache): short queries, any key order
  if impl != 'auto':
    problem = kernel_problem(impl, **kw)
    if problem:
      raise ValueError(f'attention impl {impl!r} cannot run here: {problem}; use '
                       "model.attention='auto' or 'dense'")
    return impl
  order = AUTO_ORDER.get(backend, ()) + ('dense',)
  for preferred, fallback in zip(order, order[1:]):
    problem = kernel_problem(preferred, **kw)
    if problem is None:
      return preferred
    if (preferred, problem) not in _warned:  # once per reason, not once per layer and trace
      _warned.add((preferred, problem))
      logging.warning('attention auto: %s unavailable (%s); trying %s', preferred, problem,
                      fallback)
  return order[-1]


def model_stacks(model) -> tuple[str, ...]:
  """The layer stacks (STACKS) a model config has: the encoder only for vision='encoder'."""
  return tuple(s for s in STACKS if model.get(s) is not None
               and (s != 'encoder' or model.get('vision') == 'encoder'))


def stack_impl(model, part: str, backend: str | None = None) -> str:
  """The kernel the self-attention of a layer stack ('decoder', 'head', 'encoder') runs under
  model.attention, for its head_dim and model.dtype (resolve_impl)."""
  block = model[part]
  head_dim = block.head_dim if 'head_dim' in block else block.width // block.num_heads
  return resolve_impl(model.attention, dtype=jnp.dtype(model.dtype), head_dim=head_dim,
                      self_attention=True, backend=backend)


def check_kernel_sharding(model, mesh, rules) -> None:
  """Raises ValueError when a blockwise kernel would run per shard (BLOCKWISE, on the mesh's
  platform) over heads the tensor axes do not divide: the 'heads' / 'kv_heads' rules' mesh axes
  must divide each block's query and key/value head counts.

  Parameters hold heads flattened into their projections, so the layout checks cannot see this,
  and the kernels' per-shard calls would fail mid-trace. Dense attention has no such limit.
  """
  table = dict(rules or ())
  backend = mesh.devices.flat[0].platform
  for part in model_stacks(model):
    block = model[part]
    impl = stack_impl(model, part, backend)
    if impl not in BLOCKWISE:
      continue
    for key, rule in (('num_heads', 'heads'), ('num_kv_heads', 'kv_heads')):
      axes = sharding.mesh_axes_of(table.get(rule))
      size = math.prod(mesh.shape[a] for a in axes)
      count = block.get(key, block.num_heads)
      if count % size:
        raise ValueError(f'model.{part}.{key}={count} is not divisible by mesh axes {axes} of '
                         f'size {size} (the {rule!r} sharding rule), which {impl} attention '
                         'splits per shard')


def attention(q_BTHK, k_BSGK, v_BSGK, q_info: layout.MaskInfo, kv_info: layout.MaskInfo, *,
              kind: str = 'omni', impl: str = 'dense') -> jax.Array:
  """The attention entry point: [B,T,H,K] queries against [B,S,G,K] keys/values -> [B,T,H,K].

  The blockwise kernels (BLOCKWISE, and auto's use of them) need q_info is kv_info:
  self-attention over packed rows; KV-cache calls pass a separate kv_info and run dense.
  """
  layout.check_kind(kind)
  impl = resolve_impl(impl, dtype=q_BTHK.dtype, head_dim=q_BTHK.shape[-1],
                      self_attention=q_info is kv_info)
  if impl in BLOCKWISE:
    # Pallas imports stay off the reference path.
    if impl == 'omni_hopper':
      from tuna2_jax.kernels.omni_hopper import omni_hopper_attention as blockwise
    elif impl == 'omni_flash':
      from tuna2_jax.kernels.omni_flash import omni_flash_attention as blockwise
    else:
      from tuna2_jax.kernels.omni_splash import omni_splash_attention as blockwise

    def kernel(q, k, v, segment_ids, positions, span_ids):
      return blockwise(q, k, v, layout.MaskInfo(segment_ids, positions, span_ids), kind=kind)

    # Rows (and heads, under tensor parallelism) are independent: each device runs its shard.
    q_axes, kv_axes, row_axes = QUERY_AXES, KV_AXES, ('batch', 'activation_length')
    return sharding.per_shard(kernel, (q_axes, kv_axes, kv_axes) + (row_axes,) * 3, q_axes)(
        q_BTHK, k_BSGK, v_BSGK, q_info.segment_ids, q_info.positions, q_info.span_ids)
  mask_BTS = layout.omni_mask_BTS(q_info, kv_info, kind)
  if impl == 'cudnn':
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_BTS[:, None],
                                        implementation='cudnn')
  return dense_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS)
