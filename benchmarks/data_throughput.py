r"""Data pipeline throughput: images per second per CPU core, end to end, and the converter's rate.

  python benchmarks/data_throughput.py [--images 240] [--threads 1,2] [--buckets 512]

Writes JPEGs of common photo sizes (640x480 to 1280x720, textured so that they compress like
photos rather than flat drawings) and a text->image JSON-lines file to a temporary folder, then
times
  1. the training pipeline (read, decode, resize, crop to the nearest bucket, tokenize, pack
     into 16k-token rows, batch) from the JSON-lines file and from converted ArrayRecord shards,
     with 1 loader thread (= one core) and more;
  2. the converter (records per second per core, one process);
  3. reading, decoding and resizing alone, the floor the pipeline's rate cannot pass;
each pipeline figure for both resamplers (data.resize: opencv, the config default; pillow).
Prints the machine it ran on. Per-core figures come from runs pinned to one CPU core
(sched_setaffinity), so helper threads cannot borrow a second core; each is given as wall-clock
rate and as rate per CPU-second the process used (the two agree on an idle machine; on a shared
one the wall-clock rate also counts the time other jobs held the core).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'experiments'))

import tuna2_data  # noqa: E402
from tuna2_jax.data import build_records, pipeline, shapes  # noqa: E402
from tuna2_jax.data import images as images_lib  # noqa: E402
from tuna2_jax.data.tokenizer import Tokenizer  # noqa: E402

PHOTO_SIZES = ((480, 640), (600, 800), (768, 1024), (1024, 768), (720, 1280), (640, 640))


def machine() -> str:
  model = platform.processor() or '?'
  try:
    with open('/proc/cpuinfo') as f:
      model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return (f'{platform.system()} {platform.machine()}, {model}, {os.cpu_count()} CPU cores '
          f'visible, Python {platform.python_version()}, Pillow {Image.__version__}')


def write_photos(root: str, n: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  lines = []
  for i in range(n):
    h, w = PHOTO_SIZES[i % len(PHOTO_SIZES)]
    scene = shapes.sample_scene(rng, 3)
    img = Image.fromarray(shapes.render(scene, 96)).resize((w, h), Image.BICUBIC)
    # Smooth gradients plus fine grain: roughly the entropy of a photo at JPEG quality 90.
    yy, xx = np.mgrid[0:h, 0:w]
    grad = (40 * np.sin(xx / (37 + i)) + 40 * np.cos(yy / (53 + i)))[..., None]
    px = np.asarray(img, np.float32) * 0.6 + 60 + grad + rng.normal(0, 6, (h, w, 3))
    rel = f'images/{i}.jpg'
    Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(os.path.join(root, rel),
                                                                quality=90)
    lines.append(json.dumps({'image': rel, 'caption': shapes.caption(scene)}))
  path = os.path.join(root, 't2i.jsonl')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


class one_core:
  """Pins this process to one CPU core inside the block (where the OS allows it)."""

  def __enter__(self):
    self._saved = os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else None
    if self._saved:
      os.sched_setaffinity(0, {min(self._saved)})

  def __exit__(self, *exc):
    if self._saved:
      os.sched_setaffinity(0, self._saved)


def pipeline_rate(spec: str, buckets: str, threads: int, n_images: int,
                  resize: str) -> tuple[float, float, float]:
  """(images per wall second, per CPU second, share of row slots used) over ~n_images images."""
  c = tuna2_data.get_config(f'buckets={buckets}')
  c.data.update(t2i=spec, mmu='', edit='', text='', read_threads=threads, worker_count=0,
                resize=resize)
  c.data.weights.update(t2i=1.0, mmu=0.0, edit=0.0, text=0.0)
  c.batch_size = 1
  it = iter(pipeline.train_dataset(c, Tokenizer.load()))
  # Warm-up: the index, the first packing window and the read-ahead buffer that filled in the
  # meantime. Timing starts once those images are consumed: counting them would credit the timed
  # window with work done before it (all of it, for a --measure below the buffer's size).
  warm = 0
  while warm <= c.data.read_buffer:
    warm += int(next(it)['is_time'].sum())
  images, used, rows = 0, 0, 0
  t0, c0 = time.perf_counter(), time.process_time()
  while images < n_images:
    b = next(it)
    images += int(b['is_time'].sum())
    used += int((b['segment_ids'] > 0).sum())
    rows += b['tokens'].shape[0]
  return (images / (time.perf_counter() - t0), images / (time.process_time() - c0),
          used / (rows * c.seq_len))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--images', type=int, default=240, help='distinct JPEGs written')
  parser.add_argument('--measure', type=int, default=480,
                      help='images timed per run (a few hundred at least: the packer holds '
                      'several rows of images in flight)')
  parser.add_argument('--threads', default='1,2')
  parser.add_argument('--buckets', default='512', choices=('512', '1024'))
  parser.add_argument('--resize', default=','.join(images_lib.RESAMPLERS),
                      help='data.resize values to time (the first is the config default)')
  args = parser.parse_args()
  print(f'machine: {machine()}')
  with tempfile.TemporaryDirectory() as root:
    jsonl = write_photos(root, args.images)
    sizes = [os.path.getsize(os.path.join(root, 'images', n))
             for n in os.listdir(os.path.join(root, 'images'))]
    print(f'inputs: {args.images} JPEGs of {sorted(set(PHOTO_SIZES))} (h, w), mean '
          f'{np.mean(sizes) / 1024:.0f} KiB; {args.buckets}-class buckets, 16k-token rows')

    with one_core():
      t0, c0 = time.perf_counter(), time.process_time()
      summary = build_records.convert(jsonl, 't2i', os.path.join(root, 'ar'), num_shards=4,
                                      workers=0, log=lambda m: None)
      wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = summary['records']
    print(f'converter (1 process on 1 core, {n} records): {n / wall:.0f} records/s per core '
          f'wall-clock, {n / cpu:.0f} records per CPU-second')

    resamplers = args.resize.split(',')
    paths = [os.path.join(root, 'images', n) for n in os.listdir(os.path.join(root, 'images'))]
    for resize in resamplers:
      with one_core():  # the pipeline's floor: what decoding and resizing alone take per image
        c0 = time.process_time()
        for path in paths:
          with open(path, 'rb') as f:
            images_lib.decode_to_bucket(f.read(), tuna2_data.BUCKETS[args.buckets],
                                        resampler=resize)
        cpu = time.process_time() - c0
      print(f'read + decode + bicubic resize alone (data.resize={resize}, 1 core): '
            f'{len(paths) / cpu:.0f} images per CPU-second')

    for resize in resamplers:
      for spec, name in ((jsonl, 'JSON-lines'), (os.path.join(root, 'ar'), 'ArrayRecord')):
        for threads in map(int, args.threads.split(',')):
          with one_core() if threads == 1 else contextlib.nullcontext():
            ips, per_cpu_s, used = pipeline_rate(spec, args.buckets, threads, args.measure,
                                                 resize)
          rate = (f'{ips:.0f} images/s per core wall-clock (pinned to 1 core)' if threads == 1
                  else f'{ips:.0f} images/s wall-clock (unpinned)')
          print(f'pipeline ({name}, data.resize={resize}, {threads} loader '
                f'thread{"s" * (threads > 1)}): {rate}, {per_cpu_s:.0f} images per CPU-second; '
                f'rows {used:.0%} full')


if __name__ == '__main__':
  main()
