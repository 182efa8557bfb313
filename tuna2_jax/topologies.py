"""TPU slices by name (v5p-128, v6e-256, ...): their shape, device kind and HBM, for compiling a
train step ahead of time from a host without TPUs (dry_run.py).

libtpu (`pip install -e '.[tpu-aot]'`) describes the devices of a slice that is not there
(jax.experimental.topologies.get_topology_desc); XLA's TPU compiler then partitions, fuses and
schedules for them exactly as on the pod. A name is the Cloud TPU accelerator type: the number
after the generation counts TensorCores on v5p (two per chip, one megacore device) and chips on
v5e / v6e. HBM is what libtpu lets one device's program use (its own out-of-memory limit).
"""

from __future__ import annotations

import dataclasses
import math
import os

GIB = 1024 ** 3

# Accelerator type -> chips per axis (the torus of the slice).
_V5P = {8: (2, 2, 1), 16: (2, 2, 2), 32: (2, 2, 4), 64: (2, 4, 4), 128: (4, 4, 4),
        256: (4, 4, 8), 384: (4, 4, 12), 512: (4, 8, 8), 768: (4, 8, 12), 1024: (8, 8, 8)}
_LITE = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
         256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  """One TPU slice as libtpu's topology description takes it."""
  name: str  # the accelerator type, e.g. 'v5p-128'
  topology_name: str  # '<generation>:<chips per axis>', e.g. 'v5:4x4x4'
  chip_config_name: str  # 'megacore' (v5p: one device per chip) or 'default'
  chips_per_host_bounds: tuple[int, int, int]
  wrap: tuple[bool, bool, bool]  # wrap-around links per axis
  device_kind: str  # jax's device_kind of its devices
  hbm_bytes: int  # per device

  @property
  def num_devices(self) -> int:
    return math.prod(int(n) for n in self.topology_name.split(':')[1].split('x'))


def _chips(shape: tuple[int, ...]) -> str:
  return 'x'.join(str(n) for n in shape)


def _table() -> dict[str, Topology]:
  out = {}
  for cores, shape in _V5P.items():
    # Slices of whole 4x4x4 cubes are tori; smaller ones are open meshes.
    torus = all(n % 4 == 0 for n in shape)
    out[f'v5p-{cores}'] = Topology(f'v5p-{cores}', f'v5:{_chips(shape)}', 'megacore', (2, 2, 1),
                                   (torus,) * 3, 'TPU v5', round(95.74 * GIB))
  for gen, kind, hbm in (('v5e', 'TPU v5 lite', round(15.75 * GIB)),
                         ('v6e', 'TPU v6 lite', round(31.25 * GIB))):
    for chips, shape in _LITE.items():
      # One host holds up to 8 chips (2x4); larger slices have hosts of 2x2 chips. An axis of
      # 16 chips wraps around.
      per_host = (1, 1, 1) if chips == 1 else (2, 4, 1) if chips == 8 else (2, 2, 1)
      wrap = tuple(n == 16 for n in shape) + (False,)
      out[f'{gen}-{chips}'] = Topology(f'{gen}-{chips}', f'{gen}:{_chips(shape)}', 'default',
                                       per_host, wrap, kind, hbm)
  return out


TOPOLOGIES = _table()


def get(name: str) -> Topology:
  """The slice of that accelerator type; ValueError listing the known ones otherwise."""
  if name not in TOPOLOGIES:
    raise ValueError(f'unknown TPU topology {name!r}: expected one of {", ".join(TOPOLOGIES)}')
  return TOPOLOGIES[name]


INSTALL_HINT = "pip install -e '.[tpu-aot]'"


def check_libtpu() -> None:
  """Raises ImportError with the install command when libtpu is not installed."""
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ImportError(f'compiling for a TPU topology needs libtpu: {INSTALL_HINT}') from e


def devices(topology: Topology, num_slices: int = 1) -> list:
  """The abstract devices of num_slices such slices (multi-slice: their slice_index differs).

  Nothing runs on them; they only serve as compile targets. Must be called while jax's own
  backend is the CPU (JAX_PLATFORMS=cpu), so that libtpu is loaded for compiling only.
  """
  check_libtpu()
  # No metadata server to ask (not a TPU VM); several compiles may load libtpu at once.
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  desc = topologies.get_topology_desc(
      platform='tpu', topology_name=topology.topology_name,
      chip_config_name=topology.chip_config_name,
      chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=num_slices,
      wrap=topology.wrap)
  found = list(desc.devices)
  if len(found) != topology.num_devices * num_slices:
    raise RuntimeError(f'libtpu described {len(found)} devices for {num_slices} x '
                       f'{topology.name}; expected {topology.num_devices * num_slices}')
  return found
