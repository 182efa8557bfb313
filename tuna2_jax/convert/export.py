r"""Trained parameters -> safetensors with a config.json.

  python -m tuna2_jax.convert.export --workdir=DIR --output=OUT [--use_ema=false]

Writes OUT/model-00001-of-0000N.safetensors (at most --shard_gb each), the
model.safetensors.index.json that lists which file holds each tensor, and OUT/config.json (the
run's config). Tensor names are the parameter paths with dots ('decoder.blocks.attn.q_proj.kernel')
in our layouts: kernels [in, out], per-layer parameters stacked on a leading layers axis.
Parameters are fetched one at a time, so the host holds at most one shard file's worth.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import flags

from tuna2_jax.convert import hf_folder
from tuna2_jax.convert.hf_folder import ConversionError

INDEX_FILE = 'model.safetensors.index.json'


def export(params, config_json: str, output: str, shard_bytes: int = 2 << 30) -> list[str]:
  """Writes params (an nnx.State or nested dict of arrays); returns the written file names."""
  from safetensors.numpy import save_file
  if os.path.exists(output):
    raise ConversionError(f'--output {output!r} already exists; pick a new path')
  flat = hf_folder.flat_paths(params)
  groups, size = [[]], 0
  for path, leaf in flat.items():
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if groups[-1] and size + nbytes > shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(path)
    size += nbytes
  os.makedirs(output)
  names, weight_map = [], {}
  for i, group in enumerate(groups):
    name = f'model-{i + 1:05d}-of-{len(groups):05d}.safetensors'
    tensors = {p.replace('/', '.'): np.asarray(jax.device_get(flat[p])) for p in group}
    save_file(tensors, os.path.join(output, name), metadata={'format': 'tuna2_jax'})
    weight_map.update({t: name for t in tensors})
    names.append(name)
  with open(os.path.join(output, INDEX_FILE), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f, indent=1)
  with open(os.path.join(output, 'config.json'), 'w') as f:
    f.write(config_json)
  return names


def main(argv):
  del argv
  from tuna2_jax import train_state
  model, config, step = train_state.load_model(flags.FLAGS.workdir, use_ema=flags.FLAGS.use_ema)
  from flax import nnx
  files = export(nnx.state(model, nnx.Param), config.to_json_best_effort(indent=2),
                 flags.FLAGS.output, int(flags.FLAGS.shard_gb * (1 << 30)))
  print(f'wrote {len(files)} safetensors files of step {step} to {flags.FLAGS.output}')


if __name__ == '__main__':
  from tuna2_jax import cli
  flags.DEFINE_string('workdir', None, 'Training workdir to export.', required=True)
  flags.DEFINE_string('output', None, 'Directory to write (must not exist).', required=True)
  flags.DEFINE_bool('use_ema', True, 'Export the EMA parameters (else the raw ones).')
  flags.DEFINE_float('shard_gb', 2.0, 'Largest safetensors file, in GiB.')
  cli.run(main)
