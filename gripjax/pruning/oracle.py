"""Oracle: keep the answer-region patches first, then fill the budget by [CLS] attention.

A reference row (like `full`), not a baseline: it reads the benchmark's label of which patches
hold the answer (`region_mask`, GRIP-Bench's `region`), which no deployable pruner can see. It
shows what a question-aware selection could reach at a budget: on GRIP-Bench dense the answer needs
at most four patches, so from k = 4 on the oracle keeps every one of them.

Rule, per example: every answer-region patch ranks above every other patch; the region patches
among themselves, and the rest after them, rank by the vision [CLS] attention (`ctx.cls_attn`);
the top k are kept in patch order. When the region has more than k patches the oracle keeps the k
of them the [CLS] token attends to most.

Why [CLS] attention for the fill (FasterVLM's rule) rather than DivPrune's diversity: it is
agent-free, deterministic and cheap, and it is the plain saliency ranking the question-agnostic
pruners start from, so oracle minus `fastervlm` at a budget is exactly the value of knowing the
answer region, with nothing else changed. Ties go to the lower patch index (as `fastervlm`).

The region reaches the pruner through `RegionContext`, a `PruneContext` with the (B, N) bool
`region_mask` of the batch (gripjax/eval/evaluate.py builds one for this method).
"""

import flax
import jax
import jax.numpy as jnp

from gripjax.pruning import base

# Added to the [CLS] attention (a distribution over N patches, so in [0, 1]) of region patches:
# larger than any attention difference, so every region patch outranks every other one.
_REGION_BONUS = 2.0


@flax.struct.dataclass
class RegionContext(base.PruneContext):
  """A PruneContext that also carries the answer region.

  Attributes:
    region_mask: (B, N) bool, True on the patches that hold the answer (may be all False).
  """
  region_mask: jax.Array | None = None


def scores(cls_attn: jax.Array, region_mask: jax.Array) -> jax.Array:
  """(B, N) oracle ranking scores: [CLS] attention, plus _REGION_BONUS on answer-region patches."""
  return cls_attn.astype(jnp.float32) + _REGION_BONUS * region_mask.astype(jnp.float32)


def prune(ctx: base.PruneContext, k: int) -> base.Kept:
  """Keeps the answer-region patches first, then the top [CLS]-attention patches, up to k.

  Args:
    ctx: a `RegionContext` (tokens (B, N, D), cls_attn (B, N), region_mask (B, N) bool).
    k: static number of tokens to keep, 1 <= k <= N.

  Returns:
    Kept tokens (B, k, D) and their sorted source indices (B, k).
  """
  base.check_k(k, ctx.num_tokens)
  region = getattr(ctx, 'region_mask', None)
  if region is None:
    raise ValueError('the oracle pruner needs the answer region: expected an oracle.RegionContext '
                     'with region_mask (B, N) bool, got a context without one (ctx type '
                     f'{type(ctx).__name__}).')
  if region.shape != ctx.cls_attn.shape:
    raise ValueError(f'region_mask has shape {region.shape}: expected (B, N) = '
                     f'{ctx.cls_attn.shape}, like cls_attn.')
  return base.gather_kept(ctx.tokens, base.top_k_indices(scores(ctx.cls_attn, region), k))
