r"""Generates images with a trained workdir's EMA model: text -> image, or an edit of a source image.

  python -m tuna2_jax.generate --workdir=runs/shapes --prompt "a red circle at the center." \
      --out img.png [--num 1] [--seed 0] [--cfg_scale S] [--steps N] [--sampler euler|heun]
  python -m tuna2_jax.generate --workdir=runs/shapes --source src.png \
      --prompt "make the circle blue." --out edited.png

With --source the prompt is the edit instruction, and the source is resized and centre-cropped
as training does (onto the nearest of the config's data.buckets, or its image_size square).
Images are config.data.image_size square. --num 1 writes --out itself;
--num N > 1 writes N files beside it, numbered from 0 (img.png -> img_0.png, img_1.png, ...),
each from its own noise. The written paths are printed one per line. Sampling settings not given
as flags come from the workdir's config.sampling.

`generate_images` is the host side of image sampling that evaluate.py and the sample grids use
too: prompts -> left-padded rows (with their null prompts for CFG) -> sampling.sample_images ->
uint8 images.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image

from tuna2_jax import cli
from tuna2_jax import layout
from tuna2_jax import sampling
from tuna2_jax import sharding
from tuna2_jax import train_state
from tuna2_jax.data import sequence as seq
from tuna2_jax.data import tasks
from tuna2_jax.data.tokenizer import Tokenizer


def to_uint8(x) -> np.ndarray:
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def generate_images(model, tok: Tokenizer, config: ml_collections.ConfigDict,
                    prompts: Sequence[str], key, sources: Sequence[np.ndarray] | None = None,
                    batch_size: int | None = None,
                    image_hw: tuple[int, int] | None = None) -> list[np.ndarray]:
  """Images (uint8 HxWx3, default data.image_size square) for prompts (text->image, or edits of
  `sources`), with CFG."""
  p, s = config.model.patch_size, config.sampling
  height, width = image_hw or (config.data.image_size, config.data.image_size)
  batch_size = batch_size or config.eval.batch_size
  sources = list(sources) if sources is not None else [None] * len(prompts)
  make = lambda text, src: tasks.generation_prompt(text, tok, (height, width), p, source=src)
  cond = [make(t, src) for t, src in zip(prompts, sources)]
  null = [make('', src) for src in sources]
  length = max(len(x['tokens']) for x in cond + null)
  use_cfg = s.cfg_scale != 1.0
  images = []
  for i, (chunk, n) in enumerate(sampling.fixed_batches(range(len(prompts)), batch_size)):
    rows = [cond[j] for j in chunk]
    if use_cfg:
      rows += [null[j] for j in chunk]
    batch = seq.stack_left_padded(rows, patch_size=p, pad_id=tok.pad_id, length=length)
    x = sampling.sample_images(
        model, batch, jax.random.fold_in(key, i), config.flow, steps=s.steps, sampler=s.sampler,
        cfg_scale=float(s.cfg_scale), cfg_interval=tuple(s.cfg_interval),
        cfg_interval_open=bool(s.cfg_interval_open))
    x = sharding.to_host(x)
    target = layout.flow_targets_BT(batch)
    for b in range(n):
      images.append(to_uint8(seq.unpatchify(x[b][target[b]], height, width, p)))
  return images


def output_paths(out: str, num: int) -> list[str]:
  """[out] for one image; out's stem numbered from 0 for several."""
  if num == 1:
    return [out]
  stem, ext = os.path.splitext(out)
  return [f'{stem}_{i}{ext}' for i in range(num)]


def generate(workdir: str, prompt: str, num: int, seed: int, source: str | None = None,
             **sampling_overrides) -> list[np.ndarray]:
  """`num` uint8 (S, S, 3) images for one prompt (or one edit of the image file `source`)."""
  data = train_state.load_config(workdir).data
  src = cli.read_image(source, data) if source else None  # before the slow model load
  model, config, _ = train_state.load_model(workdir, use_ema=True)
  for key, value in sampling_overrides.items():  # cfg_scale, steps, sampler: None keeps config's
    if value is not None:
      config.sampling[key] = value
  tok = Tokenizer.for_config(config)
  return generate_images(model, tok, config, [prompt] * num, jax.random.key(seed),
                         sources=None if src is None else [src] * num)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  for name in ('workdir', 'prompt', 'out'):
    if f[name].value is None:
      raise app.UsageError(f'--{name} is required')
  if not f.out.lower().endswith('.png'):
    raise app.UsageError(f'--out={f.out!r}: expected a .png path')
  if f.num < 1:
    raise app.UsageError(f'--num={f.num}: expected at least 1')
  if f.steps is not None and f.steps < 1:
    raise app.UsageError(f'--steps={f.steps}: expected at least 1')
  images = generate(f.workdir, f.prompt, f.num, f.seed, f.source, cfg_scale=f.cfg_scale,
                    steps=f.steps, sampler=f.sampler)
  for path, image in zip(output_paths(f.out, f.num), images):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    Image.fromarray(image).save(path)
    print(path)


if __name__ == '__main__':
  # Defined here, not at import, so the tools can import each other.
  flags.DEFINE_string('workdir', None, 'Training workdir whose latest checkpoint is used.')
  flags.DEFINE_string('prompt', None, 'Text prompt, or the edit instruction with --source.')
  flags.DEFINE_string('out', None, 'Output .png path (numbered when --num > 1).')
  flags.DEFINE_integer('num', 1, 'Number of images.')
  flags.DEFINE_integer('seed', 0, 'Noise seed.')
  flags.DEFINE_string('source', None, 'Image file to edit (optional).')
  flags.DEFINE_float('cfg_scale', None, 'Classifier-free guidance scale (default: config).')
  flags.DEFINE_integer('steps', None, 'Sampler steps (default: config).')
  flags.DEFINE_enum('sampler', None, list(sampling.SAMPLERS), 'Sampler (default: config).')
  cli.run(main)
