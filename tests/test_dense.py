"""Tests of the GRIP-Bench dense generator (gripjax/data/grip_bench/dense.py)."""

import collections

import numpy as np
import pytest

from gripjax.data.grip_bench import dense
from gripjax.data.grip_bench import scenes

NUM_SAMPLES = 200


@pytest.fixture(scope='module')
def samples():
  return [dense.render_example(0, 'train', i) for i in range(NUM_SAMPLES)]


def test_deterministic_by_seed_split_index():
  for i in (0, 4, 11):
    a, b = dense.render_example(2, 'test', i), dense.render_example(2, 'test', i)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert not np.array_equal(dense.render_example(0, 'train', 3)['image'],
                            dense.render_example(0, 'validation', 3)['image'])


def test_splits_use_disjoint_digit_samples():
  for split in scenes.SPLITS:
    allowed = set(scenes.split_digit_indices(0, split).tolist())
    for i in range(10):
      ex = dense.render_example(0, split, i)
      assert set(ex['digit_sample'][:ex['num_digits']].tolist()) <= allowed


def test_scene_is_dense_and_objects_do_not_touch(samples):
  for ex in samples[:50]:
    assert 10 <= ex['num_digits'] <= 24 and 6 <= ex['num_shapes'] <= 12
    objects = np.flatnonzero(ex['patch_object'] != dense.OBJECT_NONE)
    assert len(objects) == ex['num_digits'] + ex['num_shapes'] >= 16
    occupied = (ex['patch_object'] != dense.OBJECT_NONE).reshape(12, 12)
    assert not (occupied[1:] & occupied[:-1]).any() and not (occupied[:, 1:] & occupied[:, :-1]).any()
    assert ((ex['patch_digit'] != scenes.NO_DIGIT) == (ex['patch_object'] == dense.OBJECT_DIGIT)).all()


def test_regions_hold_the_answer(samples):
  region_of = scenes.region_of_patches(12)
  for ex in samples:
    q, answer, region = ex['question'], ex['answer'], ex['region']
    digits, colors = ex['patch_digit'], ex['patch_color']
    words = q.split()
    assert len(region) <= 4
    if ex['task'] == 'read':
      name = q[len('what digit is in the '):-2]
      inside = region_of == scenes.REGION_NAMES.index(name)
      assert (inside & (digits != scenes.NO_DIGIT)).sum() == 1
      assert (inside & (ex['patch_object'] >= dense.OBJECT_SHAPE0)).any()
      assert inside[region[0]] and scenes.DIGIT_WORDS[digits[region[0]]] == answer
    elif ex['task'] == 'color':
      d = scenes.DIGIT_WORDS.index(words[-2])
      assert (digits == d).sum() == 1 and digits[region[0]] == d
      assert scenes.COLORS[colors[region[0]]] == answer
    elif ex['task'] == 'count':
      c = scenes.COLORS.index(words[2])
      np.testing.assert_array_equal(region, np.flatnonzero(colors == c))
      assert scenes.DIGIT_WORDS[len(region)] == answer
      assert ((ex['patch_object_color'] == c) & (ex['patch_object'] >= dense.OBJECT_SHAPE0)).any()
    elif ex['task'] == 'exist':
      c, d = scenes.COLORS.index(words[3]), scenes.DIGIT_WORDS.index(words[4])
      match = (digits == d) & (colors == c)
      assert answer == ('yes' if match.any() else 'no')
      want = np.flatnonzero(match) if match.any() else np.flatnonzero(digits == d)
      np.testing.assert_array_equal(region, want)
      assert ((colors == c) & (digits != d)).any()  # the colour alone does not decide
    else:
      a, b = scenes.DIGIT_WORDS.index(words[2]), scenes.DIGIT_WORDS.index(words[-2])
      pa, pb = int(np.flatnonzero(digits == a)[0]), int(np.flatnonzero(digits == b)[0])
      np.testing.assert_array_equal(region, sorted([pa, pb]))
      axis = 1 if 'left' in words else 0
      ka, kb = divmod(pa, 12)[axis], divmod(pb, 12)[axis]
      assert ka != kb and answer == ('yes' if ka < kb else 'no')


def test_balanced_answers_per_template(samples):
  forms = collections.defaultdict(collections.Counter)
  for ex in samples:
    form = ex['task'] + ('/above' if 'above' in ex['question'] else '')
    forms[form][ex['answer']] += 1
  chance = {'read': 10, 'color': 6, 'count': 5, 'exist': 2, 'spatial': 2, 'spatial/above': 2}
  for form, answers in forms.items():
    assert len(answers) == chance[form], (form, answers)
    assert max(answers.values()) - min(answers.values()) <= 1, (form, answers)


def test_small_grid_renders():
  for i in range(10):
    ex = dense.render_example(0, 'train', i, image_size=48, patch_size=8)
    assert ex['image'].shape == (48, 48, 3) and ex['patch_object'].shape == (36,)
