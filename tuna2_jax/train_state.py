"""The training state (parameters, optimizer state, EMA, step) and how it is built or loaded.

The state is a plain dict pytree {'step', 'params', 'opt', 'ema'}; 'params' and 'ema' are
nnx.State trees whose Variables keep their logical axes, and optax states built from them keep
those axes too, so sharding.tree_shardings covers the whole state with one rules table.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from tuna2_jax import checkpoint as ckpt_lib
from tuna2_jax import flops
from tuna2_jax import sharding
from tuna2_jax import trainer
from tuna2_jax.models.tuna import Tuna, validate_model_config

# Logical names ride on Variables as metadata; placement happens through jit out_shardings.
nnx.use_eager_sharding(False)


def learning_rate(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, optim.lr, max(1, optim.warmup_steps))
  rest = max(1, total_steps - optim.warmup_steps)
  if optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(optim.lr, rest, alpha=optim.min_lr_ratio)
  elif optim.schedule == 'constant':
    decay = optax.constant_schedule(optim.lr)
  else:
    raise ValueError(f'optim.schedule={optim.schedule!r}: expected cosine or constant')
  return optax.join_schedules([warmup, decay], [optim.warmup_steps])


def _path(keys) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in keys)


def trainable_labels(params: nnx.State, pattern: str):
  """'train' / 'freeze' per parameter: a path is trained iff the regex matches it ('' = all)."""
  regex = re.compile(pattern) if pattern else None
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'train' if regex is None or regex.search(_path(path)) else 'freeze',
      params)


def trained_parts(config: ml_collections.ConfigDict, params: nnx.State | None = None):
  """The model parts (flops.PARTS) optim.trainable trains, for the step's model FLOPs; None
  when every parameter trains. params: the (abstract) parameters; None builds them."""
  if not config.optim.trainable:
    return None
  if params is None:
    params = abstract_model(config)[1]
  paths = [_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return flops.trained_parts(paths, config.model, config.optim.trainable)


def trained_mask(config: ml_collections.ConfigDict, params: nnx.State | None = None):
  """True per trained parameter (optim.trainable's labels), None when every parameter trains.

  params: the (abstract) parameters to label; None builds the abstract model for them.
  """
  if not config.optim.trainable:
    return None
  if params is None:
    params = abstract_model(config)[1]
  labels = trainable_labels(params, config.optim.trainable)
  return jax.tree.map(lambda label: label == 'train', labels)


def optimizer(config: ml_collections.ConfigDict, params: nnx.State) -> optax.GradientTransformation:
  o = config.optim
  adamw = optax.adamw(learning_rate(o, config.total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay)
  tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
  if not o.trainable:
    return tx
  # Frozen parameters get set_to_zero, which keeps no optimizer state for them.
  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()},
                               trainable_labels(params, o.trainable))


def build_model(config: ml_collections.ConfigDict, seed: int | None = None) -> Tuna:
  return Tuna(config.model, rngs=nnx.Rngs(config.seed if seed is None else seed))


def abstract_model(config: ml_collections.ConfigDict):
  """(graphdef, abstract params) without allocating anything."""
  model = nnx.eval_shape(lambda: build_model(config))
  return nnx.split(model, nnx.Param)


def init_state(config: ml_collections.ConfigDict, graphdef=None) -> dict:
  model = build_model(config)
  _, params = nnx.split(model, nnx.Param)
  tx = optimizer(config, params)
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': tx.init(params),
          'ema': jax.tree.map(jnp.copy, params)}


def abstract_state(config: ml_collections.ConfigDict) -> dict:
  return jax.eval_shape(lambda: init_state(config))


def state_shardings(config: ml_collections.ConfigDict, mesh) -> tuple[dict, dict]:
  """(abstract state, its NamedShardings) for the configured rules on this mesh."""
  return trainer.state_layout(lambda: init_state(config), mesh, config.sharding_rules)


def create_sharded_state(config: ml_collections.ConfigDict, mesh) -> dict:
  """Initialises the state directly into its shardings (never whole on one device)."""
  _, shardings = state_shardings(config, mesh)
  return trainer.init_into(lambda: init_state(config), shardings)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  text = ckpt_lib.read_config(workdir)
  if text is None:
    raise FileNotFoundError(f'no checkpoint to load: {workdir!r} has no config.json, so it is not '
                            'a training workdir')
  return ml_collections.ConfigDict(json.loads(text))


def has_ema(workdir: str) -> bool:
  """Whether the latest checkpoint's state holds an EMA (False also when there is none)."""
  with ckpt_lib.Checkpointer(workdir, keep=1, save_every=1, async_save=False) as ckpt:
    step = ckpt.latest_step()
    return step is not None and 'ema' in ckpt.state_metadata(step)


def load_model(workdir: str, *, use_ema: bool = True, mesh=None):
  """The trained model of a workdir's latest checkpoint: (model, config, step).

  Only the parameters are read: the EMA (use_ema) or the raw ones; a checkpoint without an EMA
  (an official one imported by convert/tuna2.py holds the parameters alone) gives its
  parameters either way.
  """
  from tuna2_jax.convert import hf_folder, init_from
  config = load_config(workdir)
  validate_model_config(config.model, config.data.image_size)
  mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  graphdef, abstract = abstract_model(config)
  flat = hf_folder.flat_paths(abstract)
  shardings = hf_folder.flat_paths(sharding.tree_shardings(abstract, mesh,
                                                           config.sharding_rules))
  item = 'ema' if use_ema and has_ema(workdir) else 'params'
  loaded, step = init_from.workdir_params(workdir, flat, shardings, item=item, where=workdir)
  params = jax.tree_util.tree_map_with_path(lambda p, _: loaded[hf_folder.path_name(p)],
                                            abstract)
  return nnx.merge(graphdef, params), config, step
