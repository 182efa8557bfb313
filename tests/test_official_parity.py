"""Modules held against the official Tuna-2 PyTorch code's outputs (tests/data/*.npz).

The reference files (README of the project's shared reference data) hold fixed-seed float32
inputs, parameters and outputs of the official modules; parameters enter through the same
name mapping as the checkpoint import (convert/tuna2.py). Tolerances are that README's, with
the highest matmul precision. Each convention is also flipped once to show the test sees it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tuna2_jax import config_lib, objectives, sampling
from tuna2_jax.convert import hf_folder, tuna2
from tuna2_jax.data import sequence as seq
from tuna2_jax.models import attention as attn_lib
from tuna2_jax.models import rope as rope_lib
from tuna2_jax.models.flow_head import FlowHead, HeadBlock, head_rope
from tuna2_jax.models.patch_embed import PatchEmbed
from tuna2_jax.models.timestep import TimestepEmbedder, sinusoidal_features

DATA = os.path.join(os.path.dirname(__file__), 'data')
F32_EPS = float(np.finfo(np.float32).eps)
nnx.use_eager_sharding(False)  # as train_state does: logical axes stay metadata


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def ref(name: str) -> dict:
  with np.load(os.path.join(DATA, f'{name}.npz')) as d:
    return {k: d[k] for k in d.files}


def load_params(module: nnx.Module, d: dict, sources: dict[str, tuna2.Source], ours: str,
                theirs: str, keep: tuple[str, ...] = ()) -> None:
  """Sets module's parameters from d's 'param.*' arrays through convert.tuna2's plan: our paths
  under `ours` and official names under `theirs` (with layer 0 for stacked sources); those in
  `keep` (which the reference file does not hold) stay as they are."""
  state = nnx.state(module, nnx.Param)
  values = {}
  for path, src in sources.items():
    if not path.startswith(ours):
      continue
    name = src.names[0][len(theirs):]
    values[path[len(ours):]] = tuna2.to_ours(src.kind, d[f'param.{name}'])
  flat = hf_folder.flat_paths(state)
  assert set(values) == set(flat) - set(keep), (sorted(values), sorted(flat))
  state = jax.tree_util.tree_map_with_path(
      lambda p, leaf: jnp.asarray(values.get(hf_folder.path_name(p), leaf), leaf.dtype), state)
  nnx.update(module, state)


def model_config(head) -> ml_collections.ConfigDict:
  """A Tuna-2 model config around `head`, with sizes that cover every reference file."""
  m = config_lib.model('patch', patch_size=4, vocab_size=16,
                       dec=config_lib.decoder(1, 256, 4, 2, 64, 128), head=head)
  m.update(config_lib.OFFICIAL_MODEL)
  return m


# ---------------------------------------------------------------------------------------------
# Timestep embedding and patch embedding


def test_timestep_embedding_matches_official():
  d = ref('timestep_embed')
  emb = TimestepEmbedder(32, 256, t_scale=1.0, order='cos_sin', rngs=nnx.Rngs(0))
  load_params(emb, d, tuna2.plan(model_config(config_lib.official_flow_head(
      1, 4, 2, 64, 128, (16, 24, 24)))), 'time_token/', 'time_embed.')
  t = jnp.asarray(d['t'])
  np.testing.assert_allclose(sinusoidal_features(t, 256, t_scale=1.0), d['t_freq'], atol=1e-6)
  np.testing.assert_allclose(emb(t), d['output'], atol=1e-6)
  # This project's own conventions (x1000, or sin first) are not the official embedding.
  for kw in (dict(t_scale=1000.0), dict(order='sin_cos')):
    assert np.abs(sinusoidal_features(t, 256, **{'t_scale': 1.0, **kw}) - d['t_freq']).max() > 0.1


def test_patch_embedding_matches_official():
  d = ref('patch_embed')
  m = model_config(config_lib.official_flow_head(1, 4, 2, 64, 128, (16, 24, 24)))
  embed = PatchEmbed(4, 32, m.patch_norm_eps, rngs=nnx.Rngs(0))
  sources = tuna2.plan(m)
  del sources['vision/mask_token']
  load_params(embed, d, sources, 'vision/', 'vision_encoder.', keep=('mask_token',))
  images = d['input'].transpose(0, 2, 3, 1)  # NCHW -> NHWC
  x = np.stack([seq.patchify(im, 4) for im in images])
  out = np.asarray(embed(jnp.asarray(x)))
  np.testing.assert_allclose(out, d['output'], atol=1e-5)
  assert m.patch_norm_eps == F32_EPS
  # The eps is what torch.nn.RMSNorm(eps=None) uses: at inputs this small, 1e-6 would differ.
  small = PatchEmbed(4, 32, 1e-6, rngs=nnx.Rngs(0))
  nnx.update(small, nnx.state(embed, nnx.Param))
  tiny = jnp.asarray(x) * 1e-4
  gap = np.abs(np.asarray(small(tiny)) - np.asarray(embed(tiny))).max()
  assert gap > 1e-3, gap


# ---------------------------------------------------------------------------------------------
# One flow-head block


def span_batch(length: int, spans: list[list[tuple[int, int]]], grid: int,
               train_rows: tuple[int, ...] = ()) -> dict:
  """Per-token fields for rows of `length` tokens with (offset, length) spans (the time token
  first); every image is a grid x grid patch grid, of which a span holds length - 1 patches."""
  b = len(spans)
  out = {k: np.zeros((b, length), np.int32) for k in ('span_ids', 'positions', 'segment_ids')}
  out.update({k: np.zeros((b, length), bool) for k in ('is_time', 'is_patch')})
  out['patch_grid'] = np.zeros((b, length, 4), np.int32)
  out['pos3'] = np.repeat(np.arange(length, dtype=np.int32)[None, :, None], 3, 2).repeat(b, 0)
  out['positions'][:] = np.arange(length)
  out['segment_ids'][:] = 1
  out['image_index'] = np.full((b, length), -1, np.int32)
  for r, row in enumerate(spans):
    for i, (offset, n) in enumerate(row):
      out['span_ids'][r, offset:offset + n] = i + 1
      out['image_index'][r, offset:offset + n] = i
      out['is_time'][r, offset] = True
      out['is_patch'][r, offset + 1:offset + n] = True
      out['patch_grid'][r, offset + 1:offset + n] = seq.grid_of(grid, grid)[:n - 1]
  return out


def block_inputs(d: dict, grid: int = 4):
  positions = d['modality_positions']
  b, length = d['hidden_states'].shape[:2]
  spans = [[tuple(map(int, s)) for s in row if s[0] >= 0] for row in positions]
  batch = span_batch(length, spans, grid)
  per_row = positions.shape[1]
  index = np.where(batch['image_index'] >= 0,
                   np.arange(b)[:, None] * per_row + batch['image_index'], 0)
  c = d['adaln_input'][index]
  return {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(c)


def official_head(**changes) -> ml_collections.ConfigDict:
  head = config_lib.official_flow_head(1, 4, 2, 64, 128, (16, 24, 24))
  head.update(changes)
  return head


def run_block(d: dict, params: dict, head_cfg, grid: int = 4):
  block = HeadBlock(256, head_cfg, 'dense', rngs=nnx.Rngs(0), dtype=jnp.float32,
                    param_dtype=jnp.float32)
  load_params(block, params, tuna2.plan(model_config(head_cfg)), 'head/blocks/',
              'diffusion_head_a.0.')
  batch, c = block_inputs(d, grid)
  info = attn_lib.MaskInfo(batch['segment_ids'], batch['positions'], batch['span_ids'])
  rope = head_rope(head_cfg, batch)
  out, _ = block(jnp.asarray(d['hidden_states']), c, batch['span_ids'] > 0, rope, info, info,
                 None)
  return np.asarray(out), block, batch, c, rope, info


def test_flow_block_matches_official():
  d = ref('flow_block')
  out, block, batch, c, rope, info = run_block(d, d, official_head())
  # The omni mask is the official one, and q after projection, q/k-norm and rope too.
  np.testing.assert_array_equal(attn_lib.omni_mask(info, info), d['attention_mask_bool'])
  mods = jnp.split(block.ada(jax.nn.silu(c)), 6, axis=-1)
  keep = (batch['span_ids'] > 0)[..., None]
  shift, scale = (jnp.where(keep, m, 0.0) for m in mods[:2])
  x = block.norm1(jnp.asarray(d['hidden_states'])) * (1 + scale) + shift
  q = block.attn.q_norm(block.attn.q_proj(x).reshape(*x.shape[:2], 4, 64))
  np.testing.assert_allclose(np.asarray(rope_lib.rotate(q, rope)).transpose(0, 2, 1, 3),
                             d['inter.q_post_rope'], atol=3e-5)
  np.testing.assert_allclose(out, d['output'], atol=3e-5)


def test_flow_block_packed_matches_official():
  d = ref('flow_block_packed')
  params = ref('flow_block')  # the packed file shares the block's parameters
  out = run_block(d, params, official_head())[0]
  np.testing.assert_allclose(out, d['output'], atol=3e-5)


@pytest.mark.parametrize('changes', [
    dict(image_rope_pairing='half'), dict(text_rope_pairing='interleaved'),
    dict(time_token_rope=True), dict(image_rope_origin='sample'), dict(text_rope='sectioned'),
    dict(text_rope_scaling=dict(kind='none')), dict(text_rope_theta=1e4)])
def test_flow_block_rope_convention_is_checked(changes):
  d = ref('flow_block')
  out = run_block(d, d, official_head(**changes))[0]
  assert np.abs(out - d['output']).max() > 3e-5 * 10, changes


@pytest.mark.parametrize('changes', [dict(norm_eps=1e-6), dict(qk_norm_eps=1e-5)])
def test_flow_block_norm_eps_is_checked(changes):
  """Each eps moves the output once the normed vectors are small enough for it to matter
  (hidden states for the block norms, q/k projections for the q/k norms)."""
  d = ref('flow_block')
  inputs, params = dict(d, hidden_states=d['hidden_states'] * 1e-3), dict(d)
  if 'qk_norm_eps' in changes:
    inputs = d
    for name in ('q_proj', 'k_proj'):
      params[f'param.self_attn.{name}.weight'] = d[f'param.self_attn.{name}.weight'] * 1e-3
  good = run_block(inputs, params, official_head())[0]
  bad = run_block(inputs, params, official_head(**changes))[0]
  assert np.abs(good - bad).max() > 1e-3, changes
