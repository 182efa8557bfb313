"""Device mesh and the one place that maps the model's logical axes onto mesh axes.

Parameters carry logical axis names (models/transformer.py); the config's rules table maps each
name to mesh axes. The same table serves parameters, optimizer state and EMA (optax states keep
the parameters' metadata), and the batch is split over ('data', 'fsdp').
"""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive, with at '
                     f'most one -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} cannot fill {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices '
                     f'but {len(devices)} are available')
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_mesh(spec: P, rules: Sequence[tuple[str, object]]) -> P:
  """Logical names -> mesh axes; a mesh axis already used by an earlier dim is not reused."""
  table = dict(rules)
  out, used = [], set()
  for name in spec:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f'logical axis {name!r} has no sharding rule; rules cover '
                       f'{sorted(table)}')
    target = table[name]
    axes = tuple(target) if isinstance(target, (list, tuple)) else (target,)
    axes = tuple(a for a in axes if a is not None and a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def check_rules(rules: Sequence[tuple[str, object]], mesh: Mesh) -> None:
  for logical, target in rules:
    for axis in (target if isinstance(target, (tuple, list)) else (target,)):
      if axis is not None and axis not in mesh.axis_names:
        raise ValueError(f'sharding rule {logical!r} -> {target!r} names mesh axis {axis!r}; '
                         f'the mesh has {mesh.axis_names}')


def tree_shardings(tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a pytree whose Variables carry logical axes (others replicate)."""
  check_rules(rules, mesh)
  specs = nnx.get_partition_spec(tree)

  def to_sharding(x):
    spec = x if isinstance(x, P) else P()
    return NamedSharding(mesh, logical_to_mesh(spec, rules))

  return jax.tree.map(to_sharding, specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assembles each process's rows into global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
