"""Ahead-of-time compile of the train step for a mesh: per-device memory before any hardware.

  python -m tuna2_jax.train --config=experiments/tuna2_7b.py --dry_run --dry_run_devices=64 \
      --config.mesh.fsdp=-1

Everything is abstract (jax.ShapeDtypeStruct with shardings): nothing is initialised or
allocated, only lowered and compiled. Parameter / optimizer / EMA bytes per device come from
the shardings (exact for any backend); arguments, outputs and temporaries come from XLA's memory
analysis of the compiled program. With --dry_run_devices the program is compiled for that many
fake CPU devices: the partitioning is the target's, but the temporaries are the CPU compiler's
(no TPU/GPU fusions or async collectives), a guide to within tens of percent.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from tuna2_jax import sharding
from tuna2_jax.data import sequence as seq

GIB = 1024 ** 3


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> dict:
  """The global batch as ShapeDtypeStructs split over the batch axes."""
  row = seq.empty_row(config.seq_len, config.model.patch_size, pad_id=0)
  split = sharding.batch_sharding(mesh, config.sharding_rules)
  return {k: jax.ShapeDtypeStruct((config.batch_size, *v.shape), v.dtype, sharding=split)
          for k, v in row.items()}


def memory_report(step_fn, abstract_state: dict, state_shardings: dict, batch: dict,
                  mesh) -> dict:
  """Compiles step_fn(state, batch, key) for abstract inputs; per-device bytes and timings."""
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract_state, state_shardings)
  key = jax.eval_shape(lambda: jax.random.key(0))
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch, key)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  out = {'mesh': dict(mesh.shape), 'devices': int(np.prod(list(mesh.shape.values()))),
         'lower_s': t1 - t0, 'compile_s': t2 - t1}
  for name in ('params', 'opt', 'ema'):
    out[f'{name}_bytes'] = sharding.per_device_bytes(abstract_state[name], state_shardings[name])
  out['batch_bytes'] = sharding.per_device_bytes(batch,
                                                 jax.tree.map(lambda b: b.sharding, batch))
  analysis = compiled.memory_analysis()
  for field in ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
                'temp_size_in_bytes', 'generated_code_size_in_bytes'):
    out[field.replace('_size_in_bytes', '_bytes')] = int(getattr(analysis, field, 0) or 0)
  # The state is donated: its outputs reuse the argument buffers (alias), so the peak is
  # arguments + temporaries + the outputs that are not aliased.
  out['peak_bytes'] = (out['argument_bytes'] + out['temp_bytes'] + out['output_bytes'] -
                       out['alias_bytes'])
  return out


def format_report(report: dict) -> str:
  lines = [f"mesh {report['mesh']} ({report['devices']} devices); lowered in "
           f"{report['lower_s']:.1f}s, compiled in {report['compile_s']:.1f}s",
           'per device:']
  for name, label in (('params', 'parameters'), ('opt', 'optimizer state'), ('ema', 'EMA'),
                      ('batch', 'batch'), ('argument', 'arguments (all of the above)'),
                      ('temp', 'temporaries (XLA)'), ('output', 'outputs'),
                      ('alias', 'outputs aliased to donated inputs'), ('peak', 'peak')):
    lines.append(f"  {label:<36} {report[f'{name}_bytes'] / GIB:10.3f} GiB")
  return '\n'.join(lines)
