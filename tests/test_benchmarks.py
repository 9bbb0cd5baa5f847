"""Benchmark parquet files in the hub schema: read back, prompted and scored as lmms-eval does."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gripjax.data import user_data
from gripjax.eval import benchmarks


def _png():
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 5, 3), 7, np.uint8)).save(buf, 'PNG')
  return buf.getvalue()


@pytest.fixture
def pope_file(tmp_path):
  n = 4
  table = pa.table({'id': [str(i) for i in range(n)], 'question_id': [str(i) for i in range(n)],
                    'question': [' Is there a cat in the image? '] * n,
                    'answer': ['yes', 'no', 'yes', 'no'], 'image_source': ['coco'] * n,
                    'image': [{'bytes': _png(), 'path': ''}] * n,
                    'category': ['random', 'random', 'popular', 'popular']})
  path = str(tmp_path / 'test-00000-of-00001.parquet')
  pq.write_table(table, path, row_group_size=2)
  return path


def test_pope_read_prompt_score(pope_file):
  ds = benchmarks.load('pope', pope_file)
  assert len(ds) == 4 and ds[0].load_image().shape == (4, 5, 3)
  assert benchmarks.prompt('pope', ds[0]) == (
      'Is there a cat in the image?\nAnswer the question using a single word or phrase.')
  # gt yes/no/yes/no. 'Yes, there is' and 'no.' are neither yes nor no after lower().strip().
  m = benchmarks.score('pope', ds, ['Yes, there is', 'no.', ' YES ', 'yes'])
  # random: no TP, no FP, no FN -> accuracy 0, P = R = F1 = 0.
  assert m['random']['accuracy'] == 0 and m['random']['f1'] == 0
  # popular: TP 1 (row 2), FP 1 (row 3): accuracy 1/2, P 1/2, R 1, F1 2/3.
  assert m['popular']['accuracy'] == 0.5 and m['popular']['precision'] == 0.5
  assert m['popular']['recall'] == 1.0 and m['popular']['f1'] == pytest.approx(2 / 3)
  # all: TP 1, FP 1, FN 0 -> accuracy 1/4, P 1/2, R 1.
  assert m['all']['accuracy'] == 0.25 and m['all']['precision'] == 0.5
  assert m['average']['accuracy'] == 0.25 and m['average']['f1'] == pytest.approx(1 / 3)
  assert m['num_unparsed'] == 2


def test_shard_while_reading_equals_shard_after(pope_file):
  whole = benchmarks.load('pope', pope_file)
  for mode, expect in (('contiguous', [2, 3]), ('strided', [1, 3])):
    part = benchmarks.load('pope', pope_file, process_index=1, process_count=2, shard_mode=mode)
    assert [e.row for e in part] == expect
    assert [e.id for e in whole.shard(1, 2, mode)] == [e.id for e in part]


def test_bad_rows_error_or_are_counted(tmp_path):
  table = pa.table({'question': ['q', None, 'q'], 'answer': ['yes', 'no', 'yes'],
                    'category': ['random'] * 3,
                    'image': [{'bytes': _png(), 'path': ''}, {'bytes': _png(), 'path': ''},
                              {'bytes': b'not an image', 'path': ''}]})
  path = str(tmp_path / 'bad.parquet')
  pq.write_table(table, path)
  with pytest.raises(user_data.BadDataError, match=r"row 1: field 'question' is null"):
    benchmarks.load('pope', path)
  ds = benchmarks.load('pope', path, skip_bad_rows=True)
  assert len(ds) == 1
  counts = ds.skip_counts()
  assert counts['missing_field'] == 1 and counts['unreadable_image'] == 1
