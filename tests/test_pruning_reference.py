"""Each pruner on a hand-worked case whose expected selection follows from its released algorithm.

The expected values are literals worked out on paper from the released code's definition (the
arithmetic is in the comments), never by calling the formula under test.

Run: .venv/bin/python -m pytest -q tests/test_pruning_reference.py
"""

import collections
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax import pruning
from gripjax.pruning import base
from gripjax.pruning import cdpruner
from gripjax.pruning import dart
from gripjax.pruning import divprune
from gripjax.pruning import fastv
from gripjax.pruning import inlm
from gripjax.pruning import pyramiddrop
from gripjax.pruning import sparsevlm
from gripjax.pruning import uniform
from gripjax.pruning import vispruner
from gripjax.pruning import visionzip


def unit(degrees):
  """Unit vectors at the given angles (degrees): cos(a_i - a_j) is their cosine similarity."""
  a = np.deg2rad(np.asarray(degrees, np.float64))
  return np.stack([np.cos(a), np.sin(a)], axis=-1).astype(np.float32)


def ctx_of(tokens, features=None, cls_attn=None, question=None, question_mask=None, grid=None):
  """A batch-of-one PruneContext from per-example arrays."""
  tokens = np.asarray(tokens, np.float32)
  n, d = tokens.shape
  features = tokens if features is None else np.asarray(features, np.float32)
  cls_attn = np.full(n, 1.0 / n, np.float32) if cls_attn is None else np.asarray(cls_attn, np.float32)
  question = np.zeros((1, d), np.float32) if question is None else np.asarray(question, np.float32)
  mask = np.ones(len(question), bool) if question_mask is None else np.asarray(question_mask, bool)
  return base.PruneContext(tokens=jnp.asarray(tokens)[None], features=jnp.asarray(features)[None],
                           cls_attn=jnp.asarray(cls_attn)[None], question=jnp.asarray(question)[None],
                           question_mask=jnp.asarray(mask)[None], rng=jax.random.PRNGKey(0),
                           grid=grid or (1, n))


def kept_index(prune, ctx, k, **kwargs):
  return np.asarray(jax.jit(functools.partial(prune, k=k, **kwargs))(ctx).index[0]).tolist()


# --- FasterVLM (Theia-4869/FasterVLM): top-k of the head-mean [CLS] attention. -----------------------

def test_fastervlm_hand_case():
  ctx = ctx_of(np.eye(5), cls_attn=[0.1, 0.4, 0.05, 0.3, 0.15])
  assert kept_index(pruning.get('fastervlm'), ctx, 2) == [1, 3]  # 0.4 and 0.3
  assert kept_index(pruning.get('fastervlm'), ctx, 3) == [1, 3, 4]  # then 0.15
  tied = ctx_of(np.eye(4), cls_attn=[0.2, 0.2, 0.1, 0.2])
  assert kept_index(pruning.get('fastervlm'), tied, 2) == [0, 1]  # ties to the lower index


# --- CDPruner (Theia-4869/CDPruner): negated relevance, similarity of the projected tokens. ----------

# Tokens v0 = e1, v1 = e2, v2 = -e1, v3 = (e1 + e2) / sqrt 2; one real question token q = e1 and a
# padding token (ignored). cos(v, q) = [1, 0, -1, 0.7071]; s = -cos = [-1, 0, 1, -0.7071];
# r = (s + 1 + 1e-6) / 2 = [5e-7, 0.5000005, 1.0000005, 0.1464471].
CD_TOKENS = [[1, 0, 0], [0, 1, 0], [-1, 0, 0], [1, 1, 0]]
CD_QUESTION = [[5, -3, 2], [1, 0, 0]]  # left-padded: the first slot is padding
CD_MASK = [False, True]


def test_cdpruner_relevance_is_negated_and_shifted():
  ctx = ctx_of(CD_TOKENS, question=CD_QUESTION, question_mask=CD_MASK)
  r = np.asarray(cdpruner.relevance(ctx.tokens, ctx.question, ctx.question_mask))[0]
  np.testing.assert_allclose(r, [5e-7, 0.5000005, 1.0000005, 0.1464471], atol=2e-7)


def test_cdpruner_greedy_map_hand_case():
  ctx = ctx_of(CD_TOKENS, question=CD_QUESTION, question_mask=CD_MASK)
  # L_ii = r_i^2 = [2.5e-13, 0.25, 1.0, 0.0214]: the first pick is token 2. The gain of j after {2} is
  # r_j^2 (1 - S_2j^2) with S on the tokens: S_20 = -1 -> 0, S_21 = 0 -> 0.25, S_23 = -0.7071 ->
  # 0.0107; so token 1 is second.
  order = np.asarray(jax.jit(cdpruner.greedy_map, static_argnums=1)(cdpruner.kernel(ctx), 2))[0]
  assert order.tolist() == [2, 1]
  assert kept_index(cdpruner.prune, ctx, 2) == [1, 2]
  # (The +cos relevance min-normalised to 0 would give r = [1, 0.5, 0, 0.854] and keep [0, 3].)
  # Similarity on pre-projector features f1 = f2 (cos 1), f3 orthogonal to f2: after token 2, token
  # 1's gain is 0.25 (1 - 1) = 0 and token 3's is 0.0214 (1 - 0): token 3 is second.
  features = [[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]]
  ctx_f = ctx_of(CD_TOKENS, features=features, question=CD_QUESTION, question_mask=CD_MASK)
  assert kept_index(cdpruner.prune, ctx_f, 2, similarity_on='features') == [2, 3]
  assert kept_index(cdpruner.prune, ctx_f, 2) == [1, 2]  # the default ignores the features


# --- VisionZip (dvlab-research/VisionZip): contextual token = target + mean(assigned). -------------

def test_visionzip_hand_case():
  # 8 tokens, k = 4 with dominant_ratio 0.5: d = 2 dominant, c = 2 contextual.
  # [CLS] attention picks tokens 1 (0.5) and 6 (0.3). The rest in patch order is [0, 2, 3, 4, 5, 7]
  # (R = 6), step = R // c = 3: targets at positions 0 and 3 = tokens 0 and 4; others 2, 3, 5, 7.
  # Features: f0 = e1, f4 = e2; f2, f7 lean to e1 (-> target 0), f3, f5 lean to e2 (-> target 4).
  tokens = np.array([[i, 10.0 * i] for i in range(8)], np.float32)  # t_i = (i, 10 i)
  features = [[1, 0], [0, 0], [1, 0.1], [0.1, 1], [0, 1], [0.2, 1], [0, 0], [1, -0.2]]
  features[1], features[6] = [1, 1], [1, 1]  # dominant: their features do not matter
  attn = [0.02, 0.5, 0.03, 0.04, 0.01, 0.05, 0.3, 0.05]
  kept = jax.jit(functools.partial(visionzip.prune, k=4, dominant_ratio=0.5))(
      ctx_of(tokens, features=features, cls_attn=attn))
  assert np.asarray(kept.index[0]).tolist() == [0, 1, 4, 6]
  # token 0: t0 + (t2 + t7) / 2 = (0, 0) + (4.5, 45); token 4: t4 + (t3 + t5) / 2 = (4, 40) + (4, 40).
  np.testing.assert_allclose(np.asarray(kept.tokens[0]), [[4.5, 45], [1, 10], [8, 80], [6, 60]],
                             atol=1e-5)
  # A target that nothing is assigned to stays itself: all others lean to e1 (target 0).
  features_e1 = [[1, 0], [1, 1], [1, 0.1], [1, 0.1], [0, 1], [1, 0.2], [1, 1], [1, -0.2]]
  kept = jax.jit(functools.partial(visionzip.prune, k=4, dominant_ratio=0.5))(
      ctx_of(tokens, features=features_e1, cls_attn=attn))
  # token 0: t0 + mean(t2, t3, t5, t7) = (0, 0) + (4.25, 42.5); token 4 unchanged.
  np.testing.assert_allclose(np.asarray(kept.tokens[0]), [[4.25, 42.5], [1, 10], [4, 40], [6, 60]],
                             atol=1e-5)
  assert visionzip.split_budget(64) == (54, 10) and visionzip.split_budget(16) == (14, 2)


# --- VisPruner (Theia-4869/VisPruner): <= 8 duplicates per round, residual in attention order. ------

# Features at angles (degrees); attention order (highest first) [5, 2, 7, 0, 3, 6, 1, 4].
VP_ANGLES = [0, 45, 200, 170, 90, 300, 80, 10]
VP_ATTN = [0.10, 0.04, 0.25, 0.08, 0.02, 0.30, 0.06, 0.15]


def test_vispruner_hand_case_released_cap():
  # k = 4: important = int(4 * 0.5) = 2 -> tokens 5, 2; residual [7, 0, 3, 6, 1, 4] must shrink to 2.
  # Round 1: r = min(8, 6 - 2) = 4 >= |A| = 3: A = [7, 3, 1] all removed; list [0, 6, 4].
  # Round 2: r = min(8, 1) = 1; A = [0, 4], B = [6]: scores cos(80) = 0.17, cos(10) = 0.98 ->
  # remove 4; list [0, 6]. Kept {0, 2, 5, 6}.
  ctx = ctx_of(np.eye(8), features=unit(VP_ANGLES), cls_attn=VP_ATTN)
  assert kept_index(vispruner.prune, ctx, 4) == [0, 2, 5, 6]


def test_vispruner_hand_case_one_per_round():
  # Same tokens, one removal per round (the list order matters now):
  # R1: A = [7, 3, 1] vs B = [0, 6, 4]: scores 0.985, 0.174, 0.819 -> drop 7; list [1, 3, 0, 6, 4]
  #     (survivors by decreasing score, then B).
  # R2: A = [1, 0, 4] vs B = [3, 6]: 0.819, 0.174, 0.985 -> drop 4; list [1, 0, 3, 6].
  # R3: A = [1, 3] vs B = [0, 6]: 0.819, 0.0 -> drop 1; list [3, 0, 6].
  # R4: A = [3, 6] vs B = [0]: -0.985, 0.174 -> drop 6; list [3, 0]. Kept {0, 2, 3, 5}.
  ctx = ctx_of(np.eye(8), features=unit(VP_ANGLES), cls_attn=VP_ATTN)
  assert kept_index(vispruner.prune, ctx, 4, max_removed_per_round=1) == [0, 2, 3, 5]


# --- DivPrune (vbdi/divprune): greedy max-min cosine distance. -------------------------------------

def test_divprune_hand_case():
  # Angles 0, 10, 90, 180, 100 degrees; distance 1 - cos. Nearest-other distances:
  # [0.015, 0.015, 0.015, 0.826, 0.015] -> token 3 first. Distances to {3}: [2, 1.985, 1, -, 0.826]
  # -> token 0. To {3, 0}: token 1 0.015, token 2 1.0, token 4 0.826 -> token 2.
  tokens = unit([0, 10, 90, 180, 100])
  order = np.asarray(jax.jit(divprune.greedy_order, static_argnums=1)(jnp.asarray(tokens)[None], 3))[0]
  assert order.tolist() == [3, 0, 2]
  assert kept_index(divprune.prune, ctx_of(tokens), 3) == [0, 2, 3]


# --- Uniform and random (no released code: their definitions). -------------------------------------

def test_uniform_hand_case():
  # 2 x 3 grid, k = 2: kh = round(sqrt(2 * 2 / 3)) = 1 row, kw = 2 columns; row centre
  # floor(0.5 * 2) = 1, column centres floor(0.5 * 1.5) = 0 and floor(1.5 * 1.5) = 2 -> patches 3, 5.
  assert kept_index(uniform.prune, ctx_of(np.eye(6), grid=(2, 3)), 2) == [3, 5]
  # 4 x 4 grid, k = 4: rows and columns {1, 3} -> patches 5, 7, 13, 15.
  assert kept_index(uniform.prune, ctx_of(np.eye(16), grid=(4, 4)), 4) == [5, 7, 13, 15]


def test_random_is_a_uniform_k_subset():
  # Each of the C(4, 2) = 6 subsets should come up 1/6 of the time: 600 examples, chi-square with 5
  # degrees of freedom below 20.5 (p = 0.001).
  b, n, k = 600, 4, 2
  ctx = base.PruneContext(tokens=jnp.zeros((b, n, 1)), features=jnp.zeros((b, n, 1)),
                          cls_attn=jnp.zeros((b, n)), question=jnp.zeros((b, 1, 1)),
                          question_mask=jnp.ones((b, 1), bool), rng=jax.random.PRNGKey(3), grid=(2, 2))
  index = np.asarray(jax.jit(functools.partial(pruning.get('random'), k=k))(ctx).index)
  counts = collections.Counter(tuple(row) for row in index.tolist())
  assert set(counts) == set(itertools.combinations(range(n), k))
  expected = b / math.comb(n, k)
  chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
  assert chi2 < 20.5, counts


# --- DART (ZichenWen1/DART): L1 key-norm pivots, image and text, least similar picks. --------------

def test_dart_select_hand_case():
  # Visual states at angles [0, 20, 90, 180, 270, 100]; key L1 norms [1, 5, 2, 3, 1, 0.5]: the image
  # pivot is token 1 (20 deg). k = 4, one image + one text pivot: quotas (2, 1).
  # Image pivot picks the 2 tokens least similar to 20 deg among {0, 2, 3, 4, 5}: cosines
  # [0.94, 0.34, -0.94, -0.34, 0.17] -> 3 and 4.
  # Text: slot 0 is padding (L1 100, never a pivot); slot 1 (95 deg, L1 2) beats slot 2 (0 deg, L1 1).
  # It picks 1 among {0, 2, 5}: cosines [-0.087, 0.996, 0.996] -> token 0. Kept [0, 1, 3, 4].
  visual = jnp.asarray(unit([0, 20, 90, 180, 270, 100]))[None]
  text = jnp.asarray(unit([0, 95, 0]))[None]
  valid = jnp.asarray([[False, True, True]])
  keep = dart.select_visual(visual, text, jnp.asarray([[1, 5, 2, 3, 1, 0.5]]), jnp.asarray([[100., 2., 1.]]),
                            valid, 4, pivot_image=1, pivot_text=1)
  assert np.asarray(keep)[0].tolist() == [0, 1, 3, 4]
  # Without text pivots the image pivot takes all 3: 3, 4, then 5 (cos 80 = 0.17 < 0.34 < 0.94).
  keep = dart.select_visual(visual, text, jnp.asarray([[1, 5, 2, 3, 1, 0.5]]), jnp.asarray([[100., 2., 1.]]),
                            valid, 4, pivot_image=1, pivot_text=0)
  assert np.asarray(keep)[0].tolist() == [1, 3, 4, 5]
  assert dart.quotas(16) == (2, 2, 2, 2, 1, 1, 1, 1)  # 12 slots over 4 image + 4 text pivots


def test_dart_pivots_rank_by_l1_norm_of_keys():
  # Keys (one KV head, Dh = 2): token 0 (3, 0) has L1 3 and L2 3; token 1 (2, 2) has L1 4, L2 2.83.
  # DART ranks by L1, so with k = 1 (one image pivot, nothing else) token 1 is kept.
  n, t = 4, 1
  keys = np.zeros((1, 1 + n + t, 1, 2), np.float32)
  keys[0, 1:1 + n, 0] = [[3, 0], [2, 2], [1, 0], [0, 1]]
  h = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1 + n + t, 2)), jnp.float32)
  select = dart.make_select(pivot_image=4, pivot_text=4)
  keep, merged = select(h, None, 1, jnp.ones((1, t), bool), keys=jnp.asarray(keys), norm=lambda x: x)
  assert np.asarray(keep)[0].tolist() == [1] and merged is None


# --- FastV (pkunlp-icler/FastV) and PyramidDrop: the last token's row, mean over heads. -------------

def test_fastv_last_row_head_mean_hand_case():
  # Two heads, 3 visual slots, 2 text slots. Last row (visual part): head 0 [0.1, 0.6, 0.3], head 1
  # [0.5, 0.1, 0.38] -> mean [0.3, 0.35, 0.34]: top 2 = {1, 2}, top 1 = {1}. Every other row prefers
  # slot 0, so a mean over all query rows would rank slot 0 first.
  n, t = 3, 2
  length = 1 + n + t
  attn = np.zeros((1, 2, length, length), np.float32)
  attn[0, :, :-1, 1] = 0.9
  attn[0, 0, -1, 1:1 + n] = [0.1, 0.6, 0.3]
  attn[0, 1, -1, 1:1 + n] = [0.5, 0.1, 0.38]
  np.testing.assert_allclose(np.asarray(fastv.visual_scores(jnp.asarray(attn), n))[0], [0.3, 0.35, 0.34],
                             atol=1e-6)
  h = jnp.zeros((1, length, 4))
  for count, want in ((2, [1, 2]), (1, [1])):
    keep, _ = fastv._select(h, jnp.asarray(attn), count, jnp.ones((1, t), bool))
    assert np.asarray(keep)[0].tolist() == want
  np.testing.assert_allclose(np.asarray(pyramiddrop.visual_scores(jnp.asarray(attn), n))[0],
                             [0.3, 0.35, 0.34], atol=1e-6)
  # PyramidDrop's released schedule (LLaVA-1.5: 32 layers, 576 tokens, lambda = 0.5 at 8, 16, 24).
  assert pyramiddrop.schedule(576, 72, 32) == ((8, 288), (16, 144), (24, 72))


# --- SparseVLM (Gumpest/SparseVLMs): raters from the LM input, scores from their attention rows. ----

def test_sparsevlm_raters_hand_case():
  # Two visual tokens v = e1, 2 e2 and three text tokens (slot 0 padding): t1 = 2 e1, t2 = e2.
  # v1 . t = [2, 0] -> softmax [0.8808, 0.1192]; v2 . t = [0, 2] -> [0.1192, 0.8808]; the mean over
  # visual tokens m = [0.5, 0.5]: nobody is above the mean, so every real token rates.
  visual = jnp.asarray([[[1.0, 0.0], [0.0, 2.0]]])
  text = jnp.asarray([[[9.0, 9.0], [2.0, 0.0], [0.0, 1.0]]])
  valid = jnp.asarray([[False, True, True]])
  assert np.asarray(sparsevlm.text_raters(visual, text, valid)).tolist() == [[False, True, True]]
  # With v2 = e1 too: both rows are softmax([2, 0]) -> m = [0.8808, 0.1192]: only t1 rates. The
  # padding slot (huge dot products) is outside the softmax and never rates.
  visual = jnp.asarray([[[1.0, 0.0], [1.0, 0.0]]])
  assert np.asarray(sparsevlm.text_raters(visual, text, valid)).tolist() == [[False, True, False]]
  # Scores: the raters' rows of the head-mean attention, averaged. 3 visual slots, 3 text slots.
  n, t = 3, 3
  length = 1 + n + t
  attn = np.zeros((1, 2, length, length), np.float32)
  attn[0, :, 1 + n + 0, 1:1 + n] = [0.9, 0.0, 0.0]  # padding row: ignored
  attn[0, 0, 1 + n + 1, 1:1 + n] = [0.1, 0.5, 0.1]
  attn[0, 1, 1 + n + 1, 1:1 + n] = [0.1, 0.3, 0.1]  # head mean [0.1, 0.4, 0.1]
  attn[0, :, 1 + n + 2, 1:1 + n] = [0.0, 0.0, 0.2]
  scores = sparsevlm.rater_scores(jnp.asarray(attn), n, jnp.asarray([[False, True, False]]))
  np.testing.assert_allclose(np.asarray(scores), [[0.1, 0.4, 0.1]], atol=1e-6)
  scores = sparsevlm.rater_scores(jnp.asarray(attn), n, jnp.asarray([[False, True, True]]))
  np.testing.assert_allclose(np.asarray(scores), [[0.05, 0.2, 0.15]], atol=1e-6)


@pytest.mark.parametrize('name', sorted(pruning.METHODS))
def test_every_pruner_names_its_released_code_and_deviations(name):
  module = inlm.module(name) if pruning.is_in_lm(name) else {
      'random': 'random_prune'}.get(name, name)
  if isinstance(module, str):
    module = __import__(f'gripjax.pruning.{module}', fromlist=['_'])
  doc = module.__doc__
  if name in ('random', 'uniform'):
    assert 'no reference paper' in doc, name
  else:
    assert 'released code' in doc and 'Deviations' in doc and 'github.com/' in doc, name
