"""VisionZip: dominant tokens by [CLS] attention plus merged contextual tokens.

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models", Yang et al.,
arXiv 2412.04467. Port of the released code: github.com/dvlab-research/VisionZip,
`visionzip/clip_encoder.py` (the "VisionZip" block of `CLIPVisionTower_VisionZip.forward`).

Rule (as the released code computes it):
  1. Dominant: the d tokens with the highest [CLS] attention of the selection layer (summed over heads;
     the ranking equals our head mean), d = round(k * 54 / 64) (the released 54 dominant + 10
     contextual of 64), leaving c = k - d >= 1 contextual slots when k >= 2.
  2. Contextual: the other R = N - d tokens, in patch order, are split into c targets at positions
     arange(0, R, step)[:c], step = max(1, R // c), and the rest. Every non-target is assigned to its
     most similar target (cosine), and each contextual token is
         target + mean(assigned tokens)        (just the target when nothing is assigned).
  3. Output sorted by patch index; a contextual token carries its target's index.

Deviations from the released code:
  - [CLS] token. The released code always keeps the vision [CLS] token as one of the d dominant
    tokens (topk(d - 1) + [CLS]). Our VLM passes only patch tokens to the LM, so the d dominant
    tokens are all patches.
  - Merge space. The released code merges the vision hidden states (before the projector) and then
    projects; we merge the projected `tokens` (the LM can take a sum of projected tokens without
    re-running the nonlinear projector). The similarity uses `features` (the released code uses the
    selection layer's keys averaged over heads; features are the closest input we carry).
  - Order. The released code appends the contextual tokens after the dominant ones; we place each at
    its target's patch index (the pruner contract: sorted, unique indices with defined positions).
  - Budget. The released counts (54/10) are for k=64 (108/20, 162/30 for 128/192): the same ratio,
    which we apply at every k (`dominant_ratio`).
  - Ties in [CLS] attention or similarity go to the lower index.
At k = N every token is dominant (or, at c >= 1, a target with nothing assigned), so all tokens are
kept unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np

from gripjax.pruning import base

DOMINANT_RATIO = 54 / 64


def split_budget(k: int, dominant_ratio: float = DOMINANT_RATIO) -> tuple[int, int]:
  """(dominant, contextual) counts for budget k: round(k * ratio) dominant, >= 1 contextual if k >= 2."""
  if not 0.0 < dominant_ratio <= 1.0:
    raise ValueError(f'dominant_ratio={dominant_ratio!r} must be in (0, 1].')
  d = min(max(round(k * dominant_ratio), 1), k)
  if k >= 2 and d == k:
    d = k - 1
  return d, k - d


def prune(ctx: base.PruneContext, k: int, *,
          dominant_ratio: float = DOMINANT_RATIO) -> base.Kept:
  """Keeps dominant tokens by [CLS] attention and merges the rest into contextual tokens."""
  n = ctx.num_tokens
  base.check_k(k, n)
  d, c = split_budget(k, dominant_ratio)
  dominant = base.top_k_indices(ctx.cls_attn, d)  # (B, d)
  if c == 0:
    return base.gather_kept(ctx.tokens, dominant)

  rest = base.complement_indices(dominant, n)  # (B, R) non-dominant tokens in patch order
  r = n - d
  step = max(1, r // c)
  target_pos = np.arange(c) * step  # static, < R since R >= c
  other_pos = np.setdiff1d(np.arange(r), target_pos)  # static, R - c positions
  targets = rest[:, target_pos]  # (B, c)
  others = rest[:, other_pos]  # (B, R - c)

  def take(x, idx):  # x (B, N, F), idx (B, M) -> (B, M, F)
    return jnp.take_along_axis(x, idx[..., None], axis=1)

  target_tokens = take(ctx.tokens, targets)  # (B, c, D)
  if other_pos.size:
    sim = base.cosine_similarity(take(ctx.features, others), take(ctx.features, targets))
    assign = jax.nn.one_hot(jnp.argmax(sim, axis=-1), c, dtype=ctx.tokens.dtype)  # (B, R-c, c)
    sums = jnp.einsum('bmc,bmd->bcd', assign, take(ctx.tokens, others),
                      precision=jax.lax.Precision.HIGHEST)  # (B, c, D)
    counts = jnp.maximum(assign.sum(axis=1), 1.0)  # (B, c), as the released clamp(min=1)
    contextual = target_tokens + sums / counts[..., None]  # (B, c, D): target + mean(assigned)
  else:
    contextual = target_tokens

  index = jnp.concatenate([dominant, targets], axis=1)  # (B, k), disjoint sets
  tokens = jnp.concatenate([take(ctx.tokens, dominant), contextual], axis=1)  # (B, k, D)
  order = jnp.argsort(index, axis=-1)  # (B, k)
  return base.Kept(tokens=jnp.take_along_axis(tokens, order[..., None], axis=1),
                   index=jnp.take_along_axis(index, order, axis=1))
