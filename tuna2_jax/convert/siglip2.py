r"""SigLIP 2 (and fixed-resolution SigLIP) vision towers (a Hugging Face folder) -> Tuna-R's
vision encoder.

  python -m tuna2_jax.convert.siglip2 --hf_dir=DIR --output=CKPT [--max_grid=N]

writes the encoder checkpoint of convert/vision_ckpt.py (CKPT/params, CKPT/encoder_config.json);
a Tuna-R config starts from it (or straight from DIR) with --config.init.encoder_from=CKPT.

Reads a NaFlex Siglip2VisionModel folder, a fixed-resolution SiglipVisionModel folder (a Conv2d
patch embedding and image_size instead of num_patches), or a full (vision + text) model of
either, whose vision tensors carry a 'vision_model.' prefix; only the vision tower's tensors are
used. As the paper does, the encoder keeps the first model.encoder.num_layers layers (26 of
So400M's 27) and drops the last one, the post-LayerNorm and the pooling head.

Positions: SigLIP 2 resizes its square n x n table (bilinear, antialiased) to each image's patch
grid, and so does our encoder (models/vision_encoder.py) from its max_grid x max_grid table.
With max_grid = n (the default of the command line; So400M/16: 16 for the NaFlex checkpoint,
32 for the 512 px one) the table is copied as it is and features equal SigLIP 2's at every grid.
Another max_grid resizes the table once here, so each image's positions are then resized twice
(close to SigLIP 2's, not equal). The connector and the mask token are not part of SigLIP and
keep their initialisation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

from tuna2_jax import config_lib
from tuna2_jax.convert import hf_folder, vision_ckpt
from tuna2_jax.convert.hf_folder import ConversionError, Mapping

MODEL_TYPES = ('siglip2', 'siglip2_vision_model', 'siglip', 'siglip_vision_model')
_FULL_MODELS = ('siglip2', 'siglip')  # vision + text: the tower's config is 'vision_config'
PREFIX = 'vision_model.'
_ACT = 'gelu_pytorch_tanh'  # the tanh GELU our encoder uses
_SAME = (('width', 'hidden_size'), ('num_heads', 'num_attention_heads'),
         ('mlp_dim', 'intermediate_size'), ('norm_eps', 'layer_norm_eps'))


def vision_config(hf: dict, where: str) -> dict:
  """The vision part of a SigLIP (2) config.json, with num_patches; raises on an unknown type."""
  kind = hf.get('model_type')
  if kind not in MODEL_TYPES:
    raise ConversionError(f'{where}: config.json model_type={kind!r} (architectures='
                          f'{hf.get("architectures")}); expected one of {MODEL_TYPES}')
  vision = dict(hf.get('vision_config', {}) if kind in _FULL_MODELS else hf)
  if 'num_patches' not in vision and 'image_size' in vision and 'patch_size' in vision:
    vision['num_patches'] = (vision['image_size'] // vision['patch_size']) ** 2  # fixed size
  for key in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
              'patch_size', 'num_patches'):
    if key not in vision:
      raise ConversionError(f'{where}: config.json has no vision {key!r}')
  act = vision.get('hidden_act', _ACT)
  if act != _ACT:
    raise ConversionError(f'{where}: hidden_act={act!r}; the encoder implements {_ACT!r}')
  return vision


def encoder_config(hf: dict, max_grid: int, where: str = 'config.json',
                   drop_last: int = 1) -> ml_collections.ConfigDict:
  """Our encoder config for a SigLIP (2) config.json, keeping all but the last drop_last layers.

  max_grid: the side of the encoder's square position table; 0 keeps the checkpoint's.
  """
  v = vision_config(hf, where)
  max_grid = max_grid or math.isqrt(v['num_patches'])
  return config_lib.vision_encoder(
      v['hidden_size'], v['num_hidden_layers'] - drop_last, v['num_attention_heads'],
      v['intermediate_size'], max_grid, norm_eps=float(v.get('layer_norm_eps', 1e-6)))


def check_compatible(v: dict, target: ml_collections.ConfigDict, patch_size: int,
                     where: str) -> None:
  for ours, theirs in _SAME:
    theirs_value = v.get(theirs, 1e-6) if theirs == 'layer_norm_eps' else v[theirs]
    if theirs_value != target[ours]:
      raise ConversionError(f'{where}: config.json {theirs}={theirs_value} but the target '
                            f'model.encoder.{ours}={target[ours]}')
  if v['num_hidden_layers'] < target.num_layers:
    raise ConversionError(f'{where}: config.json num_hidden_layers={v["num_hidden_layers"]} but '
                          f'model.encoder.num_layers={target.num_layers} are to be loaded')
  if v['patch_size'] != patch_size:
    raise ConversionError(f'{where}: config.json patch_size={v["patch_size"]} but '
                          f'model.patch_size={patch_size}')


def hf_shapes(v: dict, patch_embedding_shape: tuple[int, ...],
              prefix: str = PREFIX) -> dict[str, tuple[int, ...]]:
  """Every vision tensor of a SigLIP 2 checkpoint (all its layers)."""
  w, m = v['hidden_size'], v['intermediate_size']
  p = v['patch_size']
  if len(patch_embedding_shape) != 4:  # the NaFlex Linear; fixed-size towers store a Conv2d
    patch_embedding_shape = (w, 3 * p * p)
  layer = {'layer_norm1.weight': (w,), 'layer_norm1.bias': (w,), 'layer_norm2.weight': (w,),
           'layer_norm2.bias': (w,), 'mlp.fc1.weight': (m, w), 'mlp.fc1.bias': (m,),
           'mlp.fc2.weight': (w, m), 'mlp.fc2.bias': (w,)}
  for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
    layer.update({f'self_attn.{name}.weight': (w, w), f'self_attn.{name}.bias': (w,)})
  out = {f'{prefix}embeddings.patch_embedding.weight': tuple(patch_embedding_shape),
         f'{prefix}embeddings.patch_embedding.bias': (w,),
         f'{prefix}embeddings.position_embedding.weight': (v['num_patches'], w)}
  for i in range(v['num_hidden_layers']):
    out.update({f'{prefix}encoder.layers.{i}.{k}': s for k, s in layer.items()})
  return out


def plan(num_layers: int, prefix: str = PREFIX) -> dict[str, Mapping]:
  """{encoder parameter path: Mapping} for the tensors that map as they are."""
  per_layer = lambda key: tuple(f'{prefix}encoder.layers.{i}.{key}' for i in range(num_layers))
  out = {'patch/bias': Mapping((f'{prefix}embeddings.patch_embedding.bias',))}
  for ours, theirs in (('norm1', 'layer_norm1'), ('norm2', 'layer_norm2')):
    out[f'blocks/{ours}/scale'] = Mapping(per_layer(f'{theirs}.weight'), stacked=True)
    out[f'blocks/{ours}/bias'] = Mapping(per_layer(f'{theirs}.bias'), stacked=True)
  for ours, theirs in (('attn/q_proj', 'self_attn.q_proj'), ('attn/k_proj', 'self_attn.k_proj'),
                       ('attn/v_proj', 'self_attn.v_proj'), ('attn/o_proj', 'self_attn.out_proj'),
                       ('fc1', 'mlp.fc1'), ('fc2', 'mlp.fc2')):
    out[f'blocks/{ours}/kernel'] = Mapping(per_layer(f'{theirs}.weight'), transpose=True,
                                           stacked=True)
    out[f'blocks/{ours}/bias'] = Mapping(per_layer(f'{theirs}.bias'), stacked=True)
  return out


def resize_positions(table_NW: np.ndarray, grid: int) -> np.ndarray:
  """A square (n x n) position table resized to grid x grid, as SigLIP 2 resizes it per image;
  returned unchanged when grid == n."""
  n = math.isqrt(table_NW.shape[0])
  if grid == n:
    return np.asarray(table_NW, np.float32)
  square = jnp.asarray(np.asarray(table_NW, np.float32).reshape(n, n, -1))
  resized = jax.image.resize(square, (grid, grid, square.shape[-1]), 'linear', antialias=True)
  return np.asarray(resized).reshape(grid * grid, -1)


def load(hf_dir: str, abstract: dict[str, jax.ShapeDtypeStruct],
         shardings: dict[str, jax.sharding.Sharding] | None = None, *, patch_size: int,
         target: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """{encoder parameter path: array} for the ViT part of the encoder (not the connector)."""
  folder = hf_folder.HFFolder(hf_dir)
  v = vision_config(folder.config, hf_dir)
  check_compatible(v, target, patch_size, hf_dir)
  shapes = folder.shapes
  # A full SigLIP 2 model prefixes its vision tensors; a bare vision tower does not.
  prefix = PREFIX if any(n.startswith(PREFIX) for n in shapes) else ''
  patch_name = f'{prefix}embeddings.patch_embedding.weight'
  expected = hf_shapes(v, shapes.get(patch_name, ()), prefix)
  vision_only = {n: s for n, s in shapes.items() if n.startswith(prefix)}
  unused = (f'{prefix}post_layernorm.', f'{prefix}head.')
  hf_folder.check_shapes(expected, vision_only, hf_dir, lambda n: n.startswith(unused))
  if math.isqrt(v['num_patches']) ** 2 != v['num_patches']:
    raise ConversionError(f'{hf_dir}: num_patches={v["num_patches"]} is not a square grid')
  if len(shapes[patch_name]) == 4 and shapes[patch_name][1] != 3:
    raise ConversionError(f'{hf_dir}: {patch_name} has shape {shapes[patch_name]}; expected 3 '
                          'input channels')
  out = hf_folder.load(plan(target.num_layers, prefix), folder, abstract, shardings)
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  sharding_of = lambda path: default if shardings is None else shardings[path]
  # Small tensors, rearranged on the host: [W, C, p, p] or [W, p*p*C] -> [(row, col, ch), W].
  patch = np.asarray(folder.tensor(patch_name), np.float32)
  if patch.ndim == 4:
    patch = patch.transpose(2, 3, 1, 0).reshape(-1, patch.shape[0])
  else:
    patch = patch.T
  table = resize_positions(folder.tensor(f'{prefix}embeddings.position_embedding.weight'),
                           target.max_grid)
  for path, value in (('patch/kernel', patch), ('pos_embed', table)):
    if value.shape != tuple(abstract[path].shape):
      raise ConversionError(f'{hf_dir}: {path!r} would have shape {value.shape}; the target '
                            f'model expects {tuple(abstract[path].shape)}')
    out[path] = hf_folder.place(lambda index, value=value: value[index], abstract[path],
                                sharding_of(path))
  return out


def abstract_encoder(cfg: ml_collections.ConfigDict, patch_size: int) -> dict:
  """{parameter path: ShapeDtypeStruct} of a standalone float32 ViT (no connector)."""
  from tuna2_jax.models.vision_encoder import VisionEncoder
  with nnx.use_eager_sharding(False):  # logical axes as metadata, as train_state keeps them
    model = nnx.eval_shape(lambda: VisionEncoder(cfg, patch_size=patch_size, out_width=None,
                                                 impl='dense', remat='none', rngs=nnx.Rngs(0)))
  return hf_folder.flat_paths(nnx.state(model, nnx.Param))


def convert(hf_dir: str, output: str, max_grid: int = 0) -> str:
  """Writes the encoder checkpoint of vision_ckpt.py to output; returns output.

  max_grid: the side of the encoder's position table; 0 keeps the checkpoint's (exact).
  """
  folder = hf_folder.HFFolder(hf_dir)
  hf_folder.check_new_output(output)
  cfg = encoder_config(folder.config, max_grid, hf_dir)
  patch_size = vision_config(folder.config, hf_dir)['patch_size']
  params = load(hf_dir, abstract_encoder(cfg, patch_size), patch_size=patch_size, target=cfg)
  return vision_ckpt.save(output, params, cfg, patch_size, source=hf_dir)


def main(argv):
  del argv
  out = convert(flags.FLAGS.hf_dir, flags.FLAGS.output, flags.FLAGS.max_grid)
  print(f'wrote {out}')


if __name__ == '__main__':
  from tuna2_jax import cli
  hf_folder.define_import_flags()
  flags.DEFINE_integer('max_grid', 0, 'Side of the encoder\'s square position table (the '
                       'config\'s model.encoder.max_grid); 0 keeps the checkpoint\'s.')
  cli.run(main)
