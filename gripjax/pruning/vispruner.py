"""VisPruner: important tokens by [CLS] attention, then diverse tokens by removing duplicates.

Paper: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs",
Zhang et al., ICCV 2025, arXiv 2412.01818 (v2; v1 of the same id is FasterVLM).

Rule:
  1. Important: the k_imp = round(k * important_ratio) tokens with the highest [CLS] attention
     (at least 1; at most k - 1 when k >= 2 so some diverse tokens remain).
  2. Diverse: the other N - k_imp tokens, in patch order, are thinned until k - k_imp remain. Each
     round splits the current set alternately into A (even positions) and B (odd positions), scores
     every A token by its highest cosine similarity (on `features`) to any B token, and removes the
     min(excess, |A|) A tokens with the highest score, i.e. the most duplicated ones. Rounds repeat
     until the count is met (about log2 of the reduction).
  3. The kept set is important + diverse, sorted by patch index.

Deviations from the paper:
  - `important_ratio` default 0.5 is our choice; the paper tunes the important/diverse split per
    budget and we did not verify its exact default.
  - Similarity uses `features` (vision features before the projector), the closest input we carry to
    the vision-side features the paper uses.
  - Ties go to the lower index. The round count and sizes are static Python ints, so the loop unrolls
    under jit (a few rounds).
"""

import jax
import jax.numpy as jnp

from gripjax.pruning import base

IMPORTANT_RATIO = 0.5


def split_budget(k: int, important_ratio: float = IMPORTANT_RATIO) -> tuple[int, int]:
  """(important, diverse) counts for budget k."""
  if not 0.0 < important_ratio <= 1.0:
    raise ValueError(f'important_ratio={important_ratio!r} must be in (0, 1].')
  imp = min(max(round(k * important_ratio), 1), k)
  if k >= 2 and imp == k:
    imp = k - 1
  return imp, k - imp


def remove_duplicates(features: jax.Array, index: jax.Array, keep: int) -> jax.Array:
  """Thins `index` to `keep` tokens by repeatedly dropping the most duplicated ones.

  Args:
    features: (B, N, F) features for cosine similarity.
    index: (B, M) candidate indices, sorted ascending.
    keep: static number of tokens to keep, 0 <= keep <= M.

  Returns:
    (B, keep) int32 indices, sorted ascending.
  """
  while index.shape[1] > keep:
    m = index.shape[1]
    a, b = index[:, 0::2], index[:, 1::2]  # (B, ceil(M/2)), (B, floor(M/2)); M >= 2 here
    remove = min(m - keep, a.shape[1])
    fa = jnp.take_along_axis(features, a[..., None], axis=1)  # (B, |A|, F)
    fb = jnp.take_along_axis(features, b[..., None], axis=1)  # (B, |B|, F)
    dup = jnp.max(base.cosine_similarity(fa, fb), axis=-1)  # (B, |A|)
    if remove < a.shape[1]:
      survivors = base.top_k_indices(-dup, a.shape[1] - remove)  # (B, |A| - remove), least duplicated
      a = jnp.take_along_axis(a, survivors, axis=1)
    else:
      a = a[:, :0]
    index = jnp.sort(jnp.concatenate([a, b], axis=1), axis=-1)  # (B, M - remove)
  return index


def prune(ctx: base.PruneContext, k: int, *,
          important_ratio: float = IMPORTANT_RATIO) -> base.Kept:
  """Keeps important tokens by [CLS] attention plus diverse tokens from the rest."""
  n = ctx.num_tokens
  base.check_k(k, n)
  imp, div = split_budget(k, important_ratio)
  important = base.top_k_indices(ctx.cls_attn, imp)  # (B, imp)
  if div == 0:
    return base.gather_kept(ctx.tokens, important)
  rest = base.complement_indices(important, n)  # (B, N-imp) in patch order
  diverse = remove_duplicates(ctx.features, rest, div)  # (B, div)
  return base.gather_kept(ctx.tokens, jnp.concatenate([important, diverse], axis=1))
