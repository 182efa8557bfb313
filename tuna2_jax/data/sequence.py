"""Sequence layout: task examples -> token sequences -> packed rows the model reads.

A row is a dict of numpy arrays over T token slots, one per field of layout.SCHEMA (names,
dtypes, trailing shapes and meanings live there); the builders here write them.

Layouts (ARCHITECTURE.md): image span = [time][patches]; t2i = [BOS] prompt [BOI] span [EOI]
[EOS]; understanding = [BOS] [BOI] span [EOI] question answer [EOS]; editing = [BOS] [BOI] src
[EOI] instruction [BOI] target [EOI] [EOS]; text = [BOS] text [EOS].

Training rows for official Tuna-2 weights (model.pixel_layout='official', `assemble`'s
pixel_layout) lay each span out as the official training data does: its length is the number
of patches, so it holds the time token and every patch but the last; the last patch's pixels
ride in the time slot (which the model never reads as pixels), because the official targets,
strips of p*p raster pixels (`strips`), still cover most of them (flow.flow_target).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np

from tuna2_jax import layout


@dataclasses.dataclass
class Text:
  ids: Sequence[int]
  train: bool = False  # the model learns to predict these tokens


@dataclasses.dataclass
class Image:
  pixels: np.ndarray  # uint8 [H, W, 3]
  generate: bool = False  # a generation target: noised, trained by the flow loss


Piece = Union[Text, Image]


def patchify(image_HW3: np.ndarray, p: int, out: np.ndarray | None = None) -> np.ndarray:
  """[H, W, C] -> [(H/p)*(W/p), p*p*C], raster order over blocks, (row, col, ch) inside.

  With `out` (a C-contiguous [(H/p)*(W/p), p*p*C] array) the blocks are written into it in one
  strided copy, without an intermediate array.
  """
  h, w, c = image_HW3.shape
  if h % p or w % p:
    raise ValueError(f'image of {h}x{w} is not divisible by the patch size {p}')
  blocks = image_HW3.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
  if out is None:
    return blocks.reshape((h // p) * (w // p), p * p * c)
  out.reshape(h // p, w // p, p, p, c)[...] = blocks
  return out


def grid_of(gh: int, gw: int) -> np.ndarray:
  """int32 [gh*gw, 4]: (row, col, gh, gw) of each patch of a gh x gw grid, in raster order."""
  rows, cols = np.divmod(np.arange(gh * gw, dtype=np.int32), gw)
  return np.stack([rows, cols, np.full_like(rows, gh), np.full_like(rows, gw)], -1)


def unpatchify(patches_NP, height: int, width: int, p: int):
  """Exact inverse of patchify: [N, p*p*C] -> [H, W, C] (numpy or jax arrays)."""
  gh, gw = height // p, width // p
  c = patches_NP.shape[-1] // (p * p)
  blocks = patches_NP.reshape(gh, gw, p, p, c).transpose(0, 2, 1, 3, 4)
  return blocks.reshape(height, width, c)


def strips(image_HWC, p: int):
  """The official Tuna-2 output layout: [H, W, C] -> [H*W/(p*p), p*p*C], token k holding raster
  pixels k*p*p .. (k+1)*p*p - 1, pixel-major and channel-minor (not the blocks of patchify)."""
  h, w, c = image_HWC.shape
  return image_HWC.reshape(h * w // (p * p), p * p * c)


def unpatchify_strips(tokens_NP, height: int, width: int, p: int):
  """Inverse of `strips` (the official unpatchify): [N, p*p*C] -> [H, W, C]."""
  return tokens_NP.reshape(height, width, tokens_NP.shape[-1] // (p * p))


PIXEL_LAYOUTS = ('exact', 'official')


def assemble(pieces: Sequence[Piece], task: str, *, img_id: int, patch_size: int,
             pixel_layout: str = 'exact') -> dict:
  """Lays pieces out as one sample's per-token arrays (segment 1, span ids from 1).

  pixel_layout 'official': training spans as the official Tuna-2 data builds them (module
  docstring); 'exact' (and every inference prompt): the time token and all patches.
  Built piece by piece with numpy (no per-token Python loop): a 1024-patch image costs a few
  array writes, which keeps the data pipeline's per-image cost dominated by decoding.
  """
  if pixel_layout not in PIXEL_LAYOUTS:
    raise ValueError(f'pixel_layout {pixel_layout!r}: expected one of {PIXEL_LAYOUTS}')
  dropped = int(pixel_layout == 'official')  # patches left out of each span
  pdim = patch_size * patch_size * 3
  lengths = [len(p.ids) if isinstance(p, Text) else
             1 - dropped + (p.pixels.shape[0] // patch_size) * (p.pixels.shape[1] // patch_size)
             for p in pieces]
  length = sum(lengths)
  tokens = np.empty(length, np.int32)
  train = np.zeros(length, bool)
  span_ids = np.zeros(length, np.int32)
  is_time = np.zeros(length, bool)
  is_patch = np.zeros(length, bool)
  gen_mask = np.zeros(length, bool)
  positions = np.arange(length, dtype=np.int32)
  pos3 = np.repeat(positions[:, None], 3, axis=1)
  patch_grid = np.zeros((length, 4), np.int32)
  # uint8 from the data pipeline; float pixels (tests, references) keep their type.
  pixel_dtype = next((p.pixels.dtype for p in pieces if isinstance(p, Image)), np.uint8)
  patches = np.zeros((length, pdim), pixel_dtype)
  offset, span = 0, 0
  for piece, n in zip(pieces, lengths):
    sl = slice(offset, offset + n)
    if isinstance(piece, Text):
      tokens[sl] = np.asarray(piece.ids, np.int64).reshape(-1)
      train[sl] = piece.train
      offset += n
      continue
    span += 1
    h, w, _ = piece.pixels.shape
    gh, gw = h // patch_size, w // patch_size
    tokens[sl] = img_id
    span_ids[sl] = span
    gen_mask[sl] = piece.generate
    is_time[offset] = True
    body = slice(offset + 1, offset + n)
    is_patch[body] = True
    if dropped:  # the last patch's pixels go to the time slot
      patches[offset:offset + n] = np.roll(patchify(piece.pixels, patch_size), 1, axis=0)
      patch_grid[body] = grid_of(gh, gw)[:-1]
    else:
      patchify(piece.pixels, patch_size, out=patches[body])
      patch_grid[body] = grid_of(gh, gw)
    start = offset + 1
    pos3[body] = start
    pos3[body, 1] += patch_grid[body, 0]
    pos3[body, 2] += patch_grid[body, 1]
    offset += n
  return {
      'tokens': tokens,
      'targets': np.concatenate([tokens[1:], [0]]).astype(np.int32),
      'loss_mask': np.concatenate([train[1:], [False]]).astype(np.float32),
      'segment_ids': np.ones(length, np.int32),
      'positions': positions,
      'span_ids': span_ids,
      'is_time': is_time,
      'is_patch': is_patch,
      'gen_mask': gen_mask,
      'task': np.full(length, layout.TASK_IDS[task], np.int32),
      'patches': patches,
      'pos3': pos3.astype(np.int32),
      'patch_grid': patch_grid,
  }


def image_spans(sample: dict) -> int:
  """Image spans of one sample or packed row (its span ids run 1..n)."""
  return int(sample['span_ids'].max(initial=0))


def empty_row(seq_len: int, patch_size: int, pad_id: int) -> dict:
  pdim = patch_size * patch_size * 3
  row = {k: np.zeros(seq_len, np.int32) for k in ('targets', 'segment_ids', 'positions',
                                                    'span_ids', 'task')}
  row['tokens'] = np.full(seq_len, pad_id, np.int32)
  row['loss_mask'] = np.zeros(seq_len, np.float32)
  row.update({k: np.zeros(seq_len, bool) for k in ('is_time', 'is_patch', 'gen_mask')})
  row['patches'] = np.zeros((seq_len, pdim), np.uint8)
  row['pos3'] = np.zeros((seq_len, 3), np.int32)
  row['patch_grid'] = np.zeros((seq_len, 4), np.int32)
  return row


def pack(samples: Sequence[dict], seq_len: int, *, patch_size: int, pad_id: int) -> dict:
  """Concatenates whole samples into one row: segments 1..n, span ids unique in the row.

  Each field is written once, samples then padding (a 16k-token row's patches are 12 MB, so
  zero-filling the row before copying would double the packer's memory traffic).
  """
  lengths = [len(s['tokens']) for s in samples]
  total = sum(lengths)
  if total > seq_len:
    raise ValueError(f'samples of {total} tokens do not fit a row of seq_len={seq_len}')
  if not samples:
    return empty_row(seq_len, patch_size, pad_id)
  row = {}
  for k in layout.FIELDS:
    first = samples[0][k]
    row[k] = np.empty((seq_len, *first.shape[1:]), first.dtype)
    np.concatenate([s[k] for s in samples], out=row[k][:total])
    row[k][total:] = pad_id if k == 'tokens' else 0
  row['segment_ids'][:total] = np.repeat(np.arange(1, len(samples) + 1, dtype=np.int32), lengths)
  # Span ids continue from the previous sample's last span.
  before = np.cumsum([0] + [image_spans(s) for s in samples[:-1]])
  span_ids = row['span_ids'][:total]
  span_ids += np.where(span_ids > 0, np.repeat(before, lengths), 0).astype(span_ids.dtype)
  return row


def stack_left_padded(samples: Sequence[dict], *, patch_size: int, pad_id: int,
                      length: int | None = None) -> dict:
  """Batches single samples so that they END at the same slot (for prefill + decoding).

  Left padding keeps every row's next free slot at the same index; padding has segment 0.
  """
  length = length or max(len(s['tokens']) for s in samples)
  rows = []
  for s in samples:
    n = len(s['tokens'])
    if n > length:
      raise ValueError(f'sample of {n} tokens is longer than {length}')
    row = empty_row(length, patch_size, pad_id)
    for k in layout.FIELDS:
      row[k][length - n:] = s[k]
    rows.append(row)
  return {k: np.stack([r[k] for r in rows]) for k in layout.FIELDS}
