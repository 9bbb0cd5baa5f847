"""The budget-aware scorer: shapes, budget and query awareness, cost, and the `grip` pruner."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax.models import scorer as scorer_lib
from gripjax.pruning import base
from gripjax.pruning import grip
from tests import helpers

B, N, D, T = 3, 16, 32, 5


@pytest.fixture(scope='module')
def setup():
  scorer = scorer_lib.BudgetAwareScorer(width=16, depth=1, num_heads=2)
  params = scorer_lib.init_scorer(scorer, jax.random.key(0), N, D, T)
  rng = np.random.default_rng(0)
  visual = jnp.asarray(rng.normal(size=(B, N, D)), jnp.float32)
  question = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
  apply = jax.jit(lambda p, v, q, m, r: scorer.apply({'params': p}, v, q, m, r))
  return scorer, params, visual, question, mask, apply


def test_shape_and_finite(setup):
  _, params, visual, question, mask, apply = setup
  s = apply(params, visual, question, mask, jnp.full((B,), 0.25))
  assert s.shape == (B, N) and s.dtype == jnp.float32
  assert np.all(np.isfinite(s))


def test_budget_aware(setup):
  """rho changes the ranking, not only a constant shift (which a Plackett-Luce policy ignores)."""
  _, params, visual, question, mask, apply = setup
  lo = apply(params, visual, question, mask, jnp.full((B,), 1 / 18))
  hi = apply(params, visual, question, mask, jnp.full((B,), 1 / 2))
  centered = lambda s: s - s.mean(-1, keepdims=True)
  assert np.max(np.abs(centered(lo) - centered(hi))) > 1e-4


def test_query_aware(setup):
  _, params, visual, question, mask, apply = setup
  rho = jnp.full((B,), 0.25)
  a = apply(params, visual, question, mask, rho)
  b = apply(params, visual, question[::-1], mask, rho)
  assert np.max(np.abs(a - b)) > 1e-4
  # Padding is masked: changing the embeddings under padded slots changes nothing.
  padded = question.at[2, :4].set(123.0)
  np.testing.assert_allclose(apply(params, visual, padded, mask, rho)[2], a[2], atol=1e-5)


def test_batch_equals_per_example(setup):
  _, params, visual, question, mask, apply = setup
  rho = jnp.asarray([0.1, 0.3, 0.9])
  batched = apply(params, visual, question, mask, rho)
  for i in range(B):
    one = apply(params, visual[i:i + 1], question[i:i + 1], mask[i:i + 1], rho[i:i + 1])
    np.testing.assert_allclose(one[0], batched[i], atol=1e-5)


def test_cost_helpers():
  tiny = helpers.load_config('gripbench_tiny')
  assert scorer_lib.scorer_flops(tiny, 144, 16) > 0
  assert scorer_lib.scorer_param_count(tiny) > 0
  big = helpers.load_config('llava_1p5_7b')
  report = scorer_lib.cost_report(big)  # eval_shape only: nothing of size 7B is allocated
  assert report['scorer_params'] < 5e6
  assert report['flops_ratio'] < 0.01, report


def test_grip_pruner(setup):
  scorer, params, visual, question, mask, apply = setup
  ctx = base.PruneContext(tokens=visual, features=visual, cls_attn=jnp.zeros((B, N)),
                          question=question, question_mask=mask, rng=jax.random.key(0), grid=(4, 4))
  k = 5
  kept = jax.jit(functools.partial(grip.make_grip_prune(scorer, params), k=k))(ctx)
  assert kept.tokens.shape == (B, k, D) and kept.index.shape == (B, k)
  index = np.asarray(kept.index)
  assert np.all(np.diff(index, axis=1) > 0)
  s = np.asarray(apply(params, visual, question, mask, jnp.full((B,), k / N)))
  expect = np.sort(np.argsort(-s, axis=1)[:, :k], axis=1)
  np.testing.assert_array_equal(index, expect)
  np.testing.assert_allclose(kept.tokens, np.take_along_axis(np.asarray(visual), index[..., None], 1))
  with pytest.raises(ValueError, match='rho=1.5'):
    grip.make_grip_prune(scorer, params, rho=1.5)
