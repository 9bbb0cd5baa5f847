"""PyramidDrop: drop visual tokens in stages, a pyramid from N down to k, ranked by the last token.

Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction", Xing et al., arXiv 2410.17247 (CVPR 2025). Port of the released code:
github.com/Cooperx521/PyramidDrop, `llava/model/modeling_llama_pdrop.py` (`pdrop_rank_drop`).

Rule (as the released code computes it): split the LM into S stages at layers depth * s / S
(s = 1 .. S - 1). Stage 0 runs on all N visual tokens. At the boundary into layer l, the query of the
last instruction token and the keys of every slot are computed with layer l's own input norm, q/k
projections and RoPE on the sequence that reaches it; the softmax row (causal mask), averaged over
heads, ranks the visual tokens still present, and only the top ones go on through layer l onwards
(physically dropped, not masked). The answer is read at the last slot. We obtain that row by running
layer l's attention over the longer sequence and discarding its output (`rank_layer='next'`).

Deviations from the released code:
  - Budget. The paper fixes the ratio lambda kept at every boundary (0.5 with S = 4) and reports the
    average token count that results. We fix the final k (comparability with pre-LM pruners at k):
    the counts after the boundaries are geometric from N down to k, round(N * (k / N) ** (s / (S - 1))),
    so the ratio per boundary is lambda = (k / N) ** (1 / (S - 1)); for k = N * 0.5 ** 3 and S = 4
    this is exactly the paper's schedule. `inlm.inlm_average_tokens` gives the average count.
  - Positions. The released code renumbers the survivors' position ids contiguously after each drop:
    our 'renumber' mode; 'keep' (the survivors keep their positions) is offered for comparison.
  - Stages. S is clipped to depth so every stage has at least one layer (tiny models). Needs depth >= 2.
Ties go to the lower patch index.
"""

import jax

from gripjax.pruning import base
from gripjax.pruning import inlm

IN_LM = True
DEFAULT_STAGES = 4


def schedule(n: int, k: int, depth: int, num_stages: int = DEFAULT_STAGES) -> inlm.Drops:
  """Drops at the stage boundaries with counts geometric from N to k: ((layer, count), ...)."""
  base.check_k(k, n)
  inlm.check_int('depth', depth, 2)
  inlm.check_int('pyramiddrop num_stages', num_stages, 2)
  s_total = min(num_stages, depth)
  drops, prev = [], n
  for s in range(1, s_total):
    count = k if s == s_total - 1 else round(n * (k / n) ** (s / (s_total - 1)))
    count = min(max(count, k), prev)
    drops.append((depth * s // s_total, count))
    prev = count
  return inlm.check_drops(drops, n, k, depth)


def visual_scores(attn: jax.Array, num_visual: int, prefix_len: int = inlm.DEFAULT_PREFIX_LEN) -> jax.Array:
  """Attention the last instruction token pays each visual slot, mean over heads: (B, H, L, L) -> (B, n).

  `attn` is the attention of the first layer after the boundary, over the sequence before the drop;
  the visual slots follow `prefix_len` prefix slots.
  """
  return inlm.last_token_visual_attention(attn, num_visual, prefix_len)


# Keeps the `count` visual slots with the highest `visual_scores` (an `inlm.Select`).
_select = inlm.select_by_last_token_attention


def run_staged(lm: inlm.LmHandle, visual, text_ids, text_valid, k: int, position_mode=None, *,
               num_stages: int = DEFAULT_STAGES, text_embeds=None, prefix_ids=None,
               prefix_valid=None) -> inlm.InLmResult:
  """PyramidDrop with its per-layer length trace: -> InLmResult(logits (B, V), index (B, k), trace)."""
  drops = schedule(visual.shape[1], k, lm.config.llm.depth, num_stages)
  return inlm.run_schedule(lm, visual, text_ids, text_valid, position_mode, drops, _select, text_embeds,
                           rank_layer='next', prefix_ids=prefix_ids, prefix_valid=prefix_valid)


def prune_in_lm(lm: inlm.LmHandle, visual, text_ids, text_valid, k: int, position_mode=None, *,
                num_stages: int = DEFAULT_STAGES, text_embeds=None, prefix_ids=None, prefix_valid=None):
  """PyramidDrop inside the LM -> (answer_logits (B, V), kept_index (B, k) int32 sorted).

  Args:
    lm: the VLM handle (model + params).
    visual: (B, N, D) all projected visual tokens.
    text_ids: (B, T) int, left-padded; text_valid: (B, T) bool.
    k: static number of visual tokens in the last stage.
    position_mode: 'keep' | 'renumber' | None (the model config's).
    num_stages: S (clipped to depth).
    text_embeds: optional (B, T, D) instead of embedding text_ids.
    prefix_ids, prefix_valid: optional (B, P) text before the image, left-padded (`VLM.assemble`);
      None: <bos> alone.
  """
  out = run_staged(lm, visual, text_ids, text_valid, k, position_mode, num_stages=num_stages,
                   text_embeds=text_embeds, prefix_ids=prefix_ids, prefix_valid=prefix_valid)
  return out.logits, out.index


def prune(ctx: base.PruneContext, k: int) -> base.Kept:
  """Not a pre-LM pruner: raises a ValueError pointing to `gripjax.pruning.inlm.run`."""
  inlm.not_a_pre_lm_pruner('pyramiddrop', ctx, k)
