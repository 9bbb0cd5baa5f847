"""The budget-aware scorer: shapes, budget and query awareness, cost, and the `grip` pruner."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax.models import costs
from gripjax.models import scorer as scorer_lib
from gripjax.pruning import base
from gripjax.pruning import grip
from tests import helpers

B, N, D, T = 3, 16, 32, 5


@pytest.fixture(scope='module')
def setup():
  scorer = scorer_lib.BudgetAwareScorer(width=16, depth=1, num_heads=2)
  fast = {'xla_backend_optimization_level': 0}  # Unoptimized CPU code compiles faster.
  init = functools.partial(scorer_lib.init_scorer, scorer, n_tokens=N, d_model=D, text_len=T)
  params = jax.jit(init, compiler_options=fast)(jax.random.key(0))
  rng = np.random.default_rng(0)
  visual = jnp.asarray(rng.normal(size=(B, N, D)), jnp.float32)
  question = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
  apply = jax.jit(lambda p, v, q, m, r: scorer.apply({'params': p}, v, q, m, r),
                  compiler_options=fast)
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
  assert costs.scorer_flops(tiny, 144, 16) > 0
  assert scorer_lib.scorer_param_count(tiny) > 0
  big = helpers.load_config('llava_1p5_7b')
  report = costs.cost_report(big, 16)  # eval_shape only: nothing of size 7B is allocated
  assert report['scorer_params'] < 5e6
  assert report['flops_ratio'] < 0.01, report


def test_grip_pruner(setup):
  scorer, params, visual, question, mask, apply = setup
  ctx = base.PruneContext(tokens=visual, features=visual, cls_attn=jnp.zeros((B, N)),
                          question=question, question_mask=mask, rng=jax.random.key(0), grid=(4, 4))
  rho, k = 0.3, 5  # ceil(0.3 * 16) = 5, and the scorer is fed 0.3, not k / N = 0.3125
  kept = jax.jit(functools.partial(grip.make_grip_prune(scorer, params, rho), k=k))(ctx)
  assert kept.tokens.shape == (B, k, D) and kept.index.shape == (B, k)
  index = np.asarray(kept.index)
  assert np.all(np.diff(index, axis=1) > 0)
  s = np.asarray(apply(params, visual, question, mask, jnp.full((B,), rho)))
  expect = np.sort(np.argsort(-s, axis=1)[:, :k], axis=1)
  np.testing.assert_array_equal(index, expect)
  np.testing.assert_allclose(kept.tokens, np.take_along_axis(np.asarray(visual), index[..., None], 1))
  with pytest.raises(ValueError, match='rho=1.5'):
    grip.make_grip_prune(scorer, params, rho=1.5)
  with pytest.raises(ValueError, match='k=4 does not match rho=0.3'):
    grip.make_grip_prune(scorer, params, rho)(ctx, 4)


def test_grpo_on_toy_reward_moves_the_right_way(setup):
  """Reward = fraction of the kept tokens inside a per-example target region (no VLM needed)."""
  import optax  # pylint: disable=g-import-not-at-top
  from gripjax.rl import grpo  # pylint: disable=g-import-not-at-top
  from gripjax.rl import policy  # pylint: disable=g-import-not-at-top
  scorer, params, visual, question, mask, _ = setup
  k, group = 4, 8
  region = jnp.asarray(np.random.default_rng(1).permuted(np.tile(np.arange(N) < k, (B, 1)), axis=1))  # (B, N)
  rho = jnp.full((B,), k / N)
  order_valid = jnp.ones((B, 1, k), bool)
  tx = optax.adam(1e-2)  # 3e-2 collapses the entropy early (a known GRPO failure), stuck at 0.75

  def objective(p, orders, old_logp, adv):
    logits = scorer.apply({'params': p}, visual, question, mask, rho)  # (B, N)
    ref_logits = scorer.apply({'params': params}, visual, question, mask, rho)
    return grpo.grpo_objective(logits, ref_logits, old_logp, orders, order_valid, adv,
                               jnp.ones_like(adv, bool), 0.2, 0.0)

  def clipped_loss(p, old_logp, orders, adv):
    """grpo_loss against the fixed pre-update policy (the step's own old_logp is logp itself)."""
    logits = scorer.apply({'params': p}, visual, question, mask, rho)
    logp = policy.log_prob(logits[:, None, :], orders)  # (B, G)
    return grpo.grpo_loss(logp, old_logp, old_logp, adv, jnp.ones_like(adv), 0.2, 0.0)[0]

  @functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
  def train(p, rng):
    def body(carry, key):
      p, opt = carry
      logits = scorer.apply({'params': p}, visual, question, mask, rho)
      orders = policy.sample_orders(key, logits, k, group)  # (B, G, k)
      reward = jnp.sum(policy.keep_mask(orders, N) & region[:, None], -1) / k  # (B, G)
      adv, _ = grpo.group_advantages(reward)
      old_logp = policy.log_prob(logits[:, None, :], orders)  # (B, G), the sampling policy's
      g = jax.grad(lambda q: objective(q, orders, old_logp, adv)[0])(p)
      updates, opt = tx.update(g, opt, p)
      new = optax.apply_updates(p, updates)
      before = clipped_loss(p, old_logp, orders, adv)
      after = clipped_loss(new, old_logp, orders, adv)
      return (new, opt), (jnp.mean(reward), before, after)
    (p, _), out = jax.lax.scan(body, (p, tx.init(p)), jax.random.split(rng, 40))
    return p, out

  _, (reward, loss_before, loss_after) = train(params, jax.random.key(0))
  reward = np.asarray(reward)
  assert reward[-10:].mean() > reward[:3].mean() + 0.3, reward  # ~0.17 (chance 0.25) -> ~0.8
  # On the samples it was computed from, an update lowers the clipped loss against the pre-update
  # policy: always on Adam's first step (lr * sign(g), a descent direction), on average after it
  # (momentum carries older batches' directions).
  change = np.asarray(loss_after) - np.asarray(loss_before)
  assert change[0] < 0 and change.mean() < 0, change
