"""Uniform pruning: keep k patches spread evenly over the (H, W) patch grid.

Baseline, no reference paper and no released code, so no deviations to list. Deterministic and
data-independent.

Rule: pick a lattice of kh rows x kw columns with kh * kw >= k whose aspect follows the grid's
(kh ~ sqrt(k * H / W)), place its rows and columns at the centres of equal strips
(row_i = floor((i + 1/2) * H / kh)), and, when the lattice has more than k points, keep k of them
evenly spaced in raster order. E.g. k=9 on a 6x6 grid keeps rows {1, 3, 5} x columns {1, 3, 5}.
Always exactly k unique indices for 1 <= k <= H * W.
"""

import math

import jax.numpy as jnp
import numpy as np

from gripjax.pruning import base


def _centres(count: int, size: int) -> np.ndarray:
  """`count` unique integer positions at the centres of equal strips of [0, size)."""
  return np.floor((np.arange(count) + 0.5) * size / count).astype(np.int64)


def lattice_index(k: int, grid: tuple[int, int]) -> np.ndarray:
  """The k flat patch indices of the uniform lattice on `grid`, sorted ascending."""
  h, w = grid
  base.check_k(k, h * w)
  kh = min(max(round(math.sqrt(k * h / w)), 1), h)
  kw = min(math.ceil(k / kh), w)
  if kh * kw < k:  # kw hit W; more rows fit since k <= H * W.
    kh = math.ceil(k / kw)
  rows, cols = _centres(kh, h), _centres(kw, w)
  points = (rows[:, None] * w + cols[None, :]).reshape(-1)  # (kh * kw,) raster order
  pick = _centres(k, points.size)  # k evenly spaced, unique since points.size >= k
  index = np.sort(points[pick])
  assert index.size == k and np.unique(index).size == k, (k, grid, index)
  return index


def prune(ctx: base.PruneContext, k: int) -> base.Kept:
  """Keeps the k patches of an evenly spaced lattice over ctx.grid (same for every example)."""
  base.check_k(k, ctx.num_tokens)
  grid = base.check_grid(ctx)
  index = jnp.asarray(lattice_index(k, grid), jnp.int32)  # (k,)
  index = jnp.broadcast_to(index, (ctx.batch_size, k))  # (B, k)
  return base.gather_kept(ctx.tokens, index)
