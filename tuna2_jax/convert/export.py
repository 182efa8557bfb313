r"""Trained parameters -> safetensors with a config.json.

  python -m tuna2_jax.convert.export --workdir=DIR --output=OUT [--use_ema=false]

Writes OUT/model-00001-of-0000N.safetensors (at most --shard_gb each), the
model.safetensors.index.json that lists which file holds each tensor, and OUT/config.json (the
run's config). Tensor names are the parameter paths with dots ('decoder.blocks.attn.q_proj.kernel')
in our layouts: kernels [in, out], per-layer parameters stacked on a leading layers axis.

Only the exported parameters (the EMA, or the raw ones) are restored from the latest checkpoint,
fsdp-sharded over every device; the optimizer state is never read. Files are written tensor by
tensor, each gathered to the host on its own, so a host holds at most one parameter at a time.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import flags

from tuna2_jax import sharding
from tuna2_jax.convert import hf_folder

INDEX_FILE = 'model.safetensors.index.json'
_CODES = {np.dtype(v): k for k, v in hf_folder.DTYPES.items()}


def _write_safetensors(path: str, tensors: dict[str, object], metadata: dict[str, str]) -> None:
  """A safetensors file whose tensors are fetched and written one at a time."""
  header, offset = {'__metadata__': metadata}, 0
  for name, x in tensors.items():
    nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    header[name] = {'dtype': _CODES[np.dtype(x.dtype)], 'shape': list(x.shape),
                    'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)  # the data starts 8-byte aligned
  with open(path, 'wb') as f:
    f.write(len(text).to_bytes(8, 'little') + text)
    for x in tensors.values():
      f.write(np.ascontiguousarray(sharding.to_host(x)).tobytes())


def export(params, config_json: str, output: str, shard_bytes: int = 2 << 30) -> list[str]:
  """Writes params (an nnx.State or nested dict of arrays); returns the written file names."""
  hf_folder.check_new_output(output)
  flat = hf_folder.flat_paths(params)
  groups, size = [[]], 0
  for path, leaf in flat.items():
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if groups[-1] and size + nbytes > shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(path)
    size += nbytes
  lead = jax.process_index() == 0
  if lead:
    os.makedirs(output)
  names, weight_map = [], {}
  for i, group in enumerate(groups):
    name = f'model-{i + 1:05d}-of-{len(groups):05d}.safetensors'
    tensors = {p.replace('/', '.'): flat[p] for p in group}
    if lead:
      _write_safetensors(os.path.join(output, name), tensors, {'format': 'tuna2_jax'})
    else:  # the other processes take part in the gathers
      for x in tensors.values():
        sharding.to_host(x)
    weight_map.update({t: name for t in tensors})
    names.append(name)
  if lead:
    with open(os.path.join(output, INDEX_FILE), 'w') as f:
      json.dump({'metadata': {}, 'weight_map': weight_map}, f, indent=1)
    with open(os.path.join(output, 'config.json'), 'w') as f:
      f.write(config_json)
  return names


def _fsdp_shardings(params, rules):
  """The parameters' shardings over all devices on the fsdp axis: the largest fsdp size that
  divides the dimensions the rules split (the rest of the devices replicate)."""
  n = jax.device_count()
  for fsdp in (d for d in range(n, 0, -1) if n % d == 0):
    try:
      return sharding.tree_shardings(params, sharding.mesh_from_sizes(data=n // fsdp, fsdp=fsdp),
                                     rules)
    except ValueError:
      if fsdp == 1:
        raise


def restore_params(workdir: str, use_ema: bool = True) -> tuple[dict, ml_collections.ConfigDict,
                                                                  int]:
  """({parameter path: array}, config, step): the EMA (or raw) parameters of a workdir's latest
  checkpoint, fsdp-sharded over the devices; nothing else of the state is read."""
  from tuna2_jax import train_state
  from tuna2_jax.convert import init_from
  config = train_state.load_config(workdir)
  _, params = train_state.abstract_model(config)
  shardings = _fsdp_shardings(params, config.sharding_rules)
  flat, step = init_from.workdir_params(
      workdir, hf_folder.flat_paths(params), hf_folder.flat_paths(shardings),
      item='ema' if use_ema else 'params', where='--workdir')
  return flat, config, step


def main(argv):
  del argv
  output = flags.FLAGS.output
  hf_folder.check_new_output(output)
  params, config, step = restore_params(flags.FLAGS.workdir, use_ema=flags.FLAGS.use_ema)
  files = export(params, config.to_json_best_effort(indent=2), output,
                 int(flags.FLAGS.shard_gb * (1 << 30)))
  print(f'wrote {len(files)} safetensors files of step {step} to {output}')


if __name__ == '__main__':
  from tuna2_jax import cli
  flags.DEFINE_string('workdir', None, 'Training workdir to export.', required=True)
  flags.DEFINE_string('output', None, 'Directory to write (must not exist).', required=True)
  flags.DEFINE_bool('use_ema', True, 'Export the EMA parameters (else the raw ones).')
  flags.DEFINE_float('shard_gb', 2.0, 'Largest safetensors file, in GiB.')
  cli.run(main)
