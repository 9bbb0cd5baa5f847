"""TextVQA in the hub's parquet schema: read back, prompted and scored (VQA accuracy) by hand-checked cases."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gripjax.eval import benchmarks
from gripjax.eval.benchmarks import textvqa


def _png():
  buf = io.BytesIO()
  Image.fromarray(np.full((3, 4, 3), 9, np.uint8)).save(buf, 'PNG')
  return buf.getvalue()


COKE = ['coca cola', 'coca cola', 'coca-cola'] + ['Coke'] * 7
ONE_TWO = ['Two'] + ['three'] * 9


def write_textvqa(path, answers):
  """A file with lmms-lab/textvqa's columns (answers None: a test-split row)."""
  n = len(answers)
  table = pa.table({
      'image_id': [f'img{i}' for i in range(n)], 'question_id': list(range(n)),
      'question': ['what is the NAME of the shop?'] * n,
      'question_tokens': [['what', 'is', 'the', 'name', 'of', 'the', 'shop']] * n,
      'image': [{'bytes': _png(), 'path': ''}] * n, 'image_width': [4] * n, 'image_height': [3] * n,
      'flickr_original_url': [''] * n, 'flickr_300k_url': [''] * n,
      'answers': pa.array(answers, pa.list_(pa.string())),
      'image_classes': [['Sign']] * n, 'set_name': ['val'] * n,
      'ocr_tokens': [["Joe's", 'CAFE']] * n})
  pq.write_table(table, str(path))
  return str(path)


@pytest.mark.parametrize('raw,want', [
    ('Two', '2'),
    ('The Coca-Cola', 'coca cola'),  # '-' touches no space: becomes one; 'the' dropped.
    ('coca - cola', 'coca cola'),  # '-' next to a space: deleted.
    ('Dont.', "don't"),  # Final period deleted, contraction restored.
    ('3.5', '3.5'),  # A period before a digit stays.
    ('$3.50.', '$3.50'),
    ('1,000', '1000'),  # Commas are deleted first.
    ("What's", "what 's"),  # "'s" split off before the contraction table sees the word...
    ('whats', "what's"),  # ...so only the apostrophe-less spelling is restored.
    ('An apple', 'apple'),
    ('A', ''),
    ('hello!', 'hello'),  # '!' becomes a space, then the split drops it.
    ('hello !', 'hello'),
    ('new\nyork', 'new york'),
    ('(none)', '0'),
    ('e.g. sign', 'eg sign'),
    ('Im', 'im'),  # The table's 'Im' key is not lower case: never matches.
    ('.' * 40, '.' * 8),  # At most 32 periods deleted (re.UNICODE passed as the count).
])
def test_normalize_answer(raw, want):
  assert textvqa.normalize_answer(raw) == want


def test_vqa_accuracy_by_hand():
  # Three references normalize to 'coca cola': leaving one of them out leaves 2 matches (2/3), leaving
  # out a 'coke' leaves 3 (1): (3 * 2/3 + 7 * 1) / 10.
  assert textvqa.vqa_accuracy('Coca Cola', COKE) == pytest.approx(0.9)
  assert textvqa.vqa_accuracy('coke.', COKE) == 1.0
  assert textvqa.vqa_accuracy('pepsi', COKE) == 0.0
  # One match: 0 when it is left out, 1/3 for each of the 9 others: 9 * (1/3) / 10.
  assert textvqa.vqa_accuracy('2', ONE_TWO) == pytest.approx(0.3)


def test_read_prompt_score(tmp_path):
  path = write_textvqa(tmp_path / 'validation-00000-of-00001.parquet', [COKE, ONE_TWO, COKE])
  ds = benchmarks.load('textvqa', path)
  assert len(ds) == 3 and ds[0].load_image().shape == (3, 4, 3) and len(ds[0].answers) == 10
  # str.capitalize lower-cases the rest of the question, as lmms-eval's prompt does.
  assert benchmarks.prompt('textvqa', ds[0]) == (
      'What is the name of the shop?\nAnswer the question using a single word or phrase.')
  assert benchmarks.prompt('textvqa_ocr', ds[0]) == (
      "What is the name of the shop?\nReference OCR token: Joe's, CAFE\n"
      'Answer the question using a single word or phrase.')
  m = benchmarks.score('textvqa', ds, [' Coca Cola ', 'two', 'Pepsi'])
  # Rows: 0.9, 0.3, 0.
  assert m['exact_match'] == pytest.approx(0.4) and m['num_rows'] == 3
  assert benchmarks.score('textvqa_ocr', ds, ['coke', 'three', 'coke'])['exact_match'] == pytest.approx(
      (1.0 + 1.0 + 1.0) / 3)


def test_test_split_loads_but_is_not_scored(tmp_path):
  path = write_textvqa(tmp_path / 'test.parquet', [None, None])
  ds = benchmarks.load('textvqa', path)
  assert len(ds) == 2 and ds[0].answers == ()
  with pytest.raises(ValueError, match=r"row 'test.parquet:0' has no reference answers"):
    benchmarks.score('textvqa', ds, ['a', 'b'])
