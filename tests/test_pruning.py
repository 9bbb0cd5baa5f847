"""Tests for gripjax.pruning: the shared contract for every method, plus brute-force checks.

Run: .venv/bin/python -m pytest -q tests/test_pruning.py
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax import pruning
from gripjax.pruning import base
from gripjax.pruning import cdpruner
from gripjax.pruning import divprune
from gripjax.pruning import uniform
from gripjax.pruning import vispruner
from gripjax.pruning import visionzip

B, H, W, D, DV, T = 3, 6, 6, 16, 12, 5
N = H * W
MERGING = {'visionzip'}  # Methods whose kept tokens need not equal the gathered tokens.


def make_ctx(seed=0, b=B, grid=(H, W), d=D, dv=DV, t=T, batched_rng=True):
  n = grid[0] * grid[1]
  r = np.random.default_rng(seed)
  lengths = r.integers(1, t + 1, size=b)
  mask = np.arange(t)[None, :] >= (t - lengths)[:, None]  # left-padded
  attn = r.random((b, n)).astype(np.float32)
  key = jax.random.PRNGKey(seed)
  return base.PruneContext(
      tokens=jnp.asarray(r.normal(size=(b, n, d)), jnp.float32),
      features=jnp.asarray(r.normal(size=(b, n, dv)), jnp.float32),
      cls_attn=jnp.asarray(attn / attn.sum(-1, keepdims=True)),
      question=jnp.asarray(r.normal(size=(b, t, d)), jnp.float32),
      question_mask=jnp.asarray(mask),
      rng=jax.random.split(key, b) if batched_rng else key,
      grid=grid)


def example(ctx, i):
  return jax.tree.map(lambda x: x[i:i + 1], ctx)


def check_kept(ctx, kept, k, name):
  b, n, d = ctx.tokens.shape
  index = np.asarray(kept.index)
  assert kept.tokens.shape == (b, k, d), name
  assert index.shape == (b, k) and kept.index.dtype == jnp.int32, name
  assert np.all((index >= 0) & (index < n)), name
  assert np.all(np.diff(index, axis=1) > 0), f'{name}: index not sorted and unique: {index}'
  gathered = np.take_along_axis(np.asarray(ctx.tokens), index[..., None], axis=1)
  if name not in MERGING:
    np.testing.assert_array_equal(np.asarray(kept.tokens), gathered, err_msg=name)
  if k == n:  # Keeping every token is the identity, for merging methods too.
    np.testing.assert_array_equal(index, np.broadcast_to(np.arange(n), (b, n)), err_msg=name)
    np.testing.assert_allclose(np.asarray(kept.tokens), np.asarray(ctx.tokens), rtol=0, atol=1e-6)


def jitted(prune, k, **kwargs):
  """jax.jit of a pruner with its static budget (and options) bound: the way callers run it."""
  return jax.jit(functools.partial(prune, k=k, **kwargs))


@pytest.mark.parametrize('name', sorted(n for n in pruning.METHODS if not pruning.is_in_lm(n)))
@pytest.mark.parametrize('k', [1, 5, N])
def test_contract(name, k):
  prune = pruning.get(name)
  ctx = make_ctx(seed=k)
  kept = prune(ctx, k)  # eager, once; the rest runs jitted to keep the suite fast
  check_kept(ctx, kept, k, name)

  fast = jitted(prune, k)
  out = fast(ctx)  # jit == eager
  np.testing.assert_array_equal(np.asarray(out.index), np.asarray(kept.index))
  np.testing.assert_allclose(np.asarray(out.tokens), np.asarray(kept.tokens), rtol=1e-6, atol=1e-6)

  again = fast(make_ctx(seed=k))  # deterministic: same inputs and rng, same output
  np.testing.assert_array_equal(np.asarray(again.index), np.asarray(kept.index))
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))

  for i in range(B):  # batch == per-example
    one = fast(example(ctx, i))
    np.testing.assert_array_equal(np.asarray(one.index[0]), np.asarray(kept.index[i]),
                                  err_msg=f'{name} example {i}')
    np.testing.assert_allclose(np.asarray(one.tokens[0]), np.asarray(kept.tokens[i]),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', sorted(pruning.METHODS))
def test_bad_k_raises(name):
  prune = pruning.get(name)
  ctx = make_ctx()
  for k in (0, N + 1, 2.0):
    with pytest.raises(ValueError, match=r'k='):
      prune(ctx, k)


def test_get_unknown_lists_known():
  with pytest.raises(ValueError, match=r"'nope'.*cdpruner.*uniform"):
    pruning.get('nope')


def test_budget_to_k():
  assert base.budget_to_k(1 / 9, 144) == 16
  assert base.budget_to_k(1.0, 144) == 144
  assert base.budget_to_k(0.5, 144) == 72
  assert base.budget_to_k(0.5, 7) == 4
  assert base.budget_to_k(1e-9, 144) == 1
  for rho in (0.0, 1.5, -0.1, float('nan')):
    with pytest.raises(ValueError, match='rho'):
      base.budget_to_k(rho, 144)


def test_random_single_key_and_key_dependence():
  ctx = make_ctx(batched_rng=False)
  kept = pruning.get('random')(ctx, 5)
  check_kept(ctx, kept, 5, 'random')
  assert len({tuple(row) for row in np.asarray(kept.index)}) > 1  # examples differ
  other = pruning.get('random')(ctx.replace(rng=jax.random.PRNGKey(123)), 5)
  assert not np.array_equal(np.asarray(other.index), np.asarray(kept.index))
  typed = pruning.get('random')(ctx.replace(rng=jax.random.key(0)), 5)  # new-style typed key
  check_kept(ctx, typed, 5, 'random')
  with pytest.raises(ValueError, match='rng'):
    pruning.get('random')(ctx.replace(rng=jax.random.split(jax.random.PRNGKey(0), B + 1)), 5)


def test_fastervlm_keeps_top_cls_attention():
  ctx = make_ctx(seed=3)
  for k in (1, 7, 20):
    kept = jitted(pruning.get('fastervlm'), k)(ctx)
    want = np.sort(np.argsort(-np.asarray(ctx.cls_attn), axis=1, kind='stable')[:, :k], axis=1)
    np.testing.assert_array_equal(np.asarray(kept.index), want)


def test_uniform_lattice_and_counts():
  np.testing.assert_array_equal(uniform.lattice_index(9, (6, 6)),
                                [r * 6 + c for r in (1, 3, 5) for c in (1, 3, 5)])
  np.testing.assert_array_equal(uniform.lattice_index(4, (6, 6)), [7, 10, 25, 28])
  for grid in ((6, 6), (3, 12), (1, 7), (5, 4)):
    n = grid[0] * grid[1]
    for k in range(1, n + 1):
      index = uniform.lattice_index(k, grid)
      assert index.size == k and np.all(np.diff(index) > 0) and 0 <= index[0] and index[-1] < n
  ctx = make_ctx()
  with pytest.raises(ValueError, match='grid'):
    uniform.prune(ctx.replace(grid=(5, 6)), 4)


def numpy_divprune(x, k):
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  dist = 1.0 - x @ x.T
  n = len(x)
  nearest = np.where(np.eye(n, dtype=bool), np.inf, dist).min(axis=1)
  order = [int(np.argmax(nearest))]
  while len(order) < k:
    rest = [i for i in range(n) if i not in order]
    scores = [min(dist[i, s] for s in order) for i in rest]
    order.append(rest[int(np.argmax(scores))])
  return order


def test_divprune_matches_numpy_greedy():
  for seed in range(4):
    ctx = make_ctx(seed=seed, b=2, grid=(2, 4))
    order = np.asarray(jax.jit(divprune.greedy_order, static_argnums=1)(ctx.tokens, 8))
    for i in range(2):
      want = numpy_divprune(np.asarray(ctx.tokens[i], np.float64), 8)
      assert order[i].tolist() == want, (seed, i)


def numpy_relevance(tokens, question, mask):
  """The released CDPruner relevance: negated mean cosine, (s - min + 1e-6) / (max - min)."""
  v = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
  q = question[mask] / np.linalg.norm(question[mask], axis=-1, keepdims=True)
  s = -(v @ q.T).mean(axis=1)
  return (s - s.min() + 1e-6) / (s.max() - s.min())


def numpy_greedy_logdet(L, k):
  """At each step, evaluate log det L[S + {i}] for every candidate i and take the largest."""
  order = []
  for _ in range(k):
    rest = [i for i in range(len(L)) if i not in order]
    gains = []
    for i in rest:
      s = order + [i]
      sign, logdet = np.linalg.slogdet(L[np.ix_(s, s)])
      gains.append(logdet if sign > 0 else -np.inf)
    order.append(rest[int(np.argmax(gains))])
  return order


@pytest.mark.parametrize('theta', [None, 0.5])
def test_cdpruner_matches_numpy_greedy_logdet(theta):
  for seed in range(3):
    ctx = make_ctx(seed=seed, b=2, grid=(2, 4))
    L = np.asarray(jax.jit(cdpruner.kernel, static_argnums=1)(ctx, theta), np.float64)  # (2, 8, 8)
    for i in range(2):  # The kernel itself, from an independent numpy formula.
      r = numpy_relevance(*(np.asarray(a[i], np.float64) for a in (ctx.tokens, ctx.question)),
                          np.asarray(ctx.question_mask[i]))
      w = r if theta is None else np.exp(theta / (2 * (1 - theta)) * r)
      f = np.asarray(ctx.tokens[i], np.float64)  # similarity on the projected tokens
      f /= np.linalg.norm(f, axis=-1, keepdims=True)
      np.testing.assert_allclose(L[i], w[:, None] * (f @ f.T) * w[None, :], atol=1e-5)
    k = 7 if theta is None else 8  # with w = r one token has w ~ 1e-6: a near-zero gain, picked last
    order = np.asarray(jax.jit(cdpruner.greedy_map, static_argnums=1)(jnp.asarray(L, jnp.float32), k))
    for i in range(2):
      want = numpy_greedy_logdet(L[i], k)
      assert order[i].tolist() == want, (seed, i, theta)
      # For information only: how far greedy is from the exhaustive optimum at a mid-size budget.
      m = 4
      best = max(np.linalg.slogdet(L[i][np.ix_(s, s)])[1]
                 for s in itertools.combinations(range(8), m))
      got = np.linalg.slogdet(L[i][np.ix_(want[:m], want[:m])])[1]
      print(f'cdpruner seed={seed} ex={i} theta={theta}: greedy logdet {got:.4f}, '
            f'optimum {best:.4f}')


def test_cdpruner_ignores_question_padding():
  ctx = make_ctx(seed=5)
  noise = jax.random.normal(jax.random.PRNGKey(9), ctx.question.shape)
  padded = ctx.replace(question=jnp.where(ctx.question_mask[..., None], ctx.question, noise))
  fast = jitted(cdpruner.prune, 9)
  np.testing.assert_array_equal(np.asarray(fast(ctx).index), np.asarray(fast(padded).index))
  no_question = ctx.replace(question_mask=jnp.zeros_like(ctx.question_mask))
  check_kept(ctx, fast(no_question), 9, 'cdpruner')


def numpy_visionzip(tokens, features, attn, k):
  n = len(tokens)
  d, c = visionzip.split_budget(k)
  dominant = list(np.argsort(-attn, kind='stable')[:d])
  rest = [i for i in range(n) if i not in dominant]
  step = max(1, len(rest) // c)
  targets = rest[::step][:c]
  others = [i for i in rest if i not in targets]
  f = features / np.linalg.norm(features, axis=-1, keepdims=True)
  groups = {t: [] for t in targets}
  for o in others:
    groups[targets[int(np.argmax([f[o] @ f[t] for t in targets]))]].append(o)
  out = {i: tokens[i] for i in dominant}
  out.update({t: tokens[t] + (tokens[g].mean(axis=0) if g else 0.0) for t, g in groups.items()})
  index = sorted(out)
  return index, np.stack([out[i] for i in index])


def test_visionzip_matches_numpy():
  ctx = make_ctx(seed=7)
  for k in (2, 5, 12, 30):
    kept = jitted(visionzip.prune, k)(ctx)
    for i in range(B):
      index, tokens = numpy_visionzip(*(np.asarray(a[i], np.float64)
                                        for a in (ctx.tokens, ctx.features, ctx.cls_attn)), k)
      assert np.asarray(kept.index[i]).tolist() == index, (k, i)
      np.testing.assert_allclose(np.asarray(kept.tokens[i]), tokens, atol=1e-5)
  assert visionzip.split_budget(64) == (54, 10)
  assert visionzip.split_budget(1) == (1, 0) and visionzip.split_budget(2) == (1, 1)


def test_vispruner_keeps_important_and_removes_duplicates():
  ctx = make_ctx(seed=11)
  k = 10
  imp, _ = vispruner.split_budget(k)
  assert (imp, vispruner.split_budget(5), vispruner.split_budget(1)) == (5, (2, 3), (0, 1))
  kept = np.asarray(jitted(vispruner.prune, k)(ctx).index)
  top = np.argsort(-np.asarray(ctx.cls_attn), axis=1, kind='stable')[:, :imp]
  for i in range(B):
    assert set(top[i]) <= set(kept[i])
  # Exact duplicates of one feature vector: when few tokens are kept, most copies are removed.
  features = np.asarray(ctx.features).copy()
  features[:, 1::2] = features[:, :1]  # odd tokens (18 of them) duplicate token 0
  dup_ctx = ctx.replace(features=jnp.asarray(features))
  kept = np.asarray(jitted(vispruner.prune, 8, important_ratio=0.0)(dup_ctx).index)
  for i in range(B):
    assert np.sum(kept[i] % 2 == 1) <= 2, kept[i]
