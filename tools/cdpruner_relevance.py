"""What CDPruner's relevance term costs here: CDPruner against the same DPP without relevance.

  python tools/cdpruner_relevance.py [--examples=256] [--rho=0.1111111111111111] [--workdir=workdir/cdp]

Evaluates `cdpruner` (kernel diag(r) S diag(r), r the negated question relevance, as released), the
same greedy DPP with every weight 1 (`cdpruner.prune(theta=0)`: w = exp(0 * r) = 1, a plain DPP on
the projected tokens' similarity) and `divprune` on the first test examples of the shipped VLM, in
keep mode, with the eval harness. The plain DPP is not a registered method: it is added for this
run only, and its cost columns are CDPruner's.
"""

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gripjax import checks  # pylint: disable=g-import-not-at-top,wrong-import-position
from gripjax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from gripjax import pruning  # pylint: disable=g-import-not-at-top,wrong-import-position
from gripjax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from gripjax.eval import evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position
from gripjax.pruning import cdpruner  # pylint: disable=g-import-not-at-top,wrong-import-position
from gripjax.pruning import selection_costs  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = 'dpp_plain'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--examples', type=int, default=256, help='first test examples')
  parser.add_argument('--rho', type=float, default=1 / 9, help='keep ratio')
  parser.add_argument('--workdir', default='workdir/cdp', help='holds the prepared dataset')
  args = parser.parse_args(argv)
  path = os.path.join(ROOT, 'configs', 'gripbench_tiny.py')
  config = checks.check_config(config_lib.load_config_file(path))
  pruning.METHODS[PLAIN] = functools.partial(cdpruner.prune, theta=0.0)
  count = selection_costs.selection_flops
  selection_costs.selection_flops = (
      lambda c, m, *a, **k: count(c, 'cdpruner' if m == PLAIN else m, *a, **k))
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  params = runtime.load_vlm_params(config, vlm)
  source = runtime.split_source(config, args.workdir, 'test')
  rows = evaluate.evaluate(config, vlm, params, source, tok, ('cdpruner', PLAIN, 'divprune'),
                           (args.rho,), ('keep',), args.examples, progress=False)
  for r in rows:
    print(f"{r['method']:10s} kept {r['kept_tokens']:3d}  accuracy {100 * r['accuracy']:.1f}%  "
          f"region recall {100 * (r['region_recall'] or 0):.1f}%  (n={r['n']})")


if __name__ == '__main__':
  main()
