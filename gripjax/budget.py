"""The one budget: a keep ratio rho in (0, 1] and the number of visual tokens k it keeps.

  k = clip(ceil(float32(rho) * float32(N) - TOL), 1, N),   TOL = 1e-3

Every path that turns a ratio into a count calls this module: the train step (per-example budgets,
traced), the eval harness, pruned inference and the `grip` pruner (static Python ints). Both forms
compute the product in float32, so a ratio gives the same k whether it arrives as a Python float or
as a traced float32 array, and the agent is always fed the rho that was asked for, never k / N.

The tolerance absorbs the float32 rounding of ratios meant to be exact ((1/9) * 144 is 16.0000005 in
float32, and must keep 16 tokens, not 17): float32 rounding moves rho * N by at most about
1.2e-7 * N, under TOL for N < 8,000 visual tokens. The price: a ratio whose exact product lies less
than TOL above an integer is rounded down to that integer.

>>> budget_to_k(1 / 9, 144), budget_to_k(0.0191, 576), budget_to_k(1e-9, 7)
(16, 12, 1)
"""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
import numpy as np

TOL = 1e-3


def check_rho(rho, what: str = 'budget') -> float:
  """Returns rho as a float after checking it is a keep ratio in (0, 1]; ValueError naming `what`."""
  try:
    value = float(rho)
  except (TypeError, ValueError):
    raise ValueError(f'{what}={rho!r} is invalid: expected a keep ratio in (0, 1].') from None
  if not math.isfinite(value) or value <= 0.0 or value > 1.0:
    raise ValueError(f'{what}={rho!r} is invalid: expected a keep ratio in (0, 1].')
  return value


def _check_n(n) -> int:
  if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
    raise ValueError(f'n={n!r} is invalid: expected the number of visual tokens, a positive int.')
  return int(n)


def budget_to_k(rho, n: int) -> int:
  """Static k for a Python (or NumPy scalar) ratio: a Python int with 1 <= k <= n."""
  n = _check_n(n)
  r = check_rho(rho, 'rho')
  product = np.float32(r) * np.float32(n)  # One float32 rounding, as in `budget_k`.
  up = np.ceil(product)
  k = up - 1 if product <= (up - 1) + np.float32(TOL) else up
  return int(min(max(k, 1), n))


def budget_k(rho, n: int):
  """Traced k for per-example ratios: rho (...,) float -> (...,) int32, clipped to [1, n].

  Equal element by element to `budget_to_k`; out-of-range ratios are clipped, not refused (they
  cannot be checked under jit), so validate them where they enter (`check_rho`).
  """
  n = _check_n(n)
  product = jnp.asarray(rho, jnp.float32) * jnp.float32(n)  # (...,)
  up = jnp.ceil(product)
  # ceil(product - TOL) written without a subtraction from the product: XLA may fuse a multiply and
  # an add into one fused multiply-add, whose single rounding could disagree with NumPy's two.
  k = jnp.where(product <= (up - 1) + jnp.float32(TOL), up - 1, up)
  return jnp.clip(k.astype(jnp.int32), 1, n)
