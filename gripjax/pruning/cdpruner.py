"""CDPruner: conditional diversity by greedy MAP inference of a question-conditioned DPP.

Paper: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs",
Zhang et al., arXiv 2506.10967.

Rule:
  - relevance r_i: mean over the real question tokens of cos(v_i, q_t), computed in the LM embedding
    space (`tokens` against `question`), then min-max normalized to [0, 1] per example;
  - similarity S_ij: cosine similarity of the vision `features` (a PSD Gram matrix);
  - kernel L = diag(w) S diag(w) with w = r (default), or w = exp(alpha * r),
    alpha = theta / (2 (1 - theta)) when `theta` is given (the relevance/diversity trade-off of
    Chen et al. 2018 that CDPruner offers as an option);
  - greedy MAP (Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal Point Process to
    Improve Recommendation Diversity", NeurIPS 2018): each step adds the token that most increases
    log det L_S. The gain of token j is its squared residual d_j^2 = L_jj - ||c_j||^2 after the
    incremental Cholesky factor of the selected set, updated in O(N) per step:
    e_j = (L_pick,j - <c_pick, c_j>) / d_pick, c_j <- [c_j, e_j], d_j^2 <- d_j^2 - e_j^2.

Deviations from the paper:
  - The paper measures relevance between vision-side embeddings and text embeddings from the vision
    model's text tower (CLIP); we have no text tower, so relevance uses the projected tokens against
    the LM's question embeddings (both in LM space).
  - Always returns exactly k tokens: Chen et al. stop once every gain is ~0; we keep picking by the
    largest (possibly zero) gain, and a pick with d^2 <= eps leaves the factor unchanged. With w = r
    the least relevant token has w = 0 and is picked last.
  - If an example has no real question tokens or constant relevance, r = 1 (pure diversity).
  - Ties go to the lower index.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from gripjax.pruning import base

_EPS = 1e-10


def relevance(tokens: jax.Array, question: jax.Array, question_mask: jax.Array) -> jax.Array:
  """Min-max normalized mean cosine of each token to the real question tokens: (B, N)."""
  cos = base.cosine_similarity(tokens, question)  # (B, N, T)
  mask = question_mask.astype(cos.dtype)[:, None, :]  # (B, 1, T)
  count = jnp.maximum(mask.sum(axis=-1), 1.0)  # (B, 1)
  r = (cos * mask).sum(axis=-1) / count  # (B, N)
  lo = r.min(axis=-1, keepdims=True)
  span = r.max(axis=-1, keepdims=True) - lo
  return jnp.where(span > 1e-6, (r - lo) / jnp.maximum(span, 1e-6), 1.0)


def kernel(ctx: base.PruneContext, theta: Optional[float] = None,
           similarity_on: str = 'features') -> jax.Array:
  """The conditional DPP kernel L = diag(w) S diag(w): (B, N, N)."""
  if similarity_on == 'features':
    x = ctx.features
  elif similarity_on == 'tokens':
    x = ctx.tokens
  else:
    raise ValueError(f"similarity_on={similarity_on!r}; expected 'features' or 'tokens'.")
  r = relevance(ctx.tokens, ctx.question, ctx.question_mask)  # (B, N)
  if theta is None:
    w = r
  else:
    if not 0.0 <= theta < 1.0:
      raise ValueError(f'theta={theta!r} must be in [0, 1) (or None for w = r).')
    w = jnp.exp(theta / (2.0 * (1.0 - theta)) * r)
  sim = base.cosine_similarity(x, x)  # (B, N, N)
  return w[:, :, None] * sim * w[:, None, :]


def greedy_map(L: jax.Array, k: int) -> jax.Array:
  """Greedy DPP MAP picks in the order they are made: L (B, N, N) PSD -> (B, k) int32."""
  b, n, _ = L.shape
  base.check_k(k, n)
  rows = jnp.arange(b)

  def step(i, carry):
    order, selected, chol, d2 = carry  # (B, k), (B, N), (B, k, N), (B, N)
    pick = jnp.argmax(jnp.where(selected, -jnp.inf, d2), axis=-1).astype(jnp.int32)  # (B,)
    d2_pick = d2[rows, pick]  # (B,)
    c_pick = chol[rows, :, pick]  # (B, k); rows >= i are still zero
    resid = L[rows, pick] - jnp.einsum('bk,bkn->bn', c_pick, chol,
                                       precision=jax.lax.Precision.HIGHEST)  # (B, N)
    ok = d2_pick > _EPS
    e = jnp.where(ok[:, None], resid / jnp.sqrt(jnp.where(ok, d2_pick, 1.0))[:, None], 0.0)
    chol = chol.at[:, i].set(e)
    d2 = d2 - e * e
    order = order.at[:, i].set(pick)
    selected = selected.at[rows, pick].set(True)
    return order, selected, chol, d2

  init = (jnp.zeros((b, k), jnp.int32), jnp.zeros((b, n), bool),
          jnp.zeros((b, k, n), L.dtype), jnp.diagonal(L, axis1=1, axis2=2))
  order, _, _, _ = jax.lax.fori_loop(0, k, step, init)
  return order


def prune(ctx: base.PruneContext, k: int, *, theta: Optional[float] = None,
          similarity_on: str = 'features') -> base.Kept:
  """Keeps the greedy MAP set of the question-conditioned DPP."""
  base.check_k(k, ctx.num_tokens)
  return base.gather_kept(ctx.tokens, greedy_map(kernel(ctx, theta, similarity_on), k))
