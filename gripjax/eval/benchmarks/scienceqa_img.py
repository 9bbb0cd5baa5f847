"""ScienceQA-IMG (arXiv 2209.09513), scored as lmms-eval's `scienceqa_img` task scores it.

Hub file: lmms-lab/ScienceQA, config ScienceQA-IMG, parquet columns image, question, choices (list
of str), answer (index of the right choice), hint, task, grade, subject, topic, category, skill,
lecture, solution.

Prompt (lmms-eval's default format):
  [Context: {hint}\\n]{question}\\nA. {choice 0}\\nB. {choice 1}...\\n
  Answer with the option's letter from the given choices directly.
the context line only when the hint is not empty.

Scoring (lmms-eval's sqa_process_results, "how llava parses it"): the target is the letter of the
answer. A prediction is right when it equals the letter exactly, or when it is at least two
characters long, starts with an upper-case letter followed by '.', and that letter is the target
('B. the cat' counts as B). Nothing is stripped or lower-cased: 'b', '(B)' and ' B' are wrong.
  exact_match = #right / #rows
"""

from gripjax.eval.benchmarks import _common

REQUIRED = ('image', 'question', 'choices', 'answer')
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def to_example(doc, source, row):
  choices, answer = doc['choices'], int(doc['answer'])
  if not isinstance(choices, list) or not choices:
    raise ValueError(f"field 'choices' is {choices!r}, expected a non-empty list")
  if not 0 <= answer < len(choices):
    raise ValueError(f"field 'answer' is {answer}, expected an index into {len(choices)} choices")
  target = _common.letters(len(choices))[answer]
  return _common.example_from_doc(doc, source, row, answers=(target,))


def prompt(row) -> str:
  """lmms-eval's sqa_doc_to_text, default format."""
  choices = row.meta['choices']
  options = '\n'.join(f'{l}. {c}' for l, c in zip(_common.letters(len(choices)), choices))
  hint = row.meta.get('hint') or ''
  context = f'Context: {hint}\n' if hint else ''
  return f'{context}{row.question}\n{options}{POST_PROMPT}'


def is_correct(prediction: str, target: str) -> bool:
  """lmms-eval's rule: exact letter, or '<Upper>.' prefix whose letter is the target."""
  if prediction == target:
    return True
  if len(prediction) >= 2 and prediction[0].isupper() and prediction[1] == '.':
    return prediction[0] == target
  return False


def score(rows, predictions) -> dict:
  """{'exact_match': fraction right, 'num_rows'} (module docstring)."""
  rows, predictions = _common.check_predictions('scienceqa_img', rows, predictions)
  right = sum(is_correct(p, r.answers[0]) for r, p in zip(rows, predictions))
  return dict(exact_match=right / len(rows), num_rows=len(rows))
