"""Random pruning: keep k uniformly random distinct tokens per example.

Baseline, no reference paper and no released code, so no deviations to list. Named `random_prune`
rather than `random` so that running a script from this directory never shadows the standard
library's `random`.

Each example draws its own key: `ctx.rng` is either one key, split into B keys, or already a batch of
B keys (then example b uses key b, so a batch reproduces its per-example runs exactly). The kept set
is the top-k of i.i.d. uniform scores, i.e. a uniformly random k-subset.
"""

import jax

from gripjax.pruning import base


def per_example_keys(rng: jax.Array, batch: int) -> jax.Array:
  """Returns B keys: splits one key, or checks and passes through a batch of B keys."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    single = rng.ndim == 0
    lead = rng.shape[:1]
  else:  # Raw uint32 keys: one key is (2,) (or (4,) for some PRNG impls), a batch adds a dim.
    single = rng.ndim == 1
    lead = rng.shape[:1] if rng.ndim == 2 else ()
  if single:
    return jax.random.split(rng, batch)
  if lead != (batch,):
    raise ValueError(
        f'ctx.rng must be one PRNG key or a batch of B={batch} keys; got shape {rng.shape} and '
        f'dtype {rng.dtype}.')
  return rng


def prune(ctx: base.PruneContext, k: int) -> base.Kept:
  """Keeps k distinct tokens chosen uniformly at random, independently per example."""
  b, n = ctx.batch_size, ctx.num_tokens
  base.check_k(k, n)
  keys = per_example_keys(ctx.rng, b)  # (B,) keys
  scores = jax.vmap(lambda key: jax.random.uniform(key, (n,)))(keys)  # (B, N)
  return base.gather_kept(ctx.tokens, base.top_k_indices(scores, k))
