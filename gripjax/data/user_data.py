"""Users' datasets and benchmark files, read into one record format.

  ds = user_data.read_jsonl('qa.jsonl', image_root='images/', process_index=jax.process_index(),
                            process_count=jax.process_count(), skip_bad_rows=True)
  for ex in ds:
    pixels = ex.load_image()          # uint8 (H, W, 3), RGB
    ex.question, ex.answers, ex.id, ex.meta
  ds.skip_counts()                    # {'missing_image': 2, ...}: report these with the results

Three formats:
  JSONL        one object per line: `image` (path, relative to `image_root`), `question`,
               optional `answer` (a string or a list of strings), optional `id`; any other keys
               go to `meta`.
  LLaVA JSON   a list of {"id", "image", "conversations": [{"from": "human", "value": ...},
               {"from": "gpt", "value": ...}, ...]} (LLaVA's instruction-tuning files). The question
               is the first human turn that holds `<image>` (the placeholder and the newline next to
               it removed); the answer is the gpt turn right after it. Later turns are ignored.
  parquet      benchmark files as their hubs publish them: HF `datasets` parquet with the image
               embedded as a struct {bytes, path}. Read with pyarrow one row group at a time; a row
               group that holds none of this host's rows is not read. Which columns are needed and
               how a row becomes an Example is up to the caller (`gripjax.eval.benchmarks`).

Sharding (each host reads its own shard). Rows are numbered 0..N-1 in file order (parquet: over the
sorted files); host `i` of `P` gets
  contiguous  rows [floor(i N / P), floor((i + 1) N / P))   sizes differ by at most one
  strided     rows i, i + P, i + 2P, ...                     sizes differ by at most one
Shards are cut on the raw row numbers, before bad rows are dropped, so which rows a host owns does
not depend on which rows are bad; each host checks only its own rows. `Dataset.shard` cuts an
already read dataset the same way, so reading with `process_index/process_count` equals reading
everything and calling `.shard(...)`.

Bad input. A missing image file, an unreadable image, a row without a required field, a line that
is not JSON: a `BadDataError` naming the file, the row (or line) and the field; with
`skip_bad_rows=True` the row is skipped and recorded in `Dataset.skipped` (counted by reason in
`skip_counts()`), never dropped silently. A dataset (or shard) with no rows left, a file that does
not exist, or a parquet file without a required column is always an error.
Images are checked when read (the file exists, PIL can open and verify it); pixels are decoded
lazily by `Example.load_image`, which names the example if decoding still fails (e.g. a truncated
JPEG that passes PIL's verify).
"""

import dataclasses
import glob
import io
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

SHARD_MODES = ('contiguous', 'strided')
SKIP_REASONS = ('missing_image', 'unreadable_image', 'missing_field', 'malformed')


class BadDataError(ValueError):
  """A data file or row that cannot be used; the message names the file, row and field."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One image-question record.

  image: a uint8 (H, W, 3) array, a file path, or encoded image bytes (the last two decoded lazily
    by `load_image`). answers: the reference answers (empty when the data has none).
  meta: everything else the row carries (benchmark fields such as POPE's `category`, MME's
    `category` and `question_id`, multiple-choice `options`), as plain Python values.
  source, row: the file the example came from, and its raw row number (0-based) in the dataset
    (for parquet, counted over all files in order; errors name the row within its file).
  """
  id: str
  question: str
  answers: tuple = ()
  image: Any = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  source: str = ''
  row: int = 0

  @property
  def answer(self):
    """The first reference answer, or None."""
    return self.answers[0] if self.answers else None

  def load_image(self) -> np.ndarray:
    """The image as RGB uint8 (H, W, 3)."""
    where = f'example {self.id!r} ({self.source}, dataset row {self.row})'
    if isinstance(self.image, np.ndarray):
      if self.image.dtype != np.uint8 or self.image.ndim != 3 or self.image.shape[-1] != 3:
        raise BadDataError(f'{where}: image array has dtype {self.image.dtype} shape '
                           f'{self.image.shape}, expected uint8 (H, W, 3)')
      return self.image
    what = (f'image file {self.image!r}' if isinstance(self.image, str)
            else f'embedded image ({len(self.image)} bytes)' if isinstance(self.image, bytes)
            else f'image of type {type(self.image).__name__}')
    try:
      with _open_image(self.image) as img:
        return np.asarray(img.convert('RGB'), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt data.
      raise BadDataError(f'{where}: cannot decode {what}: {type(e).__name__}: {e}') from e


@dataclasses.dataclass(frozen=True)
class SkippedRow:
  """A row left out under `skip_bad_rows=True`: where it was and why."""
  source: str
  row: int
  reason: str  # one of SKIP_REASONS
  detail: str


@dataclasses.dataclass
class Dataset:
  """The examples of one host's shard, and the rows of that shard that were skipped.

  num_rows is the number of raw rows in the whole source (all shards), the N of the shard rule.
  """
  examples: list
  skipped: list
  source: str
  num_rows: int
  process_index: int = 0
  process_count: int = 1
  shard_mode: str = 'contiguous'

  def __len__(self):
    return len(self.examples)

  def __iter__(self):
    return iter(self.examples)

  def __getitem__(self, i):
    return self.examples[i]

  def skip_counts(self) -> dict:
    """{reason: number of skipped rows} for every reason in SKIP_REASONS (zeros included)."""
    counts = {r: 0 for r in SKIP_REASONS}
    for s in self.skipped:
      counts[s.reason] += 1
    return counts

  def shard(self, process_index: int, process_count: int, mode: str = 'contiguous') -> 'Dataset':
    """Host `process_index` of `process_count`'s part (see the module docstring for the rule).

    Only a dataset read whole (process_count 1) can be sharded again.
    """
    if self.process_count != 1:
      raise ValueError(f'dataset {self.source} is already shard {self.process_index} of '
                       f'{self.process_count}; shard the whole dataset instead')
    rows = set(shard_rows(self.num_rows, process_index, process_count, mode))
    return _finish([e for e in self.examples if e.row in rows],
                   [s for s in self.skipped if s.row in rows],
                   self.source, self.num_rows, process_index, process_count, mode)


def shard_rows(num_rows: int, process_index: int, process_count: int,
               mode: str = 'contiguous') -> range:
  """The raw row numbers host `process_index` of `process_count` owns.

  >>> list(shard_rows(7, 1, 3)), list(shard_rows(7, 1, 3, 'strided'))
  ([2, 3], [1, 4])
  """
  if mode not in SHARD_MODES:
    raise ValueError(f'shard mode {mode!r} is not one of {SHARD_MODES}')
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f'process_count must be an int >= 1, got {process_count!r}')
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be an int in [0, {process_count}), got {process_index!r}')
  if mode == 'strided':
    return range(process_index, num_rows, process_count)
  return range(process_index * num_rows // process_count,
               (process_index + 1) * num_rows // process_count)


# ------------------------------------------------------------------------------------------------
# Readers.
# ------------------------------------------------------------------------------------------------


def read_jsonl(path: str, image_root: str = '', *, process_index: int = 0, process_count: int = 1,
               shard_mode: str = 'contiguous', skip_bad_rows: bool = False,
               verify_images: bool = True) -> Dataset:
  """A JSONL file of {"image", "question", optional "answer", optional "id", ...} objects.

  Errors name the line (1-based); `Example.row` is the 0-based line number among non-blank lines.
  """
  lines = [(n, line) for n, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]
  if not lines:
    raise BadDataError(f'empty dataset: {path} has no rows')
  examples, skipped = [], []
  for row in shard_rows(len(lines), process_index, process_count, shard_mode):
    line_no, line = lines[row]
    where = f'{path} line {line_no}'
    try:
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise _RowError('malformed', f'{where}: not valid JSON ({e})') from e
      if not isinstance(obj, dict):
        raise _RowError('malformed', f'{where}: expected a JSON object, got {type(obj).__name__}')
      question = _required_str(obj, 'question', where)
      image = _image_path(_required_str(obj, 'image', where), image_root, where, verify_images)
      answers = _answers(obj.get('answer'), where)
      meta = {k: v for k, v in obj.items() if k not in ('image', 'question', 'answer', 'id')}
      ex_id = str(obj['id']) if obj.get('id') is not None else f'{os.path.basename(path)}:{row}'
      examples.append(Example(ex_id, question, answers, image, meta, path, row))
    except _RowError as e:
      _skip_or_raise(e, skip_bad_rows, skipped, path, row)
  return _finish(examples, skipped, path, len(lines), process_index, process_count, shard_mode)


def read_llava_json(path: str, image_root: str = '', *, process_index: int = 0,
                    process_count: int = 1, shard_mode: str = 'contiguous',
                    skip_bad_rows: bool = False, verify_images: bool = True) -> Dataset:
  """A LLaVA conversation JSON: a list of {"id", "image", "conversations": [...]} records.

  Rows without an image (LLaVA's text-only conversations) are rows missing the `image` field.
  Errors name the record by its 0-based index in the list.
  """
  try:
    records = json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise BadDataError(f'{path}: not valid JSON ({e})') from e
  if not isinstance(records, list):
    raise BadDataError(f'{path}: expected a JSON list of conversation records, '
                       f'got {type(records).__name__}')
  if not records:
    raise BadDataError(f'empty dataset: {path} has no rows')
  examples, skipped = [], []
  for row in shard_rows(len(records), process_index, process_count, shard_mode):
    rec = records[row]
    where = f'{path} record {row}'
    try:
      if not isinstance(rec, dict):
        raise _RowError('malformed', f'{where}: expected an object, got {type(rec).__name__}')
      question, answer = _first_image_turn(rec, where)
      image = _image_path(_required_str(rec, 'image', where), image_root, where, verify_images)
      meta = {k: v for k, v in rec.items() if k not in ('image', 'conversations', 'id')}
      ex_id = str(rec['id']) if rec.get('id') is not None else f'{os.path.basename(path)}:{row}'
      answers = (answer,) if answer is not None else ()
      examples.append(Example(ex_id, question, answers, image, meta, path, row))
    except _RowError as e:
      _skip_or_raise(e, skip_bad_rows, skipped, path, row)
  return _finish(examples, skipped, path, len(records), process_index, process_count, shard_mode)


def parquet_files(path) -> list:
  """A parquet file, a directory of them (sorted), a glob, or a list of any of these."""
  if isinstance(path, (list, tuple)):
    return [f for p in path for f in parquet_files(p)]
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, '**', '*.parquet'), recursive=True))
    if not files:
      raise BadDataError(f'empty dataset: directory {path} holds no .parquet files')
    return files
  if any(c in path for c in '*?['):
    files = sorted(glob.glob(path))
    if not files:
      raise BadDataError(f'empty dataset: no file matches {path}')
    return files
  if not os.path.exists(path):
    raise BadDataError(f'data file {path} does not exist')
  return [path]


def read_parquet(path, required: Sequence[str],
                 make_example: Callable[[dict, str, int], Example], *, process_index: int = 0,
                 process_count: int = 1, shard_mode: str = 'contiguous',
                 skip_bad_rows: bool = False, verify_images: bool = True) -> Dataset:
  """HF-style parquet files with embedded images, read one row group at a time.

  required: columns every file must have and every row must fill (not null). The `image` column, if
    required, is a struct {bytes, path}: the bytes are kept (decoded lazily), or, when bytes are
    null, `path` is read relative to the parquet file.
  make_example(doc, source, row): builds the Example from the row as a dict of Python values (the
    image already replaced by bytes or a path); it may raise `KeyError`/`ValueError` for a bad
    field, which counts as a row missing that field.
  """
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  # Heavy (~1 s); parquet files only.
  files = parquet_files(path)
  handles = []
  for f in files:
    try:
      pf = pq.ParquetFile(f)
    except Exception as e:
      raise BadDataError(f'{f}: not a readable parquet file ({type(e).__name__}: {e})') from e
    missing = [c for c in required if c not in pf.schema_arrow.names]
    if missing:
      raise BadDataError(f'{f}: missing required column(s) {missing}; the file has '
                         f'{pf.schema_arrow.names}')
    handles.append(pf)
  total = sum(pf.metadata.num_rows for pf in handles)
  source = files[0] if len(files) == 1 else f'{os.path.dirname(files[0]) or "."} ({len(files)} files)'
  if total == 0:
    raise BadDataError(f'empty dataset: {source} has no rows')
  wanted = shard_rows(total, process_index, process_count, shard_mode)
  examples, skipped = [], []
  start = 0  # global number of the first row of the current row group
  for f, pf in zip(files, handles):
    file_start = start
    for g in range(pf.metadata.num_row_groups):
      n = pf.metadata.row_group(g).num_rows
      rows = list(_intersect(wanted, start, start + n))
      if rows:
        docs = pf.read_row_group(g).to_pylist()
        for r in rows:
          local = r - file_start
          where = f'{f} row {local}'
          try:
            doc = docs[r - start]
            for c in required:
              if doc.get(c) is None:
                raise _RowError('missing_field', f'{where}: field {c!r} is null')
            if 'image' in doc and doc['image'] is not None:
              doc['image'] = _embedded_image(doc['image'], f, where, verify_images)
            try:
              ex = make_example(doc, f, local)
            except (KeyError, ValueError, TypeError, IndexError) as e:
              raise _RowError('missing_field', f'{where}: bad field: {type(e).__name__}: {e}') from e
            examples.append(dataclasses.replace(ex, row=r))
          except _RowError as e:
            _skip_or_raise(e, skip_bad_rows, skipped, f, r)
      start += n
  return _finish(examples, skipped, source, total, process_index, process_count, shard_mode)


# ------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------


class _RowError(Exception):
  """A bad row: `reason` is one of SKIP_REASONS, the message names file, row and field."""

  def __init__(self, reason, message):
    super().__init__(message)
    self.reason = reason


def _skip_or_raise(err: _RowError, skip: bool, skipped: list, source: str, row: int):
  if not skip:
    raise BadDataError(f'{err} (pass skip_bad_rows=True to skip and count such rows)') from err
  skipped.append(SkippedRow(source, row, err.reason, str(err)))


def _finish(examples, skipped, source, num_rows, process_index, process_count, mode) -> Dataset:
  if not examples:
    shard = f' shard {process_index} of {process_count} ({mode})' if process_count > 1 else ''
    if skipped:
      raise BadDataError(f'empty dataset: all {len(skipped)} rows of {source}{shard} were bad; '
                         f'first: {skipped[0].detail}')
    raise BadDataError(f'empty dataset: {source}{shard} has no rows ({num_rows} rows in all, '
                       f'{process_count} processes)')
  return Dataset(examples, skipped, source, num_rows, process_index, process_count, mode)


def _intersect(rows: range, lo: int, hi: int) -> Iterable[int]:
  """Members of `rows` (a range with positive step) in [lo, hi), without scanning all of it."""
  if rows.step == 1:
    return range(max(rows.start, lo), min(rows.stop, hi))
  first = rows.start if lo <= rows.start else rows.start + -(-(lo - rows.start) // rows.step) * rows.step
  return range(first, min(rows.stop, hi), rows.step)


def _read_text(path: str) -> str:
  if not os.path.exists(path):
    raise BadDataError(f'data file {path} does not exist')
  with open(path, encoding='utf-8') as f:
    return f.read()


def _required_str(obj: dict, key: str, where: str) -> str:
  value = obj.get(key)
  if value is None or (isinstance(value, str) and not value.strip()):
    raise _RowError('missing_field', f'{where}: missing required field {key!r}')
  if not isinstance(value, str):
    raise _RowError('malformed', f'{where}: field {key!r} must be a string, '
                                 f'got {type(value).__name__}')
  return value


def _answers(value, where: str) -> tuple:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return tuple(value)
  raise _RowError('malformed', f'{where}: field \'answer\' must be a string or a list of strings, '
                               f'got {value!r}')


def _first_image_turn(rec: dict, where: str):
  turns = rec.get('conversations')
  if not isinstance(turns, list) or not turns:
    raise _RowError('missing_field', f'{where}: missing required field \'conversations\'')
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict) or not isinstance(turn.get('value'), str):
      raise _RowError('malformed', f'{where}: conversations[{i}] has no string \'value\'')
    if turn.get('from') == 'human' and '<image>' in turn['value']:
      question = turn['value'].replace('<image>\n', '').replace('\n<image>', '')
      question = question.replace('<image>', '').strip()
      if not question:
        raise _RowError('missing_field', f'{where}: conversations[{i}] holds only <image>, no question')
      answer = None
      if i + 1 < len(turns) and isinstance(turns[i + 1], dict) and turns[i + 1].get('from') == 'gpt':
        answer = turns[i + 1].get('value')
      return question, answer
  raise _RowError('missing_field', f'{where}: no human turn in \'conversations\' holds <image>')


def _open_image(src):
  if isinstance(src, bytes):
    return Image.open(io.BytesIO(src))
  return Image.open(src)


def _check_image(src, where: str):
  try:
    with _open_image(src) as img:
      img.verify()
  except Exception as e:  # PIL raises many types for corrupt data.
    raise _RowError('unreadable_image', f'{where}: unreadable image: {type(e).__name__}: {e}') from e


def _image_path(rel: str, root: str, where: str, verify: bool) -> str:
  full = os.path.join(root, rel) if root else rel
  if not os.path.isfile(full):
    raise _RowError('missing_image', f'{where}: image file {full!r} does not exist')
  if verify:
    _check_image(full, f'{where} ({full})')
  return full


def _embedded_image(value, parquet_path: str, where: str, verify: bool):
  """HF's image struct {bytes, path} -> bytes, or a path relative to the parquet file."""
  if isinstance(value, (bytes, bytearray)):
    data = bytes(value)
  elif isinstance(value, dict) and value.get('bytes') is not None:
    data = bytes(value['bytes'])
  elif isinstance(value, dict) and value.get('path'):
    return _image_path(value['path'], os.path.dirname(parquet_path), where, verify)
  else:
    raise _RowError('missing_field', f'{where}: field \'image\' has neither bytes nor a path')
  if verify:
    _check_image(data, where)
  return data
