"""SparseVLM: question-guided sparsification inside the LM, with recycling of the deleted tokens.

Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
Zhang et al., arXiv 2410.04417 (ICML 2025). Released code: github.com/Gumpest/SparseVLMs,
`llava/model/language_model/modelling_sparse_llama.py` and `score.py`; the port follows its rule in a
simplified, budget-exact form (the deviations below).

Rule (ours): the raters are chosen once, at the LM input, as the released code does: with visual tokens
v_i and embeddings t_j of the text after the image (the question; a chat template's prefix before
the image is never a rater), m_j = mean_i softmax_j(v_i . t_j) (the softmax over the real text
tokens), and the raters are the real text tokens with m_j > mean_j m_j. At the sparsification layer S
(default 2) each visual token is scored by the attention the raters pay it (mean over raters and
heads, the released `attn_postprocess_topk`). The top k - r visual tokens are kept; the deleted ones are
recycled: the r highest-scoring deleted tokens are anchors, the top `recycle_frac` of the deleted
tokens (by score, at least r) are each assigned to their most cosine-similar anchor (hidden states at
layer S), and each anchor's group is averaged into one recycled token. Kept + recycled = k visual
tokens go on, physically shorter, through layers [S, depth). The answer is read at the last slot.

Deviations from the released code (kept simple, and budget-exact so it compares with pre-LM pruners at k):
  - Layers. The paper sparsifies progressively at several layers; we sparsify once, at layer S
    (default 2, clipped to depth - 1 so one layer runs after it), using the attention probs of layer
    S - 1. Needs depth >= 2.
  - Raters. Padding tokens are excluded from the softmax and are never raters; if no token is above
    the mean (e.g. a single real token), every real text token rates (the released code would
    average over an empty set).
  - Count. The released code keeps a fixed count per sparsification layer (e.g. 66, 30, 17 at layers
    2, 6, 15 for 64 tokens; the paper also describes a rank-adaptive count); we delete exactly enough
    to end at k.
  - Recycling. The paper clusters the recycled tokens (density-peak clustering) and merges each
    cluster; we use the r = min(max(1, k // 8), k - 1) highest-scoring deleted tokens as cluster
    centres and assign by cosine similarity (no recycling when k == 1 or nothing is deleted). The
    recycled tokens count INSIDE the budget k, and each sits at its anchor's slot: `kept_index` holds
    the anchor's patch index, so indices stay sorted and unique and positions stay defined.
Ties go to the lower patch index.
"""

import math

import jax
import jax.numpy as jnp

from gripjax.pruning import base
from gripjax.pruning import inlm

IN_LM = True
DEFAULT_LAYER = 2
DEFAULT_RECYCLE_FRAC = 0.3


def sparsify_layer(depth: int, layer: int = DEFAULT_LAYER) -> int:
  """Layer S actually used: `layer` clipped to depth - 1."""
  inlm.check_int('depth', depth, 2)
  inlm.check_int('sparsevlm layer', layer, 1)
  return min(layer, depth - 1)


def schedule(n: int, k: int, depth: int, layer: int = DEFAULT_LAYER,
             recycle_frac: float = DEFAULT_RECYCLE_FRAC) -> inlm.Drops:
  """One drop from N to k (kept + recycled) at layer S: ((S, k),)."""
  del recycle_frac  # Recycling does not change the lengths.
  base.check_k(k, n)
  return inlm.check_drops(((sparsify_layer(depth, layer), k),), n, k, depth)


def num_recycled(n: int, k: int) -> int:
  """r, the recycled tokens inside the budget k: min(max(1, k // 8), k - 1), and 0 when k == n."""
  return 0 if k == n else min(max(1, k // 8), k - 1)


def text_raters(visual: jax.Array, text: jax.Array, text_valid: jax.Array) -> jax.Array:
  """The released rater rule at the LM input.

  m_j = (1/n) sum_i softmax_j(v_i . t_j) over the real text tokens j; raters: real j with m_j > mean m.

  Args:
    visual: (B, n, D) visual tokens entering the LM; text: (B, T, D) text embeddings.
    text_valid: (B, T) bool, False on the left padding.
  Returns:
    (B, T) bool raters (every real token when none is above the mean).
  """
  text_valid = text_valid.astype(bool)
  logits = jnp.einsum('bnd,btd->bnt', visual.astype(jnp.float32), text.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)  # (B, n, T)
  logits = jnp.where(text_valid[:, None, :], logits, -jnp.inf)
  m = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)  # (B, T)
  valid = text_valid.astype(jnp.float32)
  mean = jnp.sum(m * valid, axis=1, keepdims=True) / jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
  raters = text_valid & (m > mean)  # (B, T)
  return jnp.where(jnp.any(raters, axis=1, keepdims=True), raters, text_valid)


def rater_scores(attn: jax.Array, num_visual: int, raters: jax.Array,
                 prefix_len: int = inlm.DEFAULT_PREFIX_LEN) -> jax.Array:
  """Mean attention (over raters and heads) each visual slot receives: (B, H, L, L) -> (B, n) float32.

  Args:
    attn: (B, H, L, L) attention probs, sequence `prefix + visual + text`.
    num_visual: n, the visual slots in that sequence.
    raters: (B, T) bool, the rating text tokens (the text after the image).
    prefix_len: P, the prefix slots before the visual ones (1: <bos> alone).
  """
  layout = inlm.SequenceLayout(prefix_len, num_visual, raters.shape[1])
  a = inlm.head_mean(attn)  # (B, L, L)
  text_to_visual = a[:, layout.text, layout.visual]  # (B, T, n)
  w = raters.astype(jnp.float32)
  return jnp.einsum('bt,btn->bn', w, text_to_visual) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1)


def recycle(visual_h: jax.Array, scores: jax.Array, deleted: jax.Array, r: int, pool: int):
  """Merges deleted visual tokens into r recycled tokens.

  Args:
    visual_h: (B, n, D) hidden states of the visual slots.
    scores: (B, n) rater scores.
    deleted: (B, n) bool, the slots not kept by score.
    r: static number of recycled tokens (anchors), r <= pool <= number deleted.
    pool: static number of deleted tokens (the highest-scoring ones) merged into the anchors.
  Returns:
    anchors (B, r) int32 slots (the r highest-scoring deleted tokens) and merged (B, r, D), the mean
    of the pool tokens assigned to each anchor by cosine similarity (an anchor is in its own group).
  """
  _, order = jax.lax.top_k(jnp.where(deleted, scores, -jnp.inf), pool)  # (B, P), best first
  order = order.astype(jnp.int32)
  anchors = order[:, :r]  # (B, r)
  pool_h = jnp.take_along_axis(visual_h, order[..., None], axis=1).astype(jnp.float32)  # (B, P, D)
  sim = base.cosine_similarity(pool_h, pool_h[:, :r])  # (B, P, r)
  # An anchor is most similar to itself; pin it there so exact ties between anchors cannot move it.
  sim = jnp.where(jnp.arange(pool)[:, None] == jnp.arange(r)[None, :], jnp.inf, sim)
  assign = jax.nn.one_hot(jnp.argmax(sim, axis=-1), r, dtype=jnp.float32)  # (B, P, r)
  merged = jnp.einsum('bpr,bpd->brd', assign, pool_h) / jnp.sum(assign, axis=1)[..., None]  # (B, r, D)
  return anchors, merged.astype(visual_h.dtype)


def make_select(r: int, recycle_frac: float, raters: jax.Array):
  """The `inlm.Select` of SparseVLM with r recycled tokens and the (B, T) bool `raters`."""

  def select(h, attn, count, text_valid, *, layout=None):
    layout = inlm.sequence_layout(h, text_valid, layout)
    n = layout.num_visual
    scores = rater_scores(attn, n, raters, layout.prefix_len)  # (B, n)
    if r == 0 or count == n:
      return inlm.top_k_sorted(scores, count), None
    top = base.top_k_indices(scores, count - r)  # (B, count - r)
    b = h.shape[0]
    deleted = jnp.ones((b, n), bool).at[jnp.arange(b)[:, None], top].set(False)  # (B, n)
    num_deleted = n - (count - r)
    pool = min(num_deleted, max(r, math.ceil(recycle_frac * num_deleted)))
    visual_h = h[:, layout.visual]  # (B, n, D)
    anchors, merged = recycle(visual_h, scores, deleted, r, pool)
    slots = jnp.concatenate([top, anchors], axis=1)  # (B, count), unique
    tokens = jnp.concatenate([jnp.take_along_axis(visual_h, top[..., None], axis=1), merged], axis=1)
    order = jnp.argsort(slots, axis=1)  # (B, count) into increasing slot order
    keep = jnp.take_along_axis(slots, order, axis=1)
    tokens = jnp.take_along_axis(tokens, order[..., None], axis=1)  # (B, count, D)
    return keep, tokens

  return select


def run_staged(lm: inlm.LmHandle, visual, text_ids, text_valid, k: int, position_mode=None, *,
               layer: int = DEFAULT_LAYER, recycle_frac: float = DEFAULT_RECYCLE_FRAC,
               text_embeds=None, prefix_ids=None, prefix_valid=None) -> inlm.InLmResult:
  """SparseVLM with its per-layer length trace: -> InLmResult(logits (B, V), index (B, k), trace)."""
  if not 0.0 <= float(recycle_frac) <= 1.0:
    raise ValueError(f'sparsevlm recycle_frac={recycle_frac!r}: expected a fraction in [0, 1].')
  n = visual.shape[1]
  drops = schedule(n, k, lm.config.llm.depth, layer)
  text = lm.apply('embed_text', text_ids) if text_embeds is None else text_embeds  # (B, T, D)
  raters = text_raters(visual, text, text_valid)  # (B, T), chosen at the LM input
  select = make_select(num_recycled(n, k), float(recycle_frac), raters)
  return inlm.run_schedule(lm, visual, text_ids, text_valid, position_mode, drops, select, text_embeds,
                           prefix_ids=prefix_ids, prefix_valid=prefix_valid)


def prune_in_lm(lm: inlm.LmHandle, visual, text_ids, text_valid, k: int, position_mode=None, *,
                layer: int = DEFAULT_LAYER, recycle_frac: float = DEFAULT_RECYCLE_FRAC, text_embeds=None,
                prefix_ids=None, prefix_valid=None):
  """SparseVLM inside the LM -> (answer_logits (B, V), kept_index (B, k) int32 sorted).

  Args:
    lm: the VLM handle (model + params).
    visual: (B, N, D) all projected visual tokens.
    text_ids: (B, T) int, left-padded; text_valid: (B, T) bool.
    k: static number of visual tokens (kept + recycled) after layer S.
    position_mode: 'keep' | 'renumber' | None (the model config's).
    layer: S, the first layer that runs on the sparsified sequence (clipped to depth - 1).
    recycle_frac: fraction of the deleted tokens (highest scores first) merged into the recycled ones.
    text_embeds: optional (B, T, D) instead of embedding text_ids.
    prefix_ids, prefix_valid: optional (B, P) text before the image, left-padded (`VLM.assemble`);
      None: <bos> alone.
  Returns:
    kept_index: for recycled tokens, the patch index of their anchor.
  """
  out = run_staged(lm, visual, text_ids, text_valid, k, position_mode, layer=layer,
                   recycle_frac=recycle_frac, text_embeds=text_embeds, prefix_ids=prefix_ids,
                   prefix_valid=prefix_valid)
  return out.logits, out.index


def prune(ctx: base.PruneContext, k: int) -> base.Kept:
  """Not a pre-LM pruner: raises a ValueError pointing to `gripjax.pruning.inlm.run`."""
  inlm.not_a_pre_lm_pruner('sparsevlm', ctx, k)
