"""TextVQA (arXiv 1904.08920), scored as lmms-eval's `textvqa` tasks score it (the official VQA metric).

Hub file: lmms-lab/textvqa, parquet columns image_id, question_id, question, question_tokens,
image, image_width, image_height, flickr_original_url, flickr_300k_url, answers (10 strings; null
in the test split, which is scored only by the EvalAI server), image_classes, set_name, ocr_tokens
(list of strings).

Prompt (lmms-eval's textvqa_doc_to_text, default kwargs): `{question.capitalize()}` then, in the
OCR variant (`textvqa_ocr`, the prompt of LLaVA-1.5's own TextVQA evaluation),
`\\nReference OCR token: {', '.join(ocr_tokens)}`, then
`\\nAnswer the question using a single word or phrase.`. str.capitalize lower-cases the rest of the
question, as lmms-eval's prompt does.

Answer normalization (lmms-eval's EvalAIAnswerProcessor, from the official VQA evaluation), applied
to the prediction and to each reference answer:
  1. lower-case; delete ',' and '?'; "'s" -> " 's"; turn newlines and tabs into spaces; strip.
  2. each of the characters ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted if the text (as
     it was before this step) has it next to a space anywhere, else every occurrence becomes a
     space; then a '.' not followed by a digit is deleted (at most 32 of them: the reference passes
     re.UNICODE where `count` goes, and re.UNICODE == 32).
  3. split on whitespace; number words none/zero..ten -> 0..10; articles a, an, the dropped;
     contractions missing their apostrophe restored (dont -> don't; keys that are not lower case,
     such as 'Im', never match); words joined by single spaces.
VQA accuracy of a row with answers g_1..g_n (n = 10): the mean over i of min(1, #{j != i: g_j == p} / 3),
i.e. min(1, matches / 3) averaged over the 10 leave-one-out subsets of 9 answers.
exact_match = mean over rows (lmms-eval's `exact_match`, reported x100 in papers).
"""

import functools
import re
import types

from gripjax.eval.benchmarks import _common

REQUIRED = ('question_id', 'question', 'image', 'ocr_tokens')
POST_PROMPT = '\nAnswer the question using a single word or phrase.'
OCR_PREFIX = '\nReference OCR token: '

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBERS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
           'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = ('a', 'an', 'the')
PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`',
               ',', '?', '!')
_PERIOD = re.compile(r'(?!<=\d)(\.)(?!\d)')  # As written in the reference: in effect, '.' not before a digit.
_DIGIT_COMMA = re.compile(r'(?<=\d)(\,)+(?=\d)')
_PERIOD_COUNT = re.UNICODE  # The reference's sub(..., re.UNICODE) passes 32 as `count`.


def normalize_answer(text: str) -> str:
  """EvalAI's answer normalization (module docstring, steps 1-3)."""
  text = text.lower().replace(',', '').replace('?', '').replace("'s", " 's").strip()
  text = text.replace('\n', ' ').replace('\t', ' ').strip()
  before = text
  for p in PUNCTUATION:
    if p + ' ' in before or ' ' + p in before or _DIGIT_COMMA.search(before) is not None:
      text = text.replace(p, '')
    else:
      text = text.replace(p, ' ')
  text = _PERIOD.sub('', text, _PERIOD_COUNT)
  words = [NUMBERS.get(w, w) for w in text.lower().split()]
  words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
  return ' '.join(words)


def vqa_accuracy(prediction: str, answers) -> float:
  """Mean over i of min(1, #{j != i: normalized answer j == normalized prediction} / 3)."""
  pred = normalize_answer(prediction)
  refs = [normalize_answer(a) for a in answers]
  if not refs:
    raise ValueError('no reference answers to score against')
  accs = []
  for i in range(len(refs)):
    matches = sum(r == pred for j, r in enumerate(refs) if j != i)
    accs.append(min(1.0, matches / 3))
  return sum(accs) / len(accs)


def to_example(doc, source, row):
  answers = doc.get('answers')
  if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
    raise ValueError(f"field 'answers' is {answers!r}, expected a list of strings (or null in the test split)")
  tokens = doc['ocr_tokens']
  if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
    raise ValueError(f"field 'ocr_tokens' is {tokens!r}, expected a list of strings")
  return _common.example_from_doc(doc, source, row, answers=answers or ())


def prompt(row, ocr: bool = False) -> str:
  """lmms-eval's textvqa_doc_to_text (default kwargs; `ocr=True` adds the OCR token hint)."""
  hint = OCR_PREFIX + ', '.join(row.meta['ocr_tokens']) if ocr else ''
  return f'{row.question.capitalize()}{hint}{POST_PROMPT}'


def score(rows, predictions) -> dict:
  """{'exact_match': mean VQA accuracy, 'num_rows'} (module docstring); rows need answers."""
  rows, predictions = _common.check_predictions('textvqa', rows, predictions)
  total = 0.0
  for row, pred in zip(rows, predictions):
    if not row.answers:
      raise ValueError(f'textvqa: row {row.id!r} has no reference answers (the test split is scored by '
                       'the EvalAI server): expected the validation split')
    total += vqa_accuracy(pred, row.answers)
  return dict(exact_match=total / len(rows), num_rows=len(rows))


# The OCR-hint variant, registered as 'textvqa_ocr': same rows and scoring, other prompt.
WITH_OCR = types.SimpleNamespace(REQUIRED=REQUIRED, to_example=to_example,
                                 prompt=functools.partial(prompt, ocr=True), score=score)
