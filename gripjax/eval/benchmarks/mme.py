"""MME (arXiv 2306.13394), scored as lmms-eval's `mme` task scores it.

Hub file: lmms-lab/MME, parquet columns question_id (the image's file name, shared by the image's
two questions), image, question, answer ('Yes'/'No'), category.

Prompt: the question stripped, its trailing ' Please answer yes or no.' removed, and
'\\nAnswer the question using a single word or phrase.' appended (lmms-eval's default post_prompt).

Answer parsing (lmms-eval's parse_pred_ans, from Otter): lower-case, strip, delete every '.'; then
'yes'/'no' as they are; a single character 'y'/'n' -> yes/no (any other single character: other);
otherwise 'yes' among the first 4 characters -> yes, else 'no' among them -> no, else other.
The answer is lower-cased, stripped and has its '.' deleted the same way.

Per category (questions grouped by question_id, exactly two per image):
  acc       = 100 * #correct questions / #questions
  acc_plus  = 100 * #images with both questions correct / #images
  score     = acc + acc_plus                                 (0..200)
  perception = sum of the scores of the perception categories present (10 in all: 0..2000)
  cognition  = sum of the scores of the cognition categories present (4 in all: 0..800)
"""

import collections

from gripjax.eval.benchmarks import _common

REQUIRED = ('question_id', 'question', 'answer', 'image', 'category')
PERCEPTION = ('existence', 'count', 'position', 'color', 'posters', 'celebrity', 'scene',
              'landmark', 'artwork', 'OCR')
COGNITION = ('commonsense_reasoning', 'numerical_calculation', 'text_translation',
             'code_reasoning')
_YES_NO_SUFFIX = ' Please answer yes or no.'
POST_PROMPT = '\nAnswer the question using a single word or phrase.'


def to_example(doc, source, row):
  answer = doc['answer'].lower().strip().replace('.', '')
  if answer not in ('yes', 'no'):
    raise ValueError(f"field 'answer' is {doc['answer']!r}, expected 'Yes' or 'No'")
  if doc['category'] not in PERCEPTION + COGNITION:
    raise ValueError(f"field 'category' is {doc['category']!r}, expected one of "
                     f'{PERCEPTION + COGNITION}')
  return _common.example_from_doc(doc, source, row, answers=(answer,))


def prompt(row) -> str:
  """lmms-eval's mme_doc_to_text with the default post_prompt."""
  return row.question.strip().replace(_YES_NO_SUFFIX, '') + POST_PROMPT


def parse_answer(text: str) -> str:
  """'yes', 'no' or 'other', by lmms-eval's parse_pred_ans rule (module docstring)."""
  text = text.lower().strip().replace('.', '')
  if text in ('yes', 'no'):
    return text
  if len(text) == 1:
    return {'y': 'yes', 'n': 'no'}.get(text, 'other')
  head = text[:4]
  if 'yes' in head:
    return 'yes'
  if 'no' in head:
    return 'no'
  return 'other'


def score(rows, predictions) -> dict:
  """Per-category acc, acc_plus and score; perception and cognition sums (module docstring).

  Returns {'categories': {category: {'acc', 'acc_plus', 'score', 'num_questions'}},
  'perception': float, 'cognition': float, 'total': perception + cognition}.
  """
  rows, predictions = _common.check_predictions('mme', rows, predictions)
  images = collections.defaultdict(lambda: collections.defaultdict(list))  # category -> image -> [0/1]
  for row, pred in zip(rows, predictions):
    correct = parse_answer(pred) == row.answers[0]
    images[row.meta['category']][row.meta['question_id']].append(float(correct))
  categories = {}
  for category, per_image in images.items():
    for image, scores in per_image.items():
      if len(scores) != 2:
        raise ValueError(f'mme: image {image!r} ({category}) has {len(scores)} questions among the '
                         'rows, expected 2 (MME scores question pairs; do not shard MME by rows '
                         'that split a pair, or gather all rows before scoring)')
    acc = 100.0 * sum(sum(s) for s in per_image.values()) / (2 * len(per_image))
    acc_plus = 100.0 * sum(sum(s) == 2 for s in per_image.values()) / len(per_image)
    categories[category] = dict(acc=acc, acc_plus=acc_plus, score=acc + acc_plus,
                                num_questions=2 * len(per_image))
  perception = sum(v['score'] for k, v in categories.items() if k in PERCEPTION)
  cognition = sum(v['score'] for k, v in categories.items() if k in COGNITION)
  return dict(categories=categories, perception=perception, cognition=cognition,
              total=perception + cognition)
