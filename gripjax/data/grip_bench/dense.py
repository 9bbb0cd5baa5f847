"""GRIP-Bench dense: crowded digit scenes where the token budget binds and the question decides.

The standard family (`scenes.py`) draws 3-6 digits, so 8-16 kept tokens hold every object and a
question-agnostic saliency ranker keeps the answer. Here a 12 x 12 patch grid holds 10-24 digits
plus 6-12 distractor shapes (filled squares, plus signs, crosses, diamonds, triangles, checkers,
drawn in the digits' colours and at least as bright), 16-36 salient patches against k = 16 kept
tokens at rho = 1/9 and k = 8 at rho = 1/18. Every question needs one to four specific objects,
named by place, digit or colour, so only a selection that reads the question keeps them.

Every example is a pure function of (seed, split, index): `render_example` seeds
`np.random.default_rng([seed, split_id, index, DENSE_STREAM])` (a stream of its own, unrelated to
the standard family's example of the same index), and digit samples come from the same disjoint
per-split pools as the standard family (`scenes.split_digit_indices`).

Geometry: every object covers exactly one patch (patch index `row * G + col`); no two objects share
an edge (diagonal contact is allowed). Object counts scale with the grid area (`object_counts`):
at G = 12 they are the numbers above, at G = 6 (the smoke geometry) 6 digits and 2-3 shapes.

Task families (the standard family's five names, so `task_id` and per-task reports carry over;
equal frequency: `index % 5`; answers cycle with `slot = index // 5`, so every question template
has exactly balanced answers over any run of consecutive indices):
  read     "what digit is in the top left ?"   -> "zero".."nine"; the named region holds one digit
           and at least one distractor shape; the others digits lie outside it.
  color    "what color is the seven ?"          -> colour word; the named digit appears once.
  count    "how many red digits are there ?"    -> "zero".."four"; the scene also holds 1-2 red
           shapes, which do not count.
  exist    "is there a red four ?"               -> "yes"/"no"; the scene holds 1-3 fours and 1-2
           red digits of other labels either way, so neither word alone decides; "yes" makes
           exactly one four red.
  spatial  "is the three left of the eight ?" / "... above ..."  -> "yes"/"no"; both named digits
           appear once, in different columns (rows).

`region` holds the sorted patches that carry the answer: the read digit; the coloured digit; the
counted digits (empty for "zero"); for exist the red four ("yes") or every four, whose colours show
the answer ("no"); the two named digits. At most four patches, so it fits k = 8.

Run `python -m gripjax.data.grip_bench.dense OUT.png` to draw a contact sheet of examples.
"""

import functools
import sys

import numpy as np

from gripjax.data.grip_bench import scenes

TASKS = scenes.TASKS
COLORS = scenes.COLORS
DIGIT_WORDS = scenes.DIGIT_WORDS
REGION_NAMES = scenes.REGION_NAMES
RELATIONS = scenes.RELATIONS
NO_DIGIT = scenes.NO_DIGIT
NO_COLOR = scenes.NO_COLOR
SHAPES = ('square', 'plus', 'cross', 'diamond', 'triangle', 'checker')
# `patch_object` values: empty patch, digit, then one value per distractor shape.
OBJECT_NONE, OBJECT_DIGIT = 0, 1
OBJECT_SHAPE0 = 2  # `patch_object` of SHAPES[j] is OBJECT_SHAPE0 + j.
# Object counts on the reference 12 x 12 grid (scaled by area on other grids, `object_counts`).
REF_GRID = 12
MIN_DIGITS, MAX_DIGITS = 10, 24
MIN_SHAPES, MAX_SHAPES = 6, 12
# Fewest digits any task family needs (exist: up to 3 named digits and 2 of the named colour).
FLOOR_DIGITS = 6
MAX_COUNT = 4  # count answers are "zero".."four".
DENSE_STREAM = 2  # Fourth entropy word of the example seed: the dense family's own stream.
# Distractor alpha is drawn in this range; sklearn digits peak at 1.0 with ~0.3 mean coverage, so
# a shape is at least as salient as a digit.
SHAPE_ALPHA = (0.8, 1.0)


def question_templates():
  """Every dense question form, with `{digit}`, `{digit2}`, `{color}`, `{region}`, `{article}`."""
  return (
      'what digit is in the {region} ?',
      'what color is the {digit} ?',
      'how many {color} digits are there ?',
      'is there {article} {color} {digit} ?',
      'is the {digit} left of the {digit2} ?',
      'is the {digit} above the {digit2} ?',
  )


def answer_words():
  """All answer words of the dense family."""
  return DIGIT_WORDS + COLORS + ('yes', 'no')


def vocabulary_words():
  """Sorted set of every word that dense questions and answers can contain."""
  words = set(answer_words()) | set(DIGIT_WORDS) | set(COLORS)
  fills = {'region': ' '.join(REGION_NAMES), 'digit': '', 'digit2': '', 'color': '',
           'article': 'a an'}
  for template in question_templates():
    words.update(template.format(**fills).split())
  return tuple(sorted(words))


def object_counts(grid):
  """(min_digits, max_digits, min_shapes, max_shapes) on a `grid` x `grid` patch grid.

  The reference counts (10-24 digits, 6-12 shapes at G = 12) scaled by the grid area, with at
  least FLOOR_DIGITS digits and one shape.
  """
  area = (grid / REF_GRID) ** 2
  lo_d = max(FLOOR_DIGITS, round(MIN_DIGITS * area))
  hi_d = max(lo_d, round(MAX_DIGITS * area))
  lo_s = max(1, round(MIN_SHAPES * area))
  hi_s = max(lo_s, round(MAX_SHAPES * area))
  return lo_d, hi_d, lo_s, hi_s


# ------------------------------------------------------------------------------------------------
# Distractor shapes.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def shape_mask(shape, patch_size):
  """float32 (P, P) in {0, 1}: the footprint of distractor `shape` drawn in one patch."""
  if shape not in SHAPES:
    raise ValueError(f'shape must be one of {SHAPES}, got {shape!r}.')
  if patch_size < 4:
    raise ValueError(f'patch_size must be >= 4 to draw a shape, got {patch_size}.')
  # Pixel centres in [-1, 1]; the shape stays inside a 0.8 margin like a digit in its box.
  t = (np.arange(patch_size) + 0.5) / patch_size * 2 - 1
  y, x = np.meshgrid(t, t, indexing='ij')  # (P, P) each; y grows downwards
  r = 0.8
  inside = (np.abs(x) <= r) & (np.abs(y) <= r)
  bar = 0.5 * r
  if shape == 'square':
    m = (np.abs(x) <= 0.75 * r) & (np.abs(y) <= 0.75 * r)
  elif shape == 'plus':
    m = inside & ((np.abs(x) <= bar / 1.5) | (np.abs(y) <= bar / 1.5))
  elif shape == 'cross':
    m = inside & ((np.abs(x - y) <= bar) | (np.abs(x + y) <= bar))
  elif shape == 'diamond':
    m = np.abs(x) + np.abs(y) <= r * 1.05
  elif shape == 'triangle':  # apex up, base at the bottom
    m = inside & (y >= -r) & (np.abs(x) <= (y + r) / 2)
  else:  # checker: 2 x 2 cells
    m = inside & ((x < 0) == (y < 0))
  return m.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Layout.
# ------------------------------------------------------------------------------------------------


class _Layout:
  """Places one object per patch so that no two objects share an edge."""

  def __init__(self, grid, rng):
    self.grid = grid
    self.rng = rng
    self.blocked = np.zeros((grid, grid), bool)

  def put(self, patch):
    r, c = divmod(int(patch), self.grid)
    self.blocked[r, c] = True
    self.blocked[max(r - 1, 0), c] = self.blocked[min(r + 1, self.grid - 1), c] = True
    self.blocked[r, max(c - 1, 0)] = self.blocked[r, min(c + 1, self.grid - 1)] = True
    return int(patch)

  def place(self, allowed=None):
    """Puts an object on a random free patch (within bool (G*G,) `allowed`); returns its index."""
    ok = ~self.blocked.reshape(-1)
    if allowed is not None:
      ok &= allowed
    cands = np.flatnonzero(ok)
    if not len(cands):
      raise scenes._NoRoom()  # pylint: disable=protected-access
    return self.put(self.rng.choice(cands))


# ------------------------------------------------------------------------------------------------
# Task specs: object labels and colours, where each may go, the question and the answer.
# A spec lists digits (label, colour, allowed) and shapes (shape, colour, allowed); `allowed` is a
# bool (G*G,) mask or None; `region_digits` indexes the digits that carry the answer.
# ------------------------------------------------------------------------------------------------


def _others(rng, size, exclude, total):
  """`size` values drawn uniformly from range(total) minus `exclude`."""
  pool = [v for v in range(total) if v not in exclude]
  return [int(v) for v in rng.choice(pool, size=size)]


def _spec_read(rng, n, m, regions, slot):
  target_region = int(rng.integers(9))
  target = slot % 10
  inside = regions == target_region
  labels = [target] + [int(v) for v in rng.integers(10, size=n - 1)]
  colors = [int(v) for v in rng.integers(len(COLORS), size=n)]
  allowed = [inside] + [~inside] * (n - 1)
  # One shape shares the named region, so "the bright thing there" is not the answer.
  shape_allowed = [inside] + [None] * (m - 1)
  return dict(labels=labels, colors=colors, allowed=allowed, shape_allowed=shape_allowed,
              question=f'what digit is in the {REGION_NAMES[target_region]} ?',
              answer=DIGIT_WORDS[target], region_digits=[0])


def _spec_color(rng, n, m, regions, slot):
  del regions, m
  target = int(rng.integers(10))
  color = slot % len(COLORS)
  labels = [target] + _others(rng, n - 1, {target}, 10)
  colors = [color] + [int(v) for v in rng.integers(len(COLORS), size=n - 1)]
  return dict(labels=labels, colors=colors, allowed=[None] * n,
              question=f'what color is the {DIGIT_WORDS[target]} ?', answer=COLORS[color],
              region_digits=[0])


def _spec_count(rng, n, m, regions, slot):
  del regions
  count = slot % (MAX_COUNT + 1)
  color = int(rng.integers(len(COLORS)))
  labels = [int(v) for v in rng.integers(10, size=n)]
  colors = [color] * count + _others(rng, n - count, {color}, len(COLORS))
  # Shapes of the counted colour, which must not be counted.
  decoys = min(m, int(rng.integers(1, 3)))
  shape_colors = [color] * decoys + [int(v) for v in rng.integers(len(COLORS), size=m - decoys)]
  return dict(labels=labels, colors=colors, allowed=[None] * n, shape_colors=shape_colors,
              question=f'how many {COLORS[color]} digits are there ?', answer=DIGIT_WORDS[count],
              region_digits=list(range(count)))


def _spec_exist(rng, n, m, regions, slot):
  del regions, m
  yes = slot % 2 == 0
  digit = int(rng.integers(10))
  color = int(rng.integers(len(COLORS)))
  named = int(rng.integers(1, 4))  # digits with the named label
  tinted = int(rng.integers(1, 3))  # digits of the named colour with another label
  rest = n - named - tinted
  labels = ([digit] * named + _others(rng, tinted, {digit}, 10) + _others(rng, rest, {digit}, 10))
  named_colors = _others(rng, named, {color}, len(COLORS))
  if yes:
    named_colors[0] = color
  colors = (named_colors + [color] * tinted + _others(rng, rest, {color}, len(COLORS)))
  word = COLORS[color]
  return dict(labels=labels, colors=colors, allowed=[None] * n,
              question=f'is there {scenes._article(word)} {word} {DIGIT_WORDS[digit]} ?',  # pylint: disable=protected-access
              answer='yes' if yes else 'no', region_digits=[0] if yes else list(range(named)))


def _spec_spatial(rng, n, m, regions, slot):
  del regions, m
  a, b = (int(x) for x in rng.choice(10, size=2, replace=False))
  labels = [a, b] + _others(rng, n - 2, {a, b}, 10)
  colors = [int(v) for v in rng.integers(len(COLORS), size=n)]
  relation = RELATIONS[(slot // 2) % len(RELATIONS)]
  yes = slot % 2 == 0
  return dict(labels=labels, colors=colors, allowed=[None] * n,
              question=f'is the {DIGIT_WORDS[a]} {relation} the {DIGIT_WORDS[b]} ?',
              answer='yes' if yes else 'no', region_digits=[0, 1], relation=relation,
              relation_holds=yes)


_SPECS = dict(read=_spec_read, color=_spec_color, count=_spec_count, exist=_spec_exist,
              spatial=_spec_spatial)


def _place(spec, layout, grid):
  """Digit and shape patches for `spec` (the spatial pair ordered so the relation has its answer)."""
  n = len(spec['labels'])
  patches = []
  if 'relation' in spec:
    axis = 1 if spec['relation'] == 'left of' else 0  # compare columns or rows
    p = layout.place()
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    coord = cols if axis else rows
    q = layout.place(coord != coord[p])
    first, second = sorted([p, q], key=lambda x: coord[x])
    patches = [first, second] if spec['relation_holds'] else [second, first]
  for i in range(len(patches), n):
    patches.append(layout.place(spec['allowed'][i]))
  shape_patches = [layout.place(a) for a in spec['shape_allowed']]
  return patches, shape_patches


# ------------------------------------------------------------------------------------------------
# Rendering.
# ------------------------------------------------------------------------------------------------


def _paint(image, patch, grid, patch_size, alpha, rgb):
  r, c = divmod(int(patch), grid)
  ys = slice(r * patch_size, (r + 1) * patch_size)
  xs = slice(c * patch_size, (c + 1) * patch_size)
  a = alpha[..., None]  # (P, P, 1)
  image[ys, xs] = (1 - a) * image[ys, xs] + a * rgb


def render_example(seed, split, index, image_size=96, patch_size=8):
  """Renders one GRIP-Bench dense example, a pure function of (seed, split, index).

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
      patch_digit: int32 (N,) digit under each patch, NO_DIGIT (10) for none (shapes included);
      patch_color: int32 (N,) colour index of the digit under each patch, NO_COLOR for none;
      patch_object: int32 (N,) OBJECT_NONE, OBJECT_DIGIT or OBJECT_SHAPE0 + shape index;
      patch_object_color: int32 (N,) colour of the digit or shape on each patch, NO_COLOR for none;
      digit_patch, digit_label, digit_color, digit_sample: int32 (max digits of the grid,), -1 padded;
      shape_patch, shape_kind, shape_color: int32 (max shapes of the grid,), -1 padded;
      num_digits, num_shapes: int.
  """
  grid = scenes.grid_size(image_size, patch_size)
  split_id = scenes._split_id(split)  # pylint: disable=protected-access
  if index < 0:
    raise ValueError(f'index must be >= 0, got {index}.')
  rng = np.random.default_rng([seed, split_id, index, DENSE_STREAM])
  slot, task_id = divmod(index, len(TASKS))
  task = TASKS[task_id]
  regions = scenes.region_of_patches(grid)
  lo_d, hi_d, lo_s, hi_s = object_counts(grid)
  for _ in range(100):
    n = int(rng.integers(lo_d, hi_d + 1))
    m = int(rng.integers(lo_s, hi_s + 1))
    spec = _SPECS[task](rng, n, m, regions, slot)
    spec.setdefault('shape_allowed', [None] * m)
    spec.setdefault('shape_colors', [int(v) for v in rng.integers(len(COLORS), size=m)])
    spec['shape_kinds'] = [int(v) for v in rng.integers(len(SHAPES), size=m)]
    try:
      patches, shape_patches = _place(spec, _Layout(grid, rng), grid)
      break
    except scenes._NoRoom:  # pylint: disable=protected-access
      continue
  else:
    raise RuntimeError(f'could not lay out dense example {index} of {split!r} on a {grid}x{grid} '
                       'grid.')

  labels = np.asarray(spec['labels'], np.int32)
  colors = np.asarray(spec['colors'], np.int32)
  patches = np.asarray(patches, np.int32)
  kinds = np.asarray(spec['shape_kinds'], np.int32)
  shape_colors = np.asarray(spec['shape_colors'], np.int32)
  shape_patches = np.asarray(shape_patches, np.int32)
  pools = scenes._split_pools(seed, split)  # pylint: disable=protected-access
  samples = np.asarray([pools[d][rng.integers(len(pools[d]))] for d in labels], np.int32)
  shape_alpha = rng.uniform(*SHAPE_ALPHA, size=m)

  image = scenes._background(rng, image_size)  # (S, S, 3) pylint: disable=protected-access
  for patch, sample, color in zip(patches, samples, colors):
    alpha = scenes._digit_alpha(sample, patch_size)  # (P, P) pylint: disable=protected-access
    _paint(image, patch, grid, patch_size, alpha, scenes.COLOR_RGB[color])
  for patch, kind, color, a in zip(shape_patches, kinds, shape_colors, shape_alpha):
    _paint(image, patch, grid, patch_size, a * shape_mask(SHAPES[kind], patch_size),
           scenes.COLOR_RGB[color])
  image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)

  num_patches = grid * grid
  patch_digit = np.full(num_patches, NO_DIGIT, np.int32)
  patch_digit[patches] = labels
  patch_color = np.full(num_patches, NO_COLOR, np.int32)
  patch_color[patches] = colors
  patch_object = np.full(num_patches, OBJECT_NONE, np.int32)
  patch_object[patches] = OBJECT_DIGIT
  patch_object[shape_patches] = OBJECT_SHAPE0 + kinds
  patch_object_color = patch_color.copy()
  patch_object_color[shape_patches] = shape_colors

  def padded(x, size):
    return np.concatenate([x, np.full(size - len(x), -1, np.int32)]).astype(np.int32)

  return dict(
      image=image,
      question=spec['question'],
      answer=spec['answer'],
      task=task,
      region=np.sort(patches[spec['region_digits']]).astype(np.int32),
      patch_digit=patch_digit,
      patch_color=patch_color,
      patch_object=patch_object,
      patch_object_color=patch_object_color,
      digit_patch=padded(patches, hi_d),
      digit_label=padded(labels, hi_d),
      digit_color=padded(colors, hi_d),
      digit_sample=padded(samples, hi_d),
      shape_patch=padded(shape_patches, hi_s),
      shape_kind=padded(kinds, hi_s),
      shape_color=padded(shape_colors, hi_s),
      num_digits=len(labels),
      num_shapes=m,
  )


FEATURE_KEYS = ('image', 'question', 'answer', 'task', 'region', 'patch_digit', 'patch_color',
                'patch_object', 'patch_object_color')


def render_features(args):
  """`render_example(*args)` reduced to the features GRIP-Bench dense stores (picklable).

  Args:
    args: (seed, split, index, image_size, patch_size).

  Returns:
    (index, feature dict with FEATURE_KEYS and example_id).
  """
  seed, split, index, image_size, patch_size = args
  ex = render_example(seed, split, index, image_size=image_size, patch_size=patch_size)
  return index, dict({k: ex[k] for k in FEATURE_KEYS}, example_id=index)


def generate(split, n, seed, image_size=96, patch_size=8, start=0):
  """Yields `render_example(seed, split, i, ...)` for i in [start, start + n)."""
  for i in range(start, start + n):
    yield render_example(seed, split, i, image_size=image_size, patch_size=patch_size)


if __name__ == '__main__':
  out = sys.argv[1] if len(sys.argv) > 1 else '/tmp/gripbench_dense_examples.png'
  scenes.contact_sheet([render_example(0, 'train', i) for i in range(10)], columns=5).save(out)
  print('wrote', out)
