"""Vision-encoder checkpoints written by our own encoder pretraining (pretrain_encoder.py).

  DIR/params               orbax checkpoint of {'vision': the ViT's parameters}
  DIR/encoder_config.json  {'encoder': model.encoder, 'patch_size': p, 'source': ...}

Also what `python -m tuna2_jax.convert.siglip2` writes from a SigLIP 2 Hugging Face folder. A
Tuna-R config starts from one with --config.init.encoder_from=DIR (convert/init_from.py), as it
does from the Hugging Face folder itself: the ViT is loaded, the connector and the mask token keep
their initialisation.
"""

from __future__ import annotations

import json
import os

import ml_collections
from etils import epath

from tuna2_jax.convert import hf_folder
from tuna2_jax.convert.hf_folder import ConversionError

ENCODER_CONFIG_FILE = 'encoder_config.json'
PARAMS_DIR = 'params'
# Parts of the Tuna-R vision module that encoder pretraining does not train.
NOT_PRETRAINED = ('connector_', 'mask_token')


def is_checkpoint(path: str) -> bool:
  return (epath.Path(path) / ENCODER_CONFIG_FILE).exists()


def pretrained(name: str) -> bool:
  """Whether a vision parameter path ('blocks/attn/q_proj/kernel', ...) comes from pretraining."""
  return not name.startswith(NOT_PRETRAINED)


def save(output: str, vision_params, encoder: ml_collections.ConfigDict, patch_size: int,
         source: str = '') -> str:
  """Writes the ViT part of `vision_params` (an nnx.State of a VisionEncoder) to `output`."""
  import orbax.checkpoint as ocp
  if os.path.exists(output):
    raise ConversionError(f'encoder checkpoint {output!r} already exists; pick a new path')
  flat = {k: v for k, v in hf_folder.flat_paths(vision_params).items() if pretrained(k)}
  os.makedirs(output)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(os.path.abspath(output), PARAMS_DIR),
              {'vision': hf_folder.unflatten(flat)})
  with open(os.path.join(output, ENCODER_CONFIG_FILE), 'w') as f:
    json.dump({'encoder': encoder.to_dict(), 'patch_size': patch_size, 'source': source}, f,
              indent=2)
  return output


def check_compatible(path: str, target: ml_collections.ConfigDict, patch_size: int) -> None:
  """Raises ConversionError naming the first key where the checkpoint and the model differ."""
  stored = json.loads((epath.Path(path) / ENCODER_CONFIG_FILE).read_text())
  where = f'init.encoder_from={path!r}'
  if stored['patch_size'] != patch_size:
    raise ConversionError(f'{where}: patch_size={stored["patch_size"]} but the target '
                          f'model.patch_size={patch_size}')
  for key, value in stored['encoder'].items():
    if key not in target or value != target[key]:
      raise ConversionError(f'{where}: encoder {key}={value} but the target '
                            f'model.encoder.{key}={target.get(key)}')
