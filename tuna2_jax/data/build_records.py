r"""Converts a JSON-lines file of one task into ArrayRecord shards the training pipeline reads.

  python -m tuna2_jax.data.build_records --jsonl data/t2i.jsonl --task t2i --output data/t2i_ar \
      [--image_root data/] [--num_shards 64] [--workers 8] [--absolute_paths]

Each record keeps the line's JSON and the images' encoded bytes as they are (no re-encode;
records.encode_record). Records are normalised and checked as the trainer does (records.py):
images must decode (JPEGs at 1/8 scale, cheap) and not be image bombs; a line that is not UTF-8
JSON, lacks its task's keys, holds text that is not valid Unicode or is enormous, or names a
missing, corrupt or escaping image is skipped, logged with its line number (rate-limited as the
trainer's log is) and counted by reason. Record k goes to shard k % num_shards, so the output is
the same for any number of workers.

All or nothing: the shards are written into a temporary folder beside --output, then meta.json
({"task", "records", "skipped": {reason: count}, "shards", "files", "source"}) last, and the
folder is renamed into place; a failed or interrupted conversion leaves no --output (the trainer
refuses a folder without a complete meta.json). Exit status: 0 when written, skipped records
included; 2 for bad arguments; 1 when the output could not be written.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

from tuna2_jax.data import images as images_lib
from tuna2_jax.data import records
from tuna2_jax.data import sources

_CHUNK_LINES = 256  # lines sent to a worker at once
EXIT_BAD_ARGS, EXIT_WRITE_FAILED = 2, 1


@dataclasses.dataclass(frozen=True)
class LineConverter:
  """(line number, line) -> ('ok', record bytes) | ('skip', reason, detail, where)."""
  task: str
  path: str
  image_root: str
  absolute_ok: bool = False
  max_text_chars: int = records.MAX_TEXT_CHARS
  max_image_pixels: int = records.MAX_IMAGE_PIXELS

  def __call__(self, numbered: tuple[int, bytes]):
    number, line = numbered
    where = f'{self.path}:{number}'
    try:
      return ('ok', self._convert(line, where))
    except records.Fault as fault:
      return ('skip', fault.reason, fault.detail, where)
    except Exception as e:  # pylint: disable=broad-except  # no record may stop a conversion
      return ('skip', 'load_error', f'{type(e).__name__}: {e}', where)

  def _convert(self, line: bytes, where: str) -> bytes:
    rec = records.parse_json_line(line)
    record = records.normalise(self.task, rec, self.max_text_chars)
    blobs = {}
    for key, path in record.images.items():
      blobs[key] = records.read_image_bytes(self.image_root, path, self.absolute_ok)
      images_lib.check_decodes(blobs[key], what=f'{key} {path!r}',
                               max_pixels=self.max_image_pixels)
    return records.encode_record(self.task, rec, blobs, where)

  def chunk(self, lines: list[tuple[int, bytes]]) -> list[tuple]:
    return [self(item) for item in lines]


def _numbered_chunks(path: str):
  with open(path, 'rb') as f:
    numbered = ((n, line) for n, line in enumerate(f, start=1) if line.strip())
    while chunk := list(itertools.islice(numbered, _CHUNK_LINES)):
      yield chunk


def check_output(output: str) -> None:
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise FileExistsError(f'--output {output!r} exists and is not an empty folder; expected a '
                          'new or empty folder')


def convert(jsonl: str, task: str, output: str, *, image_root: str = '', num_shards: int = 1,
            workers: int = 1, absolute_paths: bool = False,
            max_text_chars: int = records.MAX_TEXT_CHARS,
            max_image_pixels: int = records.MAX_IMAGE_PIXELS, log=print) -> dict:
  """Writes the shards and meta.json; returns the summary written to meta.json (plus 'seconds').

  Absolute image paths are allowed anywhere when image_root is '' or absolute_paths is set.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  records.check_task(task)
  if not os.path.isfile(jsonl):
    raise FileNotFoundError(f'--jsonl {jsonl!r} does not exist; expected a JSON-lines file')
  if num_shards < 1 or workers < 0:
    raise ValueError(f'--num_shards={num_shards}, --workers={workers}: expected >= 1 and >= 0')
  if image_root and not os.path.isdir(image_root):
    raise FileNotFoundError(f'--image_root {image_root!r} is not a folder')
  check_output(output)
  converter = LineConverter(task, jsonl, sources.image_root(jsonl, image_root),
                            absolute_paths or not image_root, max_text_chars, max_image_pixels)
  fault_log = records.FaultLog(sink=log)
  output = os.path.abspath(output)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.partial-',
                             dir=os.path.dirname(output))
  names = [f'{task}-{i:05d}-of-{num_shards:05d}{sources.ARRAY_RECORD_SUFFIX}'
           for i in range(num_shards)]
  written, skipped = 0, {}
  t0 = time.perf_counter()
  pool = None
  try:
    writers = [ArrayRecordWriter(os.path.join(staging, n), 'group_size:1') for n in names]
    pool = multiprocessing.get_context('spawn').Pool(workers) if workers > 1 else None
    try:
      chunks = _numbered_chunks(jsonl)
      results = pool.imap(converter.chunk, chunks) if pool else map(converter.chunk, chunks)
      for chunk in results:
        for result in chunk:
          if result[0] == 'ok':
            writers[written % num_shards].write(result[1])
            written += 1
          else:
            _, reason, detail, where = result
            skipped[reason] = skipped.get(reason, 0) + 1
            fault_log(where, records.Fault(reason, detail))
    finally:
      for w in writers:
        w.close()
    summary = {'task': task, 'records': written, 'skipped': skipped, 'shards': num_shards,
               'files': names, 'source': os.path.abspath(jsonl)}
    with open(os.path.join(staging, sources.META_FILE), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
      f.flush()
      os.fsync(f.fileno())
    if os.path.isdir(output):
      os.rmdir(output)  # empty (check_output); fails if something was written there meanwhile
    os.rename(staging, output)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  finally:
    if pool:
      pool.terminate()
      pool.join()
  return dict(summary, seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--jsonl', required=True, help='input JSON-lines file')
  parser.add_argument('--task', required=True, choices=records.TASKS)
  parser.add_argument('--output', required=True, help='new folder for the shards and meta.json')
  parser.add_argument('--image_root', default='', help="image paths' root; default: the "
                      "JSON-lines file's folder")
  parser.add_argument('--num_shards', type=int, default=1)
  parser.add_argument('--workers', type=int, default=1, help='processes reading images')
  parser.add_argument('--absolute_paths', action='store_true', help='allow absolute image '
                      'paths outside --image_root (always allowed without --image_root)')
  parser.add_argument('--max_text_chars', type=int, default=records.MAX_TEXT_CHARS,
                      help='longest text field kept (data.max_text_chars)')
  parser.add_argument('--max_image_pixels', type=int, default=records.MAX_IMAGE_PIXELS,
                      help='largest image kept, in pixels (data.max_image_pixels)')
  args = parser.parse_args(argv)
  log = lambda m: print(m, file=sys.stderr, flush=True)
  try:
    s = convert(args.jsonl, args.task, args.output, image_root=args.image_root,
                num_shards=args.num_shards, workers=args.workers,
                absolute_paths=args.absolute_paths, max_text_chars=args.max_text_chars,
                max_image_pixels=args.max_image_pixels, log=log)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    log(f'error: {e}')
    return EXIT_BAD_ARGS
  except (OSError, RuntimeError) as e:  # a full disk, a read-only folder: nothing is left behind
    log(f'error: could not write {args.output!r} ({type(e).__name__}: {e}); nothing was written')
    return EXIT_WRITE_FAILED
  total = sum(s['skipped'].values())
  reasons = ', '.join(f'{r}={n}' for r, n in sorted(s['skipped'].items())) or 'none'
  print(f'wrote {s["records"]} records to {s["shards"]} shards in {args.output}; skipped '
        f'{total} ({reasons}); {s["seconds"]:.1f} s')
  if not s['records']:
    log(f'warning: every record of {args.jsonl} was skipped; a trainer refuses {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
