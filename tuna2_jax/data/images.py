"""Image decoding onto aspect-ratio buckets: encoded bytes -> uint8 [H, W, 3] of a bucket.

The bucket is the one whose aspect ratio is nearest (in log space) to the image's; the image
is bicubically resized to cover it and centre-cropped. The crop is done first (as the resize's
source box), so only the kept region is resampled. Two resamplers (`data.resize`): 'opencv',
OpenCV's bicubic (about 3x faster than Pillow's; no antialiasing, which matters little when the
image shrinks by less than 2x, as most photos onto 512-class buckets do: mean difference from
Pillow's 1.2 / 255 on the benchmark's photos), and 'pillow', Pillow's antialiased bicubic. JPEGs are first decoded at a reduced DCT scale
(`draft`) whenever that still leaves at least the bucket's size, which makes large JPEGs cheap.
Pixels stay uint8 here; the device scales them to [-1, 1] (objectives.to_unit_range).

Every PIL mode becomes 8-bit RGB correctly or is refused with a reason: 16-bit images (I;16*,
and mode I unless its values all fit 8 bits) are scaled by 255 / 65535, not clipped;
floating-point images (mode F), whose range is undefined, are refused. An image of more than
`max_pixels` pixels (an image bomb) is refused from its header, before its raster is decoded.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from tuna2_jax.data.records import MAX_IMAGE_PIXELS, Fault

Bucket = tuple[int, int]  # (height, width)
RESAMPLERS = ('opencv', 'pillow')
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
_SIXTEEN_BIT_MAX = 65535


def check_resampler(name: str) -> None:
  """Raises for an unknown resampler, or 'opencv' without OpenCV installed."""
  if name not in RESAMPLERS:
    raise ValueError(f'data.resize={name!r}: expected one of {RESAMPLERS}')
  if name == 'opencv':
    try:
      _cv2()
    except ImportError as e:
      raise ValueError(f'data.resize=opencv needs OpenCV ({e}): pip install '
                       'opencv-python-headless, or set --config.data.resize=pillow') from None


def _cv2():
  import cv2
  cv2.setNumThreads(1)  # the loader's threads and workers are the parallelism
  return cv2


def check_buckets(buckets: Sequence[Sequence[int]], patch_size: int) -> tuple[Bucket, ...]:
  out = tuple((int(h), int(w)) for h, w in buckets)
  if not out:
    raise ValueError('data.buckets is empty: expected (height, width) pairs')
  for h, w in out:
    if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
      raise ValueError(f'bucket {h}x{w}: expected positive sides divisible by the patch size '
                       f'{patch_size}')
  return out


def choose_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
  """The bucket nearest in aspect ratio; ties go to the earlier bucket."""
  ratio = math.log(width / height)
  return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def crop_box(height: int, width: int, bucket: Bucket) -> tuple[float, float, float, float]:
  """The centred (left, top, right, bottom) region of the bucket's aspect ratio."""
  bh, bw = bucket
  scale = max(bh / height, bw / width)  # resize to cover the bucket, then crop
  ch, cw = bh / scale, bw / scale
  top, left = (height - ch) / 2, (width - cw) / 2
  return (left, top, left + cw, top + ch)


def to_bucket(image: Image.Image, buckets: Sequence[Bucket],
              resampler: str = 'pillow') -> np.ndarray:
  """A PIL image -> uint8 [bh, bw, 3] on its nearest bucket."""
  bh, bw = choose_bucket(image.height, image.width, buckets)
  if image.format == 'JPEG':
    scale = max(bh / image.height, bw / image.width)
    # draft keeps the decoded size >= the requested one, so the resize still only downsamples.
    image.draft('RGB', (math.ceil(image.width * scale), math.ceil(image.height * scale)))
  image = to_rgb(image)
  box = crop_box(image.height, image.width, (bh, bw))
  if resampler == 'opencv':
    left, top, right, bottom = (int(round(v)) for v in box)
    pixels = np.asarray(image, np.uint8)[top:bottom, left:right]
    return _cv2().resize(pixels, (bw, bh), interpolation=_cv2().INTER_CUBIC)
  # reducing_gap: a large non-JPEG source is first box-reduced by an integer factor while still
  # >= 3x the output (indistinguishable from a full bicubic pass, far cheaper).
  out = image.resize((bw, bh), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
  return np.asarray(out, np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
  """8-bit RGB of any PIL mode; raises ValueError for a mode without a defined pixel range."""
  if image.mode == 'RGB':
    return image
  if image.mode in SIXTEEN_BIT_MODES:
    values = np.asarray(image).astype(np.int64)
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low < 0 or high > _SIXTEEN_BIT_MAX:
      raise ValueError(f'mode {image.mode} pixels span {low}..{high}; expected 16-bit values '
                       f'0..{_SIXTEEN_BIT_MAX}')
    if image.mode == 'I' and high <= 255:  # 32-bit integers holding 8-bit values
      gray = values.astype(np.uint8)
    else:
      gray = ((values * 255 + _SIXTEEN_BIT_MAX // 2) // _SIXTEEN_BIT_MAX).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
  if image.mode == 'F':
    raise ValueError('floating-point pixels (mode F) have no defined range; expected 8- or '
                     '16-bit images')
  return image.convert('RGB')


def buckets_of(data) -> tuple[Bucket, ...]:
  """The buckets a config's images go onto: data.buckets, else the data.image_size square."""
  if 'buckets' in data:
    return tuple((int(h), int(w)) for h, w in data.buckets)
  return ((data.image_size, data.image_size),)


def _reason(e: Exception) -> str:
  """The decoder's complaint without the repr of the in-memory file it read from."""
  text = f'{type(e).__name__}: {e}'
  return re.sub(r'<_io\.BytesIO object at 0x[0-9a-fA-F]+>', 'the bytes', text)


@contextlib.contextmanager
def open_image(data: bytes, what: str = 'image',
               max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
  """The image in `data`, its header read and its size checked; Fault('image_too_large') for
  more than max_pixels pixels, Fault('bad_image') when it does not decode in the with block."""
  try:
    image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise Fault('image_too_large', f'{what}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except  # a corrupt file raises anything
    raise Fault('bad_image', f'{what} does not decode ({_reason(e)})') from None
  with image:
    if image.width * image.height > max_pixels:
      raise Fault('image_too_large', f'{what} is {image.width}x{image.height} = '
                  f'{image.width * image.height} pixels, more than data.max_image_pixels='
                  f'{max_pixels}')
    try:
      yield image
    except Fault:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise Fault('bad_image', f'{what} does not decode ({_reason(e)})') from None


def decode_to_bucket(data: bytes, buckets: Sequence[Bucket], what: str = 'image',
                     resampler: str = 'pillow', max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """Encoded image bytes -> uint8 [bh, bw, 3]; Fault('bad_image' | 'image_too_large')."""
  with open_image(data, what, max_pixels) as image:
    return to_bucket(image, buckets, resampler)


def check_decodes(data: bytes, what: str = 'image',
                  max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
  """Cheap full check that bytes decode to RGB (JPEGs at 1/8 scale); returns (height, width)."""
  with open_image(data, what, max_pixels) as image:
    size = image.height, image.width
    if image.format == 'JPEG':
      image.draft('RGB', (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()
    to_rgb(image)
    return size
