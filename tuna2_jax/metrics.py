"""What a run reports: `workdir/metrics.jsonl`, TensorBoard events, sample grids and a progress bar.

metrics.jsonl holds one JSON object per logged step, `{"step": 100, "loss": 2.31, ...}`, so a
run can be read back with `pandas.read_json(path, lines=True)` without TensorBoard.
"""

import json
import math
import os
from typing import Any, Sequence

import numpy as np
import tqdm
from PIL import Image, ImageDraw, ImageFont
from tensorboardX import SummaryWriter

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
TILE_GAP = 4  # pixels between tiles of a sample grid, and around it
MARK_COLOURS = {True: (0, 170, 0), False: (220, 0, 0)}  # a checker's pass / fail frame


def _json_number(value: Any) -> float | None:
  x = float(value)
  # Strict JSON has no NaN/Infinity; null keeps every line parseable by any reader.
  # TensorBoard still gets the value itself.
  return x if math.isfinite(x) else None


def _json_default(value: Any) -> Any:
  if hasattr(value, 'tolist'):  # numpy and jax scalars and arrays
    return value.tolist()
  raise TypeError(f'{type(value).__name__} {value!r} is not JSON-serialisable; expected numbers, '
                  'strings, lists or dicts')


class MetricsWriter:
  """Appends scalars to metrics.jsonl and TensorBoard; with enabled=False every call does nothing.

  Pass enabled=(jax.process_index() == 0) so that only one process of a job writes.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # Appending: a resumed run continues the same file; steps may repeat after a restart.
    self._scalars = open(os.path.join(workdir, METRICS_FILE), 'a')
    self._tb = SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR))

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    values = {name: float(value) for name, value in scalars.items()}
    record = {'step': int(step), **{k: _json_number(v) for k, v in values.items()}}
    self._scalars.write(json.dumps(record, allow_nan=False) + '\n')
    self._scalars.flush()  # a crashed run keeps every line it logged
    self.write_tensorboard(step, values)

  def write_tensorboard(self, step: int, scalars: dict[str, float]) -> None:
    """Scalars to TensorBoard only (e.g. held-out metrics that have their own jsonl file)."""
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), global_step=int(step))
    self._tb.flush()

  def write_jsonl(self, name: str, record: dict) -> None:
    """Appends `record` as one JSON line to `workdir/<name>` (e.g. 'eval.jsonl')."""
    if not self.enabled:
      return
    if os.path.basename(name) != name or not name:
      raise ValueError(f'jsonl name {name!r}: expected a plain file name inside {self.workdir}')
    with open(os.path.join(self.workdir, name), 'a') as f:
      f.write(json.dumps(record, default=_json_default) + '\n')

  def write_image(self, step: int, tag: str, image_HW3: np.ndarray) -> None:
    if not self.enabled:
      return
    image_HW3 = np.asarray(image_HW3)
    if image_HW3.ndim != 3 or image_HW3.shape[-1] != 3 or image_HW3.dtype != np.uint8:
      raise ValueError(f'image {tag!r}: got {image_HW3.dtype} {image_HW3.shape}; expected uint8 '
                       '(H, W, 3)')
    self._tb.add_image(tag, image_HW3, global_step=int(step), dataformats='HWC')
    self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._scalars.close()
    self._tb.close()


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
  """Greedy word wrap to `width` pixels; a word wider than a line is cut by characters."""
  lines = []
  for paragraph in text.splitlines() or ['']:
    line = ''
    for word in paragraph.split(' '):
      candidate = f'{line} {word}' if line else word
      if font.getlength(candidate) <= width:
        line = candidate
        continue
      if line:
        lines.append(line)
      line = ''
      for char in word:
        if line and font.getlength(line + char) > width:
          lines.append(line)
          line = ''
        line += char
    lines.append(line)
  return lines


def sample_grid(images: Sequence[np.ndarray], captions: Sequence[str], columns: int = 4,
                scale: int = 2, marks: Sequence[bool | None] | None = None) -> np.ndarray:
  """A grid (uint8 (H, W, 3)): each uint8 (H, W, 3) image upscaled `scale`x, its caption wrapped
  beneath.

  Tiles are as wide as the widest upscaled image; the grid is min(columns, len(images)) tiles
  wide with TILE_GAP pixels around every tile. marks: a checker's verdict per tile (None: no
  verdict), drawn as a green (True) or red (False) frame in the gap and 'pass: ' / 'fail: '
  before the caption.
  """
  marks = list(marks) if marks is not None else [None] * len(images)
  if len(marks) != len(images):
    raise ValueError(f'got {len(marks)} marks for {len(images)} images; expected one each')
  captions = [c if m is None else f'{"pass" if m else "fail"}: {c}'
              for c, m in zip(captions, marks)]
  if not images or len(images) != len(captions):
    raise ValueError(f'got {len(images)} images and {len(captions)} captions; expected the same '
                     'number, at least one')
  if columns < 1 or scale < 1:
    raise ValueError(f'columns={columns}, scale={scale}: expected both >= 1')
  tiles = []
  for i, image in enumerate(images):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f'image {i}: got {image.dtype} {image.shape}; expected uint8 (H, W, 3)')
    tiles.append(Image.fromarray(image).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST))
  tile_w = max(t.width for t in tiles)
  image_h = max(t.height for t in tiles)
  font = ImageFont.load_default()
  _, top, _, bottom = font.getbbox('Ag')
  line_h = bottom - top + 2
  wrapped = [_wrap(caption, font, tile_w) for caption in captions]
  tile_h = image_h + TILE_GAP + line_h * max(len(lines) for lines in wrapped)
  cols = min(columns, len(images))
  rows = -(-len(images) // cols)
  grid = Image.new('RGB', (cols * (tile_w + TILE_GAP) + TILE_GAP,
                           rows * (tile_h + TILE_GAP) + TILE_GAP), 'white')
  draw = ImageDraw.Draw(grid)
  for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
    x = TILE_GAP + (i % cols) * (tile_w + TILE_GAP)
    y = TILE_GAP + (i // cols) * (tile_h + TILE_GAP)
    if marks[i] is not None:
      frame = TILE_GAP // 2
      draw.rectangle((x - frame, y - frame, x + tile.width + frame - 1,
                      y + tile.height + frame - 1), fill=MARK_COLOURS[marks[i]])
    grid.paste(tile, (x, y))
    for j, line in enumerate(lines):
      draw.text((x, y + image_h + TILE_GAP + j * line_h - top), line, fill='black', font=font)
  return np.asarray(grid)


def save_sample_grid(path: str, images: Sequence[np.ndarray], captions: Sequence[str],
                     columns: int = 4, scale: int = 2,
                     marks: Sequence[bool | None] | None = None) -> str:
  """Writes sample_grid(...) as a PNG; returns `path`."""
  grid = Image.fromarray(sample_grid(images, captions, columns, scale, marks))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  grid.save(path, format='PNG')
  return path


def _format(value: Any) -> str:
  if isinstance(value, str):
    return value
  x = float(value)
  return f'{x:,.0f}' if abs(x) >= 1000 else f'{x:.4g}'


class Progress:
  """A tqdm bar over training steps; with enabled=False it prints nothing."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self._step = initial
    self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit='step',
                          dynamic_ncols=True)

  def update(self, step: int, postfix: dict[str, Any]) -> None:
    """Moves the bar to `step` and shows e.g. {'loss': 2.31, 'tokens/s': 51234.0} beside it."""
    self._bar.set_postfix_str(', '.join(f'{k}={_format(v)}' for k, v in postfix.items()),
                              refresh=False)
    self._bar.update(step - self._step)
    self._step = step

  def close(self) -> None:
    self._bar.close()
