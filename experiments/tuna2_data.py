r"""Tuna-2 on real data: a weighted mixture of task streams, packed into fixed-length rows.

Each stream is a JSON-lines file in the reference format, an ArrayRecord folder written by
`python -m tuna2_jax.data.build_records`, tfds:NAME[:SPLIT] (pip install "tuna2_jax[tfds]") or
'shapes' (the embedded dataset); '' leaves a stream out.

  python -m tuna2_jax.train --config=experiments/tuna2_data.py --workdir=gs://BUCKET/run \
      --config.data.t2i=/data/t2i_ar --config.data.mmu=/data/llava.jsonl \
      --config.data.text=/data/text_ar --config.data.weights.edit=0

  # smoke run on a CPU (tiny model, 64 px buckets):
  python -m tuna2_jax.train --config=experiments/tuna2_data.py:runlocal=True --workdir=/tmp/r \
      --config.data.t2i=shapes --config.data.mmu=my.jsonl

  # runlocal rows hold 128 tokens, enough for the shapes streams; official understanding records
  # need about 1024 with the small tokenizer (the start-up check names the stream and length):
  #   ... --config.data.mmu=llava.jsonl --config.seq_len=1024
  # held-out loss per stream, and answers about chosen images in the sample grids:
  ... --config.data.eval.t2i=/data/t2i_val.jsonl --config.data.eval.mmu=/data/llava_val.jsonl \
      --config.eval.images="('/data/probe/0.jpg', '/data/probe/1.jpg')"

Args after ':': runlocal=True (tiny model and rows, as shapes.py:runlocal), vision=encoder
(Tuna-R), buckets=512|1024 (the aspect-ratio bucket class).
Model and recipe otherwise as tuna2_7b.py: 16k-token rows, 7 : 3 generation : understanding.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402  (sibling configs: the tiny model and the 7B one)
import tuna2_7b  # noqa: E402

from tuna2_jax import config_lib  # noqa: E402
from tuna2_jax.data import records  # noqa: E402

# (height, width) of ~1024 (512-class) and ~4096 (1024-class) 16 px patches, about the
# aspect ratios 1:1, 4:5, 5:4, 4:7, 7:4.
BUCKETS = {
    '512': ((512, 512), (448, 576), (576, 448), (384, 672), (672, 384)),
    '1024': ((1024, 1024), (896, 1152), (1152, 896), (768, 1344), (1344, 768)),
    '64': ((64, 64), (48, 80), (80, 48)),  # runlocal
}


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False, vision='patch', buckets='512')
  if args.runlocal:
    c = shapes.get_config(f'runlocal=True,vision={args.vision}')
    c.seq_len = 128  # as shapes.py:runlocal, so tests share its compiled programs
    c.data.image_size = 64  # the shapes streams' image side
    buckets = BUCKETS['64']
  else:
    c = tuna2_7b.get_config(f'vision={args.vision}')
    if args.buckets not in ('512', '1024'):
      raise ValueError(f'buckets={args.buckets!r}: expected 512 or 1024')
    buckets = BUCKETS[args.buckets]
    c.data.image_size = max(max(b) for b in buckets)

  d = c.data
  d.name = 'mixture'
  for task in ('t2i', 'mmu', 'edit', 'text'):
    d[task] = ''  # a JSON-lines file, an ArrayRecord folder, tfds:NAME[:SPLIT] or 'shapes'
  d.image_root = {'t2i': '', 'mmu': '', 'edit': '', 'text': ''}  # '' = the file's folder
  # TFDS streams: 'our_key=feature/path,...' per task ('' = same names as the JSON keys).
  d.tfds_fields = {'t2i': '', 'mmu': '', 'edit': '', 'text': ''}
  d.buckets = buckets
  d.resize = 'opencv'  # bicubic; 'pillow': antialiased bicubic, ~3x slower (data/images.py)
  d.pack_bins = 8  # rows open at once for first-fit packing
  d.read_threads = 2  # loader threads per process (PIL decodes without the GIL)
  d.read_buffer = 64
  d.worker_count = 0 if args.runlocal else 8
  # Record safety (data/records.py): limits no real record reaches, refused before decoding.
  d.absolute_paths = False  # absolute image paths outside a configured image_root
  d.max_text_chars = records.MAX_TEXT_CHARS  # a longer text field is skipped untokenized
  d.max_image_pixels = records.MAX_IMAGE_PIXELS  # a larger image is skipped from its header
  d.check_records = 32  # at start-up, a stream none of whose first N records trains stops it
  d.max_consecutive_skips = 10_000  # ... and so does one skipping this many records in a row
  # Held-out splits (same forms as the streams, read with their image_root and tfds_fields):
  # their loss goes to eval_history.jsonl every eval.metrics_every steps (heldout.py).
  d.eval = {'t2i': '', 'mmu': '', 'edit': '', 'text': ''}

  c.eval.shapes_metrics = False
  c.eval.metrics_every = c.eval_every
  # Sample grids at eval_every; add image files to eval.images (and eval.questions) to see the
  # model's answers beside them. Shapes-grammar prompts get the shapes checker's marks.
  c.eval.prompts = (('a red circle at the top left.', 'a blue square at the center.')
                    if args.runlocal else
                    ('a photo of a red apple on a wooden table.', 'a photo of two cats.',
                     'a blue bicycle leaning against a yellow wall.', 'a bowl of ramen.'))
  c.eval.questions = ('Describe the image.',)
  return c
