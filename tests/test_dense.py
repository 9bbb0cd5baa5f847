"""Tests of the GRIP-Bench dense generator (gripjax/data/grip_bench/dense.py)."""

import collections
import os
import subprocess
import sys

import numpy as np
import pytest

from gripjax import config_lib
from gripjax import runtime
from gripjax.data import pipeline
from gripjax.data import tokenizer
from gripjax.data.grip_bench import builder
from gripjax.data.grip_bench import dense
from gripjax.data.grip_bench import scenes
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def test_every_dense_word_is_in_the_vocabulary():
  tok = tokenizer.Tokenizer.load()
  assert set(dense.vocabulary_words()) <= set(tok.tokens)
  for i in range(20):
    ex = dense.render_example(0, 'validation', i, image_size=48, patch_size=8)
    assert not tok.unknown_words(ex['question']), ex['question']
    assert tok.word_id(ex['answer']) != tok.unk_id


# ------------------------------------------------------------------------------------------------
# The dense family through the tfds builder and the pipeline (smoke geometry: 48 x 48, G = 6).
# ------------------------------------------------------------------------------------------------

SMALL = dict(seed=0, num_train=6, num_validation=3, num_test=4)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _same_example(stored, rendered):
  np.testing.assert_array_equal(stored['image'], rendered['image'])
  for key in ('question', 'answer', 'task'):
    assert pipeline.as_text(stored[key]) == rendered[key], key
  for key in ('region', 'patch_digit', 'patch_color'):
    np.testing.assert_array_equal(stored[key], rendered[key], err_msg=key)


def test_builder_writes_the_dense_family_and_the_pipeline_reads_it(data_dir):
  test = builder.load_split('test', dict(SMALL, family='dense'), 48, 8, data_dir, num_workers=1)
  assert len(test) == 4
  for i in range(4):
    want = dense.render_example(0, 'test', i, image_size=48, patch_size=8)
    _same_example(test[i], want)
    np.testing.assert_array_equal(test[i]['patch_object'], want['patch_object'])
  tok = tokenizer.Tokenizer.load()
  batch = next(pipeline.batch_iterator(test, tok, 4, 16, shuffle=False, seed=0))
  assert batch['pixels'].shape == (4, 48, 48, 3) and batch['pixels'].dtype == np.uint8
  assert batch['question_ids'].shape == (4, 16) and batch['region_mask'].shape == (4, 36)
  for row in range(4):
    want = dense.render_example(0, 'test', row, image_size=48, patch_size=8)
    assert batch['answer_id'][row] == tok.word_id(want['answer'])
    assert pipeline.TASKS[batch['task_id'][row]] == want['task']
    np.testing.assert_array_equal(np.flatnonzero(batch['region_mask'][row]), want['region'])
    ids = batch['question_ids'][row][batch['question_valid'][row]]
    assert ids.tolist() == tok.encode(want['question']) + [tok.sep_id]


def test_families_never_share_prepared_files(data_dir):
  standard = builder.builder_for(SMALL, 48, 8, data_dir)  # no family field: standard
  dense_b = builder.builder_for(dict(SMALL, family='dense'), 48, 8, data_dir)
  assert standard.builder_config.name == 's0_tr6_va3_te4_i48_p8'  # the historical name
  assert dense_b.builder_config.name == 'dense_s0_tr6_va3_te4_i48_p8'
  assert standard.data_dir != dense_b.data_dir
  test = builder.load_split('test', dict(SMALL, family='standard'), 48, 8, data_dir,
                            num_workers=1)
  _same_example(test[1], scenes.render_example(0, 'test', 1, image_size=48, patch_size=8))


def test_config_family_reaches_the_data(tmp_path):
  config = helpers.load_config('gripbench_dense', 'smoke')
  assert config.data.family == 'dense'
  source = runtime.split_source(config, str(tmp_path), 'validation')
  assert len(source) == config.data.num_validation
  _same_example(source[2], dense.render_example(0, 'validation', 2, image_size=48, patch_size=8))
  assert 'dense_' in os.listdir(os.path.join(tmp_path, 'tfds', 'grip_bench'))[0]


def test_bad_family_is_refused():
  config = helpers.load_config('gripbench_dense')
  pipeline.check(config)
  config.data.family = 'sparse'
  with pytest.raises(config_lib.ConfigError, match=r"data.family='sparse'.*'standard', 'dense'"):
    pipeline.check(config)
  with pytest.raises(ValueError, match="data.family must be one of .* got 'sparse'"):
    builder.make_config(0, 4, 4, 4, family='sparse')
  assert pipeline.family({}) == 'standard'


def test_dense_refuses_a_vision_stage_whose_count_head_is_too_small():
  config = helpers.load_config('gripbench_dense')
  config.pretrain.vision_steps = 10  # 12 x 12 dense scenes hold up to 24 digits; the head counts 6.
  with pytest.raises(config_lib.ConfigError, match='pretrain.vision_steps=10.*up to 24 digits'):
    pipeline.check(config)
  pipeline.check(helpers.load_config('gripbench_dense', 'smoke'))  # 6 x 6: at most 6 digits


def test_dense_config_validates_and_keeps_the_tiny_geometry():
  for arg in ('', ':smoke'):
    r = subprocess.run([sys.executable, '-m', 'gripjax.main',
                        f'--config=configs/gripbench_dense.py{arg}', '--mode=validate_config'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
  config, tiny = helpers.load_config('gripbench_dense'), helpers.load_config('gripbench_tiny')
  assert config.model.to_dict() == tiny.model.to_dict() and 'family' not in tiny.data
  assert runtime.num_visual_tokens(config) == 144
  np.testing.assert_allclose(config.eval.budgets, [1 / 2, 1 / 4, 1 / 9, 1 / 18, 1 / 36])
