"""The embedded "shapes" dataset: coloured shapes on a 3 x 3 grid, with a checker.

A `Scene` is rendered to an image, described by a caption, questioned and edited; `parse` reads
the scene back from an image, so generated images, captions and answers are all scored exactly.
About 10% of scenes (chosen by a hash of their caption) are held out of training for evaluation.
"""

import collections
import dataclasses
import functools
import re
import zlib

import numpy as np

KINDS = ('circle', 'square', 'triangle', 'cross')
PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles', 'cross': 'crosses'}
# Saturated and far apart in RGB (closest pair: blue and purple, 156 apart), so that a slightly
# wrong generated pixel still has one clear nearest colour.
COLOURS = {
    'red': (230, 40, 40),
    'green': (40, 200, 60),
    'blue': (40, 90, 240),
    'yellow': (240, 220, 40),
    'purple': (190, 50, 230),
    'white': (240, 240, 240),
}
BACKGROUND = (0, 0, 0)
CELLS = ('top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom',
         'bottom right')
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
QTYPES = ('colour', 'kind', 'count', 'position')
CAPTION_QUESTION = 'describe the image.'
INSTRUCTIONS = {  # filled with a reference to an object ('the red circle'), a colour, a cell
    'recolour': 'make {ref} {colour}',
    'remove': 'remove {ref}',
    'move': 'move {ref} to the {cell}',
    'add': 'add a {colour} {kind} at the {cell}',
}
SPLITS = ('train', 'eval')

OBJECT_FRACTION = 0.7  # object side / cell side
MIN_SIZE = 24  # 8 px cells: the smallest where every pair of kinds still differs by some pixels
COLOUR_TOLERANCE = 70.0  # under half the closest palette distance, so colour classes never overlap
MIN_COVER = 0.08  # share of a cell one colour must cover to be an object rather than noise
MIN_IOU = 0.5
HELD_OUT_PERCENT = 10
CAPTION_PROB = 0.2
_MAX_TRIES = 10_000


@dataclasses.dataclass(frozen=True)
class Obj:
  colour: str
  kind: str
  cell: int

  def __post_init__(self):
    if self.colour not in COLOURS:
      raise ValueError(f'colour {self.colour!r}: expected one of {tuple(COLOURS)}')
    if self.kind not in KINDS:
      raise ValueError(f'kind {self.kind!r}: expected one of {KINDS}')
    if not 0 <= self.cell < len(CELLS):
      raise ValueError(f'cell {self.cell!r}: expected 0 <= cell < {len(CELLS)}')


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects sorted by cell, at most one per cell. Empty only when `parse` finds nothing."""
  objects: tuple[Obj, ...]

  def __post_init__(self):
    objects = tuple(sorted(self.objects, key=lambda o: o.cell))
    cells = [o.cell for o in objects]
    if len(set(cells)) != len(cells):
      raise ValueError(f'cells {cells}: expected at most one object per cell')
    # Canonical order makes scenes built in any order compare (and hash) equal.
    object.__setattr__(self, 'objects', objects)


def _pick(rng: np.random.Generator, options):
  options = tuple(options)
  return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
  if not 1 <= max_objects <= len(CELLS):
    raise ValueError(f'max_objects {max_objects!r}: expected 1 <= max_objects <= {len(CELLS)}')
  n = int(rng.integers(1, max_objects + 1))
  cells = rng.choice(len(CELLS), size=n, replace=False)
  return Scene(tuple(Obj(_pick(rng, COLOURS), _pick(rng, KINDS), int(c)) for c in cells))


# --- Rendering -------------------------------------------------------------------------------

def _edges(n: int) -> list[int]:
  # Rounded thirds, so the three cells differ by at most one pixel and the grid is symmetric.
  return [round(i * n / 3) for i in range(4)]


def _cell_boxes(h: int, w: int) -> list[tuple[int, int, int, int]]:
  """(y0, y1, x0, x1) of the 9 cells, row-major."""
  ys, xs = _edges(h), _edges(w)
  return [(ys[r], ys[r + 1], xs[c], xs[c + 1]) for r in range(3) for c in range(3)]


@functools.lru_cache(maxsize=None)
def _shape(kind: str, s: int) -> np.ndarray:
  """Boolean [s, s] mask of one kind filling its box."""
  c = np.arange(s) + 0.5 - s / 2  # pixel centres relative to the box centre
  y, x = c[:, None], c[None, :]
  if kind == 'circle':
    mask = y**2 + x**2 <= (s / 2)**2
  elif kind == 'square':
    mask = np.ones((s, s), bool)
  elif kind == 'triangle':
    mask = np.abs(x) <= (y + s / 2 + 0.5) / 2  # apex up; row r is r + 1 pixels wide
  else:
    # Arms about 0.3 of the side: thicker, and at small sizes a cross is nearly a circle. Arm
    # width with the parity of s gives equal margins, keeping the cross centred.
    arm = min(range(2 - s % 2, s + 1, 2), key=lambda a: abs(a - 0.3 * s))
    bar = np.abs(c) < arm / 2
    mask = bar[:, None] | bar[None, :]
  mask.setflags(write=False)
  return mask


def _place(shape_ss: np.ndarray, h: int, w: int, top: int, left: int) -> np.ndarray:
  """shape_ss at (top, left) in an empty [h, w] mask, clipped at the borders."""
  s = shape_ss.shape[0]
  out = np.zeros((h, w), bool)
  y0, y1, x0, x1 = max(top, 0), min(top + s, h), max(left, 0), min(left + s, w)
  if y0 < y1 and x0 < x1:
    out[y0:y1, x0:x1] = shape_ss[y0 - top:y1 - top, x0 - left:x1 - left]
  return out


def _side(h: int, w: int) -> int:
  return max(1, round(OBJECT_FRACTION * min(h, w)))


@functools.lru_cache(maxsize=None)
def _templates(h: int, w: int) -> dict[str, np.ndarray]:
  """Boolean [h, w] mask of each kind centred in an h x w cell; shared by render and parse."""
  s = _side(h, w)
  return {kind: _place(_shape(kind, s), h, w, (h - s) // 2, (w - s) // 2) for kind in KINDS}


def render(scene: Scene, size: int = 64) -> np.ndarray:
  """The scene as a uint8 [size, size, 3] image: solid shapes, no antialiasing."""
  if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
    raise ValueError(f'image size {size!r}: expected an int >= {MIN_SIZE}')
  image_HW3 = np.empty((size, size, 3), np.uint8)
  image_HW3[:] = BACKGROUND
  boxes = _cell_boxes(size, size)
  for o in scene.objects:
    y0, y1, x0, x1 = boxes[o.cell]
    image_HW3[y0:y1, x0:x1][_templates(y1 - y0, x1 - x0)[o.kind]] = COLOURS[o.colour]
  return image_HW3


# --- Checker ---------------------------------------------------------------------------------

_PALETTE_P3 = np.array([BACKGROUND, *COLOURS.values()], np.float32)  # row 0 is the background


def _iou(a_hw: np.ndarray, b_hw: np.ndarray) -> float:
  return np.count_nonzero(a_hw & b_hw) / max(1, np.count_nonzero(a_hw | b_hw))


def _classify(mask_hw: np.ndarray) -> str | None:
  """The kind whose template best overlaps the mask, or None if no kind overlaps enough."""
  h, w = mask_hw.shape
  s = _side(h, w)
  ys, xs = np.nonzero(mask_hw)
  bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
  fit = max(bh, bw)
  best, best_iou = None, MIN_IOU
  for kind in KINDS:
    # A generated object may sit off centre or be a little larger or smaller, so besides the
    # template in place, try it moved onto the mask's centroid and resized to its bounding box.
    shape_ys, shape_xs = np.nonzero(_shape(kind, s))
    candidates = (
        _templates(h, w)[kind],
        _place(_shape(kind, s), h, w, round(ys.mean() - shape_ys.mean()),
               round(xs.mean() - shape_xs.mean())),
        _place(_shape(kind, fit), h, w, ys.min() - (fit - bh) // 2, xs.min() - (fit - bw) // 2))
    iou = max(_iou(c, mask_hw) for c in candidates)
    if iou >= best_iou and (best is None or iou > best_iou):
      best, best_iou = kind, iou
  return best


def parse(image_HW3: np.ndarray) -> Scene:
  """Reads the scene from a uint8 image: per cell, the dominant palette colour and best kind."""
  if not isinstance(image_HW3, np.ndarray) or image_HW3.dtype != np.uint8:
    raise ValueError(f'image dtype {getattr(image_HW3, "dtype", type(image_HW3))}: expected uint8')
  if image_HW3.ndim != 3 or image_HW3.shape[2] != 3 or min(image_HW3.shape[:2]) < MIN_SIZE:
    raise ValueError(f'image shape {image_HW3.shape}: expected [H, W, 3] with H, W >= {MIN_SIZE}')
  h, w = image_HW3.shape[:2]
  dist_HWP = np.linalg.norm(image_HW3[:, :, None, :].astype(np.float32) - _PALETTE_P3, axis=-1)
  # Only pixels close to a palette colour vote for a cell's colour (0 = background or unsure).
  sure_HW = np.where(dist_HWP.min(-1) <= COLOUR_TOLERANCE, dist_HWP.argmin(-1), 0)
  names = tuple(COLOURS)
  objects = []
  for cell, (y0, y1, x0, x1) in enumerate(_cell_boxes(h, w)):
    sure_hw, dist_hwP = sure_HW[y0:y1, x0:x1], dist_HWP[y0:y1, x0:x1]
    counts = np.bincount(sure_hw.ravel(), minlength=len(_PALETTE_P3))[1:]
    k = int(counts.argmax()) + 1
    if counts[k - 1] <= MIN_COVER * sure_hw.size:
      continue
    # The shape is every pixel nearer the colour than the background, unless surely another
    # colour: this cuts a blurred edge about half way, where the sharp edge was.
    mask_hw = (dist_hwP[..., k] < dist_hwP[..., 0]) & ((sure_hw == 0) | (sure_hw == k))
    kind = _classify(mask_hw)
    if kind is not None:
      objects.append(Obj(names[k - 1], kind, cell))
  return Scene(tuple(objects))


# --- Captions and the held-out split ---------------------------------------------------------

def caption(scene: Scene) -> str:
  """'a red circle at the top left, a blue cross at the top and a green square at the center.'"""
  if not scene.objects:
    raise ValueError('caption of an empty scene: expected at least one object')
  parts = [f'a {o.colour} {o.kind} at the {CELLS[o.cell]}' for o in scene.objects]
  head = ', '.join(parts[:-1])
  return (f'{head} and {parts[-1]}' if head else parts[-1]) + '.'


_PHRASE = re.compile(r'a (\w+) (\w+) at the (\w+(?: \w+)?)')


def parse_caption(text: str) -> Scene | None:
  """The scene a caption describes (objects in any order), or None if it is not in the grammar."""
  text = text.strip()
  if not text.endswith('.'):
    return None
  objects = []
  for part in re.split(r', and |, | and ', text[:-1]):
    m = _PHRASE.fullmatch(part.strip())
    if not m or m[1] not in COLOURS or m[2] not in KINDS or m[3] not in CELLS:
      return None
    objects.append(Obj(m[1], m[2], CELLS.index(m[3])))
  try:
    return Scene(tuple(objects))
  except ValueError:  # two objects in one cell
    return None


def is_held_out(scene: Scene) -> bool:
  # crc32, not hash(): the split must not change with PYTHONHASHSEED or between processes.
  return zlib.crc32(caption(scene).encode()) % 100 < HELD_OUT_PERCENT


def _scenes(rng: np.random.Generator, max_objects: int, split: str):
  """Scenes of `split` ('eval' = held out), until a try budget runs out."""
  if split not in SPLITS:
    raise ValueError(f'split {split!r}: expected one of {SPLITS}')
  for _ in range(_MAX_TRIES):
    scene = sample_scene(rng, max_objects)
    if is_held_out(scene) == (split == 'eval'):
      yield scene
  raise RuntimeError(f'no {split} scene in {_MAX_TRIES} tries with max_objects={max_objects}')


# --- Questions and edits ---------------------------------------------------------------------

def questions(scene: Scene) -> dict[str, list[tuple[str, str]]]:
  """Every unambiguous (question, answer) about the scene, by qtype."""
  kinds = collections.Counter(o.kind for o in scene.objects)
  colours = collections.Counter(o.colour for o in scene.objects)
  pairs = collections.Counter((o.colour, o.kind) for o in scene.objects)
  qa = {q: [] for q in QTYPES}
  for o in scene.objects:
    at = CELLS[o.cell]
    qa['colour'].append((f'what colour is the object at the {at}?', o.colour))
    qa['kind'].append((f'what shape is at the {at}?', o.kind))
    if kinds[o.kind] == 1:
      qa['colour'].append((f'what colour is the {o.kind}?', o.colour))
      qa['position'].append((f'where is the {o.kind}?', at))
    if colours[o.colour] == 1:
      qa['kind'].append((f'what shape is the {o.colour} object?', o.kind))
      qa['position'].append((f'where is the {o.colour} object?', at))
    if pairs[o.colour, o.kind] == 1:
      qa['position'].append((f'where is the {o.colour} {o.kind}?', at))
  qa['count'].append(('how many objects are there?', NUMBERS[len(scene.objects)]))
  qa['count'] += [(f'how many {PLURALS[k]} are there?', NUMBERS[n]) for k, n in kinds.items()]
  qa['count'] += [(f'how many {c} objects are there?', NUMBERS[n]) for c, n in colours.items()]
  return qa


def _references(obj: Obj) -> tuple[str, str, str]:
  """Ways to name `obj`, from shortest to always unambiguous."""
  return (f'the {obj.kind}', f'the {obj.colour} {obj.kind}',
          f'the {obj.colour} {obj.kind} at the {CELLS[obj.cell]}')


def refer(scene: Scene, obj: Obj) -> str:
  """The shortest name that picks out `obj` alone in `scene`."""
  same_kind = [o for o in scene.objects if o.kind == obj.kind]
  short, coloured, placed = _references(obj)
  if len(same_kind) == 1:
    return short
  return coloured if sum(o.colour == obj.colour for o in same_kind) == 1 else placed


def _edit(rng: np.random.Generator, scene: Scene, max_objects: int) -> tuple[str, Scene]:
  """A random (instruction, target) among the edits possible on `scene`."""
  objs = scene.objects
  empty = sorted(set(range(len(CELLS))) - {o.cell for o in objs})
  ops = ['recolour'] + ['remove'] * (len(objs) > 1) + ['move'] * bool(empty)
  ops += ['add'] * (bool(empty) and len(objs) < max_objects)
  op = _pick(rng, ops)
  if op == 'add':
    new = Obj(_pick(rng, COLOURS), _pick(rng, KINDS), _pick(rng, empty))
    text = INSTRUCTIONS['add'].format(colour=new.colour, kind=new.kind, cell=CELLS[new.cell])
    return text, Scene((*objs, new))
  i = int(rng.integers(len(objs)))
  obj, rest, ref = objs[i], objs[:i] + objs[i + 1:], refer(scene, objs[i])
  if op == 'remove':
    return INSTRUCTIONS['remove'].format(ref=ref), Scene(rest)
  if op == 'move':
    cell = _pick(rng, empty)
    text = INSTRUCTIONS['move'].format(ref=ref, cell=CELLS[cell])
    return text, Scene((*rest, dataclasses.replace(obj, cell=cell)))
  colour = _pick(rng, [c for c in COLOURS if c != obj.colour])
  text = INSTRUCTIONS['recolour'].format(ref=ref, colour=colour)
  return text, Scene((*rest, dataclasses.replace(obj, colour=colour)))


# --- Task samplers ---------------------------------------------------------------------------

def sample_t2i(rng: np.random.Generator, size: int = 64, max_objects: int = 3, *,
               split: str = 'train') -> dict:
  scene = next(_scenes(rng, max_objects, split))
  return dict(task='t2i', prompt=caption(scene), image=render(scene, size), scene=scene)


def sample_mmu(rng: np.random.Generator, size: int = 64, max_objects: int = 3, *,
               split: str = 'train', qtype: str | None = None) -> dict:
  """A question about an image; `qtype` None draws 'caption' 20% of the time, else a QTYPE."""
  if qtype is None:
    qtype = 'caption' if rng.random() < CAPTION_PROB else _pick(rng, QTYPES)
  if qtype != 'caption' and qtype not in QTYPES:
    raise ValueError(f'qtype {qtype!r}: expected None, "caption" or one of {QTYPES}')
  for scene in _scenes(rng, max_objects, split):
    if qtype == 'caption':
      question, answer = CAPTION_QUESTION, caption(scene)
    else:
      options = questions(scene)[qtype]
      if not options:  # e.g. no position question when every object looks the same
        continue
      question, answer = _pick(rng, options)
    return dict(task='mmu', image=render(scene, size), question=question, answer=answer,
                qtype=qtype, scene=scene)


def sample_edit(rng: np.random.Generator, size: int = 64, max_objects: int = 3, *,
                split: str = 'train') -> dict:
  """'train': neither source nor target is held out. 'eval': the target is held out."""
  if split not in SPLITS:
    raise ValueError(f'split {split!r}: expected one of {SPLITS}')
  for _ in range(_MAX_TRIES):
    source = sample_scene(rng, max_objects)
    if split == 'train' and is_held_out(source):
      continue
    instruction, target = _edit(rng, source, max_objects)
    if is_held_out(target) == (split == 'eval'):
      return dict(task='edit', source=render(source, size), instruction=instruction,
                  target=render(target, size), source_scene=source, target_scene=target)
  raise RuntimeError(f'no {split} edit in {_MAX_TRIES} tries with max_objects={max_objects}')


def sample_text(rng: np.random.Generator, max_objects: int = 3, *, split: str = 'train') -> dict:
  return dict(task='text', text=caption(next(_scenes(rng, max_objects, split))))


def eval_set(kind: str, n: int, seed: int, size: int = 64, max_objects: int = 3) -> list[dict]:
  """n held-out examples; kind 't2i', 'edit', 'mmu' (QTYPES in turn) or 'caption'."""
  rng = np.random.default_rng(seed)
  if kind == 't2i':
    return [sample_t2i(rng, size, max_objects, split='eval') for _ in range(n)]
  if kind == 'edit':
    return [sample_edit(rng, size, max_objects, split='eval') for _ in range(n)]
  if kind == 'mmu':
    return [sample_mmu(rng, size, max_objects, split='eval', qtype=QTYPES[i % len(QTYPES)])
            for i in range(n)]
  if kind == 'caption':
    return [sample_mmu(rng, size, max_objects, split='eval', qtype='caption') for _ in range(n)]
  raise ValueError(f'eval set kind {kind!r}: expected t2i, edit, mmu or caption')


def answer_distribution(n: int, seed: int, size: int = 64,
                        max_objects: int = 3) -> dict[str, collections.Counter]:
  """Answer counts per qtype over n training mmu samples (the majority-answer baseline)."""
  rng = np.random.default_rng(seed)
  out = collections.defaultdict(collections.Counter)
  for _ in range(n):
    example = sample_mmu(rng, size, max_objects)
    out[example['qtype']][example['answer']] += 1
  return dict(out)


# --- Tokenizer corpus ------------------------------------------------------------------------

def corpus_sentences() -> list[str]:
  """Every template of the grammar with every filler: a tokenizer trained on it covers all text."""
  singles = [Obj(c, k, p) for c in COLOURS for k in KINDS for p in range(len(CELLS))]
  # n identical objects: the count answers up to nine, and the caption joins.
  crowds = [Scene(tuple(Obj('red', 'circle', p) for p in range(n)))
            for n in range(2, len(CELLS) + 1)]
  out = []
  for scene in [Scene((o,)) for o in singles] + crowds:
    out.append(caption(scene))
    for pairs in questions(scene).values():
      for question, answer in pairs:
        out += [question, answer]
  out.append(CAPTION_QUESTION)
  for ref in dict.fromkeys(ref for o in singles for ref in _references(o)):
    out += [INSTRUCTIONS['recolour'].format(ref=ref, colour=c) for c in COLOURS]
    out += [INSTRUCTIONS['remove'].format(ref=ref)]
    out += [INSTRUCTIONS['move'].format(ref=ref, cell=c) for c in CELLS]
  out += [INSTRUCTIONS['add'].format(colour=c, kind=k, cell=p)
          for c in COLOURS for k in KINDS for p in CELLS]
  return list(dict.fromkeys(out))  # drop repeats, keep the first-seen order
