"""The pruner contract: one context in, the kept tokens and their source indices out.

Every method in `gripjax.pruning` is a pure function

  prune(ctx: PruneContext, k: int) -> Kept

with `k` a static Python int, 1 <= k <= N. It is batched (no per-example Python loops), jit-compatible
with `k` static (`jax.jit(functools.partial(prune, k=k))`), and reads its budget only from `k`.

Selection methods return the gathered tokens and their sorted, unique source indices. Merging methods
(VisionZip's contextual tokens) return merged tokens together with the index of the patch each merged
token stands for; those indices are also sorted and unique, so the kept tokens keep a defined order and
position in the LM sequence.
"""

import numbers
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp

# Re-exported: the one budget definition (rho -> k) lives in gripjax/budget.py.
from gripjax.budget import budget_to_k  # pylint: disable=unused-import


@flax.struct.dataclass
class PruneContext:
  """Everything a pre-LM pruner may look at. A pytree, so it can cross `jax.jit`.

  Attributes:
    tokens: (B, N, D) projected visual tokens V, in the LM's embedding space.
    features: (B, N, Dv) vision features before the projector.
    cls_attn: (B, N) attention the vision [CLS] token pays each patch (mean over heads).
    question: (B, T, D) question token embeddings (LM embedding table).
    question_mask: (B, T) bool, True for real question tokens (left-padded).
    rng: PRNG key, either one key (split per example by methods that need one key each) or a batch
      of B keys (example b uses key b; lets a batch reproduce per-example runs exactly).
    grid: static patch grid (H, W) with H * W == N.
    lm: static handle for in-LM methods (FastV, PyramidDrop, SparseVLM); None for pre-LM methods.
  """
  tokens: jax.Array
  features: jax.Array
  cls_attn: jax.Array
  question: jax.Array
  question_mask: jax.Array
  rng: jax.Array
  grid: tuple[int, int] = flax.struct.field(pytree_node=False)
  lm: Any = flax.struct.field(pytree_node=False, default=None)

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def num_tokens(self) -> int:
    return self.tokens.shape[1]


class Kept(NamedTuple):
  """The pruner's output.

  Attributes:
    tokens: (B, k, D) kept (or merged) tokens, in the order of `index`.
    index: (B, k) int32 source patch indices, sorted ascending, unique, in [0, N).
  """
  tokens: jax.Array
  index: jax.Array


def check_k(k: int, n: int) -> None:
  """Raises ValueError unless `k` is a static integer (Python or NumPy) with 1 <= k <= n."""
  if isinstance(k, bool) or not isinstance(k, numbers.Integral):
    raise ValueError(
        f'k must be a static Python int with 1 <= k <= N={n}; got k={k!r} of type '
        f'{type(k).__name__} (pass it with functools.partial, not as a traced argument).')
  if not 1 <= k <= n:
    raise ValueError(f'k={k} is out of range: expected 1 <= k <= N={n}.')


def check_grid(ctx: PruneContext) -> tuple[int, int]:
  """Returns ctx.grid as (H, W) after checking H * W == N."""
  n = ctx.num_tokens
  try:
    h, w = (int(x) for x in ctx.grid)
  except (TypeError, ValueError):
    raise ValueError(f'ctx.grid must be a pair (H, W) of ints; got {ctx.grid!r}.') from None
  if h < 1 or w < 1 or h * w != n:
    raise ValueError(f'ctx.grid={ctx.grid!r} does not match N={n} tokens: expected H * W == N.')
  return h, w


def gather_kept(tokens: jax.Array, index: jax.Array) -> Kept:
  """Sorts `index` per example and gathers the matching tokens.

  Args:
    tokens: (B, N, D) tokens to gather from.
    index: (B, k) integer indices into N, unique per example.

  Returns:
    Kept with tokens (B, k, D) and index (B, k) int32, sorted ascending.
  """
  if tokens.ndim != 3 or index.ndim != 2 or index.shape[0] != tokens.shape[0]:
    raise ValueError(
        f'gather_kept expects tokens (B, N, D) and index (B, k); got tokens {tokens.shape} and '
        f'index {index.shape}.')
  index = jnp.sort(index.astype(jnp.int32), axis=-1)  # (B, k)
  kept = jnp.take_along_axis(tokens, index[..., None], axis=1)  # (B, k, D)
  return Kept(tokens=kept, index=index)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Normalizes the last axis to unit L2 norm (zero vectors stay zero)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def cosine_similarity(x: jax.Array, y: jax.Array) -> jax.Array:
  """Pairwise cosine similarity: x (B, M, D), y (B, K, D) -> (B, M, K)."""
  return jnp.einsum('bmd,bkd->bmk', l2_normalize(x), l2_normalize(y),
                    precision=jax.lax.Precision.HIGHEST)


def top_k_indices(scores: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest scores per row (ties go to the lower index): (B, N) -> (B, k)."""
  _, index = jax.lax.top_k(scores, k)
  return index.astype(jnp.int32)


def complement_indices(selected: jax.Array, n: int) -> jax.Array:
  """(B, k) unique indices in [0, n) -> (B, n - k) int32 of the others, in increasing order."""
  b, k = selected.shape
  marked = jnp.zeros((b, n), jnp.int32).at[jnp.arange(b)[:, None], selected].set(1)  # (B, N)
  # A stable sort puts the unmarked indices first, in their original (patch) order.
  return jnp.argsort(marked, axis=-1, stable=True)[:, :n - k].astype(jnp.int32)
