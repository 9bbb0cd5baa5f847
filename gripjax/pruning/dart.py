"""DART: duplication-aware token reduction around a few pivot tokens.

Paper: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
Wen et al., arXiv 2502.11494.

Rule:
  1. Pivots: the P tokens with the largest L2 norm of `tokens`, P = clip(k // 8, 1, num_pivots).
  2. The other k - P slots are split across pivots as evenly as possible (earlier, larger-norm pivots
     get the remainder). Pivot by pivot, in decreasing norm, the not-yet-kept tokens least similar
     (cosine on `tokens`) to that pivot fill its quota: near-duplicates of a pivot are dropped.
  3. The kept set is the pivots plus their picks, sorted by patch index: exactly k unique tokens.

Deviations from the paper:
  - The paper prunes inside the LM (after layer 2) and ranks pivots by the norm of that layer's keys;
    we prune before the LM and rank by the norm of the projected visual tokens (no LM handle needed).
  - Picks of later pivots exclude tokens already kept, so the total is exactly k with no duplicates.
  - The pivot count scales with the budget (one per 8 kept tokens, at most `num_pivots`, default 8)
    so small budgets are not spent on pivots alone. Ties go to the lower index.
"""

import jax.numpy as jnp

from gripjax.pruning import base

NUM_PIVOTS = 8


def num_pivots_for(k: int, num_pivots: int = NUM_PIVOTS) -> int:
  """Pivot count for budget k: one per 8 kept tokens, between 1 and num_pivots."""
  if isinstance(num_pivots, bool) or not isinstance(num_pivots, int) or num_pivots < 1:
    raise ValueError(f'num_pivots={num_pivots!r} must be a positive int.')
  return min(max(k // 8, 1), num_pivots, k)


def prune(ctx: base.PruneContext, k: int, *, num_pivots: int = NUM_PIVOTS) -> base.Kept:
  """Keeps P high-norm pivots plus, per pivot, the tokens least similar to it."""
  b, n = ctx.batch_size, ctx.num_tokens
  base.check_k(k, n)
  p = num_pivots_for(k, num_pivots)
  rows = jnp.arange(b)[:, None]
  pivots = base.top_k_indices(jnp.linalg.norm(ctx.tokens, axis=-1), p)  # (B, P), decreasing norm
  pivot_tokens = jnp.take_along_axis(ctx.tokens, pivots[..., None], axis=1)  # (B, P, D)
  sim = base.cosine_similarity(pivot_tokens, ctx.tokens)  # (B, P, N)

  kept = jnp.zeros((b, n), bool).at[rows, pivots].set(True)  # (B, N)
  picks = [pivots]
  rest = k - p
  for j in range(p):
    quota = rest // p + (1 if j < rest % p else 0)
    if quota == 0:
      continue
    score = jnp.where(kept, -jnp.inf, -sim[:, j])  # (B, N), least similar first
    pick = base.top_k_indices(score, quota)  # (B, quota)
    kept = kept.at[rows, pick].set(True)
    picks.append(pick)
  return base.gather_kept(ctx.tokens, jnp.concatenate(picks, axis=1))
