"""CDPruner: conditional diversity by greedy MAP inference of a question-conditioned DPP.

Paper: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs",
Zhang et al., arXiv 2506.10967. Port of the released code: github.com/Theia-4869/CDPruner,
`llava/model/llava_arch.py` (`encode_images`, the "[CDPruner]" blocks), LLaVA-1.5 setting.

Rule (as the released code computes it):
  - similarity S_ij = cos(v_i, v_j) of the projected visual tokens (`tokens`, after the projector);
  - relevance: s_i = -mean_t cos(e_i, q_t) (the NEGATED mean cosine to the text), then
    r_i = (s_i - min_j s_j + 1e-6) / (max_j s_j - min_j s_j), so r lies in (0, 1] and the least
    relevant token keeps a small positive weight;
  - kernel L = diag(r) S diag(r), or with the optional trade-off theta: w = exp(alpha r),
    alpha = theta / (2 (1 - theta)) (the released code's commented-out option) and L = diag(w) S diag(w);
  - greedy MAP (Chen, Zhang & Zhou, NeurIPS 2018): each step adds the token with the largest squared
    residual d_j^2 = L_jj - ||c_j||^2, then e_j = (L_pick,j - <c_pick, c_j>) / d_pick, c_j <- [c_j, e_j],
    d_j^2 <- d_j^2 - e_j^2, and the picked token is excluded (its d^2 set to -inf).

Deviations from the released code:
  - Relevance space. The released code compares CLIP image embeddings (post-layernorm + visual
    projection of the vision features) with CLIP text-tower embeddings of the instruction and averages
    the cosine over the text segments. We have no CLIP text tower, so e_i are the projected tokens
    and q_t the LM's embeddings of the real question tokens (both in LM space); the mean runs over
    those tokens (padding excluded).
  - min / max are taken per example (the released code takes them over the whole batch tensor; at its
    batch size 1 that is per example).
  - Guards: if every s_i is equal (or the question is empty) r = 1 (pure diversity) instead of a
    division by zero; a pick with d^2 <= 1e-10 leaves the factor unchanged instead of dividing by
    sqrt(d^2) ~ 0, so exactly k distinct tokens are returned even when L has rank < k.
  - Ties go to the lower index (torch.argmax's rule too).
`similarity_on='features'` (cosine of the pre-projector features) is kept as an ablation; the default
follows the released code.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from gripjax.pruning import base

_EPS = 1e-10  # Smallest residual d^2 that extends the Cholesky factor.
RELEVANCE_EPS = 1e-6  # Added to the numerator of the min-max normalisation, as released.


def relevance(tokens: jax.Array, question: jax.Array, question_mask: jax.Array) -> jax.Array:
  """CDPruner's relevance weights r (B, N) in (0, 1].

  s_i = -(1/|T|) sum_{t real} cos(v_i, q_t);  r_i = (s_i - min s + 1e-6) / (max s - min s).

  Args:
    tokens: (B, N, D) projected visual tokens.
    question: (B, T, D) question embeddings.
    question_mask: (B, T) bool, True on real question tokens.
  """
  cos = base.cosine_similarity(tokens, question)  # (B, N, T)
  mask = question_mask.astype(cos.dtype)[:, None, :]  # (B, 1, T)
  count = jnp.maximum(mask.sum(axis=-1), 1.0)  # (B, 1)
  s = -(cos * mask).sum(axis=-1) / count  # (B, N): negated mean cosine
  lo = s.min(axis=-1, keepdims=True)
  span = s.max(axis=-1, keepdims=True) - lo  # (B, 1)
  return jnp.where(span > 1e-12, (s - lo + RELEVANCE_EPS) / jnp.maximum(span, 1e-12), 1.0)


def kernel(ctx: base.PruneContext, theta: Optional[float] = None,
           similarity_on: str = 'tokens') -> jax.Array:
  """The conditional DPP kernel L = diag(w) S diag(w): (B, N, N)."""
  if similarity_on == 'tokens':
    x = ctx.tokens
  elif similarity_on == 'features':
    x = ctx.features
  else:
    raise ValueError(f"similarity_on={similarity_on!r}; expected 'tokens' or 'features'.")
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
          similarity_on: str = 'tokens') -> base.Kept:
  """Keeps the greedy MAP set of the question-conditioned DPP."""
  base.check_k(k, ctx.num_tokens)
  return base.gather_kept(ctx.tokens, greedy_map(kernel(ctx, theta, similarity_on), k))
