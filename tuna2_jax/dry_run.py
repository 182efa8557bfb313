"""Ahead-of-time compile of the train step for a mesh: per-device memory before any hardware.

  python -m tuna2_jax.train --config=experiments/tuna2_7b.py --dry_run \
      --dry_run_topology=v5p-128 [--dry_run_slices=2] [--dry_run_step_time=12.5]
  python -m tuna2_jax.train --config=experiments/tuna2_7b.py --dry_run --dry_run_devices=64

Everything is abstract (jax.ShapeDtypeStruct with shardings): nothing is initialised or
allocated, only lowered and compiled. Parameter / optimizer / EMA bytes per device come from
the shardings (exact for any backend); arguments, outputs, temporaries and code come from XLA's
memory analysis of the compiled program.

--dry_run_topology compiles for a TPU slice or a GPU node (topologies.py) from any host with
libtpu (or jax's CUDA plugin) installed: XLA's TPU (GPU) compiler, Mosaic (Triton) kernels and
every kernel choice made for the target, as on the pod. The report compares the peak with the
device's memory; a program that compiles may still not fit, and the command then exits with
status 1. --dry_run_devices compiles for
that many fake CPU devices: the target's partitioning, but the CPU compiler's temporaries (no
TPU/GPU fusions or async collectives) and dense attention, a guide to within tens of percent.
"""

from __future__ import annotations

import math
import time

import jax
import ml_collections
import numpy as np

from tuna2_jax import flops
from tuna2_jax import layout
from tuna2_jax import sharding
from tuna2_jax import topologies
from tuna2_jax import train_state
from tuna2_jax.data import sequence as seq

GIB = 1024 ** 3
# The rows the analytic FLOPs count: text->image samples, each an image of data.image_size
# with a caption of this many tokens, packed while they fit (the flow objective's usual row).
FLOPS_CAPTION_TOKENS = 64
# How the lowered program names Pallas kernels: splash through Mosaic (TPU), omni_hopper through
# Mosaic GPU, omni_flash through Triton.
KERNEL_CALLS = ('tpu_custom_call', 'mosaic_gpu_v2', '__gpu$xla.gpu.triton')


class DoesNotFit(RuntimeError):
  """The compiler refused the program: it needs more memory than a device has."""


def check_target(config: ml_collections.ConfigDict, topology: topologies.Topology,
                 num_slices: int) -> None:
  """Raises ValueError naming both numbers when the mesh does not fill num_slices x topology
  or the batch does not split over its batch axes; runs before anything is compiled."""
  if num_slices < 1:
    raise ValueError(f'--dry_run_slices={num_slices}: expected a positive number of slices')
  total = topology.num_devices * num_slices
  where = f'{num_slices} x {topology.name}' if num_slices > 1 else topology.name
  try:
    ici, dcn = sharding.mesh_shape(config.mesh, total, num_slices)
  except ValueError as e:
    raise ValueError(f'mesh {dict(config.mesh)} does not fit {where} ({total} devices, '
                     f'{topology.num_devices} per slice): {e}') from e
  sizes = {a: i * d for a, i, d in zip(sharding.MESH_AXES, ici, dcn)}
  split = sharding.logical_to_mesh(jax.sharding.PartitionSpec(sharding.BATCH),
                                   config.sharding_rules)[0]
  axes = (split,) if isinstance(split, str) else tuple(split or ())
  shards = math.prod(sizes[a] for a in axes)
  if config.batch_size % shards:
    raise ValueError(f'batch_size={config.batch_size} does not split over the {shards} batch '
                     f'shards ({" x ".join(axes)}) of mesh {sizes} on {where}')


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> layout.Batch:
  """The global batch (what sharding.global_batch gives) as ShapeDtypeStructs split over the
  batch axes."""
  row = seq.empty_row(config.seq_len, config.model.patch_size, pad_id=0)
  split = sharding.batch_sharding(mesh, config.sharding_rules)
  return layout.Batch.from_rows(
      {k: jax.ShapeDtypeStruct((config.batch_size, *v.shape), v.dtype, sharding=split)
       for k, v in row.items()})


def step_flops(config: ml_collections.ConfigDict) -> float | None:
  """Analytic model FLOPs of one train step whose rows are packed text->image samples (None
  when a row cannot hold one such sample)."""
  p, size = config.model.patch_size, config.data.image_size
  sample = seq.assemble([seq.Text(np.zeros(FLOPS_CAPTION_TOKENS, np.int32)),
                         seq.Image(np.zeros((size, size, 3), np.uint8), generate=True)],
                        't2i', img_id=1, patch_size=p)
  fit = config.seq_len // len(sample['tokens'])
  if not fit:
    return None
  row = seq.pack([sample] * fit, config.seq_len, patch_size=p, pad_id=0)
  return config.batch_size * flops.train_step_flops(
      config.model, layout.Batch.from_rows({k: v[None] for k, v in row.items()}),
      trained=train_state.trained_parts(config))


def memory_report(step_fn, abstract_state: dict, state_shardings: dict, batch: layout.Batch,
                  mesh) -> dict:
  """Compiles step_fn(state, batch, key) for abstract inputs; per-device bytes and timings."""
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract_state, state_shardings)
  key = jax.eval_shape(lambda: jax.random.key(0))
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch, key)
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    raise DoesNotFit(next((l for l in str(e).splitlines() if 'RESOURCE_EXHAUSTED' in l),
                          str(e))) from e
  t2 = time.perf_counter()
  device = mesh.devices.flat[0]
  out = {'mesh': dict(mesh.shape), 'devices': int(np.prod(list(mesh.shape.values()))),
         'device_kind': device.device_kind, 'platform': device.platform,
         'lower_s': t1 - t0, 'compile_s': t2 - t1,
         'kernel_calls': sum(lowered.as_text().count(c) for c in KERNEL_CALLS)}
  for name in ('params', 'opt', 'ema'):
    out[f'{name}_bytes'] = sharding.per_device_bytes(abstract_state[name], state_shardings[name])
  out['batch_bytes'] = sharding.per_device_bytes(batch,
                                                 jax.tree.map(lambda b: b.sharding, batch))
  analysis = compiled.memory_analysis()
  for field in ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
                'temp_size_in_bytes', 'generated_code_size_in_bytes'):
    out[field.replace('_size_in_bytes', '_bytes')] = int(getattr(analysis, field, 0) or 0)
  # The state is donated: its outputs reuse the argument buffers (alias), so the peak is
  # arguments + temporaries + the outputs that are not aliased (+ the program itself).
  out['peak_bytes'] = (out['argument_bytes'] + out['temp_bytes'] + out['output_bytes'] -
                       out['alias_bytes'] + out['generated_code_bytes'])
  return out


def add_target(report: dict, config: ml_collections.ConfigDict,
               topology: topologies.Topology | None, step_time_s: float | None) -> dict:
  """Adds HBM and fit (for a topology), analytic FLOPs and, given a step time, MFU."""
  report = dict(report, step_flops=step_flops(config), step_time_s=step_time_s)
  if topology is not None:
    report.update(topology=topology.name, hbm_bytes=topology.hbm_bytes,
                  fits=report['peak_bytes'] <= topology.hbm_bytes)
  peak = flops.peak_flops(report['device_kind'])
  if step_time_s and peak and report['step_flops']:
    report['mfu'] = report['step_flops'] / step_time_s / report['devices'] / peak
  return report


def format_report(report: dict) -> str:
  target = report.get('topology') or report['platform']
  lines = [f"{target}: {report['devices']} x {report['device_kind']}, mesh {report['mesh']}; "
           f"lowered in {report['lower_s']:.1f}s, compiled in {report['compile_s']:.1f}s "
           f"({report['kernel_calls']} Pallas kernel calls: Mosaic on TPU, Mosaic GPU or Triton "
           'on GPU)',
           'per device:']
  for name, label in (('params', 'parameters'), ('opt', 'optimizer state'), ('ema', 'EMA'),
                      ('batch', 'batch'), ('argument', 'arguments (all of the above)'),
                      ('output', 'outputs'), ('alias', 'outputs aliased to donated inputs'),
                      ('temp', 'temporaries (XLA)'), ('generated_code', 'code'),
                      ('peak', 'peak')):
    lines.append(f"  {label:<36} {report[f'{name}_bytes'] / GIB:10.3f} GiB")
  if 'hbm_bytes' in report:
    share = report['peak_bytes'] / report['hbm_bytes']
    lines.append(f"  {'HBM of the chip':<36} {report['hbm_bytes'] / GIB:10.3f} GiB")
    lines.append(f"  {'fits' if report['fits'] else 'DOES NOT FIT'}: peak is {share:.1%} of HBM")
  if report.get('step_flops') is None:
    lines.append('analytic model FLOPs: n/a (a row holds no whole text->image sample)')
  else:
    per_device = report['step_flops'] / report['devices']
    line = (f"analytic model FLOPs per step: {report['step_flops']:.3e} "
            f"({per_device / 1e12:.1f} TFLOP per device; rows of text->image samples)")
    if report.get('step_time_s'):
      line += (f"; at {report['step_time_s']:g} s per step: "
               f"{per_device / report['step_time_s'] / 1e12:.1f} TFLOP/s per device")
      line += (f", MFU {report['mfu']:.1%}" if 'mfu' in report else
               f", no MFU (no bf16 peak known for {report['device_kind']})")
    lines.append(line)
  return '\n'.join(lines)
