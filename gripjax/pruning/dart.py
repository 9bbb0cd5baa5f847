"""DART: duplication-aware token reduction around a few pivot tokens, inside the LM.

Paper: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
Wen et al., arXiv 2502.11494. Port of the released code: github.com/ZichenWen1/DART, LLaVA-1.5
`modeling_llama.py` (`get_retained_image_token` and the `layer_idx == K` branch of the decoder loop;
the same rule as llmc's `token_reduction/dart.py`).

Rule (as the released code computes it, LLaVA setting K = 2, 4 image + 4 text pivots):
  1. Run layers [0, K) on the full sequence.
  2. Pivots: the P_img visual tokens and the P_txt text tokens (the tokens after the image) with the
     largest L1 norm of their layer-(K-1) keys (after RoPE, all heads concatenated), i.e. the keys of
     the last layer before the drop.
  3. State for similarity: the final RMSNorm (`norm`) of the hidden states entering layer K.
  4. Pivot by pivot, the not-yet-kept visual tokens least cosine-similar to that pivot's state are
     added (its near-duplicates are left out); already kept tokens are excluded from later picks.
  5. The text pivots are not visual tokens: the kept visual set is the image pivots plus every
     pivot's picks. Layers [K, depth) run on `prefix + kept + text`, physically shorter; the released
     code keeps the survivors' position ids (our 'keep' mode; 'renumber' is also available).

Deviations from the released code:
  - Budget. The released code gives every pivot max_num_trunction // (P_img + P_txt) picks, so it
    keeps about P_img + max_num_trunction tokens. We keep exactly k: P_img = min(4, k) image pivots,
    and the k - P_img other slots are split across the P_img + P_txt pivots as evenly as possible,
    the first pivots taking the remainder.
  - Pivot order. The released code walks the pivots in Python-set order; we walk the image pivots by
    increasing patch index, then the text pivots by increasing position.
  - Padding. Text pivots are chosen among real (non-padding) text tokens; an example with fewer real
    text tokens than P_txt takes padding slots as its last text pivots, which still pick their quota
    (so the budget stays exact; if the text has fewer than P_txt slots at all, the last pivot also
    takes the missing pivots' quotas). GRIP-Bench questions are longer than 4 tokens.
  - K = 2 is clipped to depth - 1 so at least one layer runs after the drop (tiny models); needs
    depth >= 2. Ties go to the lower index.
Cost: layers [0, K) see all N visual tokens (as FastV), counted by `inlm.inlm_prefill_flops`.
"""

import jax
import jax.numpy as jnp

from gripjax.pruning import base
from gripjax.pruning import inlm

IN_LM = True
DEFAULT_LAYER = 2
PIVOT_IMAGE = 4
PIVOT_TEXT = 4


def drop_layer(depth: int, layer: int = DEFAULT_LAYER) -> int:
  """K actually used: `layer` clipped to depth - 1 (at least one layer must run after the drop)."""
  inlm.check_int('depth', depth, 2)
  inlm.check_int('dart layer K', layer, 1)
  return min(layer, depth - 1)


def schedule(n: int, k: int, depth: int, layer: int = DEFAULT_LAYER, pivot_image: int = PIVOT_IMAGE,
             pivot_text: int = PIVOT_TEXT) -> inlm.Drops:
  """One drop from N to k at layer K: ((K, k),)."""
  del pivot_image, pivot_text  # The pivots do not change the lengths.
  base.check_k(k, n)
  return inlm.check_drops(((drop_layer(depth, layer), k),), n, k, depth)


def quotas(k: int, pivot_image: int = PIVOT_IMAGE, pivot_text: int = PIVOT_TEXT) -> tuple[int, ...]:
  """Picks per pivot (image pivots first): the k - min(pivot_image, k) non-pivot slots split evenly."""
  inlm.check_int('dart pivot_image', pivot_image, 1)
  inlm.check_int('dart pivot_text', pivot_text, 0)
  p_img = min(pivot_image, k)
  total, rest = p_img + pivot_text, k - p_img
  return tuple(rest // total + (1 if j < rest % total else 0) for j in range(total))


def select_visual(visual_state, text_state, visual_key_l1, text_key_l1, text_valid, k: int,
                  pivot_image: int = PIVOT_IMAGE, pivot_text: int = PIVOT_TEXT) -> jax.Array:
  """DART's kept visual slots.

  Args:
    visual_state: (B, n, D) normed hidden states of the visual slots; text_state: (B, T, D) of the text.
    visual_key_l1: (B, n) L1 norms of the visual slots' keys; text_key_l1: (B, T) of the text slots'.
    text_valid: (B, T) bool, False on padding.
    k: static number of visual slots kept, 1 <= k <= n.
  Returns:
    (B, k) int32 visual slots, sorted ascending, unique.
  """
  b, n, _ = visual_state.shape
  t = text_state.shape[1]
  base.check_k(k, n)
  per_pivot = quotas(k, pivot_image, pivot_text)
  p_img = min(pivot_image, k)
  p_txt = min(pivot_text, t)
  rows = jnp.arange(b)[:, None]
  image_pivots = jnp.sort(base.top_k_indices(visual_key_l1, p_img), axis=-1)  # (B, P_img)
  take = lambda x, i: jnp.take_along_axis(x, i[..., None], axis=1)
  states = [take(visual_state, image_pivots)]  # pivot states, image pivots first
  if p_txt:
    text_pivots = jnp.sort(base.top_k_indices(
        jnp.where(text_valid, text_key_l1, -jnp.inf), p_txt), axis=-1)  # (B, P_txt)
    states.append(take(text_state, text_pivots))
  pivot_state = jnp.concatenate(states, axis=1)  # (B, P, D)
  sim = base.cosine_similarity(pivot_state, visual_state)  # (B, P, n)
  kept = jnp.zeros((b, n), bool).at[rows, image_pivots].set(True)  # (B, n)
  picks = [image_pivots]
  for j, quota in enumerate(per_pivot[:pivot_state.shape[1]]):
    if quota == 0:
      continue
    pick = base.top_k_indices(jnp.where(kept, -jnp.inf, -sim[:, j]), quota)  # least similar first
    kept = kept.at[rows, pick].set(True)
    picks.append(pick)
  missing = k - sum(p.shape[1] for p in picks)  # > 0 only if T < pivot_text: fill by the last rule
  if missing:
    picks.append(base.top_k_indices(jnp.where(kept, -jnp.inf, -sim[:, -1]), missing))
  return jnp.sort(jnp.concatenate(picks, axis=1), axis=-1).astype(jnp.int32)


def make_select(pivot_image: int = PIVOT_IMAGE, pivot_text: int = PIVOT_TEXT):
  """The `inlm.Select` of DART (it needs the keys: run it with `run_schedule(..., with_keys=True)`)."""

  def select(h, attn, count, text_valid, *, keys, norm, layout=None):
    del attn
    layout = inlm.sequence_layout(h, text_valid, layout)
    vis, text = layout.visual, layout.text
    key_l1 = jnp.sum(jnp.abs(keys.astype(jnp.float32)), axis=(-2, -1))  # (B, L): all heads
    state = norm(h).astype(jnp.float32)  # (B, L, D)
    keep = select_visual(state[:, vis], state[:, text], key_l1[:, vis], key_l1[:, text],
                         text_valid, count, pivot_image, pivot_text)
    return keep, None

  return select


def run_staged(lm: inlm.LmHandle, visual, text_ids, text_valid, k: int, position_mode=None, *,
               layer: int = DEFAULT_LAYER, pivot_image: int = PIVOT_IMAGE, pivot_text: int = PIVOT_TEXT,
               text_embeds=None, prefix_ids=None, prefix_valid=None) -> inlm.InLmResult:
  """DART with its per-layer length trace: -> InLmResult(logits (B, V), index (B, k), trace)."""
  drops = schedule(visual.shape[1], k, lm.config.llm.depth, layer)
  return inlm.run_schedule(lm, visual, text_ids, text_valid, position_mode, drops,
                           make_select(pivot_image, pivot_text), text_embeds, with_keys=True,
                           prefix_ids=prefix_ids, prefix_valid=prefix_valid)


def prune_in_lm(lm: inlm.LmHandle, visual, text_ids, text_valid, k: int, position_mode=None, *,
                layer: int = DEFAULT_LAYER, pivot_image: int = PIVOT_IMAGE, pivot_text: int = PIVOT_TEXT,
                text_embeds=None, prefix_ids=None, prefix_valid=None):
  """DART inside the LM -> (answer_logits (B, V), kept_index (B, k) int32 sorted).

  Args:
    lm: the VLM handle (model + params).
    visual: (B, N, D) all projected visual tokens.
    text_ids: (B, T) int, left-padded; text_valid: (B, T) bool.
    k: static number of visual tokens kept after layer K.
    position_mode: 'keep' | 'renumber' | None (the model config's).
    layer: K, the first layer that runs on the pruned sequence (clipped to depth - 1).
    pivot_image, pivot_text: pivot counts (4 and 4 in the released LLaVA scripts).
    text_embeds: optional (B, T, D) instead of embedding text_ids.
    prefix_ids, prefix_valid: optional (B, P) text before the image, left-padded (`VLM.assemble`);
      None: <bos> alone.
  """
  out = run_staged(lm, visual, text_ids, text_valid, k, position_mode, layer=layer, pivot_image=pivot_image,
                   pivot_text=pivot_text, text_embeds=text_embeds, prefix_ids=prefix_ids,
                   prefix_valid=prefix_valid)
  return out.logits, out.index


def prune(ctx: base.PruneContext, k: int) -> base.Kept:
  """Not a pre-LM pruner: raises a ValueError pointing to `gripjax.pruning.inlm.run`."""
  inlm.not_a_pre_lm_pruner('dart', ctx, k)
