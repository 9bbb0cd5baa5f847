"""What each pruner computes to choose its tokens, in FLOPs per example (`selection_flops`), and the
prefill cost of an eval row (`row_flops`).

An eval row's `prefill_flops` is the LM prefill on what is kept plus `selection_flops`:

  prefill_flops = lm_prefill_flops + selection_flops
  lm_prefill_flops = costs.prefill_flops(k)             pre-LM methods (and the references): every
                                                         layer over P0 + k + T slots
                   = inlm.inlm_prefill_flops(method, k)  in-LM methods: every layer at the length it runs

Both count the P0 prefix slots before the image (<bos> alone: P0 = 1; a chat template's head: its
length).

The vision tower (and the projector) is shared by every row and counted in none of them: it is
`costs.vision_flops` of the layers `VLM.encode_image` runs, reported once beside the rows.

Each formula below is derived from the current code of its pruner (the file named in each function),
term by term, in the order the code runs. Counting convention (that of `gripjax.models.costs` for
matmuls, extended to the other work a pruner does):
  - Contractions: 2 FLOPs per multiply-add: matmuls and einsums (a Gram matrix of M and K vectors of
    width D is 2 M K D), squared L2 norms (2 D per vector of width D: `l2_normalize`, RMSNorm),
    sums written as products with a mask or weights (2 per term).
  - Reductions: 1 FLOP per value entering a sum, mean, max, min, argmax, any or L1 norm (a mean over
    H heads of an (L, L) matrix is H L^2). A softmax counts as its two reductions (max and sum):
    2 per value.
  - Comparisons: 1 per compared value, in a reduction (above) or elementwise (`jnp.minimum`, a
    threshold `m > mean`). A top-k of k out of n values costs n ceil(log2(k + 1)) (a partial sort
    through a heap of k; k = 1 is an argmax scan of n), a full sort of n values is the top-n
    (`top_k_flops`, `sort_flops`).
  - Not counted: elementwise maps (divides, square roots, exp, negation, subtraction, masks with
    `where`, one-hot encodings, RNG draws) and index bookkeeping (gathers, scatters, sorting the k
    kept indices by position, complements), as the LM's norms and softmax are not counted in
    `costs`.
  - A normalization of the same array used twice in one jitted function is counted once (XLA merges
    the two).
  - Work the LM does anyway is not counted again: in-LM methods read the attention probabilities or
    keys that the layer before the drop computes for its own output. Extra LM work done only to rank
    (PyramidDrop's ranking pass of the next layer, `costs.attention_probs_flops`) is counted here.

Symbols: N visual tokens, k kept, T question slots (padding included: the methods run on them,
masked), P0 prefix slots before the image (1: <bos>), L = P0 + N + T the sequence an in-LM method
ranks on, D the LM width, Dv the vision width (pre-projector features), H the LM's query heads, KVH
its key-value heads, Dh its head width.
"""

from __future__ import annotations

import math
import numbers

from gripjax import pruning
from gripjax.models import costs
from gripjax.models.vlm import DEFAULT_PREFIX_LEN
from gripjax.pruning import dart
from gripjax.pruning import inlm
from gripjax.pruning import sparsevlm
from gripjax.pruning import vispruner
from gripjax.pruning import visionzip

# Rows that choose nothing from the data: the references and the fixed lattice.
FREE_METHODS = ('full', 'blind', 'shuffled', 'uniform')


def _count(name: str, value, low: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f'{name}={value!r}: expected an int >= {low}.')
  return int(value)


def top_k_flops(n: int, k: int) -> int:
  """Comparisons of a top-k of k out of n values: n ceil(log2(k + 1)) (0 when k is 0)."""
  n, k = _count('n', n), _count('k', k)
  if k > n:
    raise ValueError(f'k={k} > n={n}: a top-k cannot keep more values than it is given.')
  return 0 if k == 0 else n * math.ceil(math.log2(k + 1))


def sort_flops(n: int) -> int:
  """Comparisons of a full sort of n values by score: the top-n, n ceil(log2(n + 1))."""
  return top_k_flops(n, n)


# ---- Pre-LM pruners (gripjax/pruning/<method>.py, `prune(ctx, k)`). ---------------------------------


def random_flops(n: int, k: int) -> int:
  """random_prune.py: the top-k of N uniform draws (the draws are not counted): top_k(N, k)."""
  return top_k_flops(n, k)


def fastervlm_flops(n: int, k: int) -> int:
  """fastervlm.py: the top-k of the N [CLS] attention values the ViT returned: top_k(N, k)."""
  return top_k_flops(n, k)


def oracle_flops(n: int, k: int) -> int:
  """oracle.py: [CLS] attention plus a bonus on the region (elementwise), then top_k(N, k)."""
  return top_k_flops(n, k)


def grip_flops(config, n: int, k: int, text_len: int) -> int:
  """grip.py: one scorer pass on (V, Q, rho) (`costs.scorer_flops`), then the greedy top-k of its N
  logits (`policy.greedy`):

    scorer_flops(N, T) + top_k(N, k)
  """
  return costs.scorer_flops(config, n, text_len) + top_k_flops(n, k)


def divprune_flops(n: int, k: int, dim: int) -> int:
  """divprune.py (`greedy_order`) on the N projected tokens of width D:

    normalize the N tokens (once for both sides)       2 N D
    Gram matrix of cosines                             2 N^2 D
    nearest other token of each (row min)             N^2
    first pick, the most isolated (argmax)             N
    k - 1 steps: argmax over N, then the elementwise
      minimum with the pick's distance row             2 N each
  """
  n, k, dim = _count('n', n, 1), _count('k', k, 1), _count('dim', dim, 1)
  return 2 * n * dim + 2 * n * n * dim + n * n + n + (k - 1) * 2 * n


def cdpruner_flops(n: int, k: int, text_len: int, dim: int) -> int:
  """cdpruner.py (defaults: kernel on the projected tokens, w = r) with T question slots:

  Relevance (`relevance`):
    normalize the N tokens and the T question slots    2 N D + 2 T D
    cosines (N, T)                                     2 N T D
    masked sum over the question (cos * mask)          2 N T
    count of real question tokens                      T
    min and max over N for the min-max scaling         2 N
  Kernel (`kernel`): the Gram matrix of the tokens normalized above, 2 N^2 D (L = diag(r) S diag(r)
  is elementwise).
  Greedy MAP (`greedy_map`), k steps, each: argmax of the N residual gains (N) and the contraction
  of the pick's column with the (k, N) factor, over all k rows of the fixed-size factor (2 k N):
    k (N + 2 k N)
  """
  n, k, t = _count('n', n, 1), _count('k', k, 1), _count('text_len', text_len)
  dim = _count('dim', dim, 1)
  relevance = 2 * n * dim + 2 * t * dim + 2 * n * t * dim + 2 * n * t + t + 2 * n
  return relevance + 2 * n * n * dim + k * (n + 2 * k * n)


def visionzip_flops(n: int, k: int, feature_dim: int, dim: int, dominant: int, contextual: int) -> int:
  """visionzip.py with d = `dominant`, c = `contextual` (d + c = k) and the M = N - k tokens left
  after the d dominant ones and the c targets (features of width Dv, tokens of width D):

    dominant: top-k of the N [CLS] values              top_k(N, d)
  then, if c > 0 and M > 0:
    normalize the M others and the c targets           2 (M + c) Dv
    their cosines (M, c)                               2 M c Dv
    each other's most similar target (argmax)          M c
    sums: one-hot (M, c) assignment times the
      others' tokens, a dense contraction              2 M c D
    counts: the assignment summed over M               M c
  (target + sum / count is elementwise.)
  """
  n, k = _count('n', n, 1), _count('k', k, 1)
  d, c = _count('dominant', dominant), _count('contextual', contextual)
  if d + c != k or k > n:
    raise ValueError(f'dominant={d} + contextual={c} != k={k} (or k > N={n}).')
  flops = top_k_flops(n, d)
  m = n - k
  if c == 0 or m == 0:
    return flops
  return flops + 2 * (m + c) * feature_dim + 2 * m * c * feature_dim + m * c + 2 * m * c * dim + m * c


def vispruner_rounds(candidates: int, keep: int,
                     per_round: int = vispruner.MAX_REMOVED_PER_ROUND) -> list[tuple[int, int]]:
  """(list size M, tokens removed) of each round of `vispruner.remove_duplicates`.

  Each round splits the M tokens into A (even positions, ceil(M / 2)) and B (the rest) and removes
  min(per_round, M - keep, |A|) tokens of A, until `keep` are left.
  """
  m, keep = _count('candidates', candidates), _count('keep', keep)
  per_round = _count('per_round', per_round, 1)
  if keep > m:
    raise ValueError(f'keep={keep} > candidates={m}.')
  rounds = []
  while m > keep:
    removed = min(per_round, m - keep, -(-m // 2))
    rounds.append((m, removed))
    m -= removed
  return rounds


def vispruner_flops(n: int, k: int, feature_dim: int, important: int,
                    per_round: int = vispruner.MAX_REMOVED_PER_ROUND) -> int:
  """vispruner.py: all N tokens sorted by [CLS] attention (the first `important` kept, the rest
  a list in that order), then duplicate removal down to k - important:

    rank the N [CLS] values (full sort)                sort(N)
  then each round (M, r) of `vispruner_rounds(N - important, k - important, per_round)`, with
  a = ceil(M / 2), b = floor(M / 2):
    normalize the a + b = M features                   2 M Dv
    cosines of A against B                             2 a b Dv
    each A token's most similar B token (max)         a b
    A sorted by that score (full sort)                 sort(a)
  """
  n, k, imp = _count('n', n, 1), _count('k', k, 1), _count('important', important)
  if not imp <= k <= n:
    raise ValueError(f'important={imp}, k={k}, N={n}: expected important <= k <= N.')
  flops = sort_flops(n)
  if k == imp:
    return flops
  for m, _ in vispruner_rounds(n - imp, k - imp, per_round):
    a, b = -(-m // 2), m // 2
    flops += 2 * m * feature_dim + 2 * a * b * feature_dim + a * b + sort_flops(a)
  return flops


# ---- In-LM pruners (run through `inlm.run_schedule`). ---------------------------------------------


def fastv_flops(heads: int, n: int, k: int) -> int:
  """fastv.py: at its one drop (layer K), the last token's row of layer K - 1's attention (computed
  by that layer anyway), averaged over H heads (H N), then top_k(N, k)."""
  heads, n, k = _count('heads', heads, 1), _count('n', n, 1), _count('k', k, 1)
  return heads * n + top_k_flops(n, k)


def pyramiddrop_flops(config, n: int, text_len: int, drops, prefix_len: int = 1) -> int:
  """pyramiddrop.py (`rank_layer='next'`): at each boundary into layer l, with p visual tokens
  present, c kept and L = P0 + p + T, the layer l attention is run over the longer sequence for
  ranking only (its output is discarded, so XLA keeps just the q and k projections and the score
  matrix: `costs.attention_probs_flops(L)`); the last token's row is averaged over H heads (H p)
  and the top c kept:

    sum over boundaries of  attention_probs_flops(L) + H p + top_k(p, c)
  """
  heads = config.model.llm.num_heads
  flops, present = 0, _count('n', n, 1)
  for _, count in drops:
    length = _count('prefix_len', prefix_len) + present + _count('text_len', text_len)
    flops += costs.attention_probs_flops(config, length) + heads * present + top_k_flops(present, count)
    present = count
  return flops


def sparsevlm_flops(heads: int, n: int, k: int, text_len: int, dim: int, recycled: int, pool: int,
                    prefix_len: int = 1) -> int:
  """sparsevlm.py with r = `recycled`, P = `pool` and L = P0 + N + T.

  Raters at the LM input (`text_raters`):
    logits v_i . t_j (N, T)                            2 N T D
    softmax over T (max and sum)                       2 N T
    mean over the N visual tokens                      N T
    masked mean over the real text tokens              2 T + T
    threshold m > mean, any rater per example          T + T
  At the sparsification layer S, from layer S - 1's attention (computed anyway; `rater_scores`):
    mean over H heads of the whole (L, L) matrix       H L^2   (as written; XLA keeps it whole)
    raters' weights times the (T, N) text-to-image
      block                                            2 T N
    number of raters                                   T
    r = 0 (k = N): top_k(N, k); otherwise the k - r kept by score, top_k(N, k - r), and recycling
  (`recycle`) over the P highest-scoring deleted tokens of width D:
    the pool                                           top_k(N, P)
    normalize the pool and its first r (anchors)       2 P D + 2 r D
    cosines of the pool to the anchors                 2 P r D
    each pool token's anchor (argmax)                  P r
    merge: one-hot (P, r) times the pool's states      2 P r D
    group sizes (the one-hot summed over P)            P r
  """
  heads, n, k = _count('heads', heads, 1), _count('n', n, 1), _count('k', k, 1)
  t, dim = _count('text_len', text_len), _count('dim', dim, 1)
  r, pool = _count('recycled', recycled), _count('pool', pool)
  length = _count('prefix_len', prefix_len) + n + t
  raters = 2 * n * t * dim + 2 * n * t + n * t + 3 * t + 2 * t
  scores = heads * length * length + 2 * t * n + t
  if r == 0:
    return raters + scores + top_k_flops(n, k)
  recycle = (top_k_flops(n, pool) + 2 * pool * dim + 2 * r * dim + 2 * pool * r * dim + pool * r
             + 2 * pool * r * dim + pool * r)
  return raters + scores + top_k_flops(n, k - r) + recycle


def sparsevlm_pool(n: int, k: int, recycle_frac: float = sparsevlm.DEFAULT_RECYCLE_FRAC) -> int:
  """P, the deleted tokens `sparsevlm.make_select` recycles at budget k (0 when nothing is recycled):
  min(deleted, max(r, ceil(recycle_frac * deleted))) with deleted = N - (k - r)."""
  r = sparsevlm.num_recycled(n, k)
  if r == 0:
    return 0
  deleted = n - (k - r)
  return min(deleted, max(r, math.ceil(recycle_frac * deleted)))


def dart_flops(n: int, k: int, text_len: int, dim: int, kv_dim: int, pivot_image: int = dart.PIVOT_IMAGE,
               pivot_text: int = dart.PIVOT_TEXT, prefix_len: int = 1) -> int:
  """dart.py at its one drop (layer K), from layer K - 1's keys (computed anyway), with
  L = P0 + N + T, KVH Dh = `kv_dim`, P_img = min(pivot_image, k), P_txt = min(pivot_text, T) and the
  per-pivot quotas q_j of `dart.quotas(k)`:

    L1 norm of every slot's keys (all heads)           L KVH Dh
    final RMSNorm of the L hidden states               2 L D
    image pivots                                       top_k(N, P_img)
    text pivots (among the T slots)                    top_k(T, P_txt)
    normalize the P = P_img + P_txt pivots and the N
      visual states; their cosines (P, N)              2 P D + 2 N D + 2 P N D
    each pivot's q_j least similar tokens              sum_{j < P, q_j > 0} top_k(N, q_j)
    the quotas of missing text pivots (T < pivot_text) top_k(N, missing)
  """
  n, k, t = _count('n', n, 1), _count('k', k, 1), _count('text_len', text_len)
  dim, kv_dim = _count('dim', dim, 1), _count('kv_dim', kv_dim, 1)
  length = _count('prefix_len', prefix_len) + n + t
  p_img, p_txt = min(pivot_image, k), min(pivot_text, t)
  quotas = dart.quotas(k, pivot_image, pivot_text)
  p = p_img + p_txt
  flops = length * kv_dim + 2 * length * dim + top_k_flops(n, p_img) + top_k_flops(t, p_txt)
  flops += 2 * p * dim + 2 * n * dim + 2 * p * n * dim
  picked = [q for q in quotas[:p] if q > 0]
  flops += sum(top_k_flops(n, q) for q in picked)
  missing = k - p_img - sum(picked)
  return flops + (top_k_flops(n, missing) if missing else 0)


# ---- Dispatch. -----------------------------------------------------------------------------------


def selection_flops(config, method: str, k: int, text_len: int, prefix_len: int = 1) -> int:
  """FLOPs per example that `method` spends choosing k of the N visual tokens of `config`, with each
  method's default hyper-parameters (those the eval harness runs).

  Args:
    config: the full ConfigDict (model geometry; `agent` for 'grip').
    method: an eval method name (references, `gripjax.pruning.METHODS`, 'oracle', 'grip').
    k: kept visual tokens (0 for 'blind').
    text_len: T question slots (the padded length the methods run on).
    prefix_len: P0 slots before the image in the LM sequence (1: <bos>); in-LM methods rank on them.
  """
  if method in FREE_METHODS:
    return 0
  n = costs.num_patches(config)
  k = _count('k', k, 1)
  if k > n:
    raise ValueError(f'k={k} > N={n} visual tokens.')
  llm = config.model.llm
  d, dv = llm.width, config.model.vit.width
  if method == 'grip':
    return grip_flops(config, n, k, text_len)
  if method == 'random':
    return random_flops(n, k)
  if method == 'fastervlm':
    return fastervlm_flops(n, k)
  if method == 'oracle':
    return oracle_flops(n, k)
  if method == 'divprune':
    return divprune_flops(n, k, d)
  if method == 'cdpruner':
    return cdpruner_flops(n, k, text_len, d)
  if method == 'visionzip':
    return visionzip_flops(n, k, dv, d, *visionzip.split_budget(k))
  if method == 'vispruner':
    return vispruner_flops(n, k, dv, vispruner.split_budget(k)[0])
  if method == 'fastv':
    return fastv_flops(llm.num_heads, n, k)
  if method == 'pyramiddrop':
    drops = inlm.inlm_schedule(config, 'pyramiddrop', k)
    return pyramiddrop_flops(config, n, text_len, drops, prefix_len)
  if method == 'sparsevlm':
    return sparsevlm_flops(llm.num_heads, n, k, text_len, d, sparsevlm.num_recycled(n, k),
                           sparsevlm_pool(n, k), prefix_len)
  if method == 'dart':
    kv_dim = llm.num_kv_heads * costs.llm_head_dim(config)
    return dart_flops(n, k, text_len, d, kv_dim, prefix_len=prefix_len)
  raise ValueError(f'selection_flops: unknown method {method!r}; expected one of {FREE_METHODS}, '
                   "'random', 'grip', 'oracle' or an in-LM or pre-LM method of gripjax.pruning.METHODS.")


def row_flops(config, method: str, k: int, text_len: int, vocab_size: int | None = None,
              prefix_len: int = DEFAULT_PREFIX_LEN) -> dict[str, int]:
  """The FLOP columns of an eval row of `method` at k kept tokens, per example.

  `prefix_len`: P0, the slots before the image in the LM sequence (1: <bos> alone; a chat
  template's head: its length); the LM runs on them, so the prefill counts them.

  Returns:
    dict with lm_prefill_flops (the LM on what it runs: `costs.prefill_flops(k)`, or for in-LM methods
    `inlm.inlm_prefill_flops`, every layer at its length), selection_flops (`selection_flops`) and
    prefill_flops (their sum).
  """
  if pruning.is_in_lm(method):
    lm = inlm.inlm_prefill_flops(config, method, k, text_len, vocab_size, prefix_len=prefix_len)
  else:
    lm = costs.prefill_flops(config, k, text_len, vocab_size, prefix_len)
  selection = selection_flops(config, method, k, text_len, prefix_len)
  return {'lm_prefill_flops': lm, 'selection_flops': selection, 'prefill_flops': lm + selection}
