"""Sampling: flow-matching image generation (Euler / Heun, CFG) and KV-cached text decoding.

Both loops are single compiled programs (lax.fori_loop inside jit). Image rows are built by the
caller with data/tasks.py prompts and stacked left-padded (data/sequence.py), so every row's
image span sits at the same slots; with CFG the batch holds the conditional rows followed by
as many unconditional (null-prompt) rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tuna2_jax import objectives
from tuna2_jax.models.attention import MaskInfo
from tuna2_jax.models.tuna import mask_info

SAMPLERS = ('euler', 'heun')


def guided_prediction(model, batch, x_BTP, t, *, cfg_scale: float, cfg_interval) -> jax.Array:
  """x-prediction at time t (scalar) for every target token, guided when cfg_scale != 1.

  Guidance x_u + s (x_c - x_u) applies only while t lies inside cfg_interval.
  """
  gen = batch['gen_mask']
  t_BT = jnp.where(gen, t, 1.0)
  clean = objectives.to_unit_range(batch['patches'])
  x_in = jnp.where(gen[..., None], x_BTP, clean)
  _, x_hat = model(batch, x_in, t_BT)
  if cfg_scale == 1.0:
    return x_hat
  x_c, x_u = jnp.split(x_hat, 2, axis=0)
  lo, hi = cfg_interval
  scale = jnp.where((t >= lo) & (t <= hi), cfg_scale, 1.0)
  guided = x_u + scale * (x_c - x_u)
  return jnp.concatenate([guided, guided], axis=0)


@functools.partial(nnx.jit, static_argnames=('steps', 'sampler', 'noise_scale', 't_eps',
                                             'cfg_scale', 'cfg_interval'))
def sample_images(model, batch: dict, key, *, steps: int, sampler: str = 'euler',
                  noise_scale: float = 1.0, t_eps: float = 0.05, cfg_scale: float = 1.0,
                  cfg_interval: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
  """Integrates dx/dt = v from t = 0 (noise * noise_scale) to t = 1 over `steps` uniform steps.

  Returns the generated pixel blocks [B, T, p*p*3] in [-1, 1] (clean inputs elsewhere); with
  CFG, rows B/2.. repeat the first half. v = (x_hat - x_t) / max(1 - t, t_eps).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'sampler {sampler!r}: expected one of {SAMPLERS}')
  # Parameters travel in the loop carry: nnx rebuilds the model at the loop's trace level.
  graphdef, params = nnx.split(model)

  def predict(params, x, t):
    return guided_prediction(nnx.merge(graphdef, params), batch, x, t, cfg_scale=cfg_scale,
                             cfg_interval=cfg_interval)

  shape = batch['patches'].shape
  noise = jax.random.normal(key, shape, jnp.float32) * noise_scale
  if cfg_scale != 1.0:  # both branches start from the same noise
    half, _ = jnp.split(noise, 2, axis=0)
    noise = jnp.concatenate([half, half], axis=0)
  dt = 1.0 / steps

  def velocity(params, x, t):
    return (predict(params, x, t) - x) / jnp.maximum(1.0 - t, t_eps)

  def step(i, carry):
    params, x = carry
    t = i * dt
    v = velocity(params, x, t)
    if sampler == 'euler':
      return params, x + dt * v
    x_next = x + dt * v
    # Heun's correction; the last step is Euler since the velocity is singular at t = 1.
    v_next = velocity(params, x_next, t + dt)
    return params, jnp.where(i < steps - 1, x + 0.5 * dt * (v + v_next), x_next)

  _, x = jax.lax.fori_loop(0, steps, step, (params, noise))
  # Only generated tokens were meant to move; every other slot returns its clean input.
  x = jnp.where(batch['gen_mask'][..., None], x, objectives.to_unit_range(batch['patches']))
  return jnp.clip(x, -1.0, 1.0)


def _sample_token(logits_BV, key, temperature: float) -> jax.Array:
  if temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BV / temperature, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=('max_new_tokens', 'temperature', 'eos_id',
                                             'pad_id'))
def decode_text(model, batch: dict, key, *, max_new_tokens: int, eos_id: int, pad_id: int,
                temperature: float = 0.0) -> jax.Array:
  """Greedy (temperature 0) or sampled continuation of left-padded prompts, with a KV cache.

  batch: prompts ending at the same slot (clean images, t = 1). Returns [B, max_new_tokens]
  token ids, pad_id after each row's EOS.
  """
  b, length = batch['tokens'].shape
  slots = length + max_new_tokens
  dec = model.decoder
  c = dec.cfg
  cache = {
      'k': jnp.zeros((c.num_layers, b, slots, c.num_kv_heads, c.head_dim), dec.dtype),
      'v': jnp.zeros((c.num_layers, b, slots, c.num_kv_heads, c.head_dim), dec.dtype),
      'index': jnp.zeros((), jnp.int32)}
  pad_tail = lambda a: jnp.pad(a, ((0, 0), (0, max_new_tokens)))
  info = mask_info(batch)
  kv_info = MaskInfo(pad_tail(info.segment_ids), pad_tail(info.positions),
                     pad_tail(info.span_ids))
  x = objectives.to_unit_range(batch['patches'])
  h = model.embed(batch, x, jnp.ones(batch['tokens'].shape, jnp.float32))
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
    kv_info = MaskInfo(kv_info.segment_ids.at[:, slot].set(seg),
                       kv_info.positions.at[:, slot].set(pos), kv_info.span_ids)
    q_info = MaskInfo(seg[:, None], pos[:, None], jnp.zeros((b, 1), jnp.int32))
    cache = dict(cache, index=jnp.asarray(slot, jnp.int32))
    hidden, cache = dec(dec.embed(token[:, None]), q_info, kv_info, cache)
    nxt = _sample_token(dec.logits(hidden[:, -1]), keys[i], temperature)
    return nxt, out, done, cache, kv_info, params

  cache = dict(cache, index=jnp.asarray(length, jnp.int32))
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  carry = (first, out, jnp.zeros((b,), bool), cache, kv_info, params)
  out = jax.lax.fori_loop(0, max_new_tokens, body, carry)[1]
  return out
