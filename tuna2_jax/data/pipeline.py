"""grain pipelines that feed training: rows of packed, mixed-task samples, sharded by process.

data.name='shapes': the procedural source, each row a pure function of (seed, row index): a
grain MapDataset over row indices, whose iterator state resumes exactly.

data.name='mixture': one stream per task (data.t2i / mmu / edit / text: a JSON-lines file, an
ArrayRecord folder, tfds:NAME[:SPLIT] or 'shapes'), each
  records [process_index::process_count] -> shuffle (seeded) -> repeat -> load + format
(a skipped record becomes a fault marker), then a weighted mixture of the streams, first-fit
packing into seq_len rows (data/packing.py) and batching. Every step is a MapDataset up to the
mixture, so the iterator state is a few integers; with data.worker_count > 0 the whole chain
runs in worker processes over disjoint slices of the mixture. Records are loaded (images decoded
and resized, which releases the GIL) by data.read_threads threads in each of them. A resumed
run must use the same process count and data.worker_count as the run that saved the state.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import grain
import ml_collections
import numpy as np
from absl import logging

from tuna2_jax import layout
from tuna2_jax.data import images as images_lib
from tuna2_jax.data import packing
from tuna2_jax.data import records
from tuna2_jax.data import sequence as seq
from tuna2_jax.data import shapes
from tuna2_jax.data import sources
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
  unknown = set(names) - set(layout.TASK_IDS)
  if unknown:
    raise ValueError(f'data.weights names unknown streams {sorted(unknown)}; expected a subset '
                     f'of {tuple(layout.TASK_IDS)}')
  w = np.asarray([data.weights[n] for n in names], np.float64)
  if (w < 0).any() or w.sum() <= 0:
    raise ValueError(f'data.weights {dict(data.weights)} must be >= 0 with a positive sum')
  return names, w / w.sum()


def shapes_row(index: int, *, config: ml_collections.ConfigDict, tok: Tokenizer) -> dict:
  """One packed row: samples of randomly chosen tasks until the next one does not fit."""
  rng = np.random.default_rng([config.seed, index])
  names, probs = stream_weights(config.data)
  samples, used, spans, misfits = [], 0, 0, 0
  max_spans = config.model.get('max_spans') or config.seq_len
  while misfits < _MAX_MISFITS:
    ex = draw_shapes_example(rng, names[rng.choice(len(names), p=probs)], config.data)
    drop = rng.random() < config.objective.caption_dropout
    s = tasks.format_example(ex, tok, config.model.patch_size, drop_prompt=drop,
                             pixel_layout=config.model.pixel_layout)
    n = len(s['tokens'])
    if n > config.seq_len:
      raise ValueError(f'a {ex["task"]} sample has {n} tokens, more than seq_len='
                       f'{config.seq_len}; raise seq_len or lower the image size')
    k = seq.image_spans(s)
    if used + n > config.seq_len or spans + k > max_spans:
      misfits += 1
      continue
    samples.append(s)
    used += n
    spans += k
  return seq.pack(samples, config.seq_len, patch_size=config.model.patch_size, pad_id=tok.pad_id)


def _global_row(i: int, *, batch_size: int, local_batch: int, process_index: int) -> int:
  return (i // local_batch) * batch_size + process_index * local_batch + i % local_batch


SHAPES_SPEC = 'shapes'


@dataclasses.dataclass(frozen=True)
class _ShapesLoader:
  """Stream item (where, index) -> a shapes example of the stream's task."""
  task: str
  data: ml_collections.ConfigDict
  seed: int

  def __call__(self, item):
    where, index = item
    rng = np.random.default_rng([self.seed, layout.TASK_IDS[self.task], index])
    return where, draw_shapes_example(rng, self.task, self.data)


def _shapes_item(index: int) -> tuple[str, int]:
  return f'shapes#{index}', index


@dataclasses.dataclass(frozen=True)
class SampleMaker:
  """(index in the stream, raw item) -> one formatted sample, or a fault marker if skipped."""
  loader: object
  tok: Tokenizer
  patch_size: int
  seq_len: int
  caption_dropout: float
  seed: int
  stream: int
  fault_log: records.FaultLog = dataclasses.field(default_factory=records.FaultLog,
                                                  compare=False, repr=False)
  pixel_layout: str = 'exact'  # model.pixel_layout: 'official' lays spans out as its training
  max_spans: int | None = None  # model.max_spans: a sample with more images is skipped

  def sample(self, index: int, item, may_drop_prompt: bool = True) -> dict:
    """The formatted sample; raises records.Fault (with `where` set) when it is skipped.

    Whatever a record holds, nothing but a Fault leaves here: an unexpected error while loading
    or formatting one record is the fault 'load_error', so no record can stop a run.
    """
    rng = np.random.default_rng([self.seed, self.stream, index, 1])  # apart from the loader's
    where = item[0]
    try:
      where, ex = self.loader(item)
      drop = may_drop_prompt and rng.random() < self.caption_dropout
      s = tasks.format_example(ex, self.tok, self.patch_size, drop_prompt=drop,
                               pixel_layout=self.pixel_layout)
    except records.Fault:
      raise
    except Exception as e:  # pylint: disable=broad-except
      fault = records.Fault('load_error', f'{type(e).__name__}: {e}')
      fault.where = where
      raise fault from e
    if len(s['tokens']) > self.seq_len:
      fault = records.Fault('too_long', f'a sample of {len(s["tokens"])} tokens > '
                            f'seq_len={self.seq_len}')
      fault.where, fault.tokens = where, len(s['tokens'])
      raise fault
    spans = seq.image_spans(s)
    if self.max_spans and spans > self.max_spans:
      fault = records.Fault('too_long', f'a sample of {spans} images > model.max_spans='
                            f'{self.max_spans}')
      fault.where = where
      raise fault
    return s

  def __call__(self, index: int, item) -> dict:
    try:
      return self.sample(index, item)
    except records.Fault as fault:
      self.fault_log(getattr(fault, 'where', item[0]), fault)
      return packing.fault_marker(fault.reason, self.stream)


def active_streams(config: ml_collections.ConfigDict) -> list[tuple[str, str, float]]:
  """[(task, spec, weight)] of the mixture's streams: a source given and a positive weight."""
  names, probs = stream_weights(config.data)
  out = [(t, config.data[t], float(w)) for t, w in zip(names, probs) if config.data[t] and w > 0]
  if not out:
    raise ValueError('data.name="mixture" needs at least one stream: set data.t2i, data.mmu, '
                     'data.edit or data.text to a JSON-lines file, an ArrayRecord folder, '
                     'tfds:NAME or "shapes", with a positive data.weights entry')
  return out


def check_data(config: ml_collections.ConfigDict) -> None:
  """Fails fast (before any model state exists) on a data config that cannot train.

  Raises for a bad bucket or resampler, a source that does not exist, an ArrayRecord folder
  converted for another task, a TFDS dataset or split TFDS does not know, a configured image
  root that is not a folder, or no stream with both a source and a positive weight; warns about
  a stream with a positive weight but no source (it is left out, the others share its weight).
  """
  if config.data.name == 'shapes':
    return
  if config.data.name != 'mixture':
    raise ValueError(f'data.name={config.data.name!r}: expected "shapes" or "mixture"')
  images_lib.check_buckets(config.data.buckets, config.model.patch_size)
  images_lib.check_resampler(config.data.resize)
  for key in ('max_text_chars', 'max_image_pixels', 'max_consecutive_skips'):
    if config.data[key] < 1:
      raise ValueError(f'data.{key}={config.data[key]}: expected a positive integer')
  streams = active_streams(config)
  for task, weight in config.data.weights.items():
    if weight > 0 and not config.data[task]:
      logging.warning('data.weights.%s=%s but data.%s is empty: the %s stream is left out and '
                      '%s share its weight', task, weight, task, task,
                      ', '.join(t for t, _, _ in streams))
  for task, spec, _ in streams:
    if spec != SHAPES_SPEC:
      sources.check_stream(task, spec, config.data.image_root[task])


def stream_parts(config: ml_collections.ConfigDict, task: str, spec: str, tok: Tokenizer, *,
                 process_index: int, process_count: int) -> tuple[grain.MapDataset, int,
                                                                  SampleMaker]:
  """(this process's records, shuffled and repeated; how many there are; their SampleMaker)."""
  data, stream = config.data, layout.TASK_IDS[task]
  if spec == SHAPES_SPEC:
    items = grain.MapDataset.range(_NUM_ROWS).map(_shapes_item)
    loader = _ShapesLoader(task, data, config.seed)
  else:
    items = sources.open_stream(task, spec, data.tfds_fields[task])
    loader = sources.stream_loader(task, spec, data.image_root[task], data.buckets, data.resize,
                                   absolute_paths=data.absolute_paths,
                                   max_text_chars=data.max_text_chars,
                                   max_image_pixels=data.max_image_pixels)
  total = len(items)
  items = items[process_index::process_count]
  count = len(items)
  if count == 0:
    raise ValueError(f'data.{task}={spec!r} has {total} records, too few for process '
                     f'{process_index} of {process_count}')
  if spec != SHAPES_SPEC:  # shapes items are endless and already random
    items = items.shuffle(seed=config.seed * 1000 + stream).repeat()
  maker = SampleMaker(loader, tok, config.model.patch_size, config.seq_len,
                      config.objective.caption_dropout, config.seed, stream,
                      pixel_layout=config.model.pixel_layout,
                      max_spans=config.model.get('max_spans'))
  return items, count, maker


def stream_dataset(config: ml_collections.ConfigDict, task: str, spec: str, tok: Tokenizer, *,
                   process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """One task stream: this process's records, shuffled, repeated, loaded and formatted."""
  items, _, maker = stream_parts(config, task, spec, tok, process_index=process_index,
                                 process_count=process_count)
  return items.map_with_index(maker)


def check_streams(config: ml_collections.ConfigDict, tok: Tokenizer, *, process_index: int = 0,
                  process_count: int = 1) -> None:
  """Raises ValueError, naming the stream and why, for a stream that cannot train: none of the
  first data.check_records records it would train on (in its shuffled order) gives a sample
  that fits seq_len, because all are skipped (by reason, with the first one's location) or
  none fits (with the shortest sample's length). A healthy stream costs one record."""
  if config.data.name != 'mixture' or config.data.check_records <= 0:
    return
  for task, spec, _ in active_streams(config):
    items, count, maker = stream_parts(config, task, spec, tok, process_index=process_index,
                                       process_count=process_count)
    reasons, first, lengths = collections.Counter(), {}, []
    checked = min(config.data.check_records, count)
    for i in range(checked):
      try:
        maker.sample(i, items[i], may_drop_prompt=False)  # it must fit with its prompt
        break
      except records.Fault as fault:
        reasons[fault.reason] += 1
        first.setdefault(fault.reason, f'{getattr(fault, "where", "?")}: {fault.detail}')
        if hasattr(fault, 'tokens'):
          lengths.append(fault.tokens)
    else:
      counts = ', '.join(f'{r} {n}' for r, n in reasons.most_common())
      why = f'none of its first {checked} records can be trained on (skipped: {counts})'
      if len(lengths) == checked:
        why = (f'its samples never fit seq_len={config.seq_len}: none of its first {checked} '
               f'records does (the shortest has {min(lengths)} tokens); raise '
               f'--config.seq_len to at least {min(lengths)}, or use shorter records')
      detail = '; '.join(f'first {r}: {w}' for r, w in first.items())
      raise ValueError(f'data.{task}={spec!r}: {why}; {detail}')


def mixed_samples(config: ml_collections.ConfigDict, tok: Tokenizer, *, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """The weighted mixture of the streams: samples and fault markers, endless."""
  streams = active_streams(config)
  datasets = [stream_dataset(config, task, spec, tok, process_index=process_index,
                             process_count=process_count) for task, spec, _ in streams]
  if len(datasets) == 1:
    return datasets[0]
  return grain.MapDataset.mix(datasets, [w for _, _, w in streams])


def mixture_dataset(config: ml_collections.ConfigDict, tok: Tokenizer, *, local_batch: int,
                    process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Mixed samples -> packed rows -> batches of local_batch rows (each field [B, seq_len, ...])."""
  data = config.data
  it = mixed_samples(config, tok, process_index=process_index,
                     process_count=process_count).to_iter_dataset(
                         grain.ReadOptions(num_threads=data.read_threads,
                                           prefetch_buffer_size=data.read_buffer))
  it = packing.FirstFitPackIterDataset(
      it, seq_len=config.seq_len, num_bins=data.pack_bins, patch_size=config.model.patch_size,
      pad_id=tok.pad_id, max_consecutive_faults=data.max_consecutive_skips,
      max_spans=config.model.get('max_spans'),
      stream_names={t: f'data.{t}={spec!r}' for t, spec, _ in active_streams(config)})
  it = it.batch(local_batch, drop_remainder=True)
  if data.worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
  return it


def train_dataset(config: ml_collections.ConfigDict, tok: Tokenizer, *, process_index: int = 0,
                  process_count: int = 1, sources_checked: bool = False) -> grain.IterDataset:
  """Batches of this process's rows: [batch_size / process_count, seq_len, ...] per field.

  Mixture batches also hold packing.SKIPPED_KEYS: per-row counts of skipped records, which the
  trainer takes off (packing.SkippedRecords) before the batch goes to the devices.
  sources_checked: the caller has already run check_data on this config (train.validate does),
  so its source checks and warnings are not repeated.
  """
  if config.batch_size % process_count:
    raise ValueError(f'batch_size {config.batch_size} is not divisible by the '
                     f'{process_count} processes')
  local_batch = config.batch_size // process_count
  if not sources_checked:
    check_data(config)
  if config.data.name == 'mixture':
    return mixture_dataset(config, tok, local_batch=local_batch, process_index=process_index,
                           process_count=process_count)
  # Global batch b is rows [b * batch_size, (b + 1) * batch_size); process p reads its p-th
  # contiguous block. The rows (and the iterator state, a batch count) are then the same for
  # every process count, so a run can resume on another number of hosts.
  ds = grain.MapDataset.range(_NUM_ROWS // config.batch_size * local_batch).map(
      functools.partial(_global_row, batch_size=config.batch_size, local_batch=local_batch,
                        process_index=process_index))
  ds = ds.map(functools.partial(shapes_row, config=config, tok=tok))
  ds = ds.batch(local_batch, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
  if config.data.worker_count > 0:
    # Rows are generated in worker processes; the iterator state stays checkpointable.
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.worker_count))
  return it


# --- Image-caption batches (encoder pretraining) --------------------------------------------

def caption_example(image_HW3: np.ndarray, text: str, tok: Tokenizer, *, patch_size: int,
                    max_len: int) -> dict:
  """One image with its caption: patches [N, p*p*3] uint8, patch_grid [N, 4] (row, col, grid
  rows, grid cols), tokens [L], valid."""
  ids = tok.encode(text)
  if len(ids) > max_len:
    raise ValueError(f'caption {text!r} has {len(ids)} tokens, more than the text tower\'s '
                     f'max_len={max_len}')
  gh, gw = image_HW3.shape[0] // patch_size, image_HW3.shape[1] // patch_size
  patches = seq.patchify(image_HW3, patch_size)
  tokens = np.full(max_len, tok.pad_id, np.int32)
  tokens[:len(ids)] = ids
  return {'patches': patches, 'patch_grid': seq.grid_of(gh, gw),
          'tokens': tokens, 'valid': np.arange(max_len) < len(ids)}


def caption_row(index: int, *, config: ml_collections.ConfigDict, tok: Tokenizer) -> dict:
  """A training scene (never a held-out one) and its caption, a pure function of the index."""
  ex = shapes.sample_t2i(np.random.default_rng([config.seed, index]), config.data.image_size,
                         config.data.max_objects)
  return caption_example(ex['image'], ex['prompt'], tok, patch_size=config.model.patch_size,
                         max_len=config.siglip.text.max_len)


def caption_dataset(config: ml_collections.ConfigDict, tok: Tokenizer, *, process_index: int = 0,
                    process_count: int = 1) -> grain.IterDataset:
  """Batches of this process's image-caption rows, laid out as train_dataset's rows are."""
  if config.batch_size % process_count:
    raise ValueError(f'batch_size {config.batch_size} is not divisible by the '
                     f'{process_count} processes')
  local_batch = config.batch_size // process_count
  ds = grain.MapDataset.range(_NUM_ROWS // config.batch_size * local_batch).map(
      functools.partial(_global_row, batch_size=config.batch_size, local_batch=local_batch,
                        process_index=process_index))
  ds = ds.map(functools.partial(caption_row, config=config, tok=tok))
  return ds.batch(local_batch, drop_remainder=True).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
