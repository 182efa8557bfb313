"""What a run reports: `workdir/metrics.jsonl`, TensorBoard events, optionally Weights & Biases,
sample grids, a progress bar and the summary at the end.

metrics.jsonl holds one JSON object per logged step, `{"step": 100, "loss": 2.31, ...}`, so a
run can be read back with `pandas.read_json(path, lines=True)` without TensorBoard. Every file
goes through tuna2_jax.paths, so a workdir may be a gs:// URL.
"""

import collections
import hashlib
import io
import json
import math
import os
from typing import Any, Sequence

import ml_collections
import numpy as np
import tqdm
from PIL import Image, ImageDraw, ImageFont

from tuna2_jax import paths

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


class WandbSink:
  """Weights & Biases behind MetricsWriter (config `wandb.enabled`; off by default).

  `wandb.mode` is 'online', 'offline' (written under workdir/wandb, synced later with
  `wandb sync`) or 'disabled'. The run id is `wandb.run_id`, or else derived from the workdir,
  so a resumed run continues the same W&B run. `module` is the wandb package (tests pass a fake).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, run_config: dict,
               module: Any = None):
    if module is None:
      try:
        import wandb as module  # pylint: disable=import-outside-toplevel
      except ImportError:
        raise ImportError('wandb.enabled=True needs the wandb package: pip install -e '
                          "'.[wandb]'") from None
    if config.mode not in WANDB_MODES:
      raise ValueError(f'wandb.mode={config.mode!r}: expected one of {WANDB_MODES}')
    # W&B keeps its files locally; a gs:// workdir's are kept in the current directory.
    local_dir = paths.absolute(workdir) if paths.is_local(workdir) else os.getcwd()
    os.makedirs(local_dir, exist_ok=True)
    name = config.name or os.path.basename(os.path.normpath(workdir.split('://')[-1]))
    run_id = config.run_id or hashlib.sha1(paths.absolute(workdir).encode()).hexdigest()[:16]
    self._run = module.init(project=config.project, entity=config.entity or None, name=name,
                            id=run_id, resume='allow', dir=local_dir, mode=config.mode,
                            config=run_config)
    self._module = module

  def log(self, step: int, scalars: dict[str, float]) -> None:
    self._run.log(dict(scalars), step=int(step))

  def log_image(self, step: int, tag: str, image_HW3: np.ndarray) -> None:
    self._run.log({tag: self._module.Image(image_HW3)}, step=int(step))

  def close(self) -> None:
    self._run.finish()


WANDB_MODES = ('online', 'offline', 'disabled')


class MetricsWriter:
  """Appends scalars to metrics.jsonl, TensorBoard and the optional W&B sink; with enabled=False
  every call does nothing.

  Pass enabled=(jax.process_index() == 0) so that only one process of a job writes.
  """

  def __init__(self, workdir: str, enabled: bool = True, wandb: WandbSink | None = None):
    self.workdir = workdir
    self.enabled = enabled
    self._wandb = wandb
    if not enabled:
      return
    paths.check_supported(workdir)
    paths.makedirs(workdir)
    paths.register_tensorboard()
    # Appending: a resumed run continues the same file; steps may repeat after a restart.
    self._scalars = paths.AppendFile(paths.join(workdir, METRICS_FILE))
    # Imported here: tensorboardX imports torch when it is installed (seconds), which a command
    # that stops at a bad argument, or writes no logs, should not pay.
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._tb = SummaryWriter(logdir=paths.join(workdir, TENSORBOARD_DIR))

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    values = {name: float(value) for name, value in scalars.items()}
    record = {'step': int(step), **{k: _json_number(v) for k, v in values.items()}}
    self._scalars.write(json.dumps(record, allow_nan=False) + '\n')
    self._scalars.flush()  # a crashed run keeps every line it logged
    self.write_tensorboard(step, values)

  def write_tensorboard(self, step: int, scalars: dict[str, float]) -> None:
    """Scalars to TensorBoard (and W&B) only (e.g. held-out metrics with their own jsonl file)."""
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), global_step=int(step))
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(step, scalars)

  def write_jsonl(self, name: str, record: dict) -> None:
    """Appends `record` as one JSON line to `workdir/<name>` (e.g. 'eval.jsonl')."""
    if not self.enabled:
      return
    if os.path.basename(name) != name or not name:
      raise ValueError(f'jsonl name {name!r}: expected a plain file name inside {self.workdir}')
    out = paths.AppendFile(paths.join(self.workdir, name))
    out.write(json.dumps(record, default=_json_default) + '\n')
    out.close()

  def write_image(self, step: int, tag: str, image_HW3: np.ndarray) -> None:
    if not self.enabled:
      return
    image_HW3 = np.asarray(image_HW3)
    if image_HW3.ndim != 3 or image_HW3.shape[-1] != 3 or image_HW3.dtype != np.uint8:
      raise ValueError(f'image {tag!r}: got {image_HW3.dtype} {image_HW3.shape}; expected uint8 '
                       '(H, W, 3)')
    self._tb.add_image(tag, image_HW3, global_step=int(step), dataformats='HWC')
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log_image(step, tag, image_HW3)

  def close(self) -> None:
    if not self.enabled:
      return
    self._scalars.close()
    self._tb.close()
    if self._wandb is not None:
      self._wandb.close()


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
  png = io.BytesIO()
  grid.save(png, format='PNG')
  return paths.write_bytes(path, png.getvalue())  # makes the folder (or writes gs://)


def _format(value: Any) -> str:
  if isinstance(value, str):
    return value
  x = float(value)
  return f'{x:,.0f}' if abs(x) >= 1000 else f'{x:.4g}'


class RateMeter:
  """Tokens per second over the last `window` finished steps (a sliding window)."""

  def __init__(self, window: int = 20):
    self._marks: collections.deque[tuple[float, float]] = collections.deque(maxlen=window + 1)
    self._total = 0.0

  def add(self, finished_at: float, tokens: float) -> float | None:
    """Records a step of `tokens` that finished at `finished_at`; the rate once two are known."""
    self._total += tokens
    self._marks.append((finished_at, self._total))
    return self.rate

  @property
  def rate(self) -> float | None:
    if len(self._marks) < 2:
      return None
    (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
    return (n1 - n0) / max(t1 - t0, 1e-9)


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


def summary(workdir: str, first_step: int, last_step: int, total_steps: int, seconds: float,
            last: dict[str, float], where: dict[str, str | None]) -> str:
  """The lines a run ends with: steps, time, last metrics and where its outputs are."""
  minutes, secs = divmod(int(round(seconds)), 60)
  status = 'done' if last_step >= total_steps else f'stopped (of {total_steps})'
  lines = [f'run {status}: steps {first_step} -> {last_step} in {minutes} min {secs} s, '
           f'workdir {workdir}']
  if last:
    lines.append('  last metrics: ' + ', '.join(f'{k}={_format(v)}' for k, v in last.items()))
  width = max(len(name) for name in where)
  lines += [f'  {name:<{width}}  {path}' for name, path in where.items() if path]
  return '\n'.join(lines)
