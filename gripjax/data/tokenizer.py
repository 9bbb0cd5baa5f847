"""Word-level tokenizer for GRIP-Bench questions and answers.

The vocabulary ships as `vocab.txt` next to this file (one token per line, line number = id). The
first five tokens are special: <pad>=0, <bos>=1, <eos>=2, <sep>=3, <unk>=4; the rest are the sorted
words of the GRIP-Bench question templates and answers. Regenerate or check it with

  python -m gripjax.data.tokenizer --write   # rewrite vocab.txt from the templates
  python -m gripjax.data.tokenizer --check   # exit 1 if vocab.txt is out of sync

A question prompt is its tokens followed by <sep>, left-padded with <pad> (the last slot always
holds the last real token, <sep>); <bos> is not part of it (the model puts it before the image
tokens).

A question the model cannot read as asked: words outside the vocabulary (each becomes <unk>), or
more than `max_len` tokens with <sep> (only the last `max_len` are kept, so its first words are
lost). `config.data.on_bad_question` chooses what `encode_question` does then: 'warn' (default)
logs the question with the unknown or dropped words and goes on; 'error' raises `QuestionError`
with the same words.
"""

import os
import re
import sys

from absl import logging
import numpy as np

from gripjax import config_lib
from gripjax.data.grip_bench import scenes

SPECIAL_TOKENS = ('<pad>', '<bos>', '<eos>', '<sep>', '<unk>')
VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'vocab.txt')
_PUNCT = re.compile(r'([?,.])')
ON_BAD_QUESTION = ('warn', 'error')  # What encode_question does with unknown words or overflow.


class QuestionError(ValueError):
  """A question with words outside the vocabulary, or too long, under on_bad_question='error'."""


def check_on_bad_question(value, field: str = 'data.on_bad_question') -> str:
  """`value` after checking it is one of ON_BAD_QUESTION; ConfigError naming `field` otherwise."""
  if not isinstance(value, str) or value not in ON_BAD_QUESTION:
    config_lib.fail(field, value, f"one of {ON_BAD_QUESTION} ('warn': log the unknown or dropped "
                    "words and go on; 'error': refuse the question)")
  return value


def on_bad_question(config) -> str:
  """`config.data.on_bad_question`, checked ('warn' when the config has no such field)."""
  data = config.get('data') if hasattr(config, 'get') else None
  value = data.get('on_bad_question', 'warn') if data is not None else 'warn'
  return check_on_bad_question(value)


def check(config) -> None:
  """Start-up check of the tokenizer's field, `config.data.on_bad_question`; raises ConfigError."""
  on_bad_question(config)


def expected_vocab():
  """The vocabulary that vocab.txt must hold: special tokens, then the sorted benchmark words."""
  return SPECIAL_TOKENS + tuple(w for w in scenes.vocabulary_words() if w not in SPECIAL_TOKENS)


def write_vocab(path=None):
  """Writes `expected_vocab()` to `path` (default: the shipped vocab.txt), one token per line."""
  path = path or VOCAB_PATH
  with open(path, 'w') as f:
    f.write('\n'.join(expected_vocab()) + '\n')


def vocab_in_sync(path=None):
  """Returns (ok, message): whether `path` (default: vocab.txt) holds `expected_vocab()`."""
  path = path or VOCAB_PATH
  with open(path) as f:
    found = tuple(line.rstrip('\n') for line in f if line.strip())
  want = expected_vocab()
  if found == want:
    return True, f'{path} is in sync ({len(want)} tokens).'
  missing = sorted(set(want) - set(found))
  extra = sorted(set(found) - set(want))
  return False, (f'{path} is out of sync with the GRIP-Bench templates: missing {missing}, extra '
                 f'{extra}, or a different order. Run `python -m gripjax.data.tokenizer --write`.')


def split_words(text):
  """Lowercases `text` and splits it on whitespace, with "?", "," and "." as their own tokens."""
  return _PUNCT.sub(r' \1 ', text.lower()).split()


class Tokenizer:
  """Word-level tokenizer; build it with `Tokenizer.load()`."""

  def __init__(self, tokens):
    tokens = tuple(tokens)
    if tokens[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
      raise ValueError(f'the vocabulary must start with {SPECIAL_TOKENS}, got {tokens[:5]}.')
    if len(set(tokens)) != len(tokens):
      dup = sorted({t for t in tokens if tokens.count(t) > 1})
      raise ValueError(f'the vocabulary has duplicate tokens: {dup}.')
    self.tokens = tokens
    self._ids = {t: i for i, t in enumerate(tokens)}
    self.pad_id, self.bos_id, self.eos_id, self.sep_id, self.unk_id = range(len(SPECIAL_TOKENS))

  @classmethod
  def load(cls, path=None):
    """Reads a vocabulary file (default: the shipped vocab.txt)."""
    path = path or VOCAB_PATH
    with open(path) as f:
      return cls(line.rstrip('\n') for line in f if line.strip())

  @property
  def vocab_size(self):
    return len(self.tokens)

  def encode(self, text):
    """Token ids of `text`; unknown words map to <unk> (`unknown_words` lists them)."""
    return [self._ids.get(w, self.unk_id) for w in split_words(text)]

  def unknown_words(self, text):
    """The words of `text` (as `split_words` cuts them) that are not in the vocabulary, in order."""
    return [w for w in split_words(text) if w not in self._ids]

  def decode(self, ids):
    """Joins the tokens of `ids`, skipping <pad> and stopping at <eos>."""
    words = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if i == self.pad_id:
        continue
      words.append(self.tokens[i] if 0 <= i < len(self.tokens) else '<unk>')
    return ' '.join(words)

  def word_id(self, word):
    """Id of a single answer word; KeyError if it is not in the vocabulary."""
    try:
      return self._ids[word]
    except KeyError:
      raise KeyError(f'answer word {word!r} is not in the vocabulary ({self.vocab_size} tokens); '
                     'answers must be single in-vocabulary words.') from None

  def encode_question(self, text, max_len, on_bad_question='warn'):
    """Encodes a question prompt: tokens + <sep>, left-padded to `max_len`.

    Args:
      text: the question.
      max_len: number of slots (>= 1).
      on_bad_question: 'warn' or 'error' (see the module docstring), for unknown words (which
        become <unk>) and for a prompt longer than `max_len` (its LAST `max_len` tokens are kept).

    Returns:
      ids: int32 (max_len,), <pad> first, then the prompt tokens, the last slot is <sep>.
      valid: bool (max_len,), True where `ids` holds a real token.

    Raises:
      QuestionError: with on_bad_question='error', naming the unknown or dropped words.
    """
    if on_bad_question not in ON_BAD_QUESTION:
      raise ValueError(f'on_bad_question={on_bad_question!r}: expected one of {ON_BAD_QUESTION}.')
    if max_len < 1:
      raise ValueError(f'max_len must be >= 1, got {max_len}.')
    words = self.encode(text)
    if not words:
      raise ValueError(f'question is empty (got {text!r}); expected at least one word.')
    problems = []
    unknown = self.unknown_words(text)
    if unknown:
      problems.append(f'words not in the vocabulary ({self.vocab_size} tokens) that become <unk>: '
                      f'{unknown}')
    prompt = words + [self.sep_id]
    if len(prompt) > max_len:
      dropped = split_words(text)[:len(prompt) - max_len]
      problems.append(f'{len(prompt)} tokens with <sep>, more than max_len={max_len}: its first '
                      f'words {dropped} are dropped (the last {max_len} are kept)')
      prompt = prompt[-max_len:]
    if problems:
      message = f'question {text!r} has ' + '; and '.join(problems)
      if on_bad_question == 'error':
        raise QuestionError(message + ". Expected in-vocabulary words within max_len (or "
                            "config.data.on_bad_question='warn' to go on with a warning).")
      logging.warning('%s.', message)
    ids = np.full((max_len,), self.pad_id, np.int32)
    valid = np.zeros((max_len,), bool)
    ids[max_len - len(prompt):] = prompt
    valid[max_len - len(prompt):] = True
    return ids, valid


def main(argv):
  if '--write' in argv:
    write_vocab()
    print(f'wrote {VOCAB_PATH} ({len(expected_vocab())} tokens)')
    return 0
  if '--check' in argv:
    ok, message = vocab_in_sync()
    print(message)
    return 0 if ok else 1
  print('usage: python -m gripjax.data.tokenizer (--write | --check)')
  return 2


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
