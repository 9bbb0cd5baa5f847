"""FasterVLM: keep the k tokens the vision [CLS] token attends to most.

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
Faster", Zhang et al., arXiv 2412.01818 (v1; v2 of the same id is VisPruner). Port of the released
code: github.com/Theia-4869/FasterVLM, `llava/model/llava_arch.py` (`encode_images`): the [CLS]
attention of the feature layer (LLaVA's penultimate ViT layer), averaged over heads, top-k, the kept
tokens in their original order. Our `ctx.cls_attn` is that quantity (see `models/vit.py`).

Deviations from the released code: the budget is the kept count k itself (the released code keeps
round(N (1 - R)) for a reduction ratio R); ties go to the lower patch index (torch.topk leaves them
unspecified).
"""

from gripjax.pruning import base


def prune(ctx: base.PruneContext, k: int) -> base.Kept:
  """Keeps the top-k tokens by [CLS] attention, before the LM, in their original order."""
  base.check_k(k, ctx.num_tokens)
  return base.gather_kept(ctx.tokens, base.top_k_indices(ctx.cls_attn, k))
