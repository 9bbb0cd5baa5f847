"""DivPrune: keep a diverse subset by greedy max-min cosine distance.

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", Alvar et al.,
arXiv 2503.02175 (CVPR 2025). Port of the released code: github.com/vbdi/divprune, LLaVA-1.5
`llava/model/llava_arch.py` (`DivPrune`, applied to the projected image features).

The paper casts pruning as the Max-Min Diversity Problem on the projected visual tokens with cosine
distance d(i, j) = 1 - cos(v_i, v_j), and solves it greedily:
  - first pick: the token whose distance to its nearest other token is largest,
    argmax_i min_{j != i} d(i, j) (the most isolated token);
  - then, k - 1 times: add the unselected token whose distance to the selected set,
    min_{s in S} d(i, s), is largest.

The released code takes the first pick as the second-smallest entry of each distance column (the
smallest is the token's zero distance to itself), i.e. the same argmax_i min_{j != i} d(i, j).

Deviations from the released code: the budget is k itself (the released code keeps
round(threshold_ratio * N)); a picked token is never picked again (the released code would re-pick
one only if every remaining distance were <= 0, e.g. all exact duplicates); ties go to the lower
index (torch.argmax's rule too). The pick order is returned by `greedy_order` for tests; `prune`
returns the kept set sorted by patch index.
"""

import jax
import jax.numpy as jnp

from gripjax.pruning import base


def cosine_distance(tokens: jax.Array) -> jax.Array:
  """1 - cosine similarity between all token pairs: (B, N, D) -> (B, N, N)."""
  return 1.0 - base.cosine_similarity(tokens, tokens)


def greedy_order(tokens: jax.Array, k: int) -> jax.Array:
  """The greedy max-min picks in the order they are made: (B, N, D) -> (B, k) int32."""
  b, n, _ = tokens.shape
  base.check_k(k, n)
  dist = cosine_distance(tokens)  # (B, N, N)
  eye = jnp.eye(n, dtype=bool)
  nearest = jnp.min(jnp.where(eye, jnp.inf, dist), axis=-1)  # (B, N) distance to nearest other
  first = jnp.argmax(nearest, axis=-1).astype(jnp.int32)  # (B,)
  rows = jnp.arange(b)

  order = jnp.zeros((b, k), jnp.int32).at[:, 0].set(first)
  selected = jnp.zeros((b, n), bool).at[rows, first].set(True)
  min_dist = dist[rows, first]  # (B, N) distance to the selected set

  def step(i, carry):
    order, selected, min_dist = carry
    pick = jnp.argmax(jnp.where(selected, -jnp.inf, min_dist), axis=-1).astype(jnp.int32)  # (B,)
    order = order.at[:, i].set(pick)
    selected = selected.at[rows, pick].set(True)
    min_dist = jnp.minimum(min_dist, dist[rows, pick])
    return order, selected, min_dist

  order, _, _ = jax.lax.fori_loop(1, k, step, (order, selected, min_dist))
  return order


def prune(ctx: base.PruneContext, k: int) -> base.Kept:
  """Keeps k tokens chosen by greedy max-min cosine distance on the projected tokens."""
  base.check_k(k, ctx.num_tokens)
  return base.gather_kept(ctx.tokens, greedy_order(ctx.tokens, k))
