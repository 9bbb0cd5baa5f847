"""An HF checkpoint's image processor (LLaVA / CLIP), in numpy and PIL, as transformers' PIL backend.

  proc = hf_image.ImageProcessor.load('/ckpt/llava-1.5-7b-hf')
  pixels = proc(image)                 # uint8 (crop_h, crop_w, 3): what the VLM's vision tower takes
  hf = hf_image.pixel_values(pixels, proc.config)   # float32 (3, H, W): transformers' pixel_values

What it returns. The vision tower (gripjax/models/vit.py `preprocess`) takes uint8 pixels (or
floats in [0, 1]) and itself computes (x / 255 - image_mean) / image_std with
`config.model.vit.image_mean / image_std`. So the processor stops before rescaling: it returns the
resized and cropped uint8 image, exact integers, and `tower_stats` gives the mean and std the model
config must hold for the tower to finish the job (configs/llava_hf.py sets them).
`pixel_values` finishes it as transformers does (float64 rescale, cast to float32, then
(x - mean) / std in float32): bit-identical to transformers' output, for parity checks.

Steps, in transformers' order (LlavaImageProcessorPil / CLIPImageProcessor with the PIL backend):
  1. convert to RGB: PIL images by PIL's convert (RGBA composited onto white first); uint8 arrays
     (H, W) or (H, W, 1) repeated to 3 channels, (H, W, 4) composited onto white:
     round(a/255 * rgb + (1 - a/255) * 255).
  2. do_pad (LLaVA's pad-to-square, `image_aspect_ratio='pad'`): the image centred on a square of
     its longer side, filled with int(255 * image_mean[c]) per channel, offset (long - short) // 2.
  3. do_resize: `size` {'shortest_edge': s} scales the shorter side to s and the longer one to
     int(s * long / short); {'height', 'width'} resizes to that. PIL's resize with `resample`
     (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming).
  4. do_center_crop to crop_size: top = (h - ch) // 2, left = (w - cw) // 2; an image smaller than
     the crop is zero-padded first (ceil((ch - h) / 2) rows above), as transformers does.
  5. do_rescale (x * rescale_factor), do_normalize ((x - mean) / std): left to the tower.

Configs read: `processor_config.json`'s `image_processor` section (transformers 5) or
`preprocessor_config.json` (4.x and llava-hf checkpoints; `size` and `crop_size` may be ints).
transformers' torchvision backend (LlavaImageProcessor with torchvision installed) resizes
differently and is not followed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import numpy as np
from PIL import Image

PROCESSOR_CONFIG = 'processor_config.json'
PREPROCESSOR_CONFIG = 'preprocessor_config.json'
RESAMPLE = {0: 'nearest', 1: 'lanczos', 2: 'bilinear', 3: 'bicubic', 4: 'box', 5: 'hamming'}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageConfigError(ValueError):
  """An image processor config this module cannot follow, or an image it cannot read."""


def _hw(value, what: str) -> Optional[tuple[int, int]]:
  """crop_size / size as (height, width): an int n is (n, n)."""
  if value is None:
    return None
  if isinstance(value, int):
    return (value, value)
  if isinstance(value, dict) and 'height' in value and 'width' in value:
    return (int(value['height']), int(value['width']))
  raise ImageConfigError(f'{what}={value!r}: expected an int or {{"height": h, "width": w}}.')


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """The fields of an HF image processor config that change the pixels (transformers' defaults for
  LlavaImageProcessor where a config leaves one out)."""
  shortest_edge: Optional[int] = 224  # Resize the shorter side to this; None: resize to `resize_hw`.
  resize_hw: Optional[tuple[int, int]] = None  # (height, width) of a fixed-size resize.
  crop_hw: tuple[int, int] = (224, 224)  # (height, width) of the centre crop.
  resample: int = 3  # PIL resampling filter (3: bicubic).
  do_convert_rgb: bool = True
  do_pad: bool = False  # LLaVA's pad-to-square with the mean colour.
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple = CLIP_MEAN
  image_std: tuple = CLIP_STD

  @classmethod
  def from_dict(cls, d: dict) -> 'ImageProcessorConfig':
    """From an HF image processor dict (processor_config.json's image_processor, or a
    preprocessor_config.json); ImageConfigError naming a field it cannot follow."""
    size = d.get('size', {'shortest_edge': 224})
    if isinstance(size, int):
      size = {'shortest_edge': size}
    if not isinstance(size, dict):
      raise ImageConfigError(f'size={size!r}: expected an int, {{"shortest_edge": s}} or {{"height", "width"}}.')
    if size.get('longest_edge') is not None or size.get('max_height') is not None:
      raise ImageConfigError(f'size={size!r}: only shortest_edge or height/width resizes are supported.')
    shortest, resize_hw = size.get('shortest_edge'), None
    if shortest is None:
      resize_hw = _hw(size, 'size')
    resample = int(d.get('resample', 3))
    if resample not in RESAMPLE:
      raise ImageConfigError(f'resample={resample!r}: expected one of PIL\'s filters {RESAMPLE}.')
    mean, std = d.get('image_mean', CLIP_MEAN), d.get('image_std', CLIP_STD)
    mean = tuple(float(x) for x in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
    std = tuple(float(x) for x in (std if isinstance(std, (list, tuple)) else [std] * 3))
    if len(mean) != 3 or len(std) != 3:
      raise ImageConfigError(f'image_mean={mean}, image_std={std}: expected 3 values each (RGB).')
    do_pad = d.get('do_pad', False)
    if d.get('image_aspect_ratio') == 'pad':  # Original LLaVA configs.
      do_pad = True
    return cls(shortest_edge=None if shortest is None else int(shortest), resize_hw=resize_hw,
               crop_hw=_hw(d.get('crop_size', {'height': 224, 'width': 224}), 'crop_size'),
               resample=resample, do_convert_rgb=bool(d.get('do_convert_rgb', True)), do_pad=bool(do_pad),
               do_resize=bool(d.get('do_resize', True)), do_center_crop=bool(d.get('do_center_crop', True)),
               do_rescale=bool(d.get('do_rescale', True)),
               rescale_factor=float(d.get('rescale_factor', 1 / 255)),
               do_normalize=bool(d.get('do_normalize', True)), image_mean=mean, image_std=std)

  def to_section(self) -> dict:
    """The fields as a config section (configs/llava_hf.py's hf.image): tuples, no None
    (shortest_edge 0 and resize_hw () stand for None)."""
    d = dataclasses.asdict(self)
    d['shortest_edge'] = d['shortest_edge'] or 0
    d['resize_hw'] = tuple(d['resize_hw'] or ())
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

  @classmethod
  def from_section(cls, section) -> 'ImageProcessorConfig':
    """The inverse of `to_section` (a ConfigDict or dict); errors name a field it lacks or a bad one."""
    d = dict(section)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in d]
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if missing or unknown:
      raise ImageConfigError(f'image processor section with missing fields {missing} and unknown fields '
                             f'{unknown}: expected exactly {[f.name for f in dataclasses.fields(cls)]}.')
    d['shortest_edge'] = d['shortest_edge'] or None
    d['resize_hw'] = tuple(d['resize_hw']) or None
    d['crop_hw'] = tuple(d['crop_hw'])
    d['image_mean'], d['image_std'] = tuple(d['image_mean']), tuple(d['image_std'])
    if d['shortest_edge'] is None and (d['resize_hw'] is None or len(d['resize_hw']) != 2):
      raise ImageConfigError(f'shortest_edge=0 and resize_hw={d["resize_hw"]}: expected a shortest edge '
                             'or a (height, width) resize.')
    if len(d['crop_hw']) != 2:
      raise ImageConfigError(f'crop_hw={d["crop_hw"]}: expected (height, width).')
    if d['resample'] not in RESAMPLE:
      raise ImageConfigError(f'resample={d["resample"]!r}: expected one of PIL\'s filters {RESAMPLE}.')
    return cls(**d)

  @classmethod
  def load(cls, path: str) -> 'ImageProcessorConfig':
    """From a checkpoint directory: processor_config.json's image_processor, else
    preprocessor_config.json; ImageConfigError if neither holds one."""
    for name, key in ((PROCESSOR_CONFIG, 'image_processor'), (PREPROCESSOR_CONFIG, None)):
      file = os.path.join(path, name)
      if os.path.exists(file):
        with open(file, encoding='utf-8') as f:
          d = json.load(f)
        if key is None:
          return cls.from_dict(d)
        if isinstance(d.get(key), dict):
          return cls.from_dict(d[key])
    raise ImageConfigError(f'{path} has no image processor config: expected {PROCESSOR_CONFIG} with an '
                           f'"image_processor" section or {PREPROCESSOR_CONFIG}.')


def tower_stats(config: ImageProcessorConfig) -> tuple[tuple, tuple]:
  """(image_mean, image_std) for config.model.vit, so the tower's (x / 255 - mean) / std equals the
  processor's rescale and normalize; ImageConfigError when no such pair exists."""
  if not config.do_rescale or not math.isclose(config.rescale_factor, 1 / 255, rel_tol=1e-6):
    raise ImageConfigError(f'do_rescale={config.do_rescale}, rescale_factor={config.rescale_factor}: '
                           'the vision tower rescales by 1/255; expected do_rescale with factor 1/255.')
  if not config.do_normalize:
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  return tuple(config.image_mean), tuple(config.image_std)


def to_rgb(image) -> np.ndarray:
  """A PIL image or a uint8 array (H, W), (H, W, 1), (H, W, 3), (H, W, 4) as uint8 (H, W, 3)."""
  if isinstance(image, Image.Image):
    if 'A' in image.getbands() or image.info.get('transparency') is not None:
      rgba = image.convert('RGBA')
      white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
      return np.array(Image.alpha_composite(white, rgba).convert('RGB'))
    return np.array(image.convert('RGB'))
  x = np.asarray(image)
  if x.dtype != np.uint8:
    raise ImageConfigError(f'image has dtype {x.dtype}: expected uint8 pixels in [0, 255] (or a PIL image).')
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
    raise ImageConfigError(f'image has shape {x.shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).')
  if x.shape[-1] == 1:
    return np.repeat(x, 3, axis=-1)
  if x.shape[-1] == 4:
    alpha = x[..., 3:4] / 255
    return np.round(alpha * x[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return x


def pad_to_square(x: np.ndarray, mean) -> np.ndarray:
  """uint8 (H, W, 3) centred on a (L, L, 3) square, L = max(H, W), filled with int(255 * mean)."""
  h, w, _ = x.shape
  if h == w:
    return x
  side = max(h, w)
  out = np.empty((side, side, 3), np.uint8)
  out[:] = np.asarray([int(m * 255) for m in mean], np.uint8)
  top, left = (side - h) // 2, (side - w) // 2
  out[top:top + h, left:left + w] = x
  return out


def resize_hw(h: int, w: int, config: ImageProcessorConfig) -> tuple[int, int]:
  """The (height, width) the resize step produces for an (h, w) image."""
  if config.shortest_edge is None:
    return config.resize_hw
  s = config.shortest_edge
  if h <= w:
    return s, int(s * w / h)
  return int(s * h / w), s


def center_crop(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """uint8 (H, W, 3) -> (ch, cw, 3) centred; a smaller image is zero-padded first (transformers)."""
  h, w, _ = x.shape
  ch, cw = hw
  top, left = (h - ch) // 2, (w - cw) // 2
  if top >= 0 and left >= 0:
    return x[top:top + ch, left:left + cw]
  nh, nw = max(ch, h), max(cw, w)
  padded = np.zeros((nh, nw, 3), x.dtype)
  tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
  padded[tp:tp + h, lp:lp + w] = x
  top, left = top + tp, left + lp
  return padded[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def process(image, config: ImageProcessorConfig) -> np.ndarray:
  """Steps 1-4 of the module docstring: uint8 (crop_h, crop_w, 3) (without a crop: the resized size)."""
  if config.do_convert_rgb or not isinstance(image, np.ndarray):
    x = to_rgb(image)
  else:
    x = np.asarray(image)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
      raise ImageConfigError(f'image has dtype {x.dtype} and shape {x.shape}: expected uint8 (H, W, 3) '
                             'when do_convert_rgb is off.')
  if config.do_pad:
    x = pad_to_square(x, config.image_mean)
  if config.do_resize:
    h, w = resize_hw(x.shape[0], x.shape[1], config)
    x = np.array(Image.fromarray(x).resize((w, h), resample=config.resample))
  if config.do_center_crop:
    x = center_crop(x, config.crop_hw)
  return np.ascontiguousarray(x)


def pixel_values(pixels: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
  """transformers' pixel_values of `process`'s uint8 (H, W, 3): float32 (3, H, W), rescaled in
  float64 then cast, normalized in float32 (bit-identical to its PIL backend)."""
  x = np.asarray(pixels).transpose(2, 0, 1)  # (3, H, W)
  if config.do_rescale:
    x = (x.astype(np.float64) * config.rescale_factor).astype(np.float32)
  if config.do_normalize:
    x = x.astype(np.float32)
    mean = np.asarray(config.image_mean, np.float32)
    std = np.asarray(config.image_std, np.float32)
    x = ((x.T - mean) / std).T
  return x


class ImageProcessor:
  """`process` bound to a checkpoint's config: `ImageProcessor.load(path)(image)` -> uint8 pixels."""

  def __init__(self, config: ImageProcessorConfig):
    self.config = config

  @classmethod
  def load(cls, path: str) -> 'ImageProcessor':
    return cls(ImageProcessorConfig.load(path))

  @property
  def output_hw(self) -> Optional[tuple[int, int]]:
    """(height, width) of every output (the crop), or None when it depends on the image."""
    if self.config.do_center_crop:
      return self.config.crop_hw
    if self.config.do_resize and self.config.shortest_edge is None:
      return self.config.resize_hw
    return None

  def __call__(self, image) -> np.ndarray:
    return process(image, self.config)
