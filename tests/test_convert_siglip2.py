"""SigLIP 2 import: the encoder's features (before the connector) equal those of transformers'
Siglip2VisionModel at the last used layer for images of several grids (and a fixed-resolution
SiglipVisionModel's at its own); the position resize reduces to the table at its own grid; bad
folders fail naming the tensor or key."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tuna2_jax import train_state  # noqa: F401  (parameters carry logical axes, not placements)
from tuna2_jax.convert import hf_folder, siglip2
from tuna2_jax.convert.hf_folder import ConversionError
from tuna2_jax.data import sequence as seq
from tuna2_jax.layout import image_info
from tuna2_jax.models.vision_encoder import VisionEncoder, grid_positions

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

PATCH, TABLE = 4, 8  # 4 px patches, an 8 x 8 SigLIP position table (num_patches=64)
GRIDS = ((6, 6), (4, 6), (8, 8))  # (rows, cols): smaller than, non-square to and equal to it


def save_tiny_siglip2(path, seed=0, **overrides):
  kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_channels=3, num_patches=TABLE * TABLE, patch_size=PATCH, layer_norm_eps=1e-6)
  kw.update(overrides)
  config = transformers.Siglip2VisionConfig(**kw)
  config._attn_implementation = 'eager'
  return _save(transformers.Siglip2VisionModel, config, path, seed)


def _save(model_class, config, path, seed):
  torch.manual_seed(seed)
  model = model_class(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


def _encoder(path):
  folder = hf_folder.HFFolder(str(path))
  cfg = siglip2.encoder_config(folder.config, max_grid=0)  # the checkpoint's; drops 1 of 3 layers
  model = nnx.eval_shape(lambda: VisionEncoder(cfg, patch_size=PATCH, out_width=16, impl='dense',
                                               remat='none', rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model, nnx.Param)
  loaded = siglip2.load(str(path), hf_folder.flat_paths(abstract), patch_size=PATCH, target=cfg)
  fresh = nnx.state(VisionEncoder(cfg, patch_size=PATCH, out_width=16, impl='dense',
                                  remat='none', rngs=nnx.Rngs(0)), nnx.Param)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: loaded.get(hf_folder.path_name(p), x), fresh)
  return nnx.merge(graphdef, params), cfg, loaded


def _grid_BT4(gh, gw):
  """(row, col, gh, gw) of the gh x gw patches of one image [1, gh*gw, 4]."""
  return seq.grid_of(gh, gw)[None]


def _features(enc, x_BNP, grids, length):
  """Our features of one image per row, (rows, cols) patches each, padded to length tokens."""
  b = len(grids)
  grid_BN4 = np.zeros((b, length, 4), np.int32)
  valid_BN = np.zeros((b, length), np.int32)
  for i, (gh, gw) in enumerate(grids):
    grid_BN4[i, :gh * gw] = _grid_BT4(gh, gw)[0]
    valid_BN[i, :gh * gw] = 1
  info = image_info(jnp.asarray(valid_BN))
  return np.asarray(enc.features(jnp.asarray(x_BNP), patch_grid_BT4=jnp.asarray(grid_BN4),
                                 info=info))


def test_position_resize_is_the_antialiased_bilinear_one_and_exact_at_the_tables_grid():
  n, d = 5, 3
  table = np.random.default_rng(0).standard_normal((n * n, d)).astype(np.float32)
  at_n = np.asarray(grid_positions(jnp.asarray(table), jnp.asarray(_grid_BT4(n, n))))[0]
  np.testing.assert_array_equal(at_n, table)  # row * n + col, not an approximation of it
  square = torch.tensor(table.reshape(n, n, d)).permute(2, 0, 1)[None]
  for gh, gw in ((3, 4), (7, 2), (1, 9), (5, 8)):  # shrinking, growing and both
    ours = np.asarray(grid_positions(jnp.asarray(table), jnp.asarray(_grid_BT4(gh, gw))))[0]
    want = torch.nn.functional.interpolate(square, size=(gh, gw), mode='bilinear',
                                           align_corners=False, antialias=True)
    np.testing.assert_allclose(ours, want[0].permute(1, 2, 0).reshape(-1, d).numpy(),
                               rtol=0, atol=1e-5, err_msg=f'{gh} x {gw}')
    resized = jax.image.resize(table.reshape(n, n, d), (gh, gw, d), 'linear', antialias=True)
    np.testing.assert_allclose(ours, np.asarray(resized).reshape(-1, d), rtol=0, atol=1e-5)
  text = np.asarray(grid_positions(jnp.asarray(table), jnp.zeros((1, 2, 4), jnp.int32)))
  assert np.isfinite(text).all()  # non-patch tokens (grid 0 x 0) stay finite


def test_features_match_transformers_at_every_grid(tmp_path):
  """SigLIP 2 resizes its 8 x 8 table to each image's grid: 6 x 6, 4 x 6 and 8 x 8 here."""
  ref_model = save_tiny_siglip2(tmp_path)
  enc, cfg, loaded = _encoder(tmp_path)
  assert cfg.num_layers == 2 and cfg.max_grid == TABLE
  assert not any(k.startswith('connector') or k == 'mask_token' for k in loaded)
  n = TABLE * TABLE
  x = np.random.default_rng(0).uniform(-1, 1, (len(GRIDS), n, PATCH * PATCH * 3))
  x = x.astype(np.float32)  # (row, col, ch) blocks, the padding past each image's patches too
  mask = np.array([[i < gh * gw for i in range(n)] for gh, gw in GRIDS], np.int64)
  with torch.no_grad():
    out = ref_model(pixel_values=torch.tensor(x), pixel_attention_mask=torch.tensor(mask),
                    spatial_shapes=torch.tensor(GRIDS), output_hidden_states=True)
  ref = out.hidden_states[cfg.num_layers].numpy()  # after layer 2 of 3, no post-norm
  ours = _features(enc, x, GRIDS, n)
  for i, (gh, gw) in enumerate(GRIDS):
    np.testing.assert_allclose(ours[i, :gh * gw], ref[i, :gh * gw], rtol=0, atol=1e-4,
                               err_msg=f'grid {gh} x {gw}')
  worst = max(np.abs(ours[i, :h * w] - ref[i, :h * w]).max() for i, (h, w) in enumerate(GRIDS))
  print(f'\n  siglip2: max |features - transformers| over grids {GRIDS} = {worst:.2e}')


def test_fixed_resolution_siglip_matches_transformers(tmp_path):
  """A SiglipVisionModel (Conv2d patches, image_size instead of num_patches) at its own grid."""
  side = 4  # 16 px images of 4 px patches
  config = transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
      num_channels=3, image_size=side * PATCH, patch_size=PATCH, layer_norm_eps=1e-6)
  config._attn_implementation = 'eager'
  ref_model = _save(transformers.SiglipVisionModel, config, tmp_path, seed=1)
  enc, cfg, _ = _encoder(tmp_path)
  assert cfg.max_grid == side
  image = np.random.default_rng(1).uniform(-1, 1, (2, side * PATCH, side * PATCH, 3))
  image = image.astype(np.float32)
  with torch.no_grad():
    out = ref_model(pixel_values=torch.tensor(image.transpose(0, 3, 1, 2)),
                    output_hidden_states=True)
  ref = out.hidden_states[cfg.num_layers].numpy()
  x = np.stack([seq.patchify(im, PATCH) for im in image])
  ours = _features(enc, x, [(side, side)] * 2, side * side)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.fixture(scope='module')
def good_folder(tmp_path_factory):
  path = tmp_path_factory.mktemp('siglip2_good')
  save_tiny_siglip2(path)
  return path


@pytest.mark.parametrize('changes, match', [
    (dict(hidden_size=48), 'hidden_size'),
    (dict(num_hidden_layers=4), 'encoder.layers.3.'),
    (dict(model_type='clip_vision_model'), 'clip_vision_model'),
])
def test_bad_folder_is_refused(good_folder, tmp_path, changes, match):
  path = tmp_path / 'bad'
  shutil.copytree(good_folder, path)
  config = json.loads((path / 'config.json').read_text())
  config.update(changes)
  (path / 'config.json').write_text(json.dumps(config))
  cfg = ml_collections.ConfigDict(dict(width=32, num_layers=2, num_heads=4, mlp_dim=64,
                                       max_grid=TABLE, norm_eps=1e-6))
  with pytest.raises(ConversionError, match=match):
    siglip2.load(str(path), {}, patch_size=PATCH, target=cfg)


def test_full_siglip2_checkpoint_loads_its_vision_tower(good_folder, tmp_path):
  """A full (vision + text) SigLIP 2 folder prefixes the tower with 'vision_model.'."""
  from safetensors.numpy import save_file
  folder = hf_folder.HFFolder(str(good_folder))
  tensors = {f'vision_model.{n}': np.asarray(folder.tensor(n)) for n in folder.shapes}
  tensors['text_model.embeddings.token_embedding.weight'] = np.zeros((8, 4), np.float32)
  full = tmp_path / 'full'
  full.mkdir()
  save_file(tensors, str(full / 'model.safetensors'))
  (full / 'config.json').write_text(json.dumps(
      {'architectures': ['Siglip2Model'], 'model_type': 'siglip2', 'text_config': {},
       'vision_config': folder.config}))
  _, cfg, bare = _encoder(good_folder)
  _, _, prefixed = _encoder(full)
  assert set(bare) == set(prefixed)
  for k in bare:
    np.testing.assert_array_equal(np.asarray(bare[k]), np.asarray(prefixed[k]))
