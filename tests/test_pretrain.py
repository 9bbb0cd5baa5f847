"""Tests for the grounding targets of the VLM recipe (gripjax/train/pretrain.py).

Run: .venv/bin/python -m pytest -q tests/test_pretrain.py
"""

import jax.numpy as jnp
import numpy as np

from gripjax.data import tokenizer as tokenizer_lib
from gripjax.data.grip_bench import scenes
from gripjax.train import pretrain


def test_pair_targets_split_the_two_named_digits_over_two_heads():
  tok = tokenizer_lib.Tokenizer.load()
  digit_of, _ = pretrain.word_ground_targets(tok, len(scenes.COLORS))
  examples = [scenes.render_example(0, 'train', i) for i in range(20)]  # 4 of each family
  ids = np.stack([tok.encode_question(ex['question'], 16)[0] for ex in examples])
  patch_digit = np.stack([ex['patch_digit'] for ex in examples])  # (B, N)
  n = patch_digit.shape[1]
  region = np.zeros((len(examples), n), bool)
  for e, ex in enumerate(examples):
    region[e, ex['region']] = True
  heads = 3  # heads 0 and 1 split the pair; head 2 keeps the answer region
  targets = np.asarray(pretrain._pair_targets(  # pylint: disable=protected-access
      jnp.broadcast_to(jnp.asarray(region)[:, None], (len(examples), heads, n)),
      {'question_ids': jnp.asarray(ids), 'patch_digit': jnp.asarray(patch_digit)},
      digit_of))
  spatial = 0
  for e, ex in enumerate(examples):
    np.testing.assert_array_equal(targets[e, 2], region[e])
    if ex['task'] != 'spatial':
      np.testing.assert_array_equal(targets[e, :2], region[e][None].repeat(2, 0), err_msg=ex['question'])
      continue
    spatial += 1
    words = ex['question'].split()
    first, second = (scenes.DIGIT_WORDS.index(w) for w in words if w in scenes.DIGIT_WORDS)
    # Each named digit appears once: one patch per head, the first named digit's on head 0.
    assert np.flatnonzero(targets[e, 0]).tolist() == np.flatnonzero(patch_digit[e] == first).tolist()
    assert np.flatnonzero(targets[e, 1]).tolist() == np.flatnonzero(patch_digit[e] == second).tolist()
    assert targets[e, 0].sum() == targets[e, 1].sum() == 1, ex['question']
    assert sorted(np.flatnonzero(targets[e, :2].any(0)).tolist()) == sorted(ex['region'].tolist())
  assert spatial == 4
