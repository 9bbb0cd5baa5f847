"""VisPruner: important tokens by [CLS] attention, then diverse tokens by removing duplicates.

Paper: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs",
Zhang et al., ICCV 2025, arXiv 2412.01818 (v2; v1 of the same id is FasterVLM). Port of the released
code: github.com/Theia-4869/VisPruner, `llava/model/llava_arch.py` (`encode_images`).

Rule (as the released code computes it):
  1. Rank all N tokens by [CLS] attention (head mean), highest first. The first
     k_imp = floor(k * important_ratio) (ratio 0.5) are the important tokens; the other N - k_imp form
     the residual list, kept in that attention order.
  2. While the residual list has R > k - k_imp tokens: r = min(max_removed_per_round, R - (k - k_imp))
     (8 per round in the released code). Split the list by position into A (even) and B (odd); score
     every A token by its highest cosine similarity (on the vision features) to any B token; drop the
     r highest-scoring A tokens (all of A if r >= |A|). The new list is the surviving A tokens, ordered
     by decreasing score, followed by B in its order.
  3. The kept set is important + residual, sorted by patch index.

Deviations from the released code:
  - Ties in attention or duplicate score go to the lower index / position (torch's argsort with
    descending=True is not stable, so its tie order is unspecified).
  - The round count and sizes are static Python ints (the loop unrolls under jit: about
    (N - k) / 8 rounds).
Similarity uses `features`, the vision hidden states of the selection layer before the projector,
as the released code does.
"""

import jax
import jax.numpy as jnp

from gripjax.pruning import base

IMPORTANT_RATIO = 0.5
MAX_REMOVED_PER_ROUND = 8


def split_budget(k: int, important_ratio: float = IMPORTANT_RATIO) -> tuple[int, int]:
  """(important, diverse) counts for budget k: int(k * ratio) important, the rest diverse."""
  if not 0.0 <= important_ratio <= 1.0:
    raise ValueError(f'important_ratio={important_ratio!r} must be in [0, 1].')
  imp = int(k * important_ratio)
  return imp, k - imp


def _descending(scores: jax.Array) -> jax.Array:
  """Positions sorted by decreasing score, ties to the lower position: (B, M) -> (B, M) int32."""
  return jnp.argsort(-scores, axis=-1, stable=True).astype(jnp.int32)


def remove_duplicates(features: jax.Array, residual: jax.Array, keep: int,
                      max_removed_per_round: int = MAX_REMOVED_PER_ROUND) -> jax.Array:
  """Thins the ordered `residual` list to `keep` tokens, at most `max_removed_per_round` per round.

  Args:
    features: (B, N, F) features for cosine similarity.
    residual: (B, M) candidate indices, in the list order of the released code.
    keep: static number of tokens to keep, 1 <= keep <= M.
    max_removed_per_round: the released code's 8.
  Returns:
    (B, keep) int32 indices, in list order (not sorted).
  """
  if isinstance(max_removed_per_round, bool) or not isinstance(max_removed_per_round, int) \
      or max_removed_per_round < 1:
    raise ValueError(f'max_removed_per_round={max_removed_per_round!r}: expected a positive int.')
  while residual.shape[1] > keep:
    m = residual.shape[1]
    r = min(max_removed_per_round, m - keep)
    a, b = residual[:, 0::2], residual[:, 1::2]  # (B, ceil(M/2)), (B, floor(M/2)); M >= 2 here
    fa = jnp.take_along_axis(features, a[..., None], axis=1)  # (B, |A|, F)
    fb = jnp.take_along_axis(features, b[..., None], axis=1)  # (B, |B|, F)
    dup = jnp.max(base.cosine_similarity(fa, fb), axis=-1)  # (B, |A|)
    survivors = _descending(dup)[:, r:]  # (B, |A| - r) or empty: the least duplicated A tokens
    a = jnp.take_along_axis(a, survivors, axis=1)
    residual = jnp.concatenate([a, b], axis=1)  # (B, M - min(r, |A|))
  return residual


def prune(ctx: base.PruneContext, k: int, *, important_ratio: float = IMPORTANT_RATIO,
          max_removed_per_round: int = MAX_REMOVED_PER_ROUND) -> base.Kept:
  """Keeps important tokens by [CLS] attention plus diverse tokens from the rest."""
  base.check_k(k, ctx.num_tokens)
  imp, div = split_budget(k, important_ratio)
  ranked = _descending(ctx.cls_attn)  # (B, N), highest attention first
  important, residual = ranked[:, :imp], ranked[:, imp:]  # (B, imp), (B, N - imp)
  if div > 0:
    residual = remove_duplicates(ctx.features, residual, div, max_removed_per_round)  # (B, div)
  else:
    residual = residual[:, :0]
  return base.gather_kept(ctx.tokens, jnp.concatenate([important, residual], axis=1))
