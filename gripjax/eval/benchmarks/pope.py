"""POPE (arXiv 2305.10355), scored as lmms-eval's `pope` tasks score it.

Hub file: lmms-lab/POPE, parquet columns id, question_id, question, answer ('yes'/'no'),
image_source, image, category (the split: 'adversarial', 'popular' or 'random'; the `Full` config
has one file per split).

Prompt: `{question}\\nAnswer the question using a single word or phrase.` (question stripped).

Answer parsing, as lmms-eval does it: the prediction is lower-cased and stripped, nothing else. It
is correct when it then equals the answer. For precision and recall (yes is the positive class) only
predictions that are exactly 'yes' or 'no' count: 'yes, there is' or 'no.' are wrong answers that
are neither a positive nor a negative prediction. `num_unparsed` reports how many there were.
  accuracy  = #correct / #rows
  precision = TP / (TP + FP), TP = #(answer yes, pred 'yes'), FP = #(answer no, pred 'yes')
  recall    = TP / (TP + FN), FN = #(answer yes, pred 'no')
  f1        = 2 P R / (P + R)            (each 0 when its denominator is 0)
  yes_ratio = #(answer yes) / #(answer yes or no): lmms-eval's `pope_yes_ratio` counts the
              ground truth; `pred_yes_ratio` = #(pred 'yes') / #rows is the model's rate.
Metrics are computed per split (the `category` column), over all rows pooled (`all`, lmms-eval's
`pope` task on the combined test split), and as the unweighted mean of the per-split metrics
(`average`, what papers report; the three splits have equal size in the hub file).
"""

from gripjax.eval.benchmarks import _common

REQUIRED = ('question', 'answer', 'image', 'category')
SPLITS = ('adversarial', 'popular', 'random')
METRICS = ('accuracy', 'precision', 'recall', 'f1', 'yes_ratio', 'pred_yes_ratio')


def to_example(doc, source, row):
  answer = doc['answer'].lower().strip()
  if answer not in ('yes', 'no'):
    raise ValueError(f"field 'answer' is {doc['answer']!r}, expected 'yes' or 'no'")
  return _common.example_from_doc(doc, source, row, answers=(answer,))


def prompt(row) -> str:
  """lmms-eval's pope_doc_to_text."""
  return f"{row.question.strip()}\nAnswer the question using a single word or phrase."


def _metrics(pairs) -> dict:
  """pairs: (ground truth, parsed prediction)."""
  tp = sum(g == 'yes' and p == 'yes' for g, p in pairs)
  fp = sum(g == 'no' and p == 'yes' for g, p in pairs)
  fn = sum(g == 'yes' and p == 'no' for g, p in pairs)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  gt_yes, gt_no = sum(g == 'yes' for g, _ in pairs), sum(g == 'no' for g, _ in pairs)
  return dict(
      accuracy=sum(g == p for g, p in pairs) / len(pairs),
      precision=precision,
      recall=recall,
      f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
      yes_ratio=gt_yes / (gt_yes + gt_no) if gt_yes + gt_no else 0.0,
      pred_yes_ratio=sum(p == 'yes' for _, p in pairs) / len(pairs),
      num_rows=len(pairs))


def score(rows, predictions) -> dict:
  """Accuracy, precision, recall, F1 (yes positive), yes ratios: per split, `all`, `average`.

  Returns {'all': {...}, 'average': {...}, '<split>': {...} for each split present,
  'num_unparsed': #predictions that are neither 'yes' nor 'no' after lower() and strip()}.
  """
  rows, predictions = _common.check_predictions('pope', rows, predictions)
  by_split = {}
  pairs = []
  for row, pred in zip(rows, predictions):
    split = row.meta.get('category')
    if split not in SPLITS:
      raise ValueError(f'pope: row {row.id!r} has category {split!r}, expected one of {SPLITS}')
    pair = (row.answers[0].lower().strip(), pred.lower().strip())
    pairs.append(pair)
    by_split.setdefault(split, []).append(pair)
  out = {split: _metrics(by_split[split]) for split in SPLITS if split in by_split}
  out['all'] = _metrics(pairs)
  per_split = [out[s] for s in SPLITS if s in by_split]
  out['average'] = {m: sum(r[m] for r in per_split) / len(per_split) for m in METRICS}
  out['average']['num_splits'] = len(per_split)
  out['num_unparsed'] = sum(p not in ('yes', 'no') for _, p in pairs)
  return out
