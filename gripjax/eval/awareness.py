"""Does the agent use its question and its budget? Three measurements, columns of every `grip` row.

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
  budget_swap_accuracy    the keep-set is the top-k of the scorer told ANOTHER budget, `swap_rho`
                          (default 1/2, `BUDGET_SWAP_RHO`), still cut to the row's k, and the VLM
                          answers on it. accuracy - budget_swap_accuracy is what the budget input is
                          worth at this budget: an agent whose ranking ignores rho loses nothing
                          here; one that spends a small budget differently from a large one does.
                          At rho = swap_rho the column equals the row's accuracy.

None is timed: they run after the row's timed step, on the same encodings.

  step = make_awareness_step(vlm, scorer, scorer_params, rho, k)
  out = step(params, enc, batch, perm, position_mode)
  # {'swap_correct': (B,), 'nesting': (B,), 'budget_swap_correct': (B,)}
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

# The budget the scorer is told in `budget_swap_accuracy`: the largest budget of both configs' evals.
BUDGET_SWAP_RHO = 0.5


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


def make_awareness_step(vlm, scorer, scorer_params, rho: float, k: int,
                        swap_rho: float = BUDGET_SWAP_RHO):
  """A jitted (params, enc, batch, perm, position_mode) -> {'swap_correct': (B,) bool,
  'nesting': (B,) float32, 'budget_swap_correct': (B,) bool} for the agent at budget `rho` keeping
  k = budget_to_k(rho, N) tokens; `swap_rho` is the budget the scorer is told for the budget swap.

  `enc` is `evaluate.make_encode`'s output, `batch` the eval batch (question_ids, question_valid,
  answer_id; prefix_ids / prefix_valid, the text before the image, when it carries them), `perm` (B,)
  int32 from `swap_permutation`, `position_mode` a bool scalar (renumber).
  """
  rho = budget.check_rho(rho, 'rho')
  swap_rho = budget.check_rho(swap_rho, 'swap_rho')
  double = min(2.0 * rho, 1.0)
  prune = grip.make_grip_prune(scorer, scorer_params, rho)

  def step(params, enc, batch, perm, position_mode):
    visual = enc['visual']  # (B, N, D)
    b, n, _ = visual.shape
    question, mask = enc['question'], batch['question_valid']  # (B, T, D), (B, T)
    prefix = vlm_lib.prefix_of(batch)

    def correct(kept):  # The VLM answers on `kept` with the example's own question.
      logits = vlm.apply({'params': params}, kept.tokens, kept.index, jnp.ones(kept.index.shape, bool),
                         batch['question_ids'], mask, position_mode, method='answer_logits', **prefix)
      return logits.argmax(-1) == batch['answer_id']  # (B,)

    ctx = base.PruneContext(tokens=visual, features=enc['features'], cls_attn=enc['cls_attn'],
                            question=question[perm], question_mask=mask[perm],
                            rng=jax.random.PRNGKey(0), grid=(int(np.sqrt(n)),) * 2)
    swap_correct = correct(prune(ctx, k))  # chosen with the other example's question

    def top_k(r):  # (B, k) indices of the scorer's greedy top-k when told budget r
      s = scorer.apply({'params': scorer_params}, visual, question, mask,
                       jnp.full((b,), r, jnp.float32))  # (B, N)
      return policy.greedy(s, k)

    nesting = jaccard(policy.keep_mask(top_k(rho), n), policy.keep_mask(top_k(double), n))
    budget_swap_correct = correct(base.gather_kept(visual, top_k(swap_rho)))
    return {'swap_correct': swap_correct, 'nesting': nesting.astype(jnp.float32),
            'budget_swap_correct': budget_swap_correct}

  return jax.jit(step)
