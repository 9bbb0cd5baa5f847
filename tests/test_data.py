"""Tests of the GRIP-Bench generator, its tfds builder and the numpy batch pipeline."""

import collections
import sys

import numpy as np
import pytest

from gripjax.data import pipeline
from gripjax.data import tokenizer as tokenizer_lib
from gripjax.data.grip_bench import scenes

SIZES = dict(seed=0, num_train=40, num_validation=20, num_test=20)
NUM_SAMPLES = 400  # generated examples for the statistics tests


@pytest.fixture(scope='module')
def samples():
  return [scenes.render_example(0, 'train', i) for i in range(NUM_SAMPLES)]


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.Tokenizer.load()


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  from gripjax.data.grip_bench import builder  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return {split: builder.load_split(split, SIZES, 96, 8, data_dir, num_workers=1)
          for split in scenes.SPLITS}


# ------------------------------------------------------------------------------------------------
# Generator.
# ------------------------------------------------------------------------------------------------


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_deterministic_by_seed_split_index():
  for i in (0, 7, 13):
    _assert_same(scenes.render_example(3, 'validation', i),
                 scenes.render_example(3, 'validation', i))
  a, b = scenes.render_example(0, 'train', 5), scenes.render_example(1, 'train', 5)
  assert not np.array_equal(a['image'], b['image'])
  c = scenes.render_example(0, 'test', 5)
  assert not np.array_equal(a['image'], c['image'])
  # generate() is the same as rendering one by one, from any start.
  _assert_same(list(scenes.generate('train', 3, seed=0, start=4))[1],
               scenes.render_example(0, 'train', 5))


def test_splits_use_disjoint_digit_samples():
  idx = {s: set(scenes.split_digit_indices(0, s).tolist()) for s in scenes.SPLITS}
  assert not idx['train'] & idx['validation']
  assert not idx['train'] & idx['test']
  assert not idx['validation'] & idx['test']
  assert sum(len(v) for v in idx.values()) == 1797
  for split in scenes.SPLITS:
    for i in range(30):
      ex = scenes.render_example(0, split, i)
      used = ex['digit_sample'][:ex['num_digits']]
      assert set(used.tolist()) <= idx[split]


def test_example_fields_and_layout(samples):
  for ex in samples[:100]:
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (96, 96, 3)
    assert ex['patch_digit'].shape == ex['patch_color'].shape == (144,)
    n = ex['num_digits']
    assert scenes.MIN_DIGITS <= n <= scenes.MAX_DIGITS
    patches = ex['digit_patch'][:n]
    assert (ex['patch_digit'] != scenes.NO_DIGIT).sum() == n
    np.testing.assert_array_equal(ex['patch_digit'][patches], ex['digit_label'][:n])
    np.testing.assert_array_equal(ex['patch_color'][patches], ex['digit_color'][:n])
    rows, cols = np.divmod(patches, 12)
    for i in range(n):
      for j in range(i + 1, n):
        assert max(abs(rows[i] - rows[j]), abs(cols[i] - cols[j])) >= 2, 'digits touch'
    assert len(ex['question'].split()) + 1 <= 16


def test_regions_hold_the_answer(samples, tok):
  region_of = scenes.region_of_patches(12)
  for ex in samples:
    region, task, answer, q = ex['region'], ex['task'], ex['answer'], ex['question']
    assert region.dtype == np.int32 and ((region >= 0) & (region < 144)).all()
    digits = ex['patch_digit']
    present = digits != scenes.NO_DIGIT
    if task == 'read':
      assert len(region) == 1 and scenes.DIGIT_WORDS[digits[region[0]]] == answer
      name = q[len('what digit is in the '):-2]
      in_region = present & (region_of == scenes.REGION_NAMES.index(name))
      assert in_region.sum() == 1 and in_region[region[0]]
    elif task == 'color':
      digit = scenes.DIGIT_WORDS.index(q.split()[-2])
      assert (digits == digit).sum() == 1 and len(region) == 1 and digits[region[0]] == digit
      assert scenes.COLORS[ex['patch_color'][region[0]]] == answer
    elif task == 'count':
      assert scenes.DIGIT_WORDS.index(answer) == len(region)
      if q == 'how many digits are there ?':
        np.testing.assert_array_equal(region, np.flatnonzero(present))
      else:
        color = scenes.COLORS.index(q.split()[2])
        np.testing.assert_array_equal(region, np.flatnonzero(ex['patch_color'] == color))
    elif task == 'exist':
      word = q.split()[3]
      match = (digits == scenes.DIGIT_WORDS.index(word) if word in scenes.DIGIT_WORDS
               else ex['patch_color'] == scenes.COLORS.index(word))
      np.testing.assert_array_equal(region, np.flatnonzero(match))
      assert answer == ('yes' if match.any() else 'no')
    elif task == 'spatial':
      words = q.split()
      a, b = scenes.DIGIT_WORDS.index(words[2]), scenes.DIGIT_WORDS.index(words[-2])
      assert (digits == a).sum() == 1 and (digits == b).sum() == 1
      pa, pb = int(np.flatnonzero(digits == a)[0]), int(np.flatnonzero(digits == b)[0])
      np.testing.assert_array_equal(region, sorted([pa, pb]))
      axis = 1 if 'left' in words else 0
      ka, kb = divmod(pa, 12)[axis], divmod(pb, 12)[axis]
      assert ka != kb
      assert answer == ('yes' if ka < kb else 'no')
    else:
      raise AssertionError(task)
    if answer in ('yes',) or (task in ('read', 'color', 'spatial')):
      assert len(region) > 0
    tok.word_id(answer)


def test_family_and_answer_balance(samples):
  tasks = collections.Counter(ex['task'] for ex in samples)
  assert set(tasks) == set(scenes.TASKS)
  assert max(tasks.values()) - min(tasks.values()) <= 1
  for task in ('exist', 'spatial'):
    answers = collections.Counter(ex['answer'] for ex in samples if ex['task'] == task)
    assert set(answers) == {'yes', 'no'}
    assert abs(answers['yes'] - answers['no']) <= 1, answers
  # No answer dominates its question form (the text alone should not give the answer away).
  forms = collections.defaultdict(collections.Counter)
  for ex in samples:
    form = ex['task'] + ('/all' if ex['question'] == 'how many digits are there ?' else '')
    forms[form][ex['answer']] += 1
  for form, answers in forms.items():
    assert max(answers.values()) <= 0.6 * sum(answers.values()), (form, answers)


@pytest.mark.parametrize('image_size,patch_size', [(84, 14), (48, 8)])
def test_other_geometries(image_size, patch_size):
  grid = image_size // patch_size
  for i in range(10):
    ex = scenes.render_example(0, 'train', i, image_size=image_size, patch_size=patch_size)
    assert ex['image'].shape == (image_size, image_size, 3)
    assert ex['patch_digit'].shape == (grid * grid,)
    assert ((ex['region'] >= 0) & (ex['region'] < grid * grid)).all()


@pytest.mark.parametrize('image_size,patch_size', [(96, 7), (40, 8), (96, 0)])
def test_bad_geometry_raises(image_size, patch_size):
  with pytest.raises(ValueError, match='image_size|grid'):
    scenes.render_example(0, 'train', 0, image_size=image_size, patch_size=patch_size)


def test_bad_split_raises():
  with pytest.raises(ValueError, match='split'):
    scenes.render_example(0, 'dev', 0)


def test_region_grid():
  names = scenes.region_of_patches(12).reshape(12, 12)
  assert names[0, 0] == 0 and names[0, 4] == 1 and names[5, 5] == 4 and names[11, 11] == 8
  assert np.bincount(names.reshape(-1)).tolist() == [16] * 9


# ------------------------------------------------------------------------------------------------
# tfds builder.
# ------------------------------------------------------------------------------------------------


def test_builder_reads_back_without_tensorflow(sources):
  assert 'tensorflow' not in sys.modules
  for split, field in (('train', 'num_train'), ('validation', 'num_validation'),
                       ('test', 'num_test')):
    assert len(sources[split]) == SIZES[field]
  ex = sources['validation'][7]
  ref = scenes.render_example(0, 'validation', 7)
  assert int(ex['example_id']) == 7
  np.testing.assert_array_equal(ex['image'], ref['image'])
  for k in ('region', 'patch_digit', 'patch_color'):
    assert ex[k].dtype == np.int32
    np.testing.assert_array_equal(ex[k], ref[k])
  for k in ('question', 'answer', 'task'):
    assert pipeline.as_text(ex[k]) == ref[k]


def test_builder_config_name_and_reuse(sources, tmp_path):
  from gripjax.data.grip_bench import builder  # pylint: disable=g-import-not-at-top
  b = builder.builder_for(SIZES, 96, 8, str(tmp_path))
  assert b.builder_config.name == 's0_tr40_va20_te20_i96_p8'
  with pytest.raises(ValueError, match='num_test'):
    builder.make_config(0, 40, 20, 0)
  with pytest.raises(ValueError, match='split'):
    builder.load_split('dev', SIZES, 96, 8, str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Pipeline.
# ------------------------------------------------------------------------------------------------


def test_batch_contents(sources, tok):
  batch = next(pipeline.batch_iterator(sources['train'], tok, 8, 16, shuffle=True, seed=0))
  assert batch['pixels'].shape == (8, 96, 96, 3) and batch['pixels'].dtype == np.uint8
  assert batch['question_ids'].shape == batch['question_valid'].shape == (8, 16)
  assert batch['question_ids'].dtype == np.int32 and batch['question_valid'].dtype == bool
  assert (batch['question_ids'][:, -1] == tok.sep_id).all()
  for k in ('answer_id', 'task_id', 'index'):
    assert batch[k].shape == (8,) and batch[k].dtype == np.int32
  assert batch['region_mask'].shape == (8, 144) and batch['region_mask'].dtype == bool
  for b in range(8):
    ex = scenes.render_example(0, 'train', int(batch['index'][b]))
    assert tok.decode(batch['question_ids'][b][:-1]) == ex['question']
    assert tok.decode([batch['answer_id'][b]]) == ex['answer']
    assert pipeline.TASKS[batch['task_id'][b]] == ex['task']
    np.testing.assert_array_equal(np.flatnonzero(batch['region_mask'][b]), ex['region'])


def _indices(it, n):
  return [next(it)['index'].tolist() for _ in range(n)]


def test_resumption_equals_uninterrupted_run(sources, tok):
  src = sources['train']  # 40 examples, batch 16: 2 steps per epoch, so 6 steps cross epochs
  full = _indices(pipeline.batch_iterator(src, tok, 16, 16, shuffle=True, seed=3), 6)
  resumed = _indices(
      pipeline.batch_iterator(src, tok, 16, 16, shuffle=True, seed=3, start_step=3), 3)
  assert resumed == full[3:]
  assert full[0] != full[2]  # reshuffled between epochs
  assert len(set(full[0] + full[1])) == 32  # no repeats inside an epoch
  other = _indices(pipeline.batch_iterator(src, tok, 16, 16, shuffle=True, seed=4), 1)
  assert other[0] != full[0]
  ordered = _indices(pipeline.batch_iterator(src, tok, 16, 16, shuffle=False, seed=0), 3)
  assert ordered == [list(range(16)), list(range(16, 32)), list(range(16))]


def test_process_slices_partition_global_batch(sources, tok):
  src = sources['train']
  whole = pipeline.batch_iterator(src, tok, 12, 16, shuffle=True, seed=1, start_step=2)
  parts = [pipeline.batch_iterator(src, tok, 12, 16, shuffle=True, seed=1, start_step=2,
                                   process_index=p, process_count=3) for p in range(3)]
  for _ in range(2):
    glob = next(whole)
    local = [next(it) for it in parts]
    for p in range(3):
      for k in glob:
        np.testing.assert_array_equal(local[p][k], glob[k][4 * p:4 * (p + 1)], err_msg=k)
  with pytest.raises(ValueError, match='divisible'):
    next(pipeline.batch_iterator(src, tok, 10, 16, shuffle=False, seed=0, process_count=3))


def test_eval_batches_cover_every_example_once(sources, tok):
  src = sources['test']  # 20 examples
  seen = []
  for batch in pipeline.eval_batches(src, tok, 8, 16):
    assert batch['pixels'].shape[0] == 8 and batch['valid'].shape == (8,)
    seen += batch['index'][batch['valid']].tolist()
  assert seen == list(range(20))
  seen = []
  for p in range(2):
    for batch in pipeline.eval_batches(src, tok, 8, 16, num_examples=13, process_index=p,
                                       process_count=2):
      assert batch['valid'].shape == (4,)
      seen += batch['index'][batch['valid']].tolist()
  assert sorted(seen) == list(range(13))


def test_prefetch_preserves_order(sources, tok):
  it = pipeline.batch_iterator(sources['train'], tok, 8, 16, shuffle=True, seed=0, num_steps=4)
  direct = [b['index'].tolist() for b in pipeline.batch_iterator(
      sources['train'], tok, 8, 16, shuffle=True, seed=0, num_steps=4)]
  assert [b['index'].tolist() for b in pipeline.prefetch(it)] == direct
