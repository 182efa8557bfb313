"""Device mesh and the one place that maps the model's logical axes onto mesh axes.

Parameters carry logical axis names (models/transformer.py); the config's rules table maps each
name to mesh axes. The same table serves parameters, optimizer state and EMA (optax states keep
the parameters' metadata), the batch (logical 'batch') and the residual-stream constraints the
model asks for through `constrain` while a train step is traced.

Mesh: axes (data, fsdp, tensor). Each has an in-slice size (`mesh.data`, ...: devices joined by
ICI, or by NVLink inside a GPU node) and an across-slice size (`mesh.dcn_data`, ...: slices of a
multi-slice TPU job, or GPU nodes); the mesh axis is their product, DCN-major. Keep DCN on
'data' (or 'fsdp' for very large models): its traffic is one gradient reduction per step.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tuna2_jax import layout

MESH_AXES = ('data', 'fsdp', 'tensor')
DCN_KEYS = tuple(f'dcn_{a}' for a in MESH_AXES)
BATCH = 'batch'  # the logical axis of the batch dimension
DEFAULT_BATCH_AXES = ('data', 'fsdp')  # used when a rules table has no 'batch' entry


def _fill(sizes: dict[str, int], total: int, unit: str) -> list[int]:
  """The sizes with their one -1 replaced so that they multiply to total."""
  values = list(sizes.values())
  if values.count(-1) > 1 or any(s == 0 or s < -1 for s in values):
    raise ValueError(f'mesh {sizes}: expected positive sizes, at most one -1')
  known = math.prod(s for s in values if s != -1)
  if -1 in values:
    if total % known:
      raise ValueError(f'mesh {sizes} cannot fill {total} {unit}: {total} is not divisible '
                       f'by {known}')
    values = [total // known if s == -1 else s for s in values]
  if math.prod(values) != total:
    raise ValueError(f'mesh {sizes} needs {math.prod(values)} {unit} but {total} are available')
  return values


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int,
               num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ICI sizes, DCN sizes) per MESH_AXES for num_devices spread over num_slices slices."""
  if num_devices % num_slices:
    raise ValueError(f'{num_devices} devices do not split into {num_slices} equal slices')
  dcn = _fill({k: int(mesh_cfg.get(k, 1)) for k in DCN_KEYS}, num_slices, 'slices')
  per_slice = num_devices // num_slices
  ici = _fill({a: int(mesh_cfg[a]) for a in MESH_AXES}, per_slice,
              'devices' if num_slices == 1 else 'devices per slice')
  return tuple(ici), tuple(dcn)


def _num_slices(devices: Sequence) -> int:
  return len({getattr(d, 'slice_index', 0) for d in devices})


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh of the config over `devices` (default: all of them).

  Several slices (TPU multi-slice) use the hybrid construction so that DCN links only join
  equal positions of different slices; one slice uses the topology-aware order on TPU.
  """
  devices = list(jax.devices() if devices is None else devices)
  wanted_slices = math.prod(int(mesh_cfg.get(k, 1)) for k in DCN_KEYS)
  # Without slice_index (CPU, most GPU set-ups) nodes stand in for slices: one per process.
  slices = _num_slices(devices)
  processes = len({d.process_index for d in devices})
  if slices == 1 and wanted_slices != 1 and processes > 1:
    slices = processes
  ici, dcn = mesh_shape(mesh_cfg, len(devices), slices)
  if math.prod(dcn) > 1:
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=_num_slices(devices) == 1)
  elif devices[0].platform == 'tpu':
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, MESH_AXES)


def mesh_from_sizes(data: int = 1, fsdp: int = 1, tensor: int = 1,
                    devices: Sequence | None = None) -> Mesh:
  """A one-slice mesh of the given sizes (for tools and tests)."""
  return make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), devices)


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


def mesh_axes_of(entry) -> tuple[str, ...]:
  """A rule's target (None, an axis name or several) as a tuple of mesh axis names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def check_divisible(tree, shardings) -> None:
  """Raises ValueError naming the first array dimension its mesh axes do not divide."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for (path, leaf), s in zip(leaves, jax.tree.leaves(shardings)):
    if not isinstance(s, NamedSharding):
      continue
    for dim, entry in enumerate(s.spec):
      axes = mesh_axes_of(entry)
      n = math.prod(s.mesh.shape[a] for a in axes)
      if leaf.shape[dim] % n:
        name = jax.tree_util.keystr(path, simple=True, separator='/')
        raise ValueError(
            f'{name}: dimension {dim} of shape {tuple(leaf.shape)} is not divisible by mesh '
            f'axes {axes} of size {n} (mesh {dict(s.mesh.shape)}); change the mesh or the '
            'sharding rule of that axis')


def tree_shardings(tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a pytree whose Variables carry logical axes (others replicate).

  Raises ValueError for a rule naming an axis the mesh lacks, or a mesh axis that does not
  divide the dimension it would split.
  """
  check_rules(rules, mesh)
  # A Variable without arrays (optax's MaskedNode: a frozen parameter's missing optimizer
  # state) keeps its empty value, so the shardings have exactly the tree's leaves.
  specs = jax.tree.map(
      lambda x: nnx.get_partition_spec(x) if jax.tree.leaves(x) else x, tree,
      is_leaf=lambda x: isinstance(x, nnx.Variable))

  def to_sharding(x):
    spec = x if isinstance(x, P) else P()
    return NamedSharding(mesh, logical_to_mesh(spec, rules))

  out = jax.tree.map(to_sharding, specs, is_leaf=lambda x: isinstance(x, P))
  check_divisible(tree, out)
  return out


def replicated_fraction(tree, shardings, axis: str = 'fsdp') -> tuple[float, list[tuple]]:
  """(share of the bytes of tree not split over `axis`, [(bytes, path, shape)] largest first)."""
  total, kept = 0, []
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for (path, leaf), s in zip(leaves, jax.tree.leaves(shardings)):
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    used = {a for entry in getattr(s, 'spec', ()) for a in mesh_axes_of(entry)}
    if axis not in used:
      kept.append((nbytes, jax.tree_util.keystr(path, simple=True, separator='/'),
                   tuple(leaf.shape)))
  kept.sort(reverse=True)
  return sum(k[0] for k in kept) / max(total, 1), kept


def check_replication(params, shardings, mesh: Mesh, max_fraction: float) -> float:
  """Under an fsdp mesh, raises when more than max_fraction of parameter bytes miss 'fsdp'."""
  fraction, kept = replicated_fraction(params, shardings)
  if mesh.shape.get('fsdp', 1) > 1 and fraction > max_fraction:
    largest = ', '.join(f'{name} {shape}' for _, name, shape in kept[:5])
    raise ValueError(
        f'{fraction:.1%} of the parameter bytes are not split over fsdp='
        f'{mesh.shape["fsdp"]} (limit max_replicated_fraction={max_fraction:.1%}); every fsdp '
        f'shard would hold a copy. Largest: {largest}. Map their logical axes to fsdp in '
        'sharding_rules')
  return fraction


def per_device_bytes(tree, shardings) -> int:
  """Bytes of tree held by one device (the largest shard of each array)."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = s.shard_shape(tuple(leaf.shape)) if hasattr(s, 'shard_shape') else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


# --- activations ---
_ACTIVATION_RULES: contextvars.ContextVar = contextvars.ContextVar('activation_rules',
                                                                   default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules):
  """While active (around tracing a step), `constrain` pins activations to the mesh."""
  token = _ACTIVATION_RULES.set(None if mesh is None else (mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVATION_RULES.reset(token)


def target_platform() -> str:
  """The platform the step being traced will run on: the active mesh's devices', else jax's.

  A step compiled ahead of time for TPU devices from a CPU host (dry_run.py) must choose its
  kernels for the TPU, not for the host's default backend.
  """
  active = _ACTIVATION_RULES.get()
  if active is None:
    return jax.default_backend()
  return active[0].devices.flat[0].platform


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """x with a sharding constraint from the rules table; unchanged outside activation_sharding."""
  active = _ACTIVATION_RULES.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_mesh(P(*logical_axes), rules)))


def per_shard(fn, in_axes: Sequence[Sequence[str | None]], out_axes: Sequence[str | None]):
  """fn run on each device's shards (shard_map) while activation_sharding is active, else fn.

  For kernels XLA cannot split itself (Pallas calls): their inputs arrive already split by the
  rules table's mapping of the given logical axes, and every shard is computed independently.
  """
  active = _ACTIVATION_RULES.get()
  if active is None:
    return fn
  mesh, rules = active
  spec = lambda axes: logical_to_mesh(P(*axes), rules)
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a) for a in in_axes),
                       out_specs=spec(out_axes), check_vma=False)


# --- batch ---
def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  """Rows split over the mesh axes of the 'batch' rule (default: data and fsdp)."""
  table = dict(rules or ())
  spec = logical_to_mesh(P(BATCH), rules) if BATCH in table else P(DEFAULT_BATCH_AXES)
  return NamedSharding(mesh, spec)


def batch_shards(mesh: Mesh, rules=None) -> int:
  spec = batch_sharding(mesh, rules).spec
  return math.prod(mesh.shape[a] for a in mesh_axes_of(spec[0] if spec else None))


def global_arrays(local, mesh: Mesh, rules=None):
  """Assembles each process's rows of a batch (a pytree of [B/P, ...] host arrays) into global
  arrays split over the batch axes.

  Process p holds rows [p * B/P, (p + 1) * B/P) of the global batch (data/pipeline.py), which
  are the rows of its devices as long as the batch axes lead the mesh (the default).
  """
  sharding = batch_sharding(mesh, rules)
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
                      local)


def global_batch(local: dict, mesh: Mesh, rules=None) -> layout.Batch:
  """The packed rows of a step as one global layout.Batch: `local` is this process's
  {field: [B/P, T, ...]} dict as the data pipeline yields it (layout.FIELDS; other keys are
  left out). The one place the pipeline's dict becomes the Batch the model side takes."""
  return global_arrays(layout.Batch.from_rows(local), mesh, rules)


def to_host(x) -> np.ndarray:
  """A jax array as numpy on every process, also when other processes hold parts of it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # only needed by multi-process jobs
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
