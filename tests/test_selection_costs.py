"""Selection FLOPs of every pruner (`gripjax.pruning.selection_costs`) against counts made by hand.

Run: .venv/bin/python -m pytest -q tests/test_selection_costs.py

Geometry (small enough to check on paper): 32 px images, patch 8 -> N = 16 patches, ViT width Dv = 8;
LM width D = 16, depth 3, H = 2 query heads, KVH = 1 key-value head of Dh = 8, MLP 32, vocabulary
V = 20; T = 5 question slots. Top-k of k out of n costs n * ceil(log2(k + 1)) comparisons, so
top_k(16, 1) = 16, top_k(16, 2) = top_k(16, 3) = 32, top_k(16, 4..7) = 48, top_k(16, 8..15) = 64,
a full sort of 16 is top_k(16, 16) = 80.
"""

import jax
import jax.numpy as jnp
import pytest

from gripjax import pruning
from gripjax.eval import evaluate
from gripjax.eval import report
from gripjax.models import costs
from gripjax.pruning import base
from gripjax.pruning import selection_costs as sc
from gripjax.pruning import vispruner
from tests import helpers

N, T, V = 16, 5, helpers.COST_VOCAB
lm_layer = helpers.cost_lm_layer


@pytest.fixture(scope='module')
def config():
  return helpers.cost_config()


def test_top_k_and_sort_counts():
  assert sc.top_k_flops(16, 1) == 16  # an argmax scan
  assert sc.top_k_flops(16, 4) == 16 * 3  # ceil(log2 5) = 3
  assert sc.top_k_flops(16, 8) == 16 * 4  # ceil(log2 9) = 4
  assert sc.top_k_flops(16, 0) == 0
  assert sc.sort_flops(16) == 16 * 5 and sc.sort_flops(7) == 7 * 3
  with pytest.raises(ValueError, match='k=4 > n=3'):
    sc.top_k_flops(3, 4)
  with pytest.raises(ValueError, match='n=-1'):
    sc.top_k_flops(-1, 0)


def test_free_rows_and_top_k_rows(config):
  for method in ('full', 'shuffled', 'uniform'):
    assert sc.selection_flops(config, method, N, T) == 0
  assert sc.selection_flops(config, 'blind', 0, T) == 0
  # random draws N uniforms (not counted) and keeps their top-k; fastervlm and oracle rank [CLS]
  # attention (oracle after adding its region bonus, elementwise): top_k(16, 4) each.
  for method in ('random', 'fastervlm', 'oracle'):
    assert sc.selection_flops(config, method, 4, T) == 48


def test_grip_is_the_scorer_plus_its_top_k(config):
  scorer = costs.scorer_flops(config, N, T)
  assert sc.selection_flops(config, 'grip', 4, T) == scorer + 48
  row = sc.row_flops(config, 'grip', 4, T, V)
  # LM prefill on <bos> + 4 kept + 5 text = 10 slots, 3 layers, LM head 2 * 16 * 20 on the last slot.
  lm = 3 * (15360 + 30720 + 6400) + 640
  assert lm == 3 * lm_layer(10) + 2 * 16 * V == 158080
  assert row == {'lm_prefill_flops': lm, 'selection_flops': scorer + 48, 'prefill_flops': lm + scorer + 48}
  # Without the scorer the row would be just the LM: the agent's cost is no longer left out.
  assert row['prefill_flops'] - costs.prefill_flops(config, 4, T, V) == scorer + 48


def test_divprune(config):
  # normalize 2*16*16, Gram 2*16*16*16, nearest-other mins 16*16, first argmax 16, then 3 steps of
  # argmax + elementwise minimum over 16.
  assert sc.selection_flops(config, 'divprune', 4, T) == 512 + 8192 + 256 + 16 + 3 * 2 * 16 == 9072


def test_cdpruner(config):
  relevance = (2 * 16 * 16 + 2 * 5 * 16  # normalize tokens and question slots
               + 2 * 16 * 5 * 16  # cosines (16, 5)
               + 2 * 16 * 5 + 5  # masked sum over the question, count of real tokens
               + 2 * 16)  # min and max over 16
  assert relevance == 3429
  gram = 2 * 16 * 16 * 16
  greedy = 4 * (16 + 2 * 4 * 16)  # 4 steps: argmax over 16, contraction of (4,) with (4, 16)
  assert sc.selection_flops(config, 'cdpruner', 4, T) == relevance + gram + greedy == 12197


def test_visionzip(config):
  # k = 12: round(12 * 54 / 64) = 10 dominant, 2 contextual targets, M = 16 - 12 = 4 others.
  assert pruning.visionzip.split_budget(12) == (10, 2)
  by_hand = (16 * 4  # top_k(16, 10)
             + 2 * (4 + 2) * 8  # normalize 4 others and 2 targets (Dv = 8)
             + 2 * 4 * 2 * 8  # cosines (4, 2)
             + 4 * 2  # argmax over the 2 targets
             + 2 * 4 * 2 * 16  # one-hot (4, 2) times the others' tokens (D = 16)
             + 4 * 2)  # counts per target
  assert sc.selection_flops(config, 'visionzip', 12, T) == by_hand == 560
  assert sc.selection_flops(config, 'visionzip', 1, T) == 16  # 1 dominant, nothing to merge


def test_vispruner(config):
  # k = 4: 2 important, the other 14 thinned to 2, at most 8 a round and at most |A| = ceil(M / 2):
  # M = 14 removes 7, M = 7 removes 4, M = 3 removes 1.
  assert sc.vispruner_rounds(14, 2) == [(14, 7), (7, 4), (3, 1)]
  rounds = ((2 * 14 * 8 + 2 * 7 * 7 * 8 + 7 * 7 + 7 * 3)  # a = b = 7; sort(7) = 7 * ceil(log2 8)
            + (2 * 7 * 8 + 2 * 4 * 3 * 8 + 4 * 3 + 4 * 3)  # a = 4, b = 3; sort(4) = 4 * 3
            + (2 * 3 * 8 + 2 * 2 * 1 * 8 + 2 * 1 + 2 * 2))  # a = 2, b = 1; sort(2) = 2 * 2
  assert sc.selection_flops(config, 'vispruner', 4, T) == 80 + rounds == 1572


def test_vispruner_rounds_are_the_rounds_the_code_runs(monkeypatch):
  """The (|A|, |B|) of every similarity `remove_duplicates` computes, recorded while it runs."""
  seen = []
  cosine = base.cosine_similarity

  def record(x, y):
    seen.append((x.shape[1], y.shape[1]))
    return cosine(x, y)

  monkeypatch.setattr(vispruner.base, 'cosine_similarity', record)
  features = jax.random.normal(jax.random.key(0), (1, 40, 4))
  kept = vispruner.remove_duplicates(features, jnp.arange(40)[None], 3)
  assert kept.shape == (1, 3)
  # By hand: 40 -> 32 (8 removed) -> 24 -> 16 -> 8 -> 4 (|A| = 4, 5 to go) -> 3.
  assert seen == [(20, 20), (16, 16), (12, 12), (8, 8), (4, 4), (2, 2)]
  assert [(-(-m // 2), m // 2) for m, _ in sc.vispruner_rounds(40, 3)] == seen


def test_fastv(config):
  # Last token's row of layer K - 1 averaged over 2 heads (2 * 16), then top_k(16, 4).
  assert sc.selection_flops(config, 'fastv', 4, T) == 2 * 16 + 48 == 80


def test_pyramiddrop(config):
  # 3 layers -> 3 stages: drops ((1, 8), (2, 4)) (16 * (4 / 16) ** (1 / 2) = 8).
  assert pruning.pyramiddrop.schedule(N, 4, 3) == ((1, 8), (2, 4))
  # Ranking pass of the next layer over L slots: q (16 x 16) and k (16 x 8) projections, scores.
  first = 2 * 22 * 16 * (16 + 8) + 2 * 22 * 22 * 16  # L = 1 + 16 + 5
  second = 2 * 14 * 16 * (16 + 8) + 2 * 14 * 14 * 16  # L = 1 + 8 + 5
  assert (first, second) == (32384, 17024)
  assert costs.attention_probs_flops(config, 22) == first
  by_hand = (first + 2 * 16 + 16 * 4) + (second + 2 * 8 + 8 * 3)  # head means, top_k(16, 8), top_k(8, 4)
  assert sc.selection_flops(config, 'pyramiddrop', 4, T) == by_hand == 49544


def test_sparsevlm(config):
  # k = 4: r = min(max(1, 4 // 8), 3) = 1 recycled; 16 - 3 = 13 deleted, pool min(13, max(1, ceil(3.9))) = 4.
  assert pruning.sparsevlm.num_recycled(N, 4) == 1 and sc.sparsevlm_pool(N, 4) == 4
  raters = (2 * 16 * 5 * 16  # v . t logits (16, 5)
            + 2 * 16 * 5  # softmax over 5 (max and sum)
            + 16 * 5  # mean over the 16 visual tokens
            + 2 * 5 + 5  # masked mean over the text
            + 5 + 5)  # threshold, any
  scores = 2 * 22 * 22 + 2 * 5 * 16 + 5  # head mean of the (22, 22) attention, raters x (5, 16), count
  recycle = (16 * 3  # top_k(16, 4): the pool
             + 2 * 4 * 16 + 2 * 1 * 16  # normalize the pool and its anchor
             + 2 * 4 * 1 * 16 + 4 * 1  # cosines (4, 1), argmax
             + 2 * 4 * 1 * 16 + 4 * 1)  # merge, group sizes
  assert sc.selection_flops(config, 'sparsevlm', 4, T) == raters + scores + 32 + recycle == 4462
  # k = N: nothing is deleted or recycled; the top-16 of 16.
  assert sc.selection_flops(config, 'sparsevlm', N, T) == raters + scores + 80


def test_dart(config):
  # k = 8: 4 image pivots, 4 text pivots (T = 5), quotas (1, 1, 1, 1, 0, 0, 0, 0); L = 1 + 16 + 5 = 22.
  assert pruning.dart.quotas(8) == (1, 1, 1, 1, 0, 0, 0, 0)
  by_hand = (22 * 8  # L1 norm of each slot's keys (KVH * Dh = 8)
             + 2 * 22 * 16  # final RMSNorm of the 22 states
             + 16 * 3 + 5 * 3  # top_k(16, 4) image pivots, top_k(5, 4) text pivots
             + 2 * 8 * 16 + 2 * 16 * 16 + 2 * 8 * 16 * 16  # normalize 8 pivots and 16 tokens, cosines
             + 4 * 16)  # four quotas of 1: top_k(16, 1) each
  assert sc.selection_flops(config, 'dart', 8, T) == by_hand == 5871
  # T = 3 < 4 text pivots and k = 16: quotas (2, 2, 2, 2, 1, 1, 1, 1); the 7 pivots pick 11, and the
  # missing pivot's 1 is picked by the last rule. L = 1 + 16 + 3 = 20.
  assert pruning.dart.quotas(16) == (2, 2, 2, 2, 1, 1, 1, 1)
  by_hand = (20 * 8 + 2 * 20 * 16 + 16 * 3 + 3 * 2  # keys, norm, top_k(16, 4), top_k(3, 3)
             + 2 * 7 * 16 + 2 * 16 * 16 + 2 * 7 * 16 * 16  # 7 pivots against 16 tokens
             + 4 * (16 * 2) + 3 * 16 + 16)  # four top_k(16, 2), three top_k(16, 1), the missing one
  assert sc.selection_flops(config, 'dart', 16, 3) == by_hand == 5366


def test_in_lm_rows_add_selection_to_the_staged_prefill(config):
  # FastV at k = 4 (K = 2): layers 0 and 1 run on 22 slots, layer 2 on 1 + 4 + 5 = 10.
  lm = 2 * lm_layer(22) + lm_layer(10) + 2 * 16 * V
  assert lm == 2 * 132352 + 52480 + 640
  assert sc.row_flops(config, 'fastv', 4, T, V) == {
      'lm_prefill_flops': lm, 'selection_flops': 80, 'prefill_flops': lm + 80}


def test_every_method_has_a_selection_count(config):
  methods = set(evaluate.known_methods()) | set(pruning.METHODS)
  assert set(pruning.METHODS) <= methods
  for method in sorted(methods):
    k = 0 if method == 'blind' else 4
    flops = sc.selection_flops(config, method, k, T)
    assert isinstance(flops, int), method
    assert (flops == 0) == (method in sc.FREE_METHODS), (method, flops)
    row = sc.row_flops(config, method, k, T, V)
    assert row['prefill_flops'] == row['lm_prefill_flops'] + flops


@pytest.mark.parametrize('call, match', [
    (lambda c: sc.selection_flops(c, 'fastvv', 4, T), "unknown method 'fastvv'"),
    (lambda c: sc.selection_flops(c, 'divprune', 17, T), 'k=17 > N=16'),
    (lambda c: sc.selection_flops(c, 'divprune', 0, T), 'k=0'),
    (lambda c: sc.selection_flops(c, 'cdpruner', 4, -1), 'text_len=-1'),
    (lambda c: sc.visionzip_flops(16, 4, 8, 16, 3, 2), 'dominant=3 \\+ contextual=2 != k=4'),
])
def test_bad_arguments(config, call, match):
  with pytest.raises(ValueError, match=match):
    call(config)


def test_report_shows_selection_and_the_vision_tower_once():
  row = {'method': 'grip', 'budget': 0.25, 'position_mode': 'keep', 'kept_tokens': 4, 'accuracy': 0.5,
         'n': 8, 'per_task': {}, 'region_recall': None, 'prefill_flops': 178_729_000,
         'selection_flops': 20_649_000, 'prefill_seconds': 0.0031, 'vision_flops': 114_066_432,
         'vision_seconds': 0.0074}
  lines = report.table([row, dict(row, method='full', selection_flops=0, prefill_seconds=None)]).splitlines()
  assert lines[0].endswith('| GFLOPs prefill | GFLOPs selection | ms prefill |')
  assert lines[2].endswith('| 0.179 | 0.021 | 3.100 |') and lines[3].endswith('| 0.179 | 0.000 | - |')
  assert report.vision_line([row]).endswith(': 0.114 GFLOPs, 7.400 ms per example.')
  assert report.vision_line([{'method': 'full'}]) is None  # rows written before the field existed
