"""The one check of image pixels that come from outside: dtype, shape, finiteness and range.

The models take uint8 pixels in [0, 255] or floats in [0, 1] (`models/vit.py` divides uint8 by 255
and takes floats as they are). Floats in [0, 255] would pass through unscaled, 255 times too
bright (measured on the shipped bundle: accuracy on 16 examples from 0.875 to 0.375), and one NaN or
inf pixel turns the answer into ''. Both are refused here, naming the image by its index:

  pixels = check_pixels(images, image_size=48)  # uint8 as is, floats as float32; or ValueError

  >>> check_pixels(np.full((2, 4, 4, 3), 255.0), 4)
  Traceback (most recent call last):
  ...
  ValueError: images[0] has float pixels in [255, 255]: expected floats in [0, 1] (or uint8 in [0, 255]); 2 of 2 images are out of range (all images: [255, 255]). For pixels in [0, 255], pass uint8 or divide by 255.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

FLOAT_RANGE = (0.0, 1.0)


def _fmt(x: float) -> str:
  return f'{x:.6g}'


def _name(what: str, i: int, labels) -> str:
  return f'{what}[{i}]' + (f' ({labels[i]})' if labels is not None else '')


def check_pixels(images, image_size: Optional[int] = None, what: str = 'images',
                 labels: Optional[Sequence[str]] = None) -> np.ndarray:
  """`images` as a numpy array after checking it: uint8 as it is, floating point as float32.

  Args:
    images: (B, H, W, 3) pixels, uint8 in [0, 255] or floating point in [0, 1].
    image_size: H = W expected (None: any square or not).
    what: the argument's name in messages ('images[i] ...').
    labels: optional name of each image, added to messages ('images[1] (source example 17) ...').

  Raises:
    ValueError: naming the first bad image (its index in the batch) and the problem: shape, dtype,
      a NaN or inf pixel (and where), or float pixels outside [0, 1] (the range found).
  """
  pixels = np.asarray(images)
  if pixels.ndim != 4 or pixels.shape[-1] != 3 or (
      image_size is not None and pixels.shape[1:3] != (image_size, image_size)):
    size = '(B, H, W, 3)' if image_size is None else f'(B, {image_size}, {image_size}, 3)'
    raise ValueError(f'{what} have shape {pixels.shape}; expected {size} (RGB, channels last).')
  if pixels.dtype == np.uint8:
    return pixels
  if not np.issubdtype(pixels.dtype, np.floating):
    raise ValueError(f'{what} have dtype {pixels.dtype}; expected uint8 in [0, 255] or float in '
                     '[0, 1].')
  pixels = pixels.astype(np.float32)
  if not pixels.size:
    return pixels
  finite = np.isfinite(pixels)
  if not finite.all():
    per_image = (~finite).reshape(len(pixels), -1).sum(axis=1)  # (B,)
    bad = np.flatnonzero(per_image)
    i = int(bad[0])
    y, x, c = (int(v) for v in np.argwhere(~finite[i])[0])
    raise ValueError(
        f'{_name(what, i, labels)} has {int(per_image[i])} non-finite pixel value(s) (first: {pixels[i, y, x, c]} '
        f'at row {y}, column {x}, channel {c}): expected finite pixels. Images with NaN or inf: '
        f'{bad.tolist()[:10]}{" ..." if len(bad) > 10 else ""} of {len(pixels)}.')
  lo, hi = FLOAT_RANGE
  low = pixels.reshape(len(pixels), -1).min(axis=1)  # (B,)
  high = pixels.reshape(len(pixels), -1).max(axis=1)  # (B,)
  bad = np.flatnonzero((low < lo) | (high > hi))
  if bad.size:
    i = int(bad[0])
    hint = (' For pixels in [0, 255], pass uint8 or divide by 255.' if high.max() > 1.5 else
            ' Clip small overshoots (e.g. after resizing) with np.clip(images, 0, 1).')
    raise ValueError(
        f'{_name(what, i, labels)} has float pixels in [{_fmt(low[i])}, {_fmt(high[i])}]: expected floats in '
        f'[{_fmt(lo)}, {_fmt(hi)}] (or uint8 in [0, 255]); {bad.size} of {len(pixels)} images are '
        f'out of range (all images: [{_fmt(low.min())}, {_fmt(high.max())}]).{hint}')
  return pixels
