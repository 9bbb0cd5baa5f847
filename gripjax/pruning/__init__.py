"""Visual-token pruners, one file per method, one signature: `prune(ctx, k) -> Kept`.

See `base.py` for the contract. Pre-LM methods only look at the context's tensors; in-LM methods
(FastV, PyramidDrop, SparseVLM, DART) run LM layers and are called through `inlm.run` (their
`prune(ctx, k)` raises).

| method           | paper                 | released code             | rule                                       |
|------------------|-----------------------|---------------------------|--------------------------------------------|
| random           | -                     | -                         | uniform random k-subset per example        |
| uniform          | -                     | -                         | evenly spaced lattice over the patch grid  |
| fastervlm        | arXiv 2412.01818 (v1) | Theia-4869/FasterVLM      | top-k [CLS] attention                      |
| visionzip        | arXiv 2412.04467      | dvlab-research/VisionZip  | [CLS] dominant + target + mean(assigned)   |
| divprune         | arXiv 2503.02175      | vbdi/divprune             | greedy max-min cosine distance on tokens   |
| vispruner        | arXiv 2412.01818 (v2) | Theia-4869/VisPruner      | [CLS] important + <= 8 duplicates a round  |
| cdpruner         | arXiv 2506.10967      | Theia-4869/CDPruner       | greedy MAP DPP, negated relevance weights  |
| dart (LM)        | arXiv 2502.11494      | ZichenWen1/DART           | L1 key-norm image + text pivots, K = 2     |
| fastv (LM)       | arXiv 2403.06764      | pkunlp-icler/FastV        | last token's attention after layer K = 2   |
| pyramiddrop (LM) | arXiv 2410.17247      | Cooperx521/PyramidDrop    | staged drops, next layer's last-token row  |
| sparsevlm (LM)   | arXiv 2410.04417      | Gumpest/SparseVLMs        | input-chosen raters' attention + recycling |
| oracle (ref.)    | -                     | -                         | answer region first, then [CLS] attention  |

`oracle` is a reference, not a baseline: it reads the answer region (a label), so it lives in
`REFERENCE_PRUNERS`, not `METHODS`, and needs an `oracle.RegionContext`; `get` finds both.

Each file's header names the released file it follows and lists its deviations from the released code
at our geometry.
"""

from gripjax.pruning import base
from gripjax.pruning import cdpruner
from gripjax.pruning import dart
from gripjax.pruning import divprune
from gripjax.pruning import fastervlm
from gripjax.pruning import fastv
from gripjax.pruning import oracle
from gripjax.pruning import pyramiddrop
from gripjax.pruning import random_prune
from gripjax.pruning import sparsevlm
from gripjax.pruning import uniform
from gripjax.pruning import vispruner
from gripjax.pruning import visionzip
from gripjax.pruning.base import budget_to_k
from gripjax.pruning.base import gather_kept
from gripjax.pruning.base import Kept
from gripjax.pruning.base import PruneContext

METHODS = {
    'random': random_prune.prune,
    'uniform': uniform.prune,
    'fastervlm': fastervlm.prune,
    'visionzip': visionzip.prune,
    'divprune': divprune.prune,
    'vispruner': vispruner.prune,
    'cdpruner': cdpruner.prune,
    # In-LM methods: their prune(ctx, k) raises; run them with gripjax.pruning.inlm.run.
    'dart': dart.prune,
    'fastv': fastv.prune,
    'pyramiddrop': pyramiddrop.prune,
    'sparsevlm': sparsevlm.prune,
}

# Reference rows that prune but read the answer region (a label no deployable pruner has); they need
# an `oracle.RegionContext` and are not baselines.
REFERENCE_PRUNERS = {
    'oracle': oracle.prune,
}

# Methods that drop visual tokens inside the LM (see inlm.py); the harness calls inlm.run for them.
IN_LM_METHODS = ('fastv', 'pyramiddrop', 'sparsevlm', 'dart')


def is_in_lm(name: str) -> bool:
  """True if `name` is an in-LM method (run through `gripjax.pruning.inlm.run`, not `prune`)."""
  return name in IN_LM_METHODS


def get(name: str):
  """Returns the pruner registered under `name` (a baseline of METHODS or a REFERENCE_PRUNERS row)."""
  try:
    return METHODS[name] if name in METHODS else REFERENCE_PRUNERS[name]
  except (KeyError, TypeError):
    known = sorted(METHODS) + sorted(REFERENCE_PRUNERS)
    raise ValueError(
        f'Unknown pruning method {name!r}; known methods: {", ".join(known)}.') from None
