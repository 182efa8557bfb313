r"""Converts a JSON-lines file of one task into ArrayRecord shards the training pipeline reads.

  python -m tuna2_jax.data.convert --jsonl data/t2i.jsonl --task t2i --output data/t2i_ar \
      [--image_root data/] [--num_shards 64] [--workers 8]

Each record keeps the line's text fields and the images' encoded bytes as they are (no
re-encode; records.encode_record). Images are checked to decode (JPEGs at 1/8 scale, cheap);
a line that is not valid JSON, lacks its task's keys, names a missing, corrupt or escaping image
is skipped, logged with its line number and counted by reason. Record k goes to shard
k % num_shards, so the output is the same for any number of workers. The folder also gets
meta.json: {"task", "records", "skipped": {reason: count}, "shards", "source"}.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import sys
import time

from tuna2_jax.data import images as images_lib
from tuna2_jax.data import records
from tuna2_jax.data import sources

_CHUNK_LINES = 256  # lines sent to a worker at once


@dataclasses.dataclass(frozen=True)
class LineConverter:
  """(line number, line) -> ('ok', record bytes) | ('skip', reason, message)."""
  task: str
  path: str
  image_root: str

  def __call__(self, numbered: tuple[int, bytes]):
    number, line = numbered
    where = f'{self.path}:{number}'
    try:
      rec = records.parse_json_line(line)
      records.check_fields(self.task, rec)
      blobs = {}
      for key in records.IMAGE_KEYS[self.task]:
        blobs[key] = records.read_image_bytes(self.image_root, rec[key])
        images_lib.check_decodes(blobs[key], what=f'{key} {rec[key]!r}')
      return ('ok', records.encode_record(self.task, rec, blobs, where))
    except records.Fault as fault:
      return ('skip', fault.reason, f'{where}: {fault}')

  def chunk(self, lines: list[tuple[int, bytes]]) -> list[tuple]:
    return [self(item) for item in lines]


def _numbered_chunks(path: str):
  with open(path, 'rb') as f:
    numbered = ((n, line) for n, line in enumerate(f, start=1) if line.strip())
    while chunk := list(itertools.islice(numbered, _CHUNK_LINES)):
      yield chunk


def convert(jsonl: str, task: str, output: str, *, image_root: str = '', num_shards: int = 1,
            workers: int = 1, log=print) -> dict:
  """Writes the shards and meta.json; returns the summary written to meta.json (plus 'seconds')."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  records.check_task(task)
  if not os.path.isfile(jsonl):
    raise FileNotFoundError(f'--jsonl {jsonl!r} does not exist; expected a JSON-lines file')
  if num_shards < 1 or workers < 0:
    raise ValueError(f'--num_shards={num_shards}, --workers={workers}: expected >= 1 and >= 0')
  os.makedirs(output, exist_ok=True)
  existing = [n for n in os.listdir(output) if n.endswith(sources.ARRAY_RECORD_SUFFIX)]
  if existing:
    raise FileExistsError(f'--output {output!r} already holds {len(existing)} shards; expected '
                          'an empty or new folder')
  root = sources.image_root(jsonl, image_root)
  converter = LineConverter(task, jsonl, root)
  paths = [os.path.join(output, f'{task}-{i:05d}-of-{num_shards:05d}'
                        f'{sources.ARRAY_RECORD_SUFFIX}') for i in range(num_shards)]
  writers = [ArrayRecordWriter(p, 'group_size:1') for p in paths]
  written, skipped = 0, {}
  t0 = time.perf_counter()
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
          _, reason, message = result
          skipped[reason] = skipped.get(reason, 0) + 1
          log(f'skipped {message}')
  finally:
    if pool:
      pool.close()
      pool.join()
    for w in writers:
      w.close()
  summary = {'task': task, 'records': written, 'skipped': skipped, 'shards': num_shards,
             'source': os.path.abspath(jsonl)}
  with open(os.path.join(output, sources.META_FILE), 'w') as f:
    json.dump(summary, f, indent=2)
  return dict(summary, seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--jsonl', required=True, help='input JSON-lines file')
  parser.add_argument('--task', required=True, choices=records.TASKS)
  parser.add_argument('--output', required=True, help='folder for the shards and meta.json')
  parser.add_argument('--image_root', default='', help="image paths' root; default: the "
                      "JSON-lines file's folder")
  parser.add_argument('--num_shards', type=int, default=1)
  parser.add_argument('--workers', type=int, default=1, help='processes reading images')
  args = parser.parse_args(argv)
  try:
    s = convert(args.jsonl, args.task, args.output, image_root=args.image_root,
                num_shards=args.num_shards, workers=args.workers,
                log=lambda m: print(m, file=sys.stderr))
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  total = sum(s['skipped'].values())
  reasons = ', '.join(f'{r}={n}' for r, n in sorted(s['skipped'].items())) or 'none'
  print(f'wrote {s["records"]} records to {s["shards"]} shards in {args.output}; skipped '
        f'{total} ({reasons}); {s["seconds"]:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
