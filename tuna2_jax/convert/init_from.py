"""The parameters a new run starts from, as distinct from resuming a run.

Resuming (a workdir with checkpoints) restores the full state: parameters, optimizer state, EMA,
step and data position. Starting from other weights takes parameters only and builds a new
optimizer, EMA (= the parameters) and step 0:

  init_from            a training workdir (the previous stage): its latest checkpoint's params,
                       every one of them, with equal shapes
  init.decoder_from    a Qwen2 / Qwen2.5 Hugging Face folder, or the output of
                       `python -m tuna2_jax.convert.qwen2`: the decoder
  init.encoder_from    a SigLIP 2 (or SigLIP) Hugging Face folder, the output of
                       `python -m tuna2_jax.convert.siglip2`, or an encoder checkpoint of our
                       own encoder pretraining (convert/vision_ckpt.py): Tuna-R's ViT (not its
                       connector)

Later sources override earlier ones; parameters no source provides keep their initialisation.
Each array is read straight into its target sharding. Every source may be a local path or a
cloud URL (gs://...; anything etils.epath opens).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from tuna2_jax.convert import hf_folder, qwen2, siglip2, vision_ckpt
from tuna2_jax.convert.hf_folder import ConversionError


def wanted(config: ml_collections.ConfigDict) -> bool:
  init = config.get('init') or {}
  return bool(config.get('init_from') or init.get('decoder_from') or init.get('encoder_from'))


def check_required(config: ml_collections.ConfigDict) -> None:
  """Raises for a new run of a stage config (init.required) given nothing to start from."""
  if (config.get('init') or {}).get('required') and not wanted(config):
    raise ValueError('this stage starts from pretrained weights, but none were given: set '
                     '--config.init.decoder_from=DIR (Qwen2.5; and init.encoder_from for '
                     'Tuna-R) or --config.init_from=WORKDIR (the previous stage)')


def _sub(flat: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def _restore_params(path: str, wanted: dict[str, jax.ShapeDtypeStruct], where: str,
                    partial: bool, metadata=None) -> dict[str, jax.Array]:
  """{name: array} of the named arrays of an orbax checkpoint, in the wanted shardings.

  metadata: the checkpoint's tree of array metadata when the caller has read it (a training
  step's state item, whose metadata orbax keeps at the step, not in `path`)."""
  if metadata is None:
    metadata = ocp.PyTreeCheckpointer().metadata(path)
    metadata = getattr(metadata, 'item_metadata', metadata)
    metadata = getattr(metadata, 'tree', metadata)
  stored = {hf_folder.path_name(p): (hf_folder.path_keys(p), leaf) for p, leaf in
            jax.tree_util.tree_flatten_with_path(metadata)[0]}
  for name, want in sorted(wanted.items()):
    if name not in stored:
      raise ConversionError(f'{where}: parameter {name!r} is missing from the checkpoint')
    if tuple(stored[name][1].shape) != tuple(want.shape):
      raise ConversionError(f'{where}: parameter {name!r} has shape '
                            f'{tuple(stored[name][1].shape)} in the checkpoint; the model '
                            f'expects {tuple(want.shape)}')
  # The target tree takes the stored key names (with their 'value' levels) of wanted arrays.
  item = hf_folder.unflatten({'/'.join(stored[name][0]): want for name, want in wanted.items()})
  args = ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=partial)
  with ocp.PyTreeCheckpointer() as ckpt:
    return hf_folder.flat_paths(ckpt.restore(path, args=args))


def workdir_params(workdir: str, abstract: dict, shardings: dict, item: str = 'params',
                   where: str = 'init_from') -> tuple[dict[str, jax.Array], int]:
  """({parameter path: array}, step) of `item` ('params' or 'ema') of a training workdir's latest
  checkpoint, each array read straight into its sharding; nothing else of the state is read."""
  from tuna2_jax import checkpoint as ckpt_lib
  if not epath.Path(workdir).is_dir():
    raise FileNotFoundError(f'{where}={workdir!r}: no such training workdir')
  with ckpt_lib.Checkpointer(workdir, keep=1, save_every=1, async_save=False) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f'{where}={workdir!r}: no checkpoint under '
                              f'{os.path.join(workdir, ckpt_lib.CHECKPOINTS_DIR)}')
    metadata = ckpt.state_metadata(step)
  wanted = {f'{item}/{k}': jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
            for k, v in abstract.items()}
  # orbax reads metadata only through absolute paths (a relative one looks empty).
  path = os.path.join(hf_folder.absolute(workdir), ckpt_lib.CHECKPOINTS_DIR, str(step), 'state')
  restored = _restore_params(path, wanted, f'{where}={workdir!r} step {step}', partial=True,
                             metadata=metadata)
  return _sub(restored, f'{item}/'), step


def _decoder(path: str, config, abstract: dict, shardings: dict) -> dict:
  stored_config = epath.Path(path) / qwen2.DECODER_CONFIG_FILE
  if stored_config.exists():
    stored = ml_collections.ConfigDict(json.loads(stored_config.read_text())['decoder'])
    where = f'init.decoder_from={path!r}'
    for key in stored:
      if stored[key] != config.model.decoder[key]:
        raise ConversionError(f'{where}: decoder {key}={stored[key]} but the target '
                              f'model.decoder.{key}={config.model.decoder[key]}')
    wanted = {f'decoder/{k}': jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
              for k, v in abstract.items()}
    return _sub(_restore_params(os.path.join(hf_folder.absolute(path), qwen2.PARAMS_DIR), wanted,
                                where, partial=False), 'decoder/')
  return qwen2.load(path, abstract, shardings, target=config.model.decoder)


def _encoder(path: str, config, abstract: dict, shardings: dict) -> dict:
  if not vision_ckpt.is_checkpoint(path):
    return siglip2.load(path, abstract, shardings, patch_size=config.model.patch_size,
                        target=config.model.encoder)
  vision_ckpt.check_compatible(path, config.model.encoder, config.model.patch_size)
  wanted = {f'vision/{k}': jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
            for k, v in abstract.items() if vision_ckpt.pretrained(k)}
  return _sub(_restore_params(os.path.join(hf_folder.absolute(path), vision_ckpt.PARAMS_DIR),
                              wanted, f'init.encoder_from={path!r}', partial=False), 'vision/')


def pretrained_params(config: ml_collections.ConfigDict, abstract_params,
                      param_shardings) -> dict[str, jax.Array]:
  """{parameter path: array} from every configured source, in the parameters' shardings."""
  abstract = hf_folder.flat_paths(abstract_params)
  shardings = hf_folder.flat_paths(param_shardings)
  loaded = {}
  if config.get('init_from'):
    loaded.update(workdir_params(config.init_from, abstract, shardings)[0])
  init = config.get('init') or ml_collections.ConfigDict()
  if init.get('decoder_from'):
    part = _decoder(init.decoder_from, config, _sub(abstract, 'decoder/'),
                    _sub(shardings, 'decoder/'))
    loaded.update({f'decoder/{k}': v for k, v in part.items()})
  if init.get('encoder_from'):
    if config.model.vision != 'encoder':
      raise ConversionError(f'init.encoder_from={init.encoder_from!r} but model.vision='
                            f'{config.model.vision!r} has no vision encoder')
    part = _encoder(init.encoder_from, config, _sub(abstract, 'vision/'),
                    _sub(shardings, 'vision/'))
    loaded.update({f'vision/{k}': v for k, v in part.items()})
  return loaded


def start_from(state: dict, loaded: dict[str, jax.Array]) -> dict:
  """A fresh state whose parameters, and EMA, are replaced where `loaded` names them."""
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: loaded.get(hf_folder.path_name(path), leaf), state['params'])
  return dict(state, params=params, ema=jax.tree.map(jnp.copy, params))
