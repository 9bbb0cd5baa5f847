"""Tests for the grounding targets of the VLM recipe (gripjax/train/vlm_objectives.py).

Run: .venv/bin/python -m pytest -q tests/test_vlm_objectives.py
"""

import jax.numpy as jnp
import numpy as np

from gripjax.data import tokenizer as tokenizer_lib
from gripjax.data.grip_bench import scenes
from gripjax.train import vlm_objectives


def test_pair_targets_split_the_two_named_digits_over_two_heads():
  tok = tokenizer_lib.Tokenizer.load()
  digit_of, _ = vlm_objectives.word_ground_targets(tok, len(scenes.COLORS))
  examples = [scenes.render_example(0, 'train', i) for i in range(20)]  # 4 of each family
  ids = np.stack([tok.encode_question(ex['question'], 16)[0] for ex in examples])
  patch_digit = np.stack([ex['patch_digit'] for ex in examples])  # (B, N)
  n = patch_digit.shape[1]
  region = np.zeros((len(examples), n), bool)
  for e, ex in enumerate(examples):
    region[e, ex['region']] = True
  heads = 3  # heads 0 and 1 split the pair; head 2 keeps the answer region
  targets, pair = vlm_objectives._pair_targets(  # pylint: disable=protected-access
      jnp.broadcast_to(jnp.asarray(region)[:, None], (len(examples), heads, n)),
      {'question_ids': jnp.asarray(ids), 'patch_digit': jnp.asarray(patch_digit)},
      digit_of)
  targets = np.asarray(targets)
  np.testing.assert_array_equal(pair, [ex['task'] == 'spatial' for ex in examples])
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


def test_curriculum_keep_and_background_dropout():
  import jax  # pylint: disable=g-import-not-at-top
  b, n = 400, 144
  patch_digit = np.full((b, n), 10)
  patch_digit[:, ::20] = 3  # 8 digit patches per example
  patch_digit = jnp.asarray(patch_digit)
  rng = jax.random.PRNGKey(0)
  every = np.asarray(vlm_objectives.curriculum_keep(rng, patch_digit, 1.0))
  assert every.all()
  some = np.asarray(vlm_objectives.curriculum_keep(rng, patch_digit, 0.25))
  assert some[:, ::20].all() and abs(some.mean() - (8 + 0.25 * 136) / 144) < 0.01
  # A zero dropout share draws exactly the plain curriculum.
  np.testing.assert_array_equal(vlm_objectives.curriculum_keep(rng, patch_digit, 0.25, 0.0), some)
  thinned = np.asarray(vlm_objectives.curriculum_keep(rng, patch_digit, 1.0, 0.5))
  assert thinned[:, ::20].all()  # digits always stay
  full_rows = thinned.all(axis=1)
  assert 0.4 < full_rows.mean() < 0.6  # about half the examples are thinned
  shares = thinned[~full_rows].mean(axis=1)
  assert shares.min() < 0.3 and shares.max() > 0.8  # per-example shares spread over [0, 1)
