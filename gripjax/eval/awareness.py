"""Does the agent use its question and its budget? Two measurements, columns of every `grip` row.

A budget-aware, query-aware scorer claims two things about itself; each is measured by swapping the
input and seeing what changes, on the same examples as the row's accuracy:

  question_swap_accuracy  the keep-set is chosen with ANOTHER example's question (example i gets the
                          question of the next valid example of its batch, i + 1 mod n_valid), then
                          the VLM answers with the RIGHT question on what was kept. An agent that
                          reads the question loses accuracy here (accuracy - question_swap_accuracy
                          is the value of question-awareness); a question-agnostic one does not.
  budget_nesting          Jaccard(top-k of s(rho), top-k of s(min(2 rho, 1))), k = budget_to_k(rho, N):
                          the tokens kept at rho against the first k of those the agent ranks at
                          twice the budget. 1.0 means the budget input changes nothing in the first
                          k (the ranking is budget-independent there); a budget-aware agent that
                          spends a larger budget differently scores below 1.

Neither is timed: they run after the row's timed step, on the same encodings.

  step = make_awareness_step(vlm, scorer, scorer_params, rho, k)
  out = step(params, enc, batch, perm, position_mode)   # {'swap_correct': (B,), 'nesting': (B,)}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gripjax import budget
from gripjax.models import vlm as vlm_lib
from gripjax.pruning import base
from gripjax.pruning import grip
from gripjax.rl import policy


def swap_permutation(valid) -> np.ndarray:
  """(B,) int32: example i takes the question of example perm[i], the next valid example (cyclic
  over the valid ones; padding rows map to themselves). A batch with one valid example maps it to
  itself, so its swap changes nothing."""
  valid = np.asarray(valid, bool)
  perm = np.arange(valid.size, dtype=np.int32)
  rows = np.flatnonzero(valid)
  perm[rows] = np.roll(rows, -1)
  return perm


def jaccard(a, b):
  """Row-wise |a & b| / |a | b| of (..., N) bool masks; 1 where both are empty."""
  inter = jnp.sum(a & b, -1)
  union = jnp.sum(a | b, -1)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def make_awareness_step(vlm, scorer, scorer_params, rho: float, k: int):
  """A jitted (params, enc, batch, perm, position_mode) -> {'swap_correct': (B,) bool,
  'nesting': (B,) float32} for the agent at budget `rho` keeping k = budget_to_k(rho, N) tokens.

  `enc` is `evaluate.make_encode`'s output, `batch` the eval batch (question_ids, question_valid,
  answer_id; prefix_ids / prefix_valid, the text before the image, when it carries them), `perm` (B,)
  int32 from `swap_permutation`, `position_mode` a bool scalar (renumber).
  """
  rho = budget.check_rho(rho, 'rho')
  double = min(2.0 * rho, 1.0)
  prune = grip.make_grip_prune(scorer, scorer_params, rho)

  def step(params, enc, batch, perm, position_mode):
    visual = enc['visual']  # (B, N, D)
    b, n, _ = visual.shape
    question, mask = enc['question'], batch['question_valid']  # (B, T, D), (B, T)
    ctx = base.PruneContext(tokens=visual, features=enc['features'], cls_attn=enc['cls_attn'],
                            question=question[perm], question_mask=mask[perm],
                            rng=jax.random.PRNGKey(0), grid=(int(np.sqrt(n)),) * 2)
    kept = prune(ctx, k)  # chosen with the other example's question
    valid = jnp.ones(kept.index.shape, bool)
    prefix = vlm_lib.prefix_of(batch)
    logits = vlm.apply({'params': params}, kept.tokens, kept.index, valid, batch['question_ids'],
                       mask, position_mode, method='answer_logits', **prefix)  # its own question
    swap_correct = logits.argmax(-1) == batch['answer_id']  # (B,)

    def top_k_mask(r):
      s = scorer.apply({'params': scorer_params}, visual, question, mask,
                       jnp.full((b,), r, jnp.float32))  # (B, N)
      return policy.keep_mask(policy.greedy(s, k), n)  # (B, N)

    nesting = jaccard(top_k_mask(rho), top_k_mask(double))
    return {'swap_correct': swap_correct, 'nesting': nesting.astype(jnp.float32)}

  return jax.jit(step)
