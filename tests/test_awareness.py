"""The agent's awareness columns (gripjax/eval/awareness.py): question swap, budget nesting and
budget swap.

A stub scorer with scores written out by hand stands in for the agent, so every expected keep-set
and Jaccard value below is worked on paper; the tiny random VLM answers.
"""

import jax
import jax.numpy as jnp
import numpy as np

from gripjax import budget
from gripjax.eval import awareness
from gripjax.eval import evaluate
from tests import test_inference
from tests.test_inference import setup  # pylint: disable=unused-import  (tiny VLM fixture)

N = test_inference.N  # 36


def test_swap_permutation_by_hand():
  np.testing.assert_array_equal(awareness.swap_permutation([True, True, False, True]), [1, 3, 2, 0])
  np.testing.assert_array_equal(awareness.swap_permutation([True, False]), [0, 1])  # nothing to swap
  np.testing.assert_array_equal(awareness.swap_permutation([True] * 3), [1, 2, 0])


def test_jaccard_by_hand():
  a = jnp.asarray([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  b = jnp.asarray([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  np.testing.assert_allclose(awareness.jaccard(a, b), [1 / 3, 1.0, 1.0])


class StubScorer:
  """Scores that depend on the question's first id and on rho in a way fixed by hand:

    s_j = -j                     for rho <= 0.1   (prefers tokens 0, 1, 2, ...)
    s_j = -j + 100 [j in {3,4}]  for rho  > 0.1   (tokens 3 and 4 jump to the front)
    plus 1000 [j == q0 mod N], where q0 is the example's first question-embedding value (rounded),
  so the question decides one token and the budget reorders the ranking.
  """

  def apply(self, variables, visual, question, mask, rho):
    del variables, mask
    j = jnp.arange(visual.shape[1])
    base_s = -j.astype(jnp.float32)[None]  # (1, N)
    bump = jnp.where((rho[:, None] > 0.1) & ((j == 3) | (j == 4))[None], 100.0, 0.0)  # (B, N)
    q0 = jnp.round(question[:, 0, 0]).astype(jnp.int32) % visual.shape[1]  # (B,)
    pick = jnp.where(j[None] == q0[:, None], 1000.0, 0.0)
    return base_s + bump + pick


def _inputs(setup, q0):
  """Encodings of 2 images and a batch whose question embeddings carry q0 per example."""
  config, tok, vlm, params, images, _ = setup
  visual, cls_attn, ids, valid = test_inference.encode(setup, [0, 1])
  question = jnp.zeros((2, ids.shape[1], config.model.llm.width)).at[:, 0, 0].set(jnp.asarray(q0, jnp.float32))
  enc = {'visual': visual, 'features': visual, 'cls_attn': cls_attn, 'question': question}
  batch = {'question_ids': ids, 'question_valid': valid, 'answer_id': jnp.asarray([5, 6], jnp.int32)}
  return vlm, params, enc, batch


def _answers_correct(vlm, params, enc, batch, kept):
  """(B,) whether the VLM, on the visual tokens at `kept` (B, k), answers each example's own question."""
  kept = jnp.asarray(kept)
  tokens = jnp.take_along_axis(enc['visual'], kept[..., None], axis=1)
  logits = vlm.apply({'params': params}, tokens, kept, jnp.ones(kept.shape, bool), batch['question_ids'],
                     batch['question_valid'], 'keep', method='answer_logits')
  return logits.argmax(-1) == batch['answer_id']


def test_nesting_and_swap_by_hand(setup):  # pylint: disable=redefined-outer-name
  vlm, params, enc, batch = _inputs(setup, [20, 30])
  rho = 1 / 9
  k = budget.budget_to_k(rho, N)  # ceil(36 / 9) = 4
  assert k == 4
  step = awareness.make_awareness_step(vlm, StubScorer(), {}, rho, k)
  perm = jnp.asarray(awareness.swap_permutation([True, True]))  # [1, 0]
  out = step(params, enc, batch, perm, jnp.asarray(False))
  # rho = 1/9 > 0.1: example 0 keeps {20, 3, 4, 0}; at 2 rho the same bump applies: same set.
  np.testing.assert_allclose(out['nesting'], [1.0, 1.0])

  rho = 0.1  # k = ceil(3.6) = 4; at rho the ranking is {q0, 0, 1, 2}, at 0.2 {q0, 3, 4, 0}
  step = awareness.make_awareness_step(vlm, StubScorer(), {}, rho, budget.budget_to_k(rho, N))
  out = step(params, enc, batch, perm, jnp.asarray(False))
  np.testing.assert_allclose(out['nesting'], [2 / 6, 2 / 6])  # {q0, 0} shared of 6 distinct

  # Question swap: example 0 chooses with example 1's question (token 30 instead of 20); the answer
  # is that of the VLM on the tokens {30, 0, 1, 2} with example 0's own question.
  kept = [[0, 1, 2, 30], [0, 1, 2, 20]]  # sorted source order, as gather_kept returns
  np.testing.assert_array_equal(out['swap_correct'], _answers_correct(vlm, params, enc, batch, kept))

  # Budget swap: told rho = 1/2 (> 0.1) the agent ranks {q0, 3, 4, 0} first; k stays 4, and each
  # example answers its own question on them.
  assert awareness.BUDGET_SWAP_RHO == 0.5
  np.testing.assert_array_equal(out['budget_swap_correct'],
                                _answers_correct(vlm, params, enc, batch, [[0, 3, 4, 20], [0, 3, 4, 30]]))
  # Told its own budget, the swap is the agent's own keep-set.
  own = awareness.make_awareness_step(vlm, StubScorer(), {}, rho, 4, swap_rho=rho)
  np.testing.assert_array_equal(own(params, enc, batch, perm, jnp.asarray(False))['budget_swap_correct'],
                                _answers_correct(vlm, params, enc, batch, [[0, 1, 2, 20], [0, 1, 2, 30]]))


def test_swap_with_equal_questions_equals_the_eval_step(setup):  # pylint: disable=redefined-outer-name
  """When both examples carry the same question, the swap changes nothing: the swapped answer is
  the one the eval harness's own grip step scores."""
  vlm, params, enc, batch = _inputs(setup, [7, 7])
  rho = 1 / 4
  k = budget.budget_to_k(rho, N)
  step = awareness.make_awareness_step(vlm, StubScorer(), {}, rho, k)
  out = step(params, enc, batch, jnp.asarray([1, 0]), jnp.asarray(True))
  batch = dict(batch, region_mask=jnp.zeros((2, N), bool))
  correct, _, index = evaluate.make_eval_step(vlm, 'grip', k, (StubScorer(), {}), rho)(
      params, enc, batch, jax.random.PRNGKey(0), jnp.asarray(True))
  np.testing.assert_array_equal(out['swap_correct'], correct)
  # Told 1/2 (> 0.1, as 1/4 is) the stub ranks the same: the budget swap changes nothing either.
  np.testing.assert_array_equal(out['budget_swap_correct'], correct)
  # rho = 1/4 > 0.1, k = 9: token 7 (the question's), then 3 and 4, then 0, 1, 2, 5, 6, 8.
  np.testing.assert_array_equal(np.asarray(index), [list(range(9))] * 2)
