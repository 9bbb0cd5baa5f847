"""Tests of the word-level tokenizer and its shipped vocabulary."""

import numpy as np
import pytest

from gripjax.data import tokenizer as tokenizer_lib
from gripjax.data.grip_bench import scenes


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.Tokenizer.load()


def test_special_ids(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3, 4)
  assert tok.tokens[:5] == tokenizer_lib.SPECIAL_TOKENS
  assert tok.vocab_size == len(tok.tokens)


def test_vocab_file_in_sync():
  ok, message = tokenizer_lib.vocab_in_sync()
  assert ok, message


def test_vocab_check_detects_drift(tmp_path):
  path = tmp_path / 'vocab.txt'
  path.write_text('\n'.join(tokenizer_lib.expected_vocab()[:-1]) + '\n')
  ok, message = tokenizer_lib.vocab_in_sync(str(path))
  assert not ok and 'missing' in message
  tokenizer_lib.write_vocab(str(path))
  assert tokenizer_lib.vocab_in_sync(str(path))[0]


def test_round_trip(tok):
  text = 'Is the three LEFT of the eight?'
  ids = tok.encode(text)
  assert tok.unk_id not in ids
  assert tok.decode(ids) == 'is the three left of the eight ?'


def test_every_generated_question_and_answer_is_in_vocab(tok):
  for i in range(60):
    ex = scenes.render_example(0, 'train', i)
    assert tok.unk_id not in tok.encode(ex['question']), ex['question']
    tok.word_id(ex['answer'])


def test_unknown_word_maps_to_unk(tok):
  ids = tok.encode('what is a zebra ?')
  assert ids[3] == tok.unk_id
  assert tok.decode(ids) == 'what is a <unk> ?'


def test_decode_skips_pad_and_stops_at_eos(tok):
  ids = [tok.pad_id, tok.pad_id] + tok.encode('yes') + [tok.eos_id] + tok.encode('no')
  assert tok.decode(ids) == 'yes'


def test_word_id_unknown_raises(tok):
  assert tok.decode([tok.word_id('seven')]) == 'seven'
  with pytest.raises(KeyError, match='zebra'):
    tok.word_id('zebra')


@pytest.mark.parametrize('text', ['', '   \n'])
def test_empty_question_raises(tok, text):
  with pytest.raises(ValueError, match='question is empty'):
    tok.encode_question(text, 8)


def test_left_padding(tok):
  ids, valid = tok.encode_question('how many digits are there ?', 10)
  assert ids.dtype == np.int32 and valid.dtype == bool and ids.shape == valid.shape == (10,)
  n = len(tok.encode('how many digits are there ?')) + 1
  np.testing.assert_array_equal(valid, np.arange(10) >= 10 - n)
  assert (ids[~valid] == tok.pad_id).all()
  assert ids[-1] == tok.sep_id
  assert tok.decode(ids[valid][:-1]) == 'how many digits are there ?'


def test_truncation_keeps_last_tokens(tok):
  text = 'what digit is in the bottom right ?'
  full = tok.encode(text) + [tok.sep_id]
  ids, valid = tok.encode_question(text, 4)
  assert valid.all()
  assert ids.tolist() == full[-4:]


def test_cli_check_and_write(tmp_path, monkeypatch):
  monkeypatch.setattr(tokenizer_lib, 'VOCAB_PATH', str(tmp_path / 'vocab.txt'))
  assert tokenizer_lib.main(['--write']) == 0
  assert tokenizer_lib.main(['--check']) == 0
