"""Synthetic packed batches with the training layout, for benchmarks that need no dataset.

Rows are filled the way the training pipeline packs them (data/sequence.py): whole samples of
the config's task mixture (text->image, editing, understanding, text-only) with random token
ids and random pixels, until the next sample would not fit; the tail is padding. Shapes, masks,
image spans and FLOP counts are those of real training batches of the same mixture.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from tuna2_jax import layout
from tuna2_jax.data import sequence as seq

IMG_ID, PAD_ID = 5, 0


def _sample(rng, task: str, image_size: int, p: int, vocab: int) -> dict:
  text = lambda lo, hi, train=False: seq.Text(rng.integers(16, vocab, rng.integers(lo, hi)),
                                              train=train)
  image = lambda generate: seq.Image(
      rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8), generate=generate)
  pieces = {
      't2i': lambda: [text(20, 120), image(True)],
      'edit': lambda: [image(False), text(10, 40), image(True)],
      'mmu': lambda: [image(False), text(10, 60), text(5, 200, train=True)],
      'text': lambda: [text(200, 1500, train=True)],
  }[task]()
  return seq.assemble(pieces, task, img_id=IMG_ID, patch_size=p)


def packed_batch(config: ml_collections.ConfigDict, *, batch_size: int | None = None,
                 seq_len: int | None = None, seed: int = 0) -> dict:
  """A host batch {field: [B, T, ...]} drawn from config.data.weights."""
  rng = np.random.default_rng(seed)
  b, t = batch_size or config.batch_size, seq_len or config.seq_len
  p, size = config.model.patch_size, config.data.image_size
  tasks = list(config.data.weights.keys())
  weights = np.array([config.data.weights[k] for k in tasks], float)
  rows = []
  for _ in range(b):
    samples, used, misses = [], 0, 0
    while misses < 8:  # a few samples that do not fit any more end the row, as in packing
      s = _sample(rng, tasks[rng.choice(len(tasks), p=weights / weights.sum())], size, p,
                  config.model.vocab_size)
      if used + len(s['tokens']) > t:
        misses += 1
        continue
      samples.append(s)
      used += len(s['tokens'])
    rows.append(seq.pack(samples, t, patch_size=p, pad_id=PAD_ID))
  return {k: np.stack([r[k] for r in rows]) for k in layout.FIELDS}


def device_line() -> str:
  """The device the figures were measured on, for every benchmark's first line."""
  import jax
  d = jax.devices()[0]
  return (f'device: {d.device_kind} x{jax.device_count()} ({jax.default_backend()}), '
          f'jax {jax.__version__}')
