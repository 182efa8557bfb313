"""Small on-disk datasets in the reference JSON-lines formats, for the data tests.

Images are rendered shapes scenes saved as JPEG and PNG at several sizes and aspect ratios;
captions and answers come from the shapes grammar, so the shipped tokenizer covers them.
"""

import json
import os

import numpy as np
from PIL import Image

from tuna2_jax.data import shapes

# (height, width) of the written images: square, landscape, portrait, very wide.
SIZES = ((80, 80), (64, 112), (112, 64), (48, 128))

# Each faulty t2i line and the reason it is skipped for.
BAD_T2I = (
    ('{"image": "images/0.jpg", "caption": ', 'bad_json'),
    ('["a list", "not an object"]', 'bad_json'),
    ('{"image": "images/0.jpg"}', 'missing_key'),
    ('{"image": 7, "caption": "a red circle."}', 'bad_field'),
    ('{"image": "images/nope.jpg", "caption": "a red circle."}', 'missing_image'),
    ('{"image": "images/corrupt.jpg", "caption": "a red circle."}', 'bad_image'),
    ('{"image": "../outside.png", "caption": "a red circle."}', 'path_escape'),
    ('{"image": "images/0.jpg\\u0000.png", "caption": "a red circle."}', 'bad_field'),
    (json.dumps({'image': 'images/0.jpg', 'caption': 'a red circle. ' * 40}), 'too_long'),
)


def scene_image(rng, height, width):
  scene = shapes.sample_scene(rng, 3)
  img = Image.fromarray(shapes.render(scene, 96)).resize((width, height), Image.BICUBIC)
  return scene, img


def write_images(root, n, seed=0):
  """n images under root/images (even: JPEG, odd: PNG); returns [(relative path, caption)]."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  out = []
  for i in range(n):
    scene, img = scene_image(rng, *SIZES[i % len(SIZES)])
    rel = f'images/{i}.{"jpg" if i % 2 == 0 else "png"}'
    img.save(os.path.join(root, rel), quality=95)
    out.append((rel, shapes.caption(scene)))
  with open(os.path.join(root, 'images', 'corrupt.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 this is not a jpeg')
  Image.new('RGB', (32, 32)).save(os.path.join(os.path.dirname(root), 'outside.png'))
  return out


def write_jsonl(path, lines):
  with open(path, 'w', encoding='utf-8') as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + '\n')
  return path


def write_corpus(root, n=8, bad=True):
  """One JSON-lines file per task under root (images in root/images); returns {task: path}.

  With bad=True the t2i file also holds every BAD_T2I line and a blank line.
  """
  imgs = write_images(root, n)
  t2i = [{'image': rel, 'caption': cap} for rel, cap in imgs]
  t2i[1]['caption'] = 'ünïcödé ✓ 日本 ' + t2i[1]['caption']
  if bad:
    t2i = t2i[:3] + [line for line, _ in BAD_T2I] + [''] + t2i[3:]
  mmu = [{'image': rel, 'conversations': [
      {'from': 'human', 'value': '<image>\nwhat colour is the circle?'},
      {'from': 'gpt', 'value': 'red.'},
      {'from': 'human', 'value': 'how many objects are there?'},
      {'from': 'gpt', 'value': 'two.'}]} for rel, _ in imgs]
  edit = [{'raw_image': imgs[i][0], 'out_image': imgs[(i + 1) % n][0],
           'instruction': 'remove the red circle'} for i in range(n)]
  text = [{'conversations': [{'from': 'human', 'value': cap}, {'from': 'gpt', 'value': cap}]}
          for _, cap in imgs[: n // 2]] + [{'text': cap} for _, cap in imgs[n // 2:]]
  return {task: write_jsonl(os.path.join(root, f'{task}.jsonl'), lines)
          for task, lines in (('t2i', t2i), ('mmu', mmu), ('edit', edit), ('text', text))}
