"""Word-level tokenizer for GRIP-Bench questions and answers.

The vocabulary ships as `vocab.txt` next to this file (one token per line, line number = id). The
first five tokens are special: <pad>=0, <bos>=1, <eos>=2, <sep>=3, <unk>=4; the rest are the sorted
words of the GRIP-Bench question templates and answers. Regenerate or check it with

  python -m gripjax.data.tokenizer --write   # rewrite vocab.txt from the templates
  python -m gripjax.data.tokenizer --check   # exit 1 if vocab.txt is out of sync

A question prompt is its tokens followed by <sep>, left-padded with <pad> (the last slot always
holds the last real token, <sep>); <bos> is not part of it (the model puts it before the image
tokens).
"""

import os
import re
import sys

from absl import logging
import numpy as np

SPECIAL_TOKENS = ('<pad>', '<bos>', '<eos>', '<sep>', '<unk>')
VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'vocab.txt')
_PUNCT = re.compile(r'([?,.])')


def expected_vocab():
  """The vocabulary that vocab.txt must hold: special tokens, then the sorted benchmark words."""
  from gripjax.data.grip_bench import scenes  # pylint: disable=g-import-not-at-top
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
    """Token ids of `text`; unknown words map to <unk>."""
    return [self._ids.get(w, self.unk_id) for w in split_words(text)]

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

  def encode_question(self, text, max_len):
    """Encodes a question prompt: tokens + <sep>, left-padded to `max_len`.

    Args:
      text: the question.
      max_len: number of slots (>= 1).

    Returns:
      ids: int32 (max_len,), <pad> first, then the prompt tokens, the last slot is <sep>.
      valid: bool (max_len,), True where `ids` holds a real token.

    If the prompt is longer than `max_len`, its LAST `max_len` tokens are kept and a warning is
    logged.
    """
    if max_len < 1:
      raise ValueError(f'max_len must be >= 1, got {max_len}.')
    words = self.encode(text)
    if not words:
      raise ValueError(f'question is empty (got {text!r}); expected at least one word.')
    prompt = words + [self.sep_id]
    if len(prompt) > max_len:
      logging.warning('question %r has %d tokens with <sep>, more than max_len=%d; keeping the '
                      'last %d.', text, len(prompt), max_len, max_len)
      prompt = prompt[-max_len:]
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
