"""Sampling: flow-matching image generation (Euler / Heun, CFG) and KV-cached text decoding.

The flow's conventions (t = 1 clean, x_t, v_hat, the integrator steps) are flow.py's; this module
holds the sampler around them: the time grid, Heun on all steps but the last, CFG and its
interval, the prompt cache.

Both loops are single compiled programs (lax.fori_loop inside jit). Image rows are built by the
caller with data/tasks.py prompts, stacked left-padded (data/sequence.py) into a layout.Batch, so
every row's image span sits at the same slots; with CFG the batch holds the conditional rows
followed by as many unconditional (null-prompt) rows, run together as one batch. The prompt (text,
and an editing source image) is clean and precedes the target, so its keys and values in the decoder
and the flow head are computed once (the prompt cache) and each flow step runs only the target
span's tokens against them.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tuna2_jax import flow
from tuna2_jax import objectives
from tuna2_jax.layout import Batch, cache_info, row_info, take_slots, text_info, with_token
from tuna2_jax.models.transformer import empty_kv_cache

SAMPLERS = ('euler', 'heun')


def in_cfg_interval(t, cfg_interval, open_interval: bool = False):
  """Whether guidance applies at t: lo <= t <= hi, or with open_interval (the official rule)
  lo < t < hi, where lo = 0 starts at t = 0."""
  lo, hi = cfg_interval
  if open_interval:
    return (t < hi) & ((lo == 0) | (t > lo))
  return (t >= lo) & (t <= hi)


def guide(x_hat_BTP, t, *, cfg_scale: float, cfg_interval,
          cfg_interval_open: bool = False) -> jax.Array:
  """x_u + s (x_c - x_u) over a batch of conditional rows followed by as many unconditional
  ones (both halves get the guided value); s applies only while t lies inside cfg_interval
  (`in_cfg_interval`)."""
  if cfg_scale == 1.0:
    return x_hat_BTP
  x_c, x_u = jnp.split(x_hat_BTP, 2, axis=0)
  scale = jnp.where(in_cfg_interval(t, cfg_interval, cfg_interval_open), cfg_scale, 1.0)
  guided = x_u + scale * (x_c - x_u)
  return jnp.concatenate([guided, guided], axis=0)


def generated_slots(gen_mask_BT) -> tuple[int, int]:
  """(start, stop): the slots every row generates, when all rows share one contiguous range.

  Raises ValueError otherwise (rows not left-padded to a common end, or several targets).
  """
  gen = np.asarray(gen_mask_BT)
  cols = np.flatnonzero(gen.any(axis=0))
  if cols.size == 0:
    raise ValueError('prompt cache: the batch has no generated (gen_mask) slots')
  start, stop = int(cols[0]), int(cols[-1]) + 1
  if not gen[:, start:stop].all() or gen[:, stop:].any():
    raise ValueError(f'prompt cache: rows generate different slots (gen_mask columns {start}..'
                     f'{stop - 1} not all set); stack rows left-padded (data/sequence.py) with '
                     'one target image each')
  if start == 0:
    raise ValueError('prompt cache: the generated span starts at slot 0, leaving no prompt')
  return start, stop


def sample_images(model, batch: Batch, key, flow_cfg: ml_collections.ConfigDict, *, steps: int,
                  sampler: str = 'euler', cfg_scale: float = 1.0,
                  cfg_interval: tuple[float, float] = (0.0, 1.0), cfg_interval_open: bool = False,
                  prompt_cache: bool | None = None, noise_BTP: jax.Array | None = None,
                  clip: bool = True) -> jax.Array:
  """Integrates dx/dt = v_hat from t = 0 (noise * noise_scale) to t = 1 over `steps` uniform
  steps; flow_cfg is the config's `flow` (noise_scale, t_eps: flow.py).

  Returns the generated pixel blocks [B, T, p*p*3] in [-1, 1] (clean inputs elsewhere); with
  CFG, rows B/2.. repeat the first half.

  prompt_cache: compute the prompt's keys and values (decoder and head) once and run only the
  generated slots at each step (model.prefill / model.extend); None = whenever the model has
  them. The result equals the uncached one up to float rounding. With the model's
  pixel_layout 'official', x_hat (strips of raster pixels) is moved into block layout first.
  Heun steps all but the last, which is Euler (the velocity is singular at t = 1).
  noise_BTP: the starting noise (unit variance, scaled by noise_scale) in place of a draw from
  key; clip=False returns the final state unclipped (for comparisons with other samplers).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'sampler {sampler!r}: expected one of {SAMPLERS}')
  max_spans = getattr(model, 'max_spans', None)
  if max_spans is not None and int(np.max(batch.span_ids_BT, initial=0)) > max_spans:
    raise ValueError(f'a row holds {int(np.max(batch.span_ids_BT))} image spans, more than '
                     f'model.max_spans={max_spans}')
  if prompt_cache is None:
    prompt_cache = hasattr(model, 'prefill')
  span = generated_slots(batch.gen_mask_BT) if prompt_cache else None
  cfg = getattr(model, 'cfg', None)
  layout = (cfg.pixel_layout, cfg.patch_size) if cfg is not None else ('exact', 0)
  return _sample_images(model, batch, key, steps=steps, sampler=sampler,
                        noise_scale=float(flow_cfg.noise_scale), t_eps=float(flow_cfg.t_eps),
                        cfg_scale=cfg_scale, cfg_interval=tuple(cfg_interval),
                        cfg_interval_open=bool(cfg_interval_open), span=span, layout=layout,
                        noise_BTP=noise_BTP, clip=clip)


@functools.partial(nnx.jit, static_argnames=('steps', 'sampler', 'noise_scale', 't_eps',
                                             'cfg_scale', 'cfg_interval', 'cfg_interval_open',
                                             'span', 'layout', 'clip'))
def _sample_images(model, batch: Batch, key, *, steps: int, sampler: str, noise_scale: float,
                   t_eps: float, cfg_scale: float, cfg_interval: tuple[float, float],
                   cfg_interval_open: bool, span: tuple[int, int] | None,
                   layout: tuple[str, int], noise_BTP: jax.Array | None,
                   clip: bool) -> jax.Array:
  """The sampler loop as one program; span = (start, stop) runs it on cached prompt slots."""
  clean = objectives.to_unit_range(batch.patches_BTP)
  start, stop = span or (0, clean.shape[1])
  gen = batch.gen_mask_BT[:, start:stop]
  span_batch = take_slots(batch, start, stop) if layout[0] == 'official' else None
  clean_span = clean[:, start:stop]
  caches = model.prefill(batch, start, stop) if span else None
  # Parameters travel in the loop carry: nnx rebuilds the model at the loop's trace level.
  graphdef, params = nnx.split(model)

  def velocity(params, x, t):
    m = nnx.merge(graphdef, params)
    t_BT = jnp.where(gen, t, 1.0)
    x_in = jnp.where(gen[..., None], x, clean_span)
    if span:
      x_hat = m.extend(batch, x_in, t_BT, caches, start, stop)
    else:
      x_hat = m(batch, x_in, t_BT)[1]
    x_hat = flow.prediction_blocks(x_hat, span_batch, *layout)
    x_hat = guide(x_hat, t, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                  cfg_interval_open=cfg_interval_open)
    return flow.velocity(x_hat, x, t, t_eps)

  # Drawn for every slot, so a cached and an uncached run from one key share their noise.
  if noise_BTP is None:
    noise_BTP = jax.random.normal(key, clean.shape, jnp.float32)
  noise = noise_BTP[:, start:stop] * noise_scale
  if cfg_scale != 1.0:  # both branches start from the same noise
    half, _ = jnp.split(noise, 2, axis=0)
    noise = jnp.concatenate([half, half], axis=0)
  dt = 1.0 / steps

  time = lambda i: jnp.asarray(i, jnp.float32) / steps

  def euler(i, carry):
    params, x = carry
    return params, flow.euler_step(functools.partial(velocity, params), x, time(i), dt)

  def heun(i, carry):
    params, x = carry
    return params, flow.heun_step(functools.partial(velocity, params), x, time(i), time(i + 1),
                                  dt)

  if sampler == 'euler':
    _, x = jax.lax.fori_loop(0, steps, euler, (params, noise))
  else:  # Heun's correction on every step but the last
    carry = jax.lax.fori_loop(0, steps - 1, heun, (params, noise))
    _, x = euler(steps - 1, carry)
  # Only generated tokens were meant to move; every other slot returns its clean input.
  x = jnp.where(gen[..., None], x, clean_span)
  out = clean.at[:, start:stop].set(x)
  return jnp.clip(out, -1.0, 1.0) if clip else out


def fixed_batches(items: Sequence, size: int):
  """(batch, #real items) for consecutive batches of `size` items; the last is padded by
  repeating its last item, so every batch has one shape (the samplers compile once)."""
  for i in range(0, len(items), size):
    chunk = list(items[i:i + size])
    yield chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)


def _sample_token(logits_BV, key, temperature: float) -> jax.Array:
  if temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BV / temperature, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=('max_new_tokens', 'temperature', 'eos_id',
                                             'pad_id'))
def decode_text(model, batch: Batch, key, *, max_new_tokens: int, eos_id: int, pad_id: int,
                temperature: float = 0.0) -> jax.Array:
  """Greedy (temperature 0) or sampled continuation of left-padded prompts, with a KV cache.

  batch: prompts ending at the same slot (clean images, t = 1). Returns [B, max_new_tokens]
  token ids, pad_id after each row's EOS.
  """
  b, length = batch.tokens_BT.shape
  slots = length + max_new_tokens
  dec = model.decoder
  c = dec.cfg
  cache = empty_kv_cache(c.num_layers, b, slots, c.num_kv_heads, c.head_dim, dec.dtype)
  info = row_info(batch)
  kv_info = cache_info(info, max_new_tokens)
  x = objectives.to_unit_range(batch.patches_BTP)
  h = model.embed(batch, x, jnp.ones(batch.tokens_BT.shape, jnp.float32))
  hidden, cache = dec(h, info, kv_info, cache)
  keys = jax.random.split(key, max_new_tokens)
  first = _sample_token(dec.logits(hidden[:, -1]), keys[0], temperature)
  next_pos = info.positions[:, -1] + 1
  seg = info.segment_ids[:, -1]

  graphdef, params = nnx.split(dec)

  def body(i, carry):
    token, out, done, cache, kv_info, params = carry
    dec = nnx.merge(graphdef, params)  # rebuilt at the loop's trace level
    token = jnp.where(done, pad_id, token)
    out = out.at[:, i].set(token)
    done = done | (token == eos_id)
    slot = length + i
    pos = next_pos + i
    kv_info = with_token(kv_info, slot, seg, pos)
    q_info = text_info(seg[:, None], pos[:, None])
    cache = dict(cache, index=jnp.asarray(slot, jnp.int32))
    hidden, cache = dec(dec.embed(token[:, None]), q_info, kv_info, cache)
    nxt = _sample_token(dec.logits(hidden[:, -1]), keys[i], temperature)
    return nxt, out, done, cache, kv_info, params

  cache = dict(cache, index=jnp.asarray(length, jnp.int32))
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  carry = (first, out, jnp.zeros((b,), bool), cache, kv_info, params)
  out = jax.lax.fori_loop(0, max_new_tokens, body, carry)[1]
  return out
