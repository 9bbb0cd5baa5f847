"""AI2D (arXiv 1603.07396), scored as lmms-eval's `ai2d` task scores it.

Hub file: lmms-lab/ai2d, parquet columns question, options (list of str), answer (index of the
right option, stored as a string), image.

Prompt (lmms-eval's default `mcq` format):
  {question}\\nA. {option 0}\\nB. {option 1}...\\n
  Answer with the option's letter from the given choices directly.

Scoring: lmms-eval's `flexible-extract` filter, then its `exact_match` metric with ignore_case and
ignore_punctuation (HF evaluate's exact_match):
  1. if the prediction matches ^\\s*([A-Z])\\. it is replaced by that letter ('  C. a leaf' -> 'C');
  2. prediction and target letter are lower-cased and every string.punctuation character deleted;
     nothing is stripped ('(B)' and 'B!' match B; ' B' and 'B is right' do not);
  3. right when equal (an empty normalized prediction is right only if it equalled the target
     before normalizing, which a letter target never allows).
  exact_match = #right / #rows
"""

import re
import string

from gripjax.eval.benchmarks import _common

REQUIRED = ('question', 'options', 'answer', 'image')
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
_LEADING_LETTER = re.compile(r'^\s*([A-Z])\.')
_NO_PUNCTUATION = str.maketrans('', '', string.punctuation)


def to_example(doc, source, row):
  options, answer = doc['options'], int(doc['answer'])
  if not isinstance(options, list) or not options:
    raise ValueError(f"field 'options' is {options!r}, expected a non-empty list")
  if not 0 <= answer < len(options):
    raise ValueError(f"field 'answer' is {doc['answer']!r}, expected an index into "
                     f'{len(options)} options')
  target = _common.letters(len(options))[answer]
  return _common.example_from_doc(doc, source, row, answers=(target,))


def prompt(row) -> str:
  """lmms-eval's ai2d_doc_to_text, `mcq` format."""
  opts = row.meta['options']
  choices = '\n'.join(f'{l}. {o}' for l, o in zip(_common.letters(len(opts)), opts))
  return f'{row.question}\n{choices}{POST_PROMPT}'


def is_correct(prediction: str, target: str) -> bool:
  """The flexible-extract filter, then exact match ignoring case and punctuation."""
  m = _LEADING_LETTER.match(prediction)
  filtered = m.group(1) if m else prediction
  pred = filtered.lower().translate(_NO_PUNCTUATION)
  ref = target.lower().translate(_NO_PUNCTUATION)
  return pred == ref and (pred != '' or filtered == target)


def score(rows, predictions) -> dict:
  """{'exact_match': fraction right, 'num_rows'} (module docstring)."""
  rows, predictions = _common.check_predictions('ai2d', rows, predictions)
  right = sum(is_correct(p, r.answers[0]) for r, p in zip(rows, predictions))
  return dict(exact_match=right / len(rows), num_rows=len(rows))
