"""FastV: after layer K, keep the visual tokens the last text token attends to most.

Paper: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", Chen et al., arXiv 2403.06764 (ECCV 2024). Port of the released code:
github.com/pkunlp-icler/FastV, `src/transformers/src/transformers/models/llama/modeling_llama.py`
(the `USE_FAST_V` branch of `LlamaModel.forward`, inplace variant).

Rule (as the released code computes it): run layers [0, K) on the full sequence; take the attention
probs of layer K - 1, average them over heads, and read the row of the LAST token of the sequence
(`last_layer_attention_avg[-1]`: the last prompt token, the one that produces the answer); keep the
visual tokens with the highest scores in that row, in their original order, and run layers
[K, depth) on `prefix + kept + text`, physically shorter, with the survivors' position ids
(`position_ids = keep_indexs`). The answer is read at the last slot. `visual_scores` is that rule.

Deviations from the released code:
  - Budget. The released code keeps ATTENTION_RANK tokens (from a drop ratio R); we keep exactly k
    (static), so the LM's last layers see exactly k visual tokens, comparable with pre-LM pruners at k.
  - K. Default K = 2 (the released default); clipped to depth - 1 so at least one layer runs after the
    drop (tiny models). Needs depth >= 2.
  - Positions. 'keep' is the released behaviour; 'renumber' recomputes them contiguously after the
    drop (see inlm.py), offered for comparison.
  - Ties go to the lower patch index.
"""

import jax

from gripjax.pruning import base
from gripjax.pruning import inlm

IN_LM = True
DEFAULT_LAYER = 2


def drop_layer(depth: int, layer: int = DEFAULT_LAYER) -> int:
  """K actually used: `layer` clipped to depth - 1 (at least one layer must run after the drop)."""
  inlm.check_int('depth', depth, 2)
  inlm.check_int('fastv layer K', layer, 1)
  return min(layer, depth - 1)


def schedule(n: int, k: int, depth: int, layer: int = DEFAULT_LAYER) -> inlm.Drops:
  """One drop from N to k at layer K: ((K, k),)."""
  base.check_k(k, n)
  return inlm.check_drops(((drop_layer(depth, layer), k),), n, k, depth)


def visual_scores(attn: jax.Array, num_visual: int, prefix_len: int = inlm.DEFAULT_PREFIX_LEN) -> jax.Array:
  """FastV's score: attention the last text token pays each visual slot, mean over heads.

  (B, H, L, L) -> (B, num_visual); the visual slots follow `prefix_len` prefix slots.
  """
  return inlm.last_token_visual_attention(attn, num_visual, prefix_len)


# Keeps the `count` visual slots with the highest `visual_scores` (an `inlm.Select`).
_select = inlm.select_by_last_token_attention


def run_staged(lm: inlm.LmHandle, visual, text_ids, text_valid, k: int, position_mode=None, *,
               layer: int = DEFAULT_LAYER, text_embeds=None, prefix_ids=None,
               prefix_valid=None) -> inlm.InLmResult:
  """FastV with its per-layer length trace: -> InLmResult(logits (B, V), index (B, k), trace)."""
  drops = schedule(visual.shape[1], k, lm.config.llm.depth, layer)
  return inlm.run_schedule(lm, visual, text_ids, text_valid, position_mode, drops, _select, text_embeds,
                           prefix_ids=prefix_ids, prefix_valid=prefix_valid)


def prune_in_lm(lm: inlm.LmHandle, visual, text_ids, text_valid, k: int, position_mode=None, *,
                layer: int = DEFAULT_LAYER, text_embeds=None, prefix_ids=None, prefix_valid=None):
  """FastV inside the LM -> (answer_logits (B, V), kept_index (B, k) int32 sorted).

  Args:
    lm: the VLM handle (model + params).
    visual: (B, N, D) all projected visual tokens.
    text_ids: (B, T) int, left-padded; text_valid: (B, T) bool.
    k: static number of visual tokens kept after layer K (what the later layers see).
    position_mode: 'keep' | 'renumber' | None (the model config's).
    layer: K, the first layer that runs on the pruned sequence (clipped to depth - 1).
    text_embeds: optional (B, T, D) instead of embedding text_ids.
    prefix_ids, prefix_valid: optional (B, P) text before the image, left-padded (`VLM.assemble`);
      None: <bos> alone.
  """
  out = run_staged(lm, visual, text_ids, text_valid, k, position_mode, layer=layer, text_embeds=text_embeds,
                   prefix_ids=prefix_ids, prefix_valid=prefix_valid)
  return out.logits, out.index


def prune(ctx: base.PruneContext, k: int) -> base.Kept:
  """Not a pre-LM pruner: raises a ValueError pointing to `gripjax.pruning.inlm.run`."""
  inlm.not_a_pre_lm_pruner('fastv', ctx, k)
