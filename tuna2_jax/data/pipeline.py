"""grain pipelines that feed training: rows of packed, mixed-task samples, sharded by process.

The shapes source is procedural, so each row is a pure function of (seed, row index): the
pipeline is a grain MapDataset over row indices, and its iterator state (saved in checkpoints)
is enough to resume on exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import functools

import grain
import ml_collections
import numpy as np

from tuna2_jax.data import sequence as seq
from tuna2_jax.data import shapes
from tuna2_jax.data import tasks
from tuna2_jax.data.tokenizer import Tokenizer

_NUM_ROWS = 1 << 40  # effectively endless; rows are generated on demand
_MAX_MISFITS = 4  # draws that do not fit the row's remaining space before it is closed


def draw_shapes_example(rng: np.random.Generator, task: str, data: ml_collections.ConfigDict):
  size, max_objects = data.image_size, data.max_objects
  if task == 't2i':
    return shapes.sample_t2i(rng, size, max_objects)
  if task == 'mmu':
    return shapes.sample_mmu(rng, size, max_objects)
  if task == 'edit':
    return shapes.sample_edit(rng, size, max_objects)
  return shapes.sample_text(rng, max_objects)


def stream_weights(data: ml_collections.ConfigDict) -> tuple[tuple[str, ...], np.ndarray]:
  names = tuple(data.weights.keys())
  unknown = set(names) - set(seq.TASK_IDS)
  if unknown:
    raise ValueError(f'data.weights names unknown streams {sorted(unknown)}; expected a subset '
                     f'of {tuple(seq.TASK_IDS)}')
  w = np.asarray([data.weights[n] for n in names], np.float64)
  if (w < 0).any() or w.sum() <= 0:
    raise ValueError(f'data.weights {dict(data.weights)} must be >= 0 with a positive sum')
  return names, w / w.sum()


def shapes_row(index: int, *, config: ml_collections.ConfigDict, tok: Tokenizer) -> dict:
  """One packed row: samples of randomly chosen tasks until the next one does not fit."""
  rng = np.random.default_rng([config.seed, index])
  names, probs = stream_weights(config.data)
  samples, used, misfits = [], 0, 0
  while misfits < _MAX_MISFITS:
    ex = draw_shapes_example(rng, names[rng.choice(len(names), p=probs)], config.data)
    drop = rng.random() < config.objective.caption_dropout
    s = tasks.format_example(ex, tok, config.model.patch_size, drop_prompt=drop)
    n = len(s['tokens'])
    if n > config.seq_len:
      raise ValueError(f'a {ex["task"]} sample has {n} tokens, more than seq_len='
                       f'{config.seq_len}; raise seq_len or lower the image size')
    if used + n > config.seq_len:
      misfits += 1
      continue
    samples.append(s)
    used += n
  return seq.pack(samples, config.seq_len, patch_size=config.model.patch_size, pad_id=tok.pad_id)


def train_dataset(config: ml_collections.ConfigDict, tok: Tokenizer, *, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """Batches of this process's rows: [batch_size / process_count, seq_len, ...] per field."""
  if config.data.name != 'shapes':
    raise ValueError(f'data.name={config.data.name!r}: expected "shapes"')
  if config.batch_size % process_count:
    raise ValueError(f'batch_size {config.batch_size} is not divisible by the '
                     f'{process_count} processes')
  local_batch = config.batch_size // process_count
  ds = grain.MapDataset.range(_NUM_ROWS)[process_index::process_count]
  ds = ds.map(functools.partial(shapes_row, config=config, tok=tok))
  ds = ds.batch(local_batch, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
  if config.data.worker_count > 0:
    # Rows are generated in worker processes; the iterator state stays checkpointable.
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.worker_count))
  return it
