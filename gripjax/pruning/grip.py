"""GRIP (arXiv 2605.13375): the trained budget-aware agent as a pruner.

  prune = make_grip_prune(scorer, scorer_params, rho)   # the keep ratio asked for
  kept = prune(ctx, budget_to_k(rho, N))                # Kept(tokens (B, k, D), index (B, k))

The agent scores every visual token from (V, question, rho) and keeps the greedy top-k of its logits,
the mode of its Plackett-Luce policy, returned in increasing source order. It is a factory rather than
an entry of `METHODS` because it needs trained params; the eval harness closes over them.

| Piece | Here |
| --- | --- |
| inference | greedy top-k of the scorer's logits (the policy's mode) at budget rho |
| rho | the ratio asked for, as in training and in `inference.PrunedGenerator` (never k / N, which
  differs from rho whenever rho * N is not an integer) |
"""

from __future__ import annotations

import jax.numpy as jnp

from gripjax import budget
from gripjax.pruning import base
from gripjax.rl import policy


def make_grip_prune(scorer, scorer_params, rho):
  """Returns `prune(ctx, k) -> Kept` using `scorer` with params `scorer_params` (inner 'params').

  Args:
    scorer: a `BudgetAwareScorer`.
    scorer_params: its trained params.
    rho: the keep ratio fed to the scorer, in (0, 1]; `prune` is called with k = budget_to_k(rho, N)
      (it refuses another k, which would mean the agent was fed another budget than it keeps).
  """
  rho = budget.check_rho(rho, 'rho')

  def prune(ctx: base.PruneContext, k: int) -> base.Kept:
    n = ctx.num_tokens
    base.check_k(k, n)
    if k != budget.budget_to_k(rho, n):
      raise ValueError(f'k={k} does not match rho={rho!r}: the agent keeps budget_to_k(rho, N={n}) = '
                       f'{budget.budget_to_k(rho, n)} tokens.')
    rho_b = jnp.full((ctx.batch_size,), rho, jnp.float32)  # (B,)
    logits = scorer.apply({'params': scorer_params}, ctx.tokens, ctx.question, ctx.question_mask,
                          rho_b)  # (B, N)
    return base.gather_kept(ctx.tokens, policy.greedy(logits, k))

  return prune
