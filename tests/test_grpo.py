"""GRPO: advantages, the clipped loss's gradients, rewards, a toy end-to-end run."""

import doctest
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gripjax.rl import grpo
from gripjax.rl import policy
from gripjax.rl import rewards


def test_group_advantages_hand_computed():
  r = jnp.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]])
  adv, m = grpo.group_advantages(r, eps=0.0)
  std0 = np.sqrt(1.25)  # population std of 1..4
  np.testing.assert_allclose(adv[0], np.array([-1.5, -0.5, 0.5, 1.5]) / std0, rtol=1e-6)
  np.testing.assert_allclose(adv[1], [-1.0, -1.0, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(m['reward/mean'], 12.0 / 8, rtol=1e-6)
  np.testing.assert_allclose(m['reward/std'], (std0 + 0.5) / 2, rtol=1e-6)
  assert float(m['frac_reward_zero_std']) == 0.0
  assert int(m['reward/num_nonfinite']) == 0


def test_group_advantages_batch_and_no_scale_by_hand():
  r = jnp.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]])
  # Deviations from each group's mean: (-1.5, -0.5, 0.5, 1.5) and (-0.5, -0.5, 0.5, 0.5);
  # their mean square over the 8 members is (2.25 + 0.25 + 0.25 + 2.25 + 4 * 0.25) / 8 = 0.75.
  adv, _ = grpo.group_advantages(r, eps=0.0, scale='batch')
  np.testing.assert_allclose(adv, np.array([[-1.5, -0.5, 0.5, 1.5], [-0.5, -0.5, 0.5, 0.5]]) / np.sqrt(0.75),
                             rtol=1e-6)
  adv, _ = grpo.group_advantages(r, scale='none')
  np.testing.assert_allclose(adv, [[-1.5, -0.5, 0.5, 1.5], [-0.5, -0.5, 0.5, 0.5]], rtol=1e-6)
  # A zero-spread group stays exactly 0 under every scale; a NaN member is left out of the batch scale.
  r = jnp.array([[2.0, 2.0], [0.0, 1.0], [jnp.nan, 3.0]])
  # Finite members: 2 + 2 + 1, deviations 0, 0, -0.5, 0.5, 0: mean square 0.5 / 5 = 0.1.
  adv, _ = grpo.group_advantages(r, eps=0.0, scale='batch')
  np.testing.assert_allclose(adv, [[0.0, 0.0], [-0.5 / np.sqrt(0.1), 0.5 / np.sqrt(0.1)], [0.0, 0.0]],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="scale='std'"):
    grpo.group_advantages(r, scale='std')


def test_zero_spread_group_gives_exact_zeros():
  r = jnp.array([[0.1, 0.1, 0.1], [1.0, 0.0, 1.0], [5.0, 5.0, 5.0]])
  adv, m = grpo.group_advantages(r)
  assert np.all(np.asarray(adv[0]) == 0) and np.all(np.asarray(adv[2]) == 0)
  assert np.any(np.asarray(adv[1]) != 0)
  np.testing.assert_allclose(m['frac_reward_zero_std'], 2 / 3, rtol=1e-6)


def test_nonfinite_rewards_are_masked_and_counted():
  r = jnp.array([[1.0, jnp.nan, 3.0, jnp.inf], [jnp.nan, jnp.nan, -jnp.inf, 2.0]])
  adv, m = grpo.group_advantages(r)
  assert np.all(np.isfinite(adv))
  np.testing.assert_allclose(adv[0], [-1.0, 0.0, 1.0, 0.0], atol=1e-5)
  assert np.all(np.asarray(adv[1]) == 0)  # one finite member: no signal
  assert int(m['reward/num_nonfinite']) == 5
  np.testing.assert_allclose(m['reward/mean'], 2.0, rtol=1e-6)  # mean of 1, 3, 2
  assert all(np.isfinite(v) for v in m.values())
  g = jax.grad(lambda x: jnp.sum(grpo.group_advantages(x)[0] ** 2))(r)
  assert np.all(np.isfinite(g))


def _loss_grad(logp, old, ref, adv, clip_eps=0.2, kl_coef=0.0, mask=None):
  mask = jnp.ones_like(logp) if mask is None else mask
  f = lambda x: grpo.grpo_loss(x, old, ref, adv, mask, clip_eps, kl_coef)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp)
  return loss, metrics, grad


def test_gradient_sign_follows_advantage():
  logp = jnp.array([-2.0, -2.0, -2.0])
  adv = jnp.array([1.0, -1.0, 0.0])
  loss, m, grad = _loss_grad(logp, logp, logp, adv)
  # Descent raises logp of positive-advantage samples, lowers negative ones.
  assert grad[0] < 0 and grad[1] > 0 and grad[2] == 0
  np.testing.assert_allclose(grad, -adv / 3, rtol=1e-6)  # ratio = 1: d/dlogp = -A/n
  np.testing.assert_allclose(loss, 0.0, atol=1e-7)
  assert float(m['clip_ratio']) == 0.0 and float(m['approx_kl']) == 0.0
  # REINFORCE has the same gradient at ratio 1 without KL.
  g2 = jax.grad(lambda x: grpo.reinforce_loss(x, adv, jnp.ones(3)))(logp)
  np.testing.assert_allclose(g2, grad, rtol=1e-6)


def test_clipping_cuts_gradient_on_the_right_side():
  old = jnp.zeros(4)
  up, down = jnp.log(1.5), jnp.log(0.5)  # ratios 1.5 and 0.5 with eps 0.2
  logp = jnp.array([up, up, down, down])
  adv = jnp.array([1.0, -1.0, 1.0, -1.0])
  _, m, grad = _loss_grad(logp, old, logp, adv, clip_eps=0.2)
  g = np.asarray(grad)
  assert g[0] == 0.0  # A > 0, ratio > 1 + eps: clipped, no push further up
  assert g[3] == 0.0  # A < 0, ratio < 1 - eps: clipped, no push further down
  assert g[1] > 0     # A < 0, ratio > 1 + eps: unclipped, pulled back down
  assert g[2] < 0     # A > 0, ratio < 1 - eps: unclipped, pulled back up
  np.testing.assert_allclose(m['clip_ratio'], 0.5)
  assert float(m['approx_kl']) > 0


def test_kl_term_zero_at_reference_positive_elsewhere():
  logp = jnp.array([-1.0, -3.0])
  adv = jnp.zeros(2)
  loss, m, grad = _loss_grad(logp, logp, logp, adv, kl_coef=0.5)
  assert float(m['kl_ref']) == 0.0 and float(loss) == 0.0
  np.testing.assert_allclose(grad, 0.0, atol=1e-7)
  ref = logp + jnp.array([0.7, -0.4])
  loss, m, grad = _loss_grad(logp, logp, ref, adv, kl_coef=0.5)
  assert float(m['kl_ref']) > 0 and float(loss) > 0
  # Descent moves logp toward the reference.
  assert np.all(np.sign(-np.asarray(grad)) == np.sign(np.asarray(ref - logp)))


def test_mask_excludes_nonfinite_entries():
  logp = jnp.array([-1.0, -jnp.inf, -2.0])
  old = jnp.array([-1.0, -jnp.inf, -2.5])
  mask = jnp.array([1.0, 0.0, 1.0])
  loss, m, grad = _loss_grad(logp, old, old, jnp.array([1.0, 5.0, -1.0]),
                             kl_coef=0.1, mask=mask)
  assert np.isfinite(loss) and all(np.isfinite(v) for v in m.values())
  assert np.all(np.isfinite(grad)) and grad[1] == 0


def _toy_problem():
  """B examples, N=6 tokens with features; a token is good iff feature 0 > 0."""
  rng = np.random.default_rng(0)
  b, n, f = 4, 6, 3
  x = rng.normal(size=(b, n, f)).astype(np.float32)
  x[:, :3, 0] = np.abs(x[:, :3, 0]) + 0.1   # three good tokens per example
  x[:, 3:, 0] = -np.abs(x[:, 3:, 0]) - 0.1  # three bad ones
  for i in range(b):
    x[i] = x[i, rng.permutation(n)]
  return jnp.asarray(x), jnp.asarray(x[..., 0] > 0)


def test_grpo_raises_reward_on_toy_problem():
  x, good = _toy_problem()  # (B, N, F), (B, N)
  k, g, clip_eps, kl_coef = 2, 8, 0.2, 0.01
  scorer = lambda w: x @ w  # (B, N)
  params0 = jnp.full((x.shape[-1],), 0.01, jnp.float32)
  all_orders = jnp.array(list(itertools.permutations(range(x.shape[1]), k)))  # (P, k)

  def reward_fn(order):  # number of good tokens kept, (B, ...)
    kept = policy.keep_mask(order, x.shape[1])  # (B, ..., N)
    good_b = good.reshape(good.shape[:1] + (1,) * (kept.ndim - 2) + good.shape[1:])
    return jnp.sum(kept & good_b, -1).astype(jnp.float32)

  @jax.jit
  def expected_reward(w):  # exact, by enumeration of all ordered pairs
    logp = policy.log_prob(scorer(w)[:, None], all_orders[None])  # (B, P)
    return jnp.mean(jnp.sum(jnp.exp(logp) * reward_fn(jnp.broadcast_to(
        all_orders, (x.shape[0],) + all_orders.shape)), -1))

  opt = optax.adam(0.1)

  @jax.jit
  def step(w, opt_state, rng):
    logits = scorer(w)  # (B, N)
    order = policy.sample_orders(rng, jax.lax.stop_gradient(logits), k, g)  # (B, G, k)
    adv, metrics = grpo.group_advantages(reward_fn(order))  # (B, G)
    ref_logp = policy.log_prob(scorer(params0)[:, None], order)
    old_logp = policy.log_prob(logits[:, None], order)

    def loss_fn(w):
      logp = policy.log_prob(scorer(w)[:, None], order)  # (B, G)
      return grpo.grpo_loss(logp, old_logp, ref_logp, adv, jnp.ones_like(adv),
                            clip_eps, kl_coef)

    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(w)
    updates, opt_state = opt.update(grads, opt_state, w)
    metrics.update(m, entropy=jnp.mean(policy.entropy(logits[:, None], order)))
    return optax.apply_updates(w, updates), opt_state, metrics

  before = float(expected_reward(params0))
  np.testing.assert_allclose(before, 1.0, atol=0.15)  # near-uniform: 2 * 3/6
  w, opt_state = params0, opt.init(params0)
  for rng in jax.random.split(jax.random.key(0), 15):
    w, opt_state, metrics = step(w, opt_state, rng)
    assert all(np.isfinite(v) for v in metrics.values())
  assert not np.allclose(w, params0)
  after = float(expected_reward(w))
  assert after > before + 0.3, (before, after)


def test_rewards_doctests():
  assert doctest.testmod(rewards).failed == 0
  assert doctest.testmod(grpo).failed == 0


def test_rewards_values_and_registry():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
  answer = jnp.array([0, 2])
  lp = rewards.answer_logprob(logits, answer)
  want = jax.nn.log_softmax(logits)[jnp.arange(2), answer]
  np.testing.assert_allclose(lp, want, rtol=1e-6)
  np.testing.assert_array_equal(rewards.exact_match(logits, answer), [1.0, 0.0])
  same = rewards.agreement(logits, logits)
  np.testing.assert_allclose(same, 1.0, rtol=1e-6)
  p_full = jax.nn.softmax(logits[::-1])
  kl = np.sum(p_full * (np.log(p_full) - jax.nn.log_softmax(logits)), -1)
  np.testing.assert_allclose(rewards.agreement(logits, logits[::-1]), np.exp(-kl), rtol=1e-5)
  # Masked vocabulary entries (-inf in the full logits) stay finite.
  full = jnp.array([[1.0, -jnp.inf, 0.0]])
  assert np.all(np.isfinite(rewards.agreement(jnp.zeros((1, 3)), full)))
  for name in ('logprob', 'exact_match', 'agreement'):
    assert rewards.get(name) is rewards.REWARDS[name]
  with pytest.raises(ValueError, match='known rewards'):
    rewards.get('bleu')


def test_step_kl_loss_by_hand():
  """At the sampling policy (ratio 1): loss = -(mean A - c * mean kl) over the mask."""
  logp = jnp.array([-1.0, -2.0, -0.5])
  adv = jnp.array([1.0, -0.5, 2.0])
  kl = jnp.array([0.2, 0.4, 9.0])
  mask = jnp.array([True, True, False])
  loss, m = grpo.grpo_loss_step_kl(logp, logp, kl, adv, mask, 0.2, 0.5)
  # Entries 0 and 1: obj = (1.0 - 0.5) / 2 = 0.25; kl mean = 0.3; loss = -(0.25 - 0.5 * 0.3) = -0.1.
  np.testing.assert_allclose(loss, -0.1, atol=1e-6)
  np.testing.assert_allclose(m['kl_ref'], 0.3, atol=1e-6)
  assert float(m['clip_ratio']) == 0.0 and abs(float(m['approx_kl'])) < 1e-7
