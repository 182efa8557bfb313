"""Record sources of the task streams, and the per-record loader that turns one into an example.

A stream's source is one of
  FILE.jsonl     the reference JSON-lines format (records.py); random access over line offsets
  DIR            ArrayRecord shards written by `python -m tuna2_jax.data.build_records`
  tfds:NAME[:SPLIT]   a TFDS dataset through `tfds.data_source` (pip install tuna2_jax[tfds]);
                 data.tfds_fields.<task> maps the task's keys onto the dataset's features
Every source is a grain MapDataset of raw items (where, payload): `where` names the record
("file.jsonl:12", "dir#345") for the log line of a skipped record. `RecordLoader` (run in the
data workers) decodes a raw item into an example for data/tasks.py, raising records.Fault for
anything unusable.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from tuna2_jax.data import images as images_lib
from tuna2_jax.data import records

ARRAY_RECORD_SUFFIX = '.array_record'
META_FILE = 'meta.json'  # written by data/build_records.py next to the shards
TFDS_PREFIX = 'tfds:'
# Default TFDS feature names for each task's keys (override with data.tfds_fields.<task>).
TFDS_FIELDS = {'t2i': 'image=image,caption=caption', 'mmu': 'image=image,question=question,'
               'answer=answer', 'edit': 'raw_image=raw_image,out_image=out_image,'
               'instruction=instruction', 'text': 'text=text'}


def _line_index(path: str, block_size: int = 1 << 26):
  """(start offsets, end offsets, 1-based line numbers) of the file's non-blank lines."""
  ends, offset = [], 0
  with open(path, 'rb') as f:
    while block := f.read(block_size):
      ends.append(np.flatnonzero(np.frombuffer(block, np.uint8) == ord('\n')) + offset + 1)
      offset += len(block)
    ends = np.concatenate(ends).astype(np.int64) if ends else np.zeros(0, np.int64)
    if offset and (not len(ends) or ends[-1] != offset):  # a last line without a newline
      ends = np.append(ends, offset)
    starts = np.concatenate([np.zeros(1, np.int64), ends[:-1]])[:len(ends)]
    keep = ends - starts > 2
    for i in np.flatnonzero(~keep):  # the few short lines: kept unless only whitespace
      f.seek(starts[i])
      keep[i] = bool(f.read(int(ends[i] - starts[i])).strip())
  return starts[keep], ends[keep], np.flatnonzero(keep).astype(np.int64) + 1


class JsonlSource:
  """Random access to the non-blank lines of a JSON-lines file: item i -> ('file:line', bytes).

  The index (start and end offsets of each line) is built with one pass over the file; the file
  itself is opened lazily in each process that reads it, so the source pickles to workers.
  """

  def __init__(self, path: str):
    self.path = path
    self._starts, self._ends, self._numbers = _line_index(path)
    self._file = None

  def __del__(self, _close=os.close):  # bound now: at interpreter exit `os` may be gone
    if getattr(self, '_file', None) is not None:
      _close(self._file)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_file'} | {'_file': None}

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> tuple[str, bytes]:
    if self._file is None:
      self._file = os.open(self.path, os.O_RDONLY)
    start, end = int(self._starts[index]), int(self._ends[index])
    # pread: no shared file position, so the loader threads may read concurrently.
    return f'{self.path}:{int(self._numbers[index])}', os.pread(self._file, end - start, start)

  def __repr__(self) -> str:
    return f'JsonlSource({self.path!r}, {len(self)} lines)'


@functools.lru_cache(maxsize=8)
def _jsonl_source(path: str, mtime_ns: int, size: int) -> JsonlSource:
  """One line index per file version: the start-up stream check and the run share it."""
  del mtime_ns, size  # the cache key: a changed file is indexed again
  return JsonlSource(path)


@dataclasses.dataclass(frozen=True)
class _Locate:
  """(index, payload) -> (where, payload) for sources without their own location."""
  name: str

  def __call__(self, index: int, payload):
    return f'{self.name}#{index}', payload


def tfds_name_split(spec: str) -> tuple[str, str]:
  """'tfds:NAME[:SPLIT]' -> (NAME, SPLIT), the split 'train' when none is given."""
  name, _, split = spec[len(TFDS_PREFIX):].partition(':')
  return name, split or 'train'


def _tfds_module(spec: str, task: str):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f'data.{task}={spec!r} needs tensorflow-datasets: pip install '
                      '"tuna2_jax[tfds]"') from None
  return tfds


def check_tfds(spec: str, task: str) -> None:
  """Raises unless TFDS knows the dataset and, where its metadata lists splits, the split.

  Reads the builder's metadata only: nothing is downloaded or prepared.
  """
  tfds = _tfds_module(spec, task)
  name, split = tfds_name_split(spec)
  try:
    builder = tfds.builder(name)
  except Exception as e:  # pylint: disable=broad-except  # DatasetNotFoundError and relatives
    raise ValueError(f'data.{task}={spec!r}: TFDS has no dataset {name!r} ({type(e).__name__}: '
                     f'{e}); expected a registered name, as tfds.builder takes it') from None
  splits = list(getattr(builder.info, 'splits', None) or ())
  base = re.split(r'[\[+]', split)[0]  # 'train[:10%]', 'train+validation'
  if splits and base not in splits:
    raise ValueError(f'data.{task}={spec!r}: TFDS dataset {name!r} has no split {base!r}; '
                     f'expected one of {sorted(splits)}')


class TfdsRecords:
  """A tfds.data_source with its features renamed to a task's keys: i -> ('tfds:..#i', dict)."""

  def __init__(self, spec: str, task: str, fields: str):
    name, split = tfds_name_split(spec)
    self.spec = spec
    self._source = _tfds_module(spec, task).data_source(name, split=split)
    self._fields = dict(item.split('=', 1) for item in fields.split(',') if item)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[str, dict]:
    raw = self._source[index]
    out = {}
    for key, path in self._fields.items():
      value = raw
      for part in path.split('/'):  # nested features: 'captions/text'
        value = value.get(part) if isinstance(value, dict) else None
      if isinstance(value, np.ndarray) and value.dtype == object and value.size:
        value = value.reshape(-1)[0]  # a sequence feature: its first entry
      if isinstance(value, bytes):
        value = value.decode('utf-8', 'replace')
      if value is not None:
        out[key] = value
    return f'{self.spec}#{index}', out


def stream_kind(spec: str, task: str) -> str:
  """'jsonl' | 'array_record' | 'tfds'; raises FileNotFoundError for a path that is absent."""
  if spec.startswith(TFDS_PREFIX):
    return 'tfds'
  if os.path.isdir(spec):
    if not glob.glob(os.path.join(spec, '*' + ARRAY_RECORD_SUFFIX)):
      raise FileNotFoundError(f'data.{task}={spec!r} is a folder without {ARRAY_RECORD_SUFFIX} '
                              'shards; expected one written by '
                              'python -m tuna2_jax.data.build_records')
    return 'array_record'
  if os.path.isfile(spec):
    return 'jsonl'
  raise FileNotFoundError(f'data.{task}={spec!r} does not exist; expected a JSON-lines file, '
                          f'an ArrayRecord folder or {TFDS_PREFIX}NAME[:SPLIT]')


def check_converted(spec: str, task: str) -> dict:
  """The meta.json of a complete conversion into `spec` for `task`; raises ValueError for a
  folder without one (an interrupted conversion, or shards of another tool), a meta.json that
  does not parse or lists shards that are not there, or one converted for another task."""
  meta_path = os.path.join(spec, META_FILE)
  expected = 'expected a folder written by python -m tuna2_jax.data.build_records, which writes ' \
             f'{META_FILE} after every shard'
  try:
    with open(meta_path, encoding='utf-8') as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise ValueError(f'data.{task}={spec!r} has shards but no {META_FILE}: not a complete '
                     f'conversion; {expected}') from None
  except (OSError, ValueError) as e:
    raise ValueError(f'data.{task}={spec!r}: {meta_path} cannot be read ({e}); {expected}') \
        from None
  if not isinstance(meta, dict) or not {'task', 'records', 'shards'} <= set(meta):
    raise ValueError(f'data.{task}={spec!r}: {meta_path} lacks task / records / shards; '
                     f'{expected}')
  if meta['task'] != task:
    raise ValueError(f'data.{task}={spec!r} holds {meta["task"]!r} records (see {meta_path}); '
                     f'expected {task!r} records')
  files = meta.get('files') or []
  missing = [n for n in files if not os.path.isfile(os.path.join(spec, n))]
  found = len(glob.glob(os.path.join(spec, '*' + ARRAY_RECORD_SUFFIX)))
  if missing or found != meta['shards']:
    raise ValueError(f'data.{task}={spec!r}: {meta_path} lists {meta["shards"]} shards, the '
                     f'folder holds {found}{f" and lacks {missing[:3]}" if missing else ""}; '
                     f'{expected}')
  return meta


def check_stream(task: str, spec: str, configured_root: str = '') -> None:
  """Raises, before any record is read, for a source the stream could not read: a path that
  does not exist, an ArrayRecord folder of another task, a TFDS dataset or split that TFDS
  does not know (or no tensorflow-datasets), a configured image root that is not a folder."""
  kind = stream_kind(spec, task)
  if kind == 'array_record':
    check_converted(spec, task)
  elif kind == 'tfds':
    check_tfds(spec, task)
  if configured_root and not os.path.isdir(configured_root):
    raise FileNotFoundError(f'data.image_root.{task}={configured_root!r} is not a folder; '
                            f'expected the folder that the image paths of data.{task} are '
                            'relative to')


def open_stream(task: str, spec: str, tfds_fields: str = '') -> grain.MapDataset:
  """The stream's records as a MapDataset of (where, payload)."""
  kind = stream_kind(spec, task)
  if kind == 'jsonl':
    stat = os.stat(spec)
    return grain.MapDataset.source(_jsonl_source(spec, stat.st_mtime_ns, stat.st_size))
  if kind == 'tfds':
    return grain.MapDataset.source(TfdsRecords(spec, task, tfds_fields or TFDS_FIELDS[task]))
  check_converted(spec, task)
  paths = sorted(glob.glob(os.path.join(spec, '*' + ARRAY_RECORD_SUFFIX)))
  source = grain.sources.ArrayRecordDataSource(paths)
  return grain.MapDataset.source(source).map_with_index(_Locate(spec))


@dataclasses.dataclass(frozen=True)
class RecordLoader:
  """Raw item -> (where, example dict for data/tasks.py), images decoded onto buckets (uint8).

  Raises records.Fault, with its `where` set to the record's location, for anything unusable.
  absolute_ok: absolute image paths are allowed anywhere (records.resolve_image).
  """
  task: str
  kind: str
  image_root: str
  buckets: tuple[tuple[int, int], ...]
  resampler: str = 'pillow'  # images.RESAMPLERS
  absolute_ok: bool = False
  max_text_chars: int = records.MAX_TEXT_CHARS
  max_image_pixels: int = records.MAX_IMAGE_PIXELS

  def __call__(self, item: tuple[str, Any]) -> tuple[str, dict]:
    where, payload = item
    try:
      if self.kind == 'jsonl':
        record = records.normalise(self.task, records.parse_json_line(payload),
                                   self.max_text_chars)
        blobs = {k: records.read_image_bytes(self.image_root, path, self.absolute_ok)
                 for k, path in record.images.items()}
      elif self.kind == 'array_record':
        task, rec, blobs, origin = records.decode_record(payload)
        where = f'{where} ({origin})'
        if task != self.task:
          raise records.Fault('bad_field', f'record of task {task!r} in the {self.task} stream')
        record = records.normalise(self.task, rec, self.max_text_chars)
      else:
        record, blobs = _from_tfds(self.task, payload, self.max_text_chars)
      pixels = {k: self._pixels(v, f'{k} {record.images[k]!r}') for k, v in blobs.items()}
    except records.Fault as fault:
      fault.where = where
      raise
    return where, to_example(self.task, record, pixels)

  def _pixels(self, blob, what: str) -> np.ndarray:
    if isinstance(blob, np.ndarray):  # TFDS decodes images itself
      if blob.ndim == 2:
        blob = np.repeat(blob[..., None], 3, axis=-1)
      if blob.dtype == np.uint16:
        blob = (blob.astype(np.uint32) * 255 + 32767) // 65535
      return images_lib.to_bucket(Image.fromarray(blob[..., :3].astype(np.uint8)), self.buckets,
                                  self.resampler)
    return images_lib.decode_to_bucket(blob, self.buckets, what=what, resampler=self.resampler,
                                       max_pixels=self.max_image_pixels)


def _from_tfds(task: str, payload: dict, max_text_chars: int) -> tuple[records.Record, dict]:
  rec = dict(payload)
  if task in ('mmu', 'text') and 'conversations' not in rec:
    if 'question' in rec and 'answer' in rec:
      rec['conversations'] = [{'from': 'human', 'value': str(rec.pop('question'))},
                              {'from': 'gpt', 'value': str(rec.pop('answer'))}]
  blobs = {k: rec.pop(k) for k in records.IMAGE_KEYS[task] if k in rec}
  record = records.normalise(task, {**rec, **{k: k for k in blobs}}, max_text_chars)
  return record, blobs


# Example keys of each task's images (data/tasks.py).
_EXAMPLE_IMAGE_KEYS = {'image': 'image', 'raw_image': 'source', 'out_image': 'target'}


def to_example(task: str, record: records.Record, pixels: dict[str, np.ndarray]) -> dict:
  """A normalised record with decoded images -> the example dict data/tasks.py formats."""
  return {'task': task, **record.text,
          **{_EXAMPLE_IMAGE_KEYS[k]: v for k, v in pixels.items()}}


def image_root(spec: str, configured: str) -> str:
  """The configured root, else the JSON-lines file's folder."""
  return configured or os.path.dirname(os.path.abspath(spec))


def stream_loader(task: str, spec: str, configured_root: str,
                  buckets: Sequence[tuple[int, int]], resampler: str = 'pillow', *,
                  absolute_paths: bool = False, max_text_chars: int = records.MAX_TEXT_CHARS,
                  max_image_pixels: int = records.MAX_IMAGE_PIXELS) -> RecordLoader:
  """The stream's loader; absolute image paths are allowed anywhere when no image root is
  configured or absolute_paths is set (else only inside the configured root)."""
  return RecordLoader(task, stream_kind(spec, task), image_root(spec, configured_root),
                      tuple(map(tuple, buckets)), resampler,
                      absolute_ok=absolute_paths or not configured_root,
                      max_text_chars=max_text_chars, max_image_pixels=max_image_pixels)
