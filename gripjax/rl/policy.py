"""Plackett-Luce policy over visual tokens, sampled by Gumbel-top-k.

The agent's MDP keeps one visual token per step, chosen among the tokens not
kept yet. With a static scorer (logits s over N tokens, computed once from the
image, the question and the budget) the probability of an ordered selection
o = (o_1, ..., o_k) is the Plackett-Luce probability

  P(o | s) = prod_{t=1..k} exp(s_{o_t}) / sum_{j in R_t} exp(s_j),
  R_t = {valid j} \\ {o_1, ..., o_{t-1}}         (tokens still available).

Sampling: adding i.i.d. Gumbel(0, 1) noise g to s and taking the indices of the
k largest s + g, in decreasing order, draws o from exactly this distribution
(Gumbel-top-k; Yellott 1977, Kool et al. 2019). So G samples cost one top-k.

Per-example budgets with static shapes: every example is sampled with the same
k_max, and `order_valid (..., k_max)` (see `step_mask`) marks the first k_i
slots as real. A slot with order_valid False contributes nothing to
`log_prob`, `entropy`, `keep_mask` or `sorted_index`. Because the first k_i
steps of a Gumbel-top-k_max sample are a Gumbel-top-k_i sample, truncating
keeps the distribution exact.

Shapes: N tokens, k (or k_max) steps, G samples per example; every function
is batched over arbitrary leading dims `...` and is jit-compatible (k, n and
the sample count are static Python ints; no Python loop over steps). The
array functions are wrapped in `jax.jit` themselves, so eager calls compile
once per shape instead of dispatching op by op; inside an outer jit they
simply inline.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _check_static_k(k, n, what='k'):
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
    raise TypeError(f'{what}={k!r} must be a static Python int.')
  if not 1 <= k <= n:
    raise ValueError(f'{what}={k} is invalid: expected 1 <= {what} <= N={n}.')


def _concrete_or_none(x):
  """Returns x as a numpy array, or None when it is traced (under jit)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


def _masked_logits(logits, valid):
  s = jnp.asarray(logits, jnp.float32)
  if valid is None:
    return s
  return jnp.where(valid, s, -jnp.inf)


def sample_orders(rng, logits, k, num_samples, valid=None):
  """Draws `num_samples` ordered keep-sets per example by Gumbel-top-k.

  order[..., g, :] = top_k(s + g_g, k) with g_g ~ Gumbel(0, 1)^N i.i.d.,
  so order[..., g, :] ~ PlackettLuce(s) restricted to valid tokens.

  Args:
    rng: a PRNG key (new-style `jax.random.key` or raw `PRNGKey`).
    logits: (..., N) scores s.
    k: static number of steps (k_max when budgets differ per example).
    num_samples: static G, samples per example.
    valid: optional (..., N) bool; invalid tokens get s = -inf and are never
      chosen while a valid one is left.

  Returns:
    order: (..., G, k) int32, the kept token indices in the order chosen.

  Raises:
    ValueError: k not in [1, N], num_samples < 1, or (when `valid` is concrete,
      i.e. not under jit) some example has fewer than k valid tokens. Under
      jit that last check cannot run: an example with fewer valid tokens than
      k then gets invalid tokens in its trailing slots, which `log_prob` scores
      as -inf. Callers with per-example budgets keep k_max <= min valid count
      and mark slots beyond each k_i with `order_valid`.
  """
  n = logits.shape[-1]
  _check_static_k(k, n)
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f'num_samples={num_samples!r} must be a Python int >= 1.')
  if valid is not None:
    concrete = _concrete_or_none(valid)
    if concrete is not None:
      count = concrete.sum(-1)
      if np.any(count < k):
        raise ValueError(f'k={k} exceeds the number of valid tokens '
                         f'(min {int(count.min())} over the batch).')
  return _gumbel_top_k(rng, logits, valid, k, num_samples)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _gumbel_top_k(rng, logits, valid, k, num_samples):
  s = _masked_logits(logits, valid)[..., None, :]  # (..., 1, N)
  shape = s.shape[:-2] + (num_samples, s.shape[-1])
  gumbel = jax.random.gumbel(rng, shape, jnp.float32)  # (..., G, N)
  _, order = jax.lax.top_k(s + gumbel, k)  # (..., G, k)
  return order.astype(jnp.int32)


def greedy(logits, k, valid=None):
  """The mode of the Plackett-Luce policy: the k highest scores, best first.

  Returns:
    (..., k) int32 indices, order[..., 0] = argmax over valid tokens.
  """
  _check_static_k(k, logits.shape[-1])
  return _top_k(logits, valid, k)


@functools.partial(jax.jit, static_argnums=2)
def _top_k(logits, valid, k):
  _, order = jax.lax.top_k(_masked_logits(logits, valid), k)  # (..., k)
  return order.astype(jnp.int32)


def _remaining(logits, order, valid, order_valid):
  """Shared per-step quantities of the Plackett-Luce factorization.

  Returns:
    s: (..., N) float32 logits broadcast to the batch of `order`.
    order: (..., k) the order, broadcast likewise.
    avail: (..., k, N) bool, avail[t, j] = j in R_t (valid, not chosen before
      step t by an order_valid step).
    lse: (..., k) logsumexp_{j in R_t} s_j (-inf when R_t is empty).
    ov: (..., k) bool step validity.
  """
  n = logits.shape[-1]
  batch = jnp.broadcast_shapes(logits.shape[:-1], order.shape[:-1])
  k = order.shape[-1]
  s = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), batch + (n,))
  order = jnp.broadcast_to(order, batch + (k,))
  if order_valid is None:
    ov = jnp.ones(batch + (k,), bool)
  else:
    ov = jnp.broadcast_to(jnp.asarray(order_valid, bool), batch + (k,))
  if valid is None:
    valid = jnp.ones(batch + (n,), bool)
  valid = jnp.broadcast_to(jnp.asarray(valid, bool), batch + (n,))

  picked = jax.nn.one_hot(order, n, dtype=jnp.int32) * ov[..., None]  # (..., k, N)
  # Exclusive cumulative sum: how often j was chosen strictly before step t.
  chosen_before = jnp.cumsum(picked, axis=-2) - picked  # (..., k, N)
  avail = valid[..., None, :] & (chosen_before == 0)  # (..., k, N)

  # Masked logsumexp, safe for gradients: unavailable entries become -inf
  # *before* the exp, and an empty set never reaches log(0).
  z = jnp.where(avail, s[..., None, :], -jnp.inf)  # (..., k, N)
  m = jnp.max(z, axis=-1, keepdims=True)  # (..., k, 1)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  total = jnp.sum(jnp.exp(z - m), axis=-1)  # (..., k)
  nonempty = total > 0
  lse = jnp.where(nonempty, jnp.log(jnp.where(nonempty, total, 1.0)) + m[..., 0],
                  -jnp.inf)  # (..., k)
  return s, order, avail, lse, ov


@jax.jit
def log_prob(logits, order, valid=None, order_valid=None):
  """Plackett-Luce log-probability of ordered selections.

  log P(o | s) = sum_{t : order_valid_t} [ s_{o_t} - logsumexp_{j in R_t} s_j ],
  R_t = {valid j} minus the tokens chosen at earlier order_valid steps.

  Vectorized over steps with a (..., k, N) "still available" mask built from
  an exclusive cumulative sum of one-hot choices.

  Args:
    logits: (..., N) scores; leading dims broadcast against `order`'s, so
      per-example logits (B, 1, N) score G samples (B, G, k).
    order: (..., k) int token indices.
    valid: optional (..., N) bool token validity.
    order_valid: optional (..., k) bool; False steps contribute 0 (and their
      token is not removed from later steps' R_t).

  Returns:
    (...,) float32 log-probabilities. An impossible order (an invalid or
    repeated token at an order_valid step) gets -inf; gradients stay finite.
  """
  s, order, avail, lse, ov = _remaining(logits, order, valid, order_valid)
  s_pick = jnp.take_along_axis(s, order, axis=-1)  # (..., k)
  ok = jnp.take_along_axis(avail, order[..., None], axis=-1)[..., 0]  # (..., k)
  step = jnp.where(ok, s_pick - lse, -jnp.inf)  # (..., k)
  return jnp.sum(jnp.where(ov, step, 0.0), axis=-1)


@jax.jit
def entropy(logits, order, valid=None, order_valid=None):
  """Mean per-step entropy of the policy along sampled orders.

  H_t = -sum_{j in R_t} p_t(j) log p_t(j),  p_t = softmax(s restricted to R_t),
  entropy = mean over order_valid steps t of H_t.

  The Plackett-Luce entropy itself has no closed form; this per-step average
  (in nats, between 0 and log N) is the `entropy` metric: it falls to 0 as the
  policy becomes deterministic.

  Returns:
    (...,) float32.
  """
  s, _, avail, lse, ov = _remaining(logits, order, valid, order_valid)
  s_t = jnp.where(avail, s[..., None, :], 0.0)  # (..., k, N), no -inf * 0
  p = jnp.where(avail, jnp.exp(s_t - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]),
                0.0)  # (..., k, N)
  h = jnp.where(jnp.isfinite(lse), lse - jnp.sum(p * s_t, axis=-1), 0.0)  # (..., k)
  num = jnp.sum(ov, axis=-1)
  return jnp.sum(jnp.where(ov, h, 0.0), axis=-1) / jnp.maximum(num, 1)


@jax.jit
def step_kl(logits, ref_logits, order, valid=None, order_valid=None):
  """Mean per-step KL(pi_t || ref_t) along sampled orders, exact at each step.

  KL_t = sum_{j in R_t} p_t(j) [log p_t(j) - log q_t(j)],
  p_t = softmax(s restricted to R_t),  q_t = softmax(s_ref restricted to R_t),
  step_kl = mean over order_valid steps t of KL_t.

  Each step's KL is computed exactly over the tokens still available (no sampled estimator), and
  the steps are averaged, not summed, so the value is in nats per selection step whatever the
  budget k: it stays comparable across budgets, and a policy that sharpens on a few tokens cannot
  make it explode the way the sequence-level k3 estimate exp(x) - x - 1 of a k-step log-ratio x
  does. Gradients flow through `logits` (and `ref_logits`, which callers stop).

  Args:
    logits, ref_logits: (..., N) scores, broadcast against `order`'s leading dims.
    order: (..., k) sampled orders; valid, order_valid as in `log_prob`.

  Returns:
    (...,) float32, >= 0.
  """
  s, _, avail, lse, ov = _remaining(logits, order, valid, order_valid)
  r, _, _, ref_lse, _ = _remaining(ref_logits, order, valid, order_valid)
  ok = jnp.isfinite(lse) & jnp.isfinite(ref_lse)  # (..., k): R_t non-empty
  logp = jnp.where(avail, s[..., None, :] - jnp.where(ok, lse, 0.0)[..., None], 0.0)  # (..., k, N)
  logq = jnp.where(avail, r[..., None, :] - jnp.where(ok, ref_lse, 0.0)[..., None], 0.0)
  p = jnp.where(avail, jnp.exp(logp), 0.0)
  kl = jnp.where(ok, jnp.sum(p * (logp - logq), axis=-1), 0.0)  # (..., k)
  num = jnp.sum(ov, axis=-1)
  return jnp.sum(jnp.where(ov, kl, 0.0), axis=-1) / jnp.maximum(num, 1)


@functools.partial(jax.jit, static_argnums=1)
def keep_mask(order, n, order_valid=None):
  """(..., k) indices -> (..., n) bool mask of the kept tokens."""
  hit = jax.nn.one_hot(order, n, dtype=bool)  # (..., k, n)
  if order_valid is not None:
    hit = hit & jnp.asarray(order_valid, bool)[..., None]
  return jnp.any(hit, axis=-2)


@jax.jit
def sorted_index(order, order_valid=None):
  """Kept indices sorted ascending (original token order), invalid slots last.

  Returns:
    index: (..., k) int32; valid slots hold the kept indices in increasing
      order; invalid slots repeat the largest kept index (0 if none), so the
      array stays non-decreasing and any gather with it stays in range.
    index_valid: (..., k) bool, True for the first sum(order_valid) slots.
  """
  order = jnp.asarray(order, jnp.int32)
  if order_valid is None:
    return jnp.sort(order, axis=-1), jnp.ones(order.shape, bool)
  ov = jnp.broadcast_to(jnp.asarray(order_valid, bool), order.shape)
  big = jnp.iinfo(jnp.int32).max
  key = jnp.sort(jnp.where(ov, order, big), axis=-1)  # (..., k)
  index_valid = key != big
  last = jnp.max(jnp.where(ov, order, 0), axis=-1, keepdims=True)  # (..., 1)
  return jnp.where(index_valid, key, last), index_valid


@functools.partial(jax.jit, static_argnums=1)
def step_mask(k, k_max):
  """Per-example budgets as static shapes: (...,) k -> (..., k_max) bool.

  step_mask[..., t] = t < k. Pass it as `order_valid`.
  """
  return jnp.arange(k_max) < jnp.asarray(k)[..., None]
