"""Compile targets by name: TPU slices (v5p-128, v6e-256, ...) and GPU nodes (h100-8), with
their shape, device kind and memory, for compiling a train step ahead of time from a host that
has none of them (dry_run.py). GPU: h100-1 (one GPU) and h100-8 (a node).

TPU: libtpu (`pip install -e '.[tpu-aot]'`) describes the devices of a slice that is not there
(jax.experimental.topologies.get_topology_desc); XLA's TPU compiler then partitions, fuses and
schedules for them exactly as on the pod. A name is the Cloud TPU accelerator type: the number
after the generation counts TensorCores on v5p (two per chip, one megacore device) and chips on
v5e / v6e. HBM is what libtpu lets one device's program use (its own out-of-memory limit).

GPU: jax's CUDA plugin (`pip install -e '.[gpu-aot]'`, no CUDA libraries needed) compiles for
GPUs described by a target config (the device's properties, written out below) instead of a
driver query. Slices are nodes of 8 GPUs joined by the network.
"""

from __future__ import annotations

import dataclasses
import importlib
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
  """One TPU slice as libtpu's topology description takes it (or one GPU node)."""
  name: str  # the accelerator type, e.g. 'v5p-128'
  topology_name: str  # '<generation>:<chips per axis>', e.g. 'v5:4x4x4'; GPU: 'h100:8'
  chip_config_name: str  # 'megacore' (v5p: one device per chip) or 'default'
  chips_per_host_bounds: tuple[int, int, int]
  wrap: tuple[bool, bool, bool]  # wrap-around links per axis
  device_kind: str  # jax's device_kind of its devices
  hbm_bytes: int  # per device
  platform: str = 'tpu'

  @property
  def num_devices(self) -> int:
    return math.prod(int(n) for n in self.topology_name.split(':')[1].split('x'))


# H100 SXM (80 GB HBM3) as XLA's GPU compiler sees it: the fields of its GpuTargetConfigProto
# that the compiler reads for partitioning, fusion and scheduling (NVIDIA's data sheet values).
_H100_DEVICE_INFO = dict(
    threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
    shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132,
    fpus_per_core=128, block_dim_limit_x=2147483647, block_dim_limit_y=65535,
    block_dim_limit_z=65535, memory_bandwidth=3352320000000, l2_cache_size=52428800,
    clock_rate_ghz=1.98, device_memory_size=84942979072, shared_memory_per_block_optin=232448,
    registers_per_core_limit=65536, registers_per_block_limit=65536)
_H100_NAME = 'NVIDIA H100 80GB HBM3'
GPUS_PER_NODE = 8


def _gpu_target_config(info: dict, compute_capability: tuple[int, int], name: str) -> str:
  """The text-format GpuTargetConfigProto of a device."""
  fields = ''.join(f'  {k}: {v}\n' for k, v in info.items())
  major, minor = compute_capability
  return (f'gpu_device_info {{\n{fields}  cuda_compute_capability {{ major: {major} minor: '
          f'{minor} }}\n}}\nplatform_name: "CUDA"\n'
          f'dnn_version_info {{ major: 9 minor: 8 patch: 0 }}\n'
          f'device_description_str: "{name}"\n')


_H100_CONFIG = _gpu_target_config(_H100_DEVICE_INFO, (9, 0), _H100_NAME)
# One GPU (h100-1: what the one-GPU benchmarks measure) or a node of 8.
_GPU_TARGET_CONFIGS = {f'h100-{n}': _H100_CONFIG for n in (1, GPUS_PER_NODE)}


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
  for name in _GPU_TARGET_CONFIGS:
    out[name] = Topology(name, f'h100:{name.split("-")[1]}', 'default', (1, 1, 1),
                         (False,) * 3, _H100_NAME, _H100_DEVICE_INFO['device_memory_size'],
                         platform='gpu')
  return out


TOPOLOGIES = _table()


def get(name: str) -> Topology:
  """The slice of that accelerator type; ValueError listing the known ones otherwise."""
  if name not in TOPOLOGIES:
    raise ValueError(f'unknown topology {name!r}: expected one of {", ".join(TOPOLOGIES)}')
  return TOPOLOGIES[name]


def check_compiler(topology: Topology) -> None:
  """Raises ImportError with the install command when the target's compiler is missing."""
  module, what, extra = (('libtpu', 'libtpu', 'tpu-aot') if topology.platform == 'tpu' else
                         ('jax_plugins.xla_cuda12', "jax's CUDA plugin", 'gpu-aot'))
  try:
    importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f'compiling for {topology.name} needs {what}: '
                      f"pip install -e '.[{extra}]'") from e


def devices(topology: Topology, num_slices: int = 1) -> list:
  """The abstract devices of num_slices such slices (multi-slice: their slice_index differs;
  GPU nodes: their process_index).

  Nothing runs on them; they only serve as compile targets. Must be called while jax's own
  backend is the CPU (JAX_PLATFORMS=cpu), so that libtpu is loaded for compiling only.
  """
  check_compiler(topology)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  if topology.platform == 'gpu':
    desc = topologies.get_topology_desc(
        'cuda', 'cuda', topology=f'1x{num_slices}x{topology.num_devices}',
        target_config=_GPU_TARGET_CONFIGS[topology.name])
  else:
    # No metadata server to ask (not a TPU VM); several compiles may load libtpu at once.
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
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
