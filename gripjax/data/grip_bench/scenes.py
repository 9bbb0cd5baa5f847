"""GRIP-Bench scenes: handwritten digits over photo backgrounds, with one question each.

Pure numpy (plus PIL for resizing). Every example is a deterministic function of
(seed, split, index): `render_example` seeds `np.random.default_rng([seed, split_id, index])`, so
any example can be regenerated on its own, in any order and in parallel.

Content that ships with the installed packages (no download):
  * objects: scikit-learn's handwritten digits (`load_digits`: 1797 images, 8x8, levels 0..16);
  * backgrounds: scikit-image's bundled photos, randomly cropped, rescaled, desaturated, darkened.

Geometry: the image is a G x G grid of patches (G = image_size // patch_size, G >= 6); patch index
is `row * G + col`. Every digit covers exactly one patch, drawn at patch resolution with its
intensity as alpha over the background in a saturated colour, and no two digits are 8-neighbours.
The grid is split 3 x 3 into named regions ("top left" ... "bottom right").

Task families (equal frequency: `index % len(TASKS)`; yes/no and sub-forms alternate with
`index // len(TASKS)`), answers are single words:
  read     "what digit is in the top left ?"          -> "zero".."nine" (region holds one digit)
  color    "what color is the seven ?"                -> colour word (the digit appears once)
  count    "how many digits are there ?"              -> "three".."six"
           "how many red digits are there ?"          -> "zero".."three"
  exist    "is there a four ?" / "is there a blue digit ?"  -> "yes" / "no"
  spatial  "is the three left of the eight ?" / "... above ..."  -> "yes" / "no"

`region` holds the sorted patch indices that carry the answer (empty for "no" and zero counts).

Run `python -m gripjax.data.grip_bench.scenes OUT.png` to draw a contact sheet of examples.
"""

import functools
import sys

import numpy as np
from PIL import Image
from PIL import ImageDraw

TASKS = ('read', 'color', 'count', 'exist', 'spatial')
SPLITS = ('train', 'validation', 'test')
DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
COLORS = ('red', 'green', 'blue', 'yellow', 'magenta', 'white')
# Saturated RGB in [0, 1]; blue is lightened so it stays readable over a dark background.
COLOR_RGB = np.array([
    (1.00, 0.15, 0.15),  # red
    (0.15, 0.95, 0.15),  # green
    (0.30, 0.50, 1.00),  # blue
    (1.00, 0.95, 0.10),  # yellow
    (1.00, 0.25, 1.00),  # magenta
    (1.00, 1.00, 1.00),  # white
], np.float32)
REGION_NAMES = ('top left', 'top', 'top right', 'left', 'center', 'right',
                'bottom left', 'bottom', 'bottom right')
RELATIONS = ('left of', 'above')
NO_DIGIT = 10  # `patch_digit` value of a patch without a digit.
NO_COLOR = len(COLORS)  # `patch_color` value of a patch without a digit.
MIN_DIGITS, MAX_DIGITS = 3, 6
MIN_GRID = 6
# Fraction of the 1797 sklearn digit samples in each split (disjoint, by a seeded permutation).
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
# Photos bundled inside scikit-image (checked: no download needed). Text-like images are left out.
BACKGROUNDS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'coins', 'camera',
               'immunohistochemistry', 'hubble_deep_field', 'moon', 'clock', 'retina', 'brick',
               'grass', 'gravel', 'cell')


def question_templates():
  """Every question form, with `{digit}`, `{digit2}`, `{color}`, `{region}`, `{article}` slots."""
  return (
      'what digit is in the {region} ?',
      'what color is the {digit} ?',
      'how many digits are there ?',
      'how many {color} digits are there ?',
      'is there {article} {digit} ?',
      'is there {article} {color} digit ?',
      'is the {digit} left of the {digit2} ?',
      'is the {digit} above the {digit2} ?',
  )


def answer_words():
  """All answer words (digit and number words, colours, yes/no)."""
  return DIGIT_WORDS + COLORS + ('yes', 'no')


def vocabulary_words():
  """Sorted set of every word that questions and answers can contain (no special tokens)."""
  words = set(answer_words())
  fills = {'region': ' '.join(REGION_NAMES), 'digit': '', 'digit2': '', 'color': '',
           'article': 'a an'}
  for template in question_templates():
    words.update(template.format(**fills).split())
  return tuple(sorted(words))


def _article(word):
  return 'an' if word[0] in 'aeiou' else 'a'


# ------------------------------------------------------------------------------------------------
# Packaged content, loaded once per process.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _digits():
  """Returns (images float32 (1797, 8, 8) in [0, 1], labels int32 (1797,))."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  # Heavy; only when rendering.
  d = datasets.load_digits()
  return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


@functools.lru_cache(maxsize=None)
def split_digit_indices(seed, split):
  """Sorted sklearn digit indices reserved for `split`; the three splits are disjoint."""
  split_id = _split_id(split)
  _, labels = _digits()
  perm = np.random.default_rng([seed, 1797]).permutation(len(labels))
  bounds = np.round(np.cumsum((0.0,) + SPLIT_FRACTIONS) * len(labels)).astype(int)
  return np.sort(perm[bounds[split_id]:bounds[split_id + 1]])


@functools.lru_cache(maxsize=None)
def _split_pools(seed, split):
  """Per digit label, the sklearn indices of that label in `split`."""
  idx = split_digit_indices(seed, split)
  _, labels = _digits()
  pools = tuple(idx[labels[idx] == d] for d in range(10))
  for d, pool in enumerate(pools):
    if not len(pool):
      raise ValueError(f'split {split!r} has no sample of digit {d}.')
  return pools


@functools.lru_cache(maxsize=None)
def _backgrounds(image_size):
  """The bundled photos as RGB PIL images, shrunk so the short side is at most 3 * image_size."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top  # Heavy; only when rendering.
  images = []
  for name in BACKGROUNDS:
    x = np.asarray(getattr(skdata, name)())
    if x.ndim == 2:
      x = np.stack([x] * 3, axis=-1)
    img = Image.fromarray(np.ascontiguousarray(x[..., :3]).astype(np.uint8))
    scale = 3 * image_size / min(img.size)
    if scale < 1:  # Pre-shrinking makes the per-example crop + resize cheap.
      img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BILINEAR)
    images.append(img)
  return tuple(images)


def _split_id(split):
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
  return SPLITS.index(split)


# ------------------------------------------------------------------------------------------------
# Geometry.
# ------------------------------------------------------------------------------------------------


def grid_size(image_size, patch_size):
  """Patches per side; raises ValueError unless image_size = G * patch_size with G >= 6."""
  if patch_size <= 0 or image_size <= 0 or image_size % patch_size:
    raise ValueError(f'image_size ({image_size}) must be a positive multiple of patch_size '
                     f'({patch_size}).')
  g = image_size // patch_size
  if g < MIN_GRID:
    raise ValueError(f'the patch grid is {g}x{g} (image_size={image_size}, '
                     f'patch_size={patch_size}); GRIP-Bench needs at least {MIN_GRID}x{MIN_GRID}.')
  return g


def region_of_patches(grid):
  """int32 (grid*grid,): the 3x3 region index (into REGION_NAMES) of every patch."""
  bounds = np.round(np.arange(4) * grid / 3).astype(int)  # band edges, e.g. 0 4 8 12
  band = np.searchsorted(bounds[1:], np.arange(grid), side='right')  # (G,) band of each row/col
  return (band[:, None] * 3 + band[None, :]).reshape(-1).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Scene layout.
# ------------------------------------------------------------------------------------------------


class _Layout:
  """Places digits on the grid so that no two are equal or 8-neighbours."""

  def __init__(self, grid, rng):
    self.grid = grid
    self.rng = rng
    self.blocked = np.zeros((grid, grid), bool)
    self.patches = []

  def free(self, allowed=None):
    """Flat indices of patches where a digit can still go (optionally within `allowed`)."""
    ok = ~self.blocked.reshape(-1)
    if allowed is not None:
      ok &= allowed
    return np.flatnonzero(ok)

  def put(self, patch):
    r, c = divmod(int(patch), self.grid)
    self.blocked[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = True
    self.patches.append(int(patch))

  def place(self, allowed=None):
    cands = self.free(allowed)
    if not len(cands):
      raise _NoRoom()
    self.put(self.rng.choice(cands))
    return self.patches[-1]


class _NoRoom(Exception):
  pass


def _spec_read(rng, n, regions, slot):
  """One digit alone in a named region; the others outside it."""
  del slot
  target_region = int(rng.integers(9))
  target = int(rng.integers(10))
  labels = [target] + list(rng.integers(10, size=n - 1))
  colors = list(rng.integers(len(COLORS), size=n))
  allowed = [regions == target_region] + [regions != target_region] * (n - 1)
  question = f'what digit is in the {REGION_NAMES[target_region]} ?'
  return dict(labels=labels, colors=colors, allowed=allowed, question=question,
              answer=DIGIT_WORDS[target], region_digits=[0])


def _spec_color(rng, n, regions, slot):
  """A digit that appears once; its colour is the answer."""
  del regions, slot
  target = int(rng.integers(10))
  others = [d for d in range(10) if d != target]
  labels = [target] + list(rng.choice(others, size=n - 1))
  colors = list(rng.integers(len(COLORS), size=n))
  question = f'what color is the {DIGIT_WORDS[target]} ?'
  return dict(labels=labels, colors=colors, allowed=[None] * n, question=question,
              answer=COLORS[colors[0]], region_digits=[0])


def _spec_count(rng, n, regions, slot):
  """All digits, or the digits of one colour (0..3 of them, uniform)."""
  del regions
  labels = list(rng.integers(10, size=n))
  if slot % 2 == 0:
    colors = list(rng.integers(len(COLORS), size=n))
    return dict(labels=labels, colors=colors, allowed=[None] * n,
                question='how many digits are there ?', answer=DIGIT_WORDS[n],
                region_digits=list(range(n)))
  k = int(rng.integers(4))  # n >= 3, so k <= n
  target = int(rng.integers(len(COLORS)))
  others = [c for c in range(len(COLORS)) if c != target]
  colors = [target] * k + list(rng.choice(others, size=n - k))
  return dict(labels=labels, colors=colors, allowed=[None] * n,
              question=f'how many {COLORS[target]} digits are there ?', answer=DIGIT_WORDS[k],
              region_digits=list(range(k)))


def _spec_exist(rng, n, regions, slot):
  """Yes/no (alternating) on a digit label or on a colour."""
  del regions
  yes = slot % 2 == 0
  labels = list(rng.integers(10, size=n))
  colors = list(rng.integers(len(COLORS), size=n))
  if (slot // 2) % 2 == 0:
    target = int(rng.integers(10))
    if yes:
      labels[0] = target
    else:
      labels = list(rng.choice([d for d in range(10) if d != target], size=n))
    word = DIGIT_WORDS[target]
    question = f'is there {_article(word)} {word} ?'
    matches = [i for i in range(n) if labels[i] == target]
  else:
    target = int(rng.integers(len(COLORS)))
    if yes:
      colors[0] = target
    else:
      colors = list(rng.choice([c for c in range(len(COLORS)) if c != target], size=n))
    word = COLORS[target]
    question = f'is there {_article(word)} {word} digit ?'
    matches = [i for i in range(n) if colors[i] == target]
  return dict(labels=labels, colors=colors, allowed=[None] * n, question=question,
              answer='yes' if yes else 'no', region_digits=matches)


def _spec_spatial(rng, n, regions, slot):
  """Two distinct digits, each once; "left of" (columns differ) or "above" (rows differ)."""
  del regions
  a, b = (int(x) for x in rng.choice(10, size=2, replace=False))
  others = [d for d in range(10) if d not in (a, b)]
  labels = [a, b] + list(rng.choice(others, size=n - 2))
  colors = list(rng.integers(len(COLORS), size=n))
  relation = RELATIONS[(slot // 2) % len(RELATIONS)]
  yes = slot % 2 == 0
  question = f'is the {DIGIT_WORDS[a]} {relation} the {DIGIT_WORDS[b]} ?'
  return dict(labels=labels, colors=colors, allowed=[None] * n, question=question,
              answer='yes' if yes else 'no', region_digits=[0, 1],
              relation=relation, relation_holds=yes)


_SPECS = dict(read=_spec_read, color=_spec_color, count=_spec_count, exist=_spec_exist,
              spatial=_spec_spatial)


def _place(spec, layout, grid):
  """Places the spec's digits; for `spatial`, orders the pair so the relation has its answer."""
  n = len(spec['labels'])
  start = 0
  if 'relation' in spec:
    axis = 1 if spec['relation'] == 'left of' else 0  # compare columns or rows
    p = layout.place()
    r, c = divmod(p, grid)
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    other_axis = cols if axis else rows
    q = layout.place(other_axis != (c if axis else r))
    first, second = sorted([p, q], key=lambda x: divmod(x, grid)[axis])
    layout.patches[:2] = [first, second] if spec['relation_holds'] else [second, first]
    start = 2
  for i in range(start, n):
    layout.place(spec['allowed'][i])


# ------------------------------------------------------------------------------------------------
# Rendering.
# ------------------------------------------------------------------------------------------------


def _background(rng, image_size):
  """float32 (S, S, 3): a random crop of a bundled photo, desaturated, low contrast, dark."""
  photo = _backgrounds(image_size)[int(rng.integers(len(BACKGROUNDS)))]
  w, h = photo.size
  side = int(min(w, h) * rng.uniform(0.3, 1.0))
  x0 = int(rng.integers(w - side + 1))
  y0 = int(rng.integers(h - side + 1))
  crop = photo.resize((image_size, image_size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
  x = np.asarray(crop, np.float32) / 255.0  # (S, S, 3)
  if rng.random() < 0.5:
    x = x[:, ::-1]
  gray = x.mean(axis=-1, keepdims=True)
  x = gray + rng.uniform(0.2, 0.5) * (x - gray)  # desaturate
  lo, hi = rng.uniform(0.03, 0.12), rng.uniform(0.35, 0.5)  # brightness band of the background
  x_min, x_max = float(x.min()), float(x.max())
  return lo + (hi - lo) * (x - x_min) / max(x_max - x_min, 1e-3)


def _digit_alpha(sample, patch_size):
  """float32 (P, P) in [0, 1]: the sklearn digit's intensity, resized to the patch."""
  images, _ = _digits()
  img = images[sample]
  if patch_size == img.shape[0]:
    return img
  pil = Image.fromarray(img, mode='F').resize((patch_size, patch_size), Image.BILINEAR)
  return np.clip(np.asarray(pil, np.float32), 0.0, 1.0)


def render_example(seed, split, index, image_size=96, patch_size=8):
  """Renders one GRIP-Bench example, a pure function of (seed, split, index).

  Args:
    seed: generation seed (the config's `data.seed`).
    split: 'train', 'validation' or 'test' (each uses its own, disjoint digit samples).
    index: example index within the split (>= 0).
    image_size: image side in pixels.
    patch_size: patch side in pixels; image_size // patch_size must be >= 6.

  Returns:
    dict with
      image: uint8 (S, S, 3);
      question, answer, task: str;
      region: int32 (R,) sorted patch indices holding the answer (R may be 0);
      patch_digit: int32 (N,) digit under each patch, NO_DIGIT (10) for none;
      patch_color: int32 (N,) colour index under each patch, NO_COLOR for none;
      digit_patch, digit_label, digit_color, digit_sample: int32 (MAX_DIGITS,), -1 padded;
      num_digits: int.
  """
  grid = grid_size(image_size, patch_size)
  split_id = _split_id(split)
  if index < 0:
    raise ValueError(f'index must be >= 0, got {index}.')
  rng = np.random.default_rng([seed, split_id, index])
  # Families take turns; `slot` alternates yes/no and sub-forms within a family, so both are
  # balanced exactly over any run of consecutive indices.
  slot, task_id = divmod(index, len(TASKS))
  task = TASKS[task_id]
  regions = region_of_patches(grid)
  for _ in range(100):
    n = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    spec = _SPECS[task](rng, n, regions, slot)
    layout = _Layout(grid, rng)
    try:
      _place(spec, layout, grid)
      break
    except _NoRoom:
      continue
  else:
    raise RuntimeError(f'could not lay out example {index} of {split!r} on a {grid}x{grid} grid.')

  labels = np.asarray(spec['labels'], np.int32)
  colors = np.asarray(spec['colors'], np.int32)
  patches = np.asarray(layout.patches, np.int32)
  n = len(labels)
  pools = _split_pools(seed, split)
  samples = np.asarray([pools[d][rng.integers(len(pools[d]))] for d in labels], np.int32)

  image = _background(rng, image_size)  # (S, S, 3)
  for patch, sample, color in zip(patches, samples, colors):
    r, c = divmod(int(patch), grid)
    alpha = _digit_alpha(sample, patch_size)[..., None]  # (P, P, 1)
    ys = slice(r * patch_size, (r + 1) * patch_size)
    xs = slice(c * patch_size, (c + 1) * patch_size)
    image[ys, xs] = (1 - alpha) * image[ys, xs] + alpha * COLOR_RGB[color]
  image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)

  patch_digit = np.full(grid * grid, NO_DIGIT, np.int32)
  patch_digit[patches] = labels
  patch_color = np.full(grid * grid, NO_COLOR, np.int32)
  patch_color[patches] = colors

  def padded(x):
    return np.concatenate([x, np.full(MAX_DIGITS - n, -1, np.int32)]).astype(np.int32)

  return dict(
      image=image,
      question=spec['question'],
      answer=spec['answer'],
      task=task,
      region=np.sort(patches[spec['region_digits']]).astype(np.int32),
      patch_digit=patch_digit,
      patch_color=patch_color,
      digit_patch=padded(patches),
      digit_label=padded(labels),
      digit_color=padded(colors),
      digit_sample=padded(samples),
      num_digits=n,
  )


def render_features(args):
  """`render_example(*args)` reduced to the features GRIP-Bench stores (picklable for workers).

  Args:
    args: (seed, split, index, image_size, patch_size).

  Returns:
    (index, feature dict with image, question, answer, task, region, patch_digit, patch_color,
    example_id).
  """
  seed, split, index, image_size, patch_size = args
  ex = render_example(seed, split, index, image_size=image_size, patch_size=patch_size)
  keys = ('image', 'question', 'answer', 'task', 'region', 'patch_digit', 'patch_color')
  return index, dict({k: ex[k] for k in keys}, example_id=index)


def generate(split, n, seed, image_size=96, patch_size=8, start=0):
  """Yields `render_example(seed, split, i, ...)` for i in [start, start + n)."""
  for i in range(start, start + n):
    yield render_example(seed, split, i, image_size=image_size, patch_size=patch_size)


def contact_sheet(examples, scale=3, columns=4):
  """A PIL image showing `examples` (render_example dicts) with question and answer below each."""
  size = examples[0]['image'].shape[0] * scale
  cell_h = size + 30
  rows = (len(examples) + columns - 1) // columns
  sheet = Image.new('RGB', (columns * (size + 10), rows * cell_h), 'white')
  draw = ImageDraw.Draw(sheet)
  for i, ex in enumerate(examples):
    x, y = (i % columns) * (size + 10), (i // columns) * cell_h
    sheet.paste(Image.fromarray(ex['image']).resize((size, size), Image.NEAREST), (x, y))
    draw.text((x, y + size + 2), ex['question'], fill='black')
    draw.text((x, y + size + 15), f"-> {ex['answer']}  [{ex['task']}]", fill='blue')
  return sheet


if __name__ == '__main__':
  out = sys.argv[1] if len(sys.argv) > 1 else '/tmp/gripbench_examples.png'
  contact_sheet([render_example(0, 'train', i) for i in range(8)]).save(out)
  print('wrote', out)
