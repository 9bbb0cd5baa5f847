"""GRIP (arXiv 2605.13375): the trained budget-aware agent as a pruner.

  prune = make_grip_prune(scorer, scorer_params, rho)   # rho None: k / N at each call
  kept = prune(ctx, k)                                  # Kept(tokens (B, k, D), index (B, k))

The agent scores every visual token from (V, question, rho) and keeps the greedy top-k of its logits,
the mode of its Plackett-Luce policy, returned in increasing source order. It is a factory rather than
an entry of `METHODS` because it needs trained params; the eval harness closes over them.

| Piece | Here |
| --- | --- |
| inference | greedy top-k of the scorer's logits (the policy's mode) at budget rho |
| rho | fixed at construction, or k / N of each call when None |
"""

from __future__ import annotations

import jax.numpy as jnp

from gripjax import config_lib
from gripjax.pruning import base
from gripjax.rl import policy


def make_grip_prune(scorer, scorer_params, rho=None):
  """Returns `prune(ctx, k) -> Kept` using `scorer` with params `scorer_params` (inner 'params').

  Args:
    scorer: a `BudgetAwareScorer`.
    scorer_params: its trained params.
    rho: the keep ratio fed to the scorer; None feeds k / N (the budget the call asks for).
  """
  if rho is not None:
    rho = config_lib.validate_budget(rho, 'rho')

  def prune(ctx: base.PruneContext, k: int) -> base.Kept:
    n = ctx.num_tokens
    base.check_k(k, n)
    r = k / n if rho is None else rho
    rho_b = jnp.full((ctx.batch_size,), r, jnp.float32)  # (B,)
    logits = scorer.apply({'params': scorer_params}, ctx.tokens, ctx.question, ctx.question_mask,
                          rho_b)  # (B, N)
    return base.gather_kept(ctx.tokens, policy.greedy(logits, k))

  return prune
