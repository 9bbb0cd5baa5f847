"""FasterVLM: keep the k tokens the vision [CLS] token attends to most.

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
Faster", Zhang et al., arXiv 2412.01818 (v1; v2 of the same id is VisPruner).

Deviations: none in the rule. The paper reads [CLS] attention from the penultimate ViT layer (the one
LLaVA takes features from), averaged over heads; we use whatever `ctx.cls_attn` the vision encoder
provides. Ties go to the lower patch index.
"""

from gripjax.pruning import base


def prune(ctx: base.PruneContext, k: int) -> base.Kept:
  """Keeps the top-k tokens by [CLS] attention, before the LM, in their original order."""
  base.check_k(k, ctx.num_tokens)
  return base.gather_kept(ctx.tokens, base.top_k_indices(ctx.cls_attn, k))
