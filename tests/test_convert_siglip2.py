"""SigLIP 2 import: the encoder's features (before the connector) equal those of transformers'
Siglip2VisionModel at the last used layer; bad folders fail naming the tensor or key."""

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
from tuna2_jax.models.attention import MaskInfo
from tuna2_jax.models.vision_encoder import VisionEncoder

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

PATCH, GRID, TABLE = 4, 8, 4  # 4 px patches, 8 x 8 patch images, a 4 x 4 SigLIP position table


def save_tiny_siglip2(path, seed=0):
  config = transformers.Siglip2VisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
      num_channels=3, num_patches=TABLE * TABLE, patch_size=PATCH, layer_norm_eps=1e-6)
  config._attn_implementation = 'eager'
  torch.manual_seed(seed)
  model = transformers.Siglip2VisionModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


def _encoder(path):
  folder = hf_folder.HFFolder(str(path))
  cfg = siglip2.encoder_config(folder.config, max_grid=GRID)  # drops the last of 3 layers
  model = nnx.eval_shape(lambda: VisionEncoder(cfg, patch_size=PATCH, out_width=16, impl='dense',
                                               remat='none', rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model, nnx.Param)
  loaded = siglip2.load(str(path), hf_folder.flat_paths(abstract), patch_size=PATCH, target=cfg)
  fresh = nnx.state(VisionEncoder(cfg, patch_size=PATCH, out_width=16, impl='dense',
                                  remat='none', rngs=nnx.Rngs(0)), nnx.Param)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: loaded.get(hf_folder.path_name(p), x), fresh)
  return nnx.merge(graphdef, params), cfg, loaded


def test_features_match_transformers(tmp_path):
  ref_model = save_tiny_siglip2(tmp_path)
  enc, cfg, loaded = _encoder(tmp_path)
  assert cfg.num_layers == 2
  assert not any(k.startswith('connector') or k == 'mask_token' for k in loaded)
  rng = np.random.default_rng(0)
  n = GRID * GRID
  x = rng.uniform(-1, 1, (2, n, PATCH * PATCH * 3)).astype(np.float32)  # (row, col, ch) blocks
  with torch.no_grad():
    out = ref_model(pixel_values=torch.tensor(x), pixel_attention_mask=torch.ones(2, n),
                    spatial_shapes=torch.tensor([[GRID, GRID]] * 2), output_hidden_states=True)
  ref = out.hidden_states[cfg.num_layers].numpy()  # after layer 2 of 3, no post-norm
  rows, cols = np.divmod(np.arange(n), GRID)
  hw = jnp.asarray(np.broadcast_to(np.stack([rows, cols], -1), (2, n, 2)))
  info = MaskInfo(jnp.ones((2, n), jnp.int32), jnp.broadcast_to(jnp.arange(n), (2, n)),
                  jnp.ones((2, n), jnp.int32))
  ours = np.asarray(enc.features(jnp.asarray(x), patch_hw_BT2=hw, info=info))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
  print(f'\n  siglip2: max |features - transformers| = {np.abs(ours - ref).max():.2e}')


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
                                       max_grid=GRID, norm_eps=1e-6))
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
