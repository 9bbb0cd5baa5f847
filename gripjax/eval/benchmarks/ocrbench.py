"""OCRBench (arXiv 2305.07895), scored as lmms-eval's `ocrbench` task scores it.

Hub file: echo840/OCRBench, parquet columns dataset (the source set, e.g. 'IIIT5K', 'HME100k'),
question, question_type (one of the ten CATEGORIES), answer (list of accepted strings), image.

Prompt: the question, stripped.

Scoring (lmms-eval's ocrbench_process_results): the prediction is lower-cased and stripped first.
A row scores 1 when any accepted answer is a substring of the prediction, after:
  - rows from the HME100k set (handwritten mathematical expressions): answer and prediction
    stripped, newlines turned to spaces, then every space deleted. The answer is not lower-cased
    while the prediction already was, so an answer with an upper-case letter never matches
    (lmms-eval's behaviour, kept; the original OCRBench script compares case-sensitively).
  - every other row: answer and prediction lower-cased, stripped, newlines turned to spaces
    (inner spaces kept).
  final_score = sum of row scores (out of 1000 on the full benchmark; text recognition is the six
  recognition categories, 300 in all), per category counts in `categories`;
  accuracy = final_score / 1000 (what lmms-eval returns as `ocrbench_accuracy`).
"""

from gripjax.eval.benchmarks import _common

REQUIRED = ('dataset', 'question', 'question_type', 'answer', 'image')
RECOGNITION = ('Regular Text Recognition', 'Irregular Text Recognition',
               'Artistic Text Recognition', 'Handwriting Recognition', 'Digit String Recognition',
               'Non-Semantic Text Recognition')
CATEGORIES = RECOGNITION + ('Scene Text-centric VQA', 'Doc-oriented VQA',
                            'Key Information Extraction',
                            'Handwritten Mathematical Expression Recognition')
MATH_SET = 'HME100k'


def to_example(doc, source, row):
  answers = doc['answer']
  if isinstance(answers, str):
    answers = [answers]
  if not answers or not all(isinstance(a, str) for a in answers):
    raise ValueError(f"field 'answer' is {doc['answer']!r}, expected a list of strings")
  if doc['question_type'] not in CATEGORIES:
    raise ValueError(f"field 'question_type' is {doc['question_type']!r}, expected one of "
                     f'{CATEGORIES}')
  return _common.example_from_doc(doc, source, row, answers=answers)


def prompt(row) -> str:
  """lmms-eval's ocrbench_doc_to_text."""
  return row.question.strip()


def row_score(prediction: str, answers, source_set: str) -> int:
  """1 if an accepted answer is a substring of the prediction under lmms-eval's rules, else 0."""
  pred = prediction.lower().strip()
  for answer in answers:
    if source_set == MATH_SET:
      a = answer.strip().replace('\n', ' ').replace(' ', '')
      p = pred.strip().replace('\n', ' ').replace(' ', '')
    else:
      a = answer.lower().strip().replace('\n', ' ')
      p = pred.lower().strip().replace('\n', ' ')
    if a in p:
      return 1
  return 0


def score(rows, predictions) -> dict:
  """{'final_score', 'text_recognition', 'categories': {type: count}, 'category_rows',
  'accuracy': final_score / 1000, 'num_rows'} (module docstring)."""
  rows, predictions = _common.check_predictions('ocrbench', rows, predictions)
  counts = {c: 0 for c in CATEGORIES}
  seen = {c: 0 for c in CATEGORIES}
  for row, pred in zip(rows, predictions):
    category = row.meta['question_type']
    counts[category] += row_score(pred, row.answers, row.meta['dataset'])
    seen[category] += 1
  final = sum(counts.values())
  return dict(final_score=final, text_recognition=sum(counts[c] for c in RECOGNITION),
              categories=counts, category_rows=seen, accuracy=final / 1000,
              num_rows=len(rows))
