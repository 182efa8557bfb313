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

from tuna2_jax import config_lib, flow, layout, sampling
from tuna2_jax.convert import hf_folder, tuna2
from tuna2_jax.data import sequence as seq
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
  embed_alone = lambda m, x: m(x, patch_grid_BT4=None, info=None)
  out = np.asarray(embed_alone(embed, jnp.asarray(x)))
  np.testing.assert_allclose(out, d['output'], atol=1e-5)
  # Float rounding only (observed 4.8e-7): an eps of 1e-6 instead would miss by 5.5e-6.
  assert np.abs(out - d['output']).max() < 2e-6
  assert m.patch_norm_eps == F32_EPS
  # The eps is what torch.nn.RMSNorm(eps=None) uses: at inputs this small, 1e-6 would differ.
  small = PatchEmbed(4, 32, 1e-6, rngs=nnx.Rngs(0))
  nnx.update(small, nnx.state(embed, nnx.Param))
  tiny = jnp.asarray(x) * 1e-4
  gap = np.abs(np.asarray(embed_alone(small, tiny)) - np.asarray(embed_alone(embed, tiny))).max()
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


def as_batch(fields: dict) -> layout.Batch:
  """span_batch's fields as a layout.Batch; the row fields it lacks (tokens, targets, patches,
  ...: none of what reads it here) are zeros."""
  b, length = fields['segment_ids'].shape
  return layout.Batch.from_rows({
      k: fields[k] if k in fields else np.zeros((b, length, *layout.trailing_shape(k, 1)),
                                                layout.SCHEMA[k].dtype)
      for k in layout.FIELDS})


def block_inputs(d: dict, grid: int = 4):
  positions = d['modality_positions']
  b, length = d['hidden_states'].shape[:2]
  spans = [[tuple(map(int, s)) for s in row if s[0] >= 0] for row in positions]
  batch = span_batch(length, spans, grid)
  per_row = positions.shape[1]
  # The AdaLN input per span [B, 1 + spans, D]: row s for span id s, row 0 (text) unused.
  index = np.arange(b)[:, None] * per_row + np.arange(per_row)[None, :]
  c = d['adaln_input'][index]
  c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
  return jax.tree.map(jnp.asarray, as_batch(batch)), jnp.asarray(c)


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
  info = layout.row_info(batch)
  rope = head_rope(head_cfg, batch)
  out, _ = block(jnp.asarray(d['hidden_states']), c, batch.span_ids_BT, rope, info, info, None)
  return np.asarray(out), block, batch, c, rope, info


def test_flow_block_matches_official():
  d = ref('flow_block')
  out, block, batch, c, rope, info = run_block(d, d, official_head())
  # The omni mask is the official one, and q after projection, q/k-norm and rope too.
  np.testing.assert_array_equal(layout.omni_mask_BTS(info, info), d['attention_mask_bool'])
  c_BTD = jnp.take_along_axis(c, batch.span_ids_BT[..., None], axis=1)
  mods = jnp.split(block.ada(jax.nn.silu(c_BTD)), 6, axis=-1)
  keep = (batch.span_ids_BT > 0)[..., None]
  shift, scale = (jnp.where(keep, m, 0.0) for m in mods[:2])
  x = block.norm1(jnp.asarray(d['hidden_states'])) * (1 + scale) + shift
  q = block.attn.q_norm(block.attn.q_proj(x).reshape(*x.shape[:2], 4, 64))
  np.testing.assert_allclose(np.asarray(rope_lib.rotate(q, rope)).transpose(0, 2, 1, 3),
                             d['inter.q_post_rope'], atol=3e-5)
  np.testing.assert_allclose(out, d['output'], atol=3e-5)
  # Float rounding only (observed 3.1e-6): the block norms at 1e-6 or the q/k norms at 1e-5
  # miss by 2.2e-5 and 1.4e-5.
  assert np.abs(out - d['output']).max() < 6e-6


def test_flow_block_packed_matches_official():
  d = ref('flow_block_packed')
  params = ref('flow_block')  # the packed file shares the block's parameters
  out = run_block(d, params, official_head())[0]
  np.testing.assert_allclose(out, d['output'], atol=3e-5)
  assert np.abs(out - d['output']).max() < 6e-6  # observed 2.4e-6; wrong eps: >= 1.4e-5


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


# ---------------------------------------------------------------------------------------------
# Final layer and the official pixel layout


def test_final_layer_and_unpatchify_match_official():
  d = ref('final_layer')
  head_cfg = config_lib.official_flow_head(1, 4, 2, 16, 32, (4, 6, 6))
  m = model_config(head_cfg)
  head = FlowHead(64, head_cfg, patch_dim=48, time_embed=None, impl='dense', remat='none',
                  rngs=nnx.Rngs(0))
  sources = {k: v for k, v in tuna2.plan(m).items() if k.startswith('head/final_') or
             k.startswith('head/out/')}
  load_params(head, d, sources, 'head/', 'diffusion_head_b.',
              keep=tuple(p for p in hf_folder.flat_paths(nnx.state(head, nnx.Param))
                         if p.startswith('blocks/')))
  batch, c = block_inputs(d)
  out = np.asarray(head.final(jnp.asarray(d['hidden_states']), c, batch.span_ids_BT))
  np.testing.assert_allclose(out, d['output'], atol=1e-5)
  image = d['image'][:, :, 0].transpose(0, 2, 3, 1)  # [N, C, T, H, W] -> [N, H, W, C]
  for r, (offset, _) in enumerate(d['modality_positions'][:, 0]):
    tokens = d['output'][r, offset + 1:offset + 17]
    np.testing.assert_array_equal(tokens, d['image_tokens'][r])
    np.testing.assert_array_equal(seq.unpatchify_strips(tokens, 16, 16, 4), image[r])
    np.testing.assert_array_equal(seq.strips(image[r], 4), tokens)
  # On device the strips become blocks, whose exact unpatchify is the official image.
  blocks = np.asarray(flow.prediction_blocks(jnp.asarray(d['output']), batch,
                                                   'official', 4))
  for r, (offset, _) in enumerate(d['modality_positions'][:, 0]):
    np.testing.assert_array_equal(seq.unpatchify(blocks[r, offset + 1:offset + 17], 16, 16, 4),
                                  image[r])
    assert not np.array_equal(seq.unpatchify(d['image_tokens'][r], 16, 16, 4), image[r])


def jit_loss_batch(d: dict):
  """The reference's training rows, laid out by data/sequence.py with the official layout."""
  tok = d['text_tokens']
  rows = []
  for r in range(tok.shape[0]):
    image = d['x'][r, :, 0].transpose(1, 2, 0)  # [C, H, W] -> [H, W, C], in [-1, 1]
    pieces = [seq.Text(tok[r, :5].tolist()), seq.Image(image, generate=True),
              seq.Text(tok[r, 9:].tolist())]
    rows.append(seq.assemble(pieces, 't2i', img_id=54, patch_size=16, pixel_layout='official'))
  return layout.Batch.from_rows(
      {k: jnp.asarray(np.stack([row[k] for row in rows])) for k in layout.FIELDS})


def test_jit_noising_and_loss_match_official():
  d = ref('jit_loss')
  t = d['t'][:, None, None, None, None]
  e = d['noise_scale'] * d['noise_unit']
  x_t = flow.interpolate(jnp.asarray(d['x']), jnp.asarray(t[..., 0]), jnp.asarray(e))
  np.testing.assert_allclose(x_t, d['x_t'], atol=1e-6)

  batch = jit_loss_batch(d)
  np.testing.assert_array_equal(batch.tokens_BT[:, :5], d['text_tokens'][:, :5])
  span = np.asarray(batch.span_ids_BT > 0)
  np.testing.assert_array_equal(span, d['image_masks_input'])  # time token + 3 of 4 patches
  target_BT = batch.gen_mask_BT & batch.is_patch_BT
  np.testing.assert_array_equal(target_BT, d['loss_token_mask'])
  x = batch.patches_BTP.astype(jnp.float32)
  target = flow.flow_target(x, batch, 'official', 16)
  np.testing.assert_array_equal(np.where(target_BT[..., None], target, 0), d['target_tokens'])
  t_BT = jnp.where(batch.span_ids_BT > 0, jnp.asarray(d['t'])[:, None], 1.0)
  loss, count = flow.flow_loss(jnp.asarray(d['x0_pred_tokens']), target, t_BT, target_BT,
                                     float(d['t_eps']))
  np.testing.assert_allclose(loss, d['loss'], rtol=1e-6)
  assert count == 6
  # The exact layout compares each token with its own block, which is not the official target.
  exact = flow.flow_loss(jnp.asarray(d['x0_pred_tokens']), x, t_BT, target_BT, 0.05)[0]
  assert abs(float(exact) - float(d['loss'])) > 1.0


# ---------------------------------------------------------------------------------------------
# Omni mask


def test_omni_mask_matches_official():
  d = ref('omni_mask')
  length = int(d['seq_len'])
  spans = [[tuple(map(int, s)) for s in row if s[0] >= 0 and s[1] > 0]
           for row in d['modality_positions']]
  batch = as_batch(span_batch(length, spans, grid=2))
  info = jax.tree.map(jnp.asarray, layout.row_info(batch))
  np.testing.assert_array_equal(layout.omni_mask_BTS(info, info), d['allowed'])


# ---------------------------------------------------------------------------------------------
# Sampler with CFG


class ToyInner(nnx.Module):
  """The reference README's toy model: conditional rows x0 = 0.5 z + 0.2 t, unconditional
  rows x0 = 0.25 z - 0.1 (the batch holds the conditional rows, then the unconditional)."""

  def __call__(self, batch, x_BTP, t_BT):
    cond = (jnp.arange(x_BTP.shape[0]) < x_BTP.shape[0] // 2)[:, None, None]
    t = t_BT[..., None]
    return None, jnp.where(cond, 0.5 * x_BTP + 0.2 * t, 0.25 * x_BTP - 0.1)


@pytest.mark.parametrize('run,sampler,steps,interval', [
    ('euler4', 'euler', 4, (0.0, 1.0)), ('heun4', 'heun', 4, (0.0, 1.0)),
    ('euler4_interval', 'euler', 4, (0.3, 0.8)), ('euler25', 'euler', 25, (0.0, 1.0))])
def test_sampler_with_cfg_matches_official(run, sampler, steps, interval):
  d = ref('sampler')
  p = 8
  image = d['noise_unit'][0, :, 0].transpose(1, 2, 0)  # [H, W, C]
  row = seq.assemble([seq.Text([1]), seq.Image(np.zeros((p, p, 3), np.uint8), generate=True)],
                     't2i', img_id=2, patch_size=p)
  batch = layout.Batch.from_rows(seq.stack_left_padded([row, row], patch_size=p, pad_id=0))
  noise = np.zeros(batch.patches_BTP.shape, np.float32)
  noise[:, 2] = seq.patchify(image, p)[0]
  out = sampling.sample_images(
      ToyInner(), batch, jax.random.key(0),
      config_lib.flow(noise_scale=float(d['noise_scale']), t_eps=0.05), steps=steps,
      sampler=sampler, cfg_scale=float(d['guidance_scale']),
      cfg_interval=interval, cfg_interval_open=True, prompt_cache=False,
      noise_BTP=jnp.asarray(noise), clip=False)
  final = seq.unpatchify(np.asarray(out[0, 2:3]), p, p, p)
  np.testing.assert_allclose(final, d[f'{run}.final'][0, :, 0].transpose(1, 2, 0), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(out[1]))  # both halves guided


def test_cfg_interval_openness():
  t = jnp.asarray([0.0, 0.3, 0.5, 0.8, 1.0])
  np.testing.assert_array_equal(sampling.in_cfg_interval(t, (0.3, 0.8), True),
                                [False, False, True, False, False])
  np.testing.assert_array_equal(sampling.in_cfg_interval(t, (0.3, 0.8), False),
                                [False, True, True, True, False])
  np.testing.assert_array_equal(sampling.in_cfg_interval(t, (0.0, 1.0), True),
                                [True, True, True, True, False])


def test_heun_calls_the_model_2s_minus_1_times():
  """Heun over S steps runs the model 2 S - 1 times (the last step is Euler), as the official
  sampler does, counted at run time."""
  calls = []

  class Counting(ToyInner):
    def __call__(self, batch, x_BTP, t_BT):
      jax.debug.callback(lambda: calls.append(1), ordered=True)
      return super().__call__(batch, x_BTP, t_BT)

  row = seq.assemble([seq.Text([1]), seq.Image(np.zeros((8, 8, 3), np.uint8), generate=True)],
                     't2i', img_id=2, patch_size=8)
  batch = layout.Batch.from_rows(seq.stack_left_padded([row], patch_size=8, pad_id=0))
  out = sampling.sample_images(Counting(), batch, jax.random.key(0), config_lib.flow(), steps=4,
                               sampler='heun', prompt_cache=False)
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert len(calls) == 7
