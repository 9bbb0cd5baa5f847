"""Visual-token pruners, one file per method, one signature: `prune(ctx, k) -> Kept`.

See `base.py` for the contract. Pre-LM methods only look at the context's tensors; in-LM methods
(FastV, PyramidDrop, SparseVLM) will use `ctx.lm` and join `METHODS` under their own names.

| method     | paper                       | scores / rule                                         |
|------------|-----------------------------|-------------------------------------------------------|
| random     | -                           | uniform random k-subset per example                   |
| uniform    | -                           | evenly spaced lattice over the patch grid             |
| fastervlm  | arXiv 2412.01818 (v1)       | top-k [CLS] attention                                 |
| visionzip  | arXiv 2412.04467            | dominant by [CLS] attention + merged contextual       |
| divprune   | arXiv 2503.02175            | greedy max-min cosine distance on tokens              |
| vispruner  | arXiv 2412.01818 (v2), ICCV | [CLS]-important + duplicate-removed diverse           |
| cdpruner   | arXiv 2506.10967            | greedy MAP of a question-conditioned DPP              |
| dart       | arXiv 2502.11494            | norm pivots + tokens least similar to each pivot      |

Each file's header lists its deviations from the paper.
"""

from gripjax.pruning import base
from gripjax.pruning import cdpruner
from gripjax.pruning import dart
from gripjax.pruning import divprune
from gripjax.pruning import fastervlm
from gripjax.pruning import fastv
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
    'dart': dart.prune,
    # In-LM methods: their prune(ctx, k) raises; run them with gripjax.pruning.inlm.run.
    'fastv': fastv.prune,
    'pyramiddrop': pyramiddrop.prune,
    'sparsevlm': sparsevlm.prune,
}

# Methods that drop visual tokens inside the LM (see inlm.py); the harness calls inlm.run for them.
IN_LM_METHODS = ('fastv', 'pyramiddrop', 'sparsevlm')


def is_in_lm(name: str) -> bool:
  """True if `name` is an in-LM method (run through `gripjax.pruning.inlm.run`, not `prune`)."""
  return name in IN_LM_METHODS


def get(name: str):
  """Returns the pruner registered under `name`."""
  try:
    return METHODS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f'Unknown pruning method {name!r}; known methods: {", ".join(sorted(METHODS))}.') from None
