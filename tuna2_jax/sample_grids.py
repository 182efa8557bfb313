"""What the sample grids show: the prompts, the understanding images and questions, the marks.

Generation: eval.prompts when the config lists any, else (shapes data) eval.num_samples_png
held-out shapes prompts. Images are drawn at the first of data.buckets (a mixture config) or
data.image_size square (shapes). A prompt the shapes grammar reads (shapes.parse_caption) gets
the checker's verdict: pass when shapes.parse reads back exactly the prompt's scene from the
image, else fail; other prompts get none.

Understanding: eval.images (image files, fitted to data.buckets or data.image_size as training
images are) with eval.questions, one per image or one for all; the answers are decoded as
understand.answer_questions decodes them. `write_samples` draws and writes the grids of a step.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from tuna2_jax import metrics as metrics_lib
from tuna2_jax import paths
from tuna2_jax.data import images as images_lib
from tuna2_jax.data import records
from tuna2_jax.data import shapes
from tuna2_jax.data.tokenizer import Tokenizer
from tuna2_jax.generate import generate_images
from tuna2_jax.understand import answer_questions


MIN_TILE_SIDE = 128  # small images are upscaled (nearest) by whole factors to about this side


def grid_scale(images: Sequence[np.ndarray]) -> int:
  """The upscaling factor of a grid's tiles: shapes' 48 px scenes 2x, photographs 1x."""
  return max(1, MIN_TILE_SIDE // max(max(np.shape(im)[:2]) for im in images))


def generation_hw(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The (height, width) sample images are drawn at."""
  buckets = config.data.get('buckets')
  if config.data.name == 'mixture' and buckets:
    return tuple(int(x) for x in buckets[0])
  return config.data.image_size, config.data.image_size


def prompts(config: ml_collections.ConfigDict) -> list[str]:
  """The prompts of the generation grid ([] when there are none to draw)."""
  listed = config.eval.get('prompts') or ()
  if listed:
    bad = [i for i, p in enumerate(listed) if not isinstance(p, str) or not p.strip()]
    if bad:
      raise ValueError(f'eval.prompts[{bad[0]}]={listed[bad[0]]!r}: expected a non-empty string')
    return list(listed)
  if config.data.name == 'shapes':
    d = config.data
    return [x['prompt'] for x in shapes.eval_set('t2i', config.eval.num_samples_png, seed=5,
                                                   size=d.image_size, max_objects=d.max_objects)]
  return []


def marks(images: Sequence[np.ndarray], texts: Sequence[str]) -> list[bool | None]:
  """The shapes checker's verdict per image (None for a prompt outside the shapes grammar)."""
  out = []
  for image, text in zip(images, texts):
    scene = shapes.parse_caption(text)
    out.append(None if scene is None else shapes.parse(np.asarray(image)) == scene)
  return out


def questions(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """[(image path, question)] of the understanding grid; raises for images the questions do not
  pair with."""
  paths, asked = list(config.eval.get('images') or ()), list(config.eval.get('questions') or ())
  if not paths:  # questions alone (a config's default question) ask about nothing
    return []
  if len(asked) == 1:
    asked = asked * len(paths)
  if len(asked) != len(paths):
    raise ValueError(f'eval.images has {len(paths)} images and eval.questions {len(asked)} '
                     'questions: expected one question per image, or one for all')
  return list(zip(paths, asked))


def load_image(config: ml_collections.ConfigDict, path: str) -> np.ndarray:
  """An understanding image, fitted as training images are; records.Fault when it cannot be
  read."""
  try:
    data = paths.read_bytes(path)  # local or gs://
  except OSError as e:
    raise records.Fault('missing_image', f'{path}: {e.strerror or e}') from None
  d = config.data
  if d.name == 'mixture':
    return images_lib.decode_to_bucket(data, d.buckets, what=path, resampler=d.resize)
  return images_lib.decode_to_bucket(data, ((d.image_size, d.image_size),), what=path)


def check(config: ml_collections.ConfigDict) -> None:
  """Raises, before training starts, for sample settings that cannot be drawn, naming them."""
  prompts(config)
  for i, (path, _) in enumerate(questions(config)):
    try:
      load_image(config, path)
    except records.Fault as fault:
      raise ValueError(f'eval.images[{i}]={path!r}: {fault.detail}; expected an image file '
                       f'(relative paths are from {os.getcwd()})') from None


def understanding_inputs(config: ml_collections.ConfigDict
                         ) -> tuple[list[np.ndarray], list[str]]:
  """(images, questions) of the grid; an image that no longer reads is left out with a warning
  (check() has refused unreadable ones when the run started)."""
  images, asked = [], []
  for path, question in questions(config):
    try:
      images.append(load_image(config, path))
      asked.append(question)
    except records.Fault as fault:
      logging.warning('sample image %s left out of the understanding grid: %s', path,
                      fault.detail)
  return images, asked


def write_samples(model, tok: Tokenizer, config: ml_collections.ConfigDict, workdir: str,
                  step: int, writer: metrics_lib.MetricsWriter | None = None) -> list[str]:
  """The sample grids of a step: samples/step_NNNNNN.png (images generated for the prompts,
  with the shapes checker's marks where it applies) and samples/step_NNNNNN_understanding.png
  (answers to the questions about the images), each with a .json of its captions and marks,
  and the grids to TensorBoard (samples/generation, samples/understanding, and
  samples/checker_pass, the share of marked tiles that pass). Returns the PNG paths.

  Every process of a job calls it (all take part in sampling); only process 0 writes.
  """
  stem = os.path.join(workdir, 'samples', f'step_{step:06d}')
  grids = []
  texts = prompts(config)
  if texts:
    images = generate_images(model, tok, config, texts, jax.random.key(config.seed + 2),
                             image_hw=generation_hw(config))
    grids.append(('generation', stem + '.png', images, texts, marks(images, texts)))
  pictures, asked = understanding_inputs(config)
  if pictures:
    answers = answer_questions(model, tok, config, pictures, asked,
                               jax.random.key(config.seed + 2))
    grids.append(('understanding', stem + '_understanding.png', pictures,
                  [f'Q: {q}\nA: {a}' for q, a in zip(asked, answers)], None))
  if jax.process_index() != 0:
    return [path for _, path, *_ in grids]
  for tag, path, images, captions, verdicts in grids:
    scale = grid_scale(images)
    metrics_lib.save_sample_grid(path, images, captions, scale=scale, marks=verdicts)
    paths.write_text(os.path.splitext(path)[0] + '.json',
                     json.dumps({'step': step, 'captions': captions, 'marks': verdicts}, indent=1))
    if writer is not None:
      writer.write_image(step, f'samples/{tag}', metrics_lib.sample_grid(
          images, captions, scale=scale, marks=verdicts))
      judged = [m for m in verdicts or () if m is not None]
      if judged:
        writer.write_tensorboard(step, {'samples/checker_pass': float(np.mean(judged))})
  return [path for _, path, *_ in grids]
