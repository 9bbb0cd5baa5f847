"""Plackett-Luce policy: log-probs against brute-force enumeration, sampling."""

import doctest
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax.rl import policy


def _pl_prob_numpy(s, order, valid):
  """prod_t exp(s[o_t]) / sum_{j in R_t} exp(s_j), computed directly."""
  avail = np.array(valid, bool)
  p = 1.0
  for o in order:
    p *= np.exp(s[o]) / np.exp(s[avail]).sum()
    avail[o] = False
  return p


def _all_orders(valid, k):
  return list(itertools.permutations(np.flatnonzero(valid).tolist(), k))


@pytest.mark.parametrize('n,k', [(3, 1), (4, 2), (5, 3), (5, 5)])
def test_log_prob_equals_enumeration(n, k):
  s = np.random.default_rng(n * 10 + k).normal(size=n) * 2.0
  valid = np.ones(n, bool)
  orders = np.array(_all_orders(valid, k))  # (P, k)
  logp = np.asarray(policy.log_prob(jnp.asarray(s)[None], jnp.asarray(orders)))
  expected = np.array([_pl_prob_numpy(s, o, valid) for o in orders])
  np.testing.assert_allclose(np.exp(logp), expected, rtol=1e-5)
  np.testing.assert_allclose(np.exp(logp).sum(), 1.0, rtol=1e-5)


def test_log_prob_with_invalid_tokens_and_order_valid():
  k_max = 3
  s = np.array([0.3, -1.0, 2.0, 0.5, 1.2])
  valid = np.array([True, False, True, True, True])
  for k in (1, 2, 3):
    orders = np.array(_all_orders(valid, k))  # (P, k)
    # Pad to k_max with junk (an invalid token, a repeat): must not count.
    pad = np.tile(np.array([1, orders[0, 0]])[: k_max - k], (len(orders), 1))
    padded = np.concatenate([orders, pad.reshape(len(orders), k_max - k)], -1)
    ov = policy.step_mask(jnp.full((len(orders),), k), k_max)
    logp = np.asarray(policy.log_prob(s, padded, jnp.asarray(valid), ov))
    expected = np.array([_pl_prob_numpy(s, o, valid) for o in orders])
    np.testing.assert_allclose(np.exp(logp), expected, rtol=1e-5)
    np.testing.assert_allclose(np.exp(logp).sum(), 1.0, rtol=1e-5)


def test_log_prob_per_example_budgets_in_one_batch():
  s = jnp.array([[0.1, 0.9, -0.4, 1.3], [2.0, -1.0, 0.0, 0.5]])  # (B=2, N)
  order = jnp.array([[3, 1, 0], [0, 3, 2]])  # (B, k_max)
  ov = policy.step_mask(jnp.array([3, 1]), 3)
  got = np.asarray(policy.log_prob(s, order, order_valid=ov))
  ones = np.ones(4, bool)
  want = [np.log(_pl_prob_numpy(np.asarray(s[0]), [3, 1, 0], ones)),
          np.log(_pl_prob_numpy(np.asarray(s[1]), [0], ones))]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_impossible_order_is_minus_inf_with_finite_grad():
  s = jnp.array([0.1, 0.2, 0.3])
  valid = jnp.array([True, False, True])
  order = jnp.array([[0, 0], [1, 2]])  # a repeat; an invalid token
  assert np.all(np.isneginf(policy.log_prob(s, order, valid)))
  g = jax.grad(lambda x: policy.log_prob(x, order, valid).sum())(s)
  assert np.all(np.isfinite(g))


def test_gumbel_top_k_matches_plackett_luce():
  scipy_stats = pytest.importorskip('scipy.stats')
  n, k, num = 4, 2, 20000
  s = jnp.array([1.0, 0.0, -0.5, 0.7])
  order = np.asarray(policy.sample_orders(jax.random.key(0), s, k, num))
  assert order.shape == (num, k)
  pairs = _all_orders(np.ones(n, bool), k)
  index = {p: i for i, p in enumerate(pairs)}
  counts = np.bincount([index[tuple(o)] for o in order.tolist()], minlength=len(pairs))
  probs = np.exp(np.asarray(policy.log_prob(s, jnp.array(pairs))))
  _, pvalue = scipy_stats.chisquare(counts, probs / probs.sum() * num)
  assert pvalue > 1e-3, (counts, probs * num)


def test_invalid_tokens_never_sampled_and_shapes():
  b, g, n, k = 3, 16, 7, 3
  s = jnp.asarray(np.random.default_rng(1).normal(size=(b, n)) * 3.0, jnp.float32)
  valid = jnp.array([[True] * 7, [False, True] * 3 + [True],
                     [True, True, True, False, False, False, False]])
  order = policy.sample_orders(jax.random.key(2), s, k, g, valid)
  assert order.shape == (b, g, k) and order.dtype == jnp.int32
  picked_valid = np.take_along_axis(np.asarray(valid)[:, None, :], np.asarray(order), -1)
  assert picked_valid.all()
  # Distinct tokens in each sample; the last example must keep exactly {0,1,2}.
  assert all(len(set(o)) == k for o in np.asarray(order).reshape(-1, k).tolist())
  np.testing.assert_array_equal(np.sort(np.asarray(order)[2], -1), np.tile([0, 1, 2], (g, 1)))
  # Per-example logits (B, 1, N) score (B, G, k) samples.
  logp = policy.log_prob(s[:, None], order, valid[:, None])
  assert logp.shape == (b, g) and np.all(np.isfinite(logp))
  ent = policy.entropy(s[:, None], order, valid[:, None])
  assert ent.shape == (b, g) and np.all(ent >= 0) and np.all(ent <= np.log(n) + 1e-5)


def test_sample_orders_checks_k():
  s = jnp.zeros((2, 4))
  with pytest.raises(ValueError, match='k=5'):
    policy.sample_orders(jax.random.key(0), s, 5, 2)
  with pytest.raises(ValueError, match='valid tokens'):
    policy.sample_orders(jax.random.key(0), s, 3, 2, jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool))
  with pytest.raises(ValueError, match='num_samples'):
    policy.sample_orders(jax.random.key(0), s, 2, 0)


def test_greedy_is_top_k():
  s = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 9)), jnp.float32)
  got = np.asarray(policy.greedy(s, 4))
  want = np.argsort(-np.asarray(s), -1)[..., :4]
  np.testing.assert_array_equal(got, want)
  valid = jnp.arange(9) % 2 == 0
  got = np.asarray(policy.greedy(s, 3, valid))
  assert np.all(got % 2 == 0)


def test_log_prob_jit_and_grad_finite():
  b, g, n, k = 2, 4, 6, 3
  s = jnp.asarray(np.random.default_rng(5).normal(size=(b, n)), jnp.float32)
  valid = jnp.array([[True] * 6, [True, True, True, True, False, False]])
  budget = jnp.array([3, 2])  # per-example k

  def f(x, rng):  # sampling, budgets and scoring all under one jit
    order = policy.sample_orders(rng, jax.lax.stop_gradient(x), k, g, valid)
    ov = policy.step_mask(jnp.broadcast_to(budget[:, None], (b, g)), k)  # (B, G, k)
    return jnp.sum(policy.log_prob(x[:, None], order, valid[:, None], ov)
                   + policy.entropy(x[:, None], order, valid[:, None], ov))

  val, grad = jax.jit(jax.value_and_grad(f))(s, jax.random.key(6))
  assert np.isfinite(val) and np.all(np.isfinite(grad))
  # Invalid tokens get no gradient.
  assert np.all(np.asarray(grad)[1, 4:] == 0)


def test_entropy_limits():
  order = jnp.array([[0, 1]])
  h_uniform = policy.entropy(jnp.zeros(4), order)
  np.testing.assert_allclose(h_uniform, (np.log(4) + np.log(3)) / 2, rtol=1e-6)
  h_peaked = policy.entropy(jnp.array([50.0, 40.0, 0.0, 0.0]), order)
  assert float(h_peaked[0]) < 1e-3


def test_keep_mask_and_sorted_index():
  order = jnp.array([[4, 0, 2], [3, 1, 5]])
  ov = jnp.array([[True, True, True], [True, False, False]])
  np.testing.assert_array_equal(
      policy.keep_mask(order, 6, ov),
      [[1, 0, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0]])
  index, index_valid = policy.sorted_index(order, ov)
  np.testing.assert_array_equal(index, [[0, 2, 4], [3, 3, 3]])
  np.testing.assert_array_equal(index_valid, [[1, 1, 1], [1, 0, 0]])
  index, index_valid = policy.sorted_index(order)
  np.testing.assert_array_equal(index, [[0, 2, 4], [1, 3, 5]])
  assert np.all(index_valid)


def test_doctests():
  assert doctest.testmod(policy).failed == 0


def test_step_kl_equals_brute_force_per_step():
  """Exact KL of each step's distribution over the tokens still available, averaged over steps,
  computed here with explicit Python loops over the remaining sets."""
  rng = np.random.default_rng(7)
  n, k = 5, 3
  s = rng.normal(size=(2, n))
  r = rng.normal(size=(2, n))
  order = np.array([[3, 0, 4], [1, 2, 0]])
  ov = np.array([[True, True, True], [True, True, False]])  # example 1 keeps two tokens
  want = []
  for b in range(2):
    left, kls = list(range(n)), []
    for t in range(k):
      if not ov[b, t]:
        continue
      p = np.exp(s[b, left]) / np.exp(s[b, left]).sum()
      q = np.exp(r[b, left]) / np.exp(r[b, left]).sum()
      kls.append(float(np.sum(p * np.log(p / q))))
      left.remove(order[b, t])
    want.append(np.mean(kls))
  got = policy.step_kl(jnp.asarray(s, jnp.float32), jnp.asarray(r, jnp.float32), jnp.asarray(order),
                       None, jnp.asarray(ov))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  same = policy.step_kl(jnp.asarray(s, jnp.float32), jnp.asarray(s, jnp.float32), jnp.asarray(order))
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  # Gradient flows through the current logits and vanishes at the reference.
  grad = jax.grad(lambda x: jnp.sum(policy.step_kl(x, jnp.asarray(s, jnp.float32),
                                                   jnp.asarray(order))))(jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
