"""A Hugging Face model folder read lazily (config.json + *.safetensors), and tensors placed
straight into their target shardings.

Only safetensors are read: a pickled PyTorch file (*.bin, *.pt, ...) can run code when it is
loaded, so a folder holding only those is refused. A local folder's tensors are memory-mapped, so
reading a slice touches only those bytes. A cloud folder's (gs://..., any path etils.epath opens)
are read by byte range (seek + read), one tensor at a time, each kept only while the parameter
it belongs to is placed. `place` builds each target array shard by shard
(jax.make_array_from_callback): beyond the page cache a host holds at most one parameter's
local shards (and, from a cloud folder, that parameter's source tensors) at a time, never a
second copy of the model.

A conversion is a plan {target path: Mapping} checked against the folder's tensor shapes before
any tensor is read, so a bad folder fails with one error naming the tensor and nothing written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from absl import flags
from etils import epath

DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_}
PICKLED_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')
_MEAN_CHUNK_ROWS = 8192  # rows summed at a time when averaging an embedding


class ConversionError(ValueError):
  """A folder or checkpoint that cannot be imported. Nothing was written."""


@dataclasses.dataclass(frozen=True)
class Mapping:
  """How one target parameter is made from source tensors.

  names: one tensor, or one per layer for a parameter stacked on a leading layers axis.
  transpose: the source is [out, in] (PyTorch Linear) and the target [in, out].
  rows: for embeddings, the target's vocabulary size; rows past the source's are new tokens,
    initialised to the mean of the source rows. The vocabulary is the source's first axis (the
    target's last one when transposed).
  """
  names: tuple[str, ...]
  transpose: bool = False
  stacked: bool = False
  rows: int | None = None

  def target_shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    shape = list(shapes[self.names[0]])
    if self.rows is not None:
      shape[0] = self.rows
    if self.transpose:
      shape = shape[::-1]
    return (len(self.names),) * self.stacked + tuple(shape)


def path_keys(path) -> list[str]:
  """The key names of a pytree key path (DictKey .key, GetAttrKey .name, SequenceKey .idx)."""
  return [str(next((getattr(k, a) for a in ('key', 'name', 'idx') if hasattr(k, a)), k))
          for k in path]


def path_name(path) -> str:
  """'decoder/blocks/attn/q_proj/kernel' for a key path of a parameter state (a Variable's
  'value' level, which orbax also stores, left out)."""
  return '/'.join(k for k in path_keys(path) if k != 'value')


def flat_paths(tree) -> dict[str, object]:
  """{'a/b/c': leaf} of an nnx.State or nested dict."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[str, object]) -> dict:
  """The nested dict of {'a/b/c': leaf}."""
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    *parents, last = path.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return tree


def check_new_output(output: str) -> None:
  """Raises before any work when a conversion's --output already exists (nothing is overwritten)."""
  if os.path.exists(output):
    raise ConversionError(f'--output {output!r} already exists; pick a new path')


def define_import_flags() -> None:
  """--hf_dir and --output, the flags every import command (convert.qwen2, convert.siglip2)
  takes; called under `if __name__ == '__main__'`, so the modules can import each other."""
  flags.DEFINE_string('hf_dir', None, 'Hugging Face folder: config.json + *.safetensors.',
                      required=True)
  flags.DEFINE_string('output', None, 'Directory to write (must not exist).', required=True)


def is_local(path: str) -> bool:
  """Whether path is on a local file system (memory-mappable), not a URL such as gs://..."""
  return '://' not in path


def absolute(path: str) -> str:
  """An absolute local path (orbax needs one); URLs are left as they are."""
  return path if not is_local(path) else os.path.abspath(path)


def _read_range(file: str, offset: int, size: int) -> bytes:
  with epath.Path(file).open('rb') as f:
    f.seek(offset)
    data = f.read(size)
  if len(data) != size:
    raise ConversionError(f'{file} ends after {len(data)} of the {size} bytes at offset {offset}')
  return data


def _read_header(path: str) -> tuple[dict, int]:
  size = int.from_bytes(_read_range(path, 0, 8), 'little')
  try:
    header = json.loads(_read_range(path, 8, size))
  except ValueError as e:
    raise ConversionError(f'{path} is not a safetensors file: {e}') from None
  return header, 8 + size


class HFFolder:
  """config.json and the tensors of a folder's *.safetensors files, opened lazily."""

  def __init__(self, path: str):
    folder = epath.Path(path)
    if not folder.is_dir():
      raise FileNotFoundError(f'model folder {path!r} not found (expected a directory with '
                              'config.json and *.safetensors)')
    self.path = path
    files = sorted(p.name for p in folder.iterdir())
    if 'config.json' not in files:
      raise FileNotFoundError(f'model folder {path!r} has no config.json')
    self.config = json.loads((folder / 'config.json').read_text())
    weights = [f for f in files if f.endswith('.safetensors')]
    if not weights:
      pickled = [f for f in files if f.endswith(PICKLED_SUFFIXES)]
      if pickled:
        raise ConversionError(
            f'model folder {path!r} holds pickled PyTorch weights ({pickled[0]}) and no '
            '*.safetensors: pickled files are refused because loading them can run arbitrary '
            'code; convert them to safetensors first')
      raise FileNotFoundError(f'model folder {path!r} has no *.safetensors files')
    if 'model.safetensors.index.json' in files:
      index = json.loads((folder / 'model.safetensors.index.json').read_text())
      for name, file in sorted(index.get('weight_map', {}).items()):
        if file not in weights:
          raise FileNotFoundError(f'model folder {path!r} lacks {file}, which the index names '
                                  f'as holding tensor {name!r}')
    self._entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
    self._read: dict[str, np.ndarray] = {}
    for file in weights:
      full = os.path.join(path, file)
      header, base = _read_header(full)
      for name, info in header.items():
        if name == '__metadata__':
          continue
        if info['dtype'] not in DTYPES:
          raise ConversionError(f'tensor {name!r} in {full} has dtype {info["dtype"]}; expected '
                                f'one of {sorted(DTYPES)}')
        self._entries[name] = (full, np.dtype(DTYPES[info['dtype']]), tuple(info['shape']),
                               base + info['data_offsets'][0])

  @property
  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: entry[2] for name, entry in self._entries.items()}

  def tensor(self, name: str) -> np.ndarray:
    """The tensor: a read-only memory map for a local folder (slicing it reads only the slice);
    for a cloud folder its byte range, read once and kept until `release`."""
    file, dtype, shape, offset = self._entries[name]
    if is_local(file):
      return np.memmap(file, dtype=dtype, mode='r', offset=offset, shape=shape)
    if name not in self._read:
      data = _read_range(file, offset, int(np.prod(shape)) * dtype.itemsize)
      self._read[name] = np.frombuffer(data, dtype).reshape(shape)
    return self._read[name]

  def release(self) -> None:
    """Drops the tensors read from a cloud folder (load calls it after each parameter)."""
    self._read.clear()


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                 where: str, ignored: Callable[[str], bool] = lambda name: False) -> None:
  """Raises ConversionError naming the first missing, unexpected or mis-shaped tensor."""
  for name, shape in expected.items():
    if name not in found:
      raise ConversionError(f'{where}: tensor {name!r} is missing (expected shape {shape})')
    if tuple(found[name]) != tuple(shape):
      raise ConversionError(f'{where}: tensor {name!r} has shape {tuple(found[name])}; the '
                            f'config implies {tuple(shape)}')
  extra = sorted(n for n in found if n not in expected and not ignored(n))
  if extra:
    raise ConversionError(f'{where}: unexpected tensor {extra[0]!r} (shape {found[extra[0]]})'
                          f'{f" and {len(extra) - 1} more" if len(extra) > 1 else ""}; the '
                          'config.json does not account for it')


def _rows_with_mean(t_VD: np.ndarray, rows: int, index: tuple[slice, slice]) -> np.ndarray:
  """Rows `index[0]` (of `rows`), columns `index[1]` of t extended by mean rows."""
  r = range(rows)[index[0]]
  cols = index[1]
  have = t_VD.shape[0]
  out = np.empty((len(r), len(range(t_VD.shape[1])[cols])), np.float32)
  inside = [i for i, row in enumerate(r) if row < have]
  if inside:
    out[inside[0]:inside[-1] + 1] = t_VD[r[inside[0]]:r[inside[-1]] + 1:r.step, cols]
  if len(inside) < len(r):
    total = np.zeros(out.shape[1], np.float64)
    for start in range(0, have, _MEAN_CHUNK_ROWS):
      total += t_VD[start:start + _MEAN_CHUNK_ROWS, cols].astype(np.float64).sum(0)
    out[len(inside):] = (total / have).astype(np.float32)
  return out


def reader(mapping: Mapping, folder: HFFolder) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """index (a tuple of slices of the target) -> that part of the target, as numpy."""
  def one(name, index):
    t = folder.tensor(name)
    if mapping.rows is not None:
      if mapping.transpose:
        return _rows_with_mean(t, mapping.rows, index[::-1]).T
      return _rows_with_mean(t, mapping.rows, index)
    return (t.T if mapping.transpose else t)[index]

  def read(index):
    index = tuple(index)
    if not mapping.stacked:
      return one(mapping.names[0], index)
    return np.stack([one(name, index[1:]) for name in mapping.names[index[0]]])
  return read


def place(read: Callable[[tuple[slice, ...]], np.ndarray], abstract: jax.ShapeDtypeStruct,
          sharding: jax.sharding.Sharding) -> jax.Array:
  """The target array built shard by shard: each device's shard is read and sent on its own."""
  return jax.make_array_from_callback(
      abstract.shape, sharding, lambda index: np.ascontiguousarray(read(index), abstract.dtype))


def load(plan: dict[str, Mapping], folder: HFFolder, abstract: dict[str, jax.ShapeDtypeStruct],
         shardings: dict[str, jax.sharding.Sharding] | None = None) -> dict[str, jax.Array]:
  """Every planned target, placed in its sharding (default: the first local device)."""
  for path, mapping in plan.items():
    if path not in abstract:
      raise ConversionError(f'{folder.path}: the conversion produces {path!r}, which the target '
                            'model does not have')
    got = mapping.target_shape(folder.shapes)
    if got != tuple(abstract[path].shape):
      raise ConversionError(f'{folder.path}: {path!r} would have shape {got} from tensor '
                            f'{mapping.names[0]!r}; the target model expects '
                            f'{tuple(abstract[path].shape)}')
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  out = {}
  for path, m in plan.items():
    out[path] = place(reader(m, folder), abstract[path],
                      default if shardings is None else shardings[path])
    folder.release()
  return out
