"""What the benchmark modules share: the parquet row -> Example rule and argument checks."""

import os

from gripjax.data import user_data


def example_from_doc(doc: dict, source: str, row: int, answers=()) -> user_data.Example:
  """An Example whose `meta` is the row's columns as lmms-eval sees them (`doc`), image aside.

  The id is `<file name>:<row in that file>`: unique, and stable across shardings.
  """
  meta = {k: v for k, v in doc.items() if k != 'image'}
  return user_data.Example(id=f'{os.path.basename(source)}:{row}', question=doc['question'],
                           answers=tuple(answers), image=doc['image'], meta=meta, source=source,
                           row=row)


def check_predictions(name: str, rows, predictions):
  """(rows, predictions) as lists, one str prediction per row; a clear error otherwise."""
  rows, predictions = list(rows), list(predictions)
  if len(rows) != len(predictions):
    raise ValueError(f'{name}: {len(predictions)} predictions for {len(rows)} rows; '
                     'expected one prediction per row, in row order')
  if not rows:
    raise ValueError(f'{name}: no rows to score')
  for i, p in enumerate(predictions):
    if not isinstance(p, str):
      raise ValueError(f'{name}: prediction {i} (row {rows[i].id!r}) is a '
                       f'{type(p).__name__}, expected str')
  return rows, predictions


def letters(n: int) -> list:
  """Option letters A, B, C, ... for n options (lmms-eval's chr(ord('A') + i))."""
  return [chr(ord('A') + i) for i in range(n)]
