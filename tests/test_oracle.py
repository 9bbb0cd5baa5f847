"""Tests of the oracle reference pruner (gripjax/pruning/oracle.py) and its place in the eval harness.

Run: .venv/bin/python -m pytest -q tests/test_oracle.py
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax import pruning
from gripjax import runtime
from gripjax.data import pipeline
from gripjax.data.grip_bench import dense
from gripjax.eval import evaluate
from gripjax.pruning import base
from gripjax.pruning import oracle
from tests import helpers

# Two examples on a 2 x 3 grid (N = 6). Token n of example b is the vector (10 b + n) * ones.
CLS = np.array([[0.30, 0.05, 0.20, 0.10, 0.25, 0.10],   # region {1, 3}
                [0.10, 0.10, 0.40, 0.20, 0.10, 0.10]],  # no region: [CLS] attention alone
               np.float32)
REGION = np.array([[0, 1, 0, 1, 0, 0],
                   [0, 0, 0, 0, 0, 0]], bool)
# Kept indices worked out by hand from CLS and REGION, per k.
#   example 0: region patches first (3 outranks 1 by [CLS] attention, 0.10 > 0.05), then the rest
#              by attention: 0 (0.30), 4 (0.25), 2 (0.20), 5 (0.10).
#   example 1: [CLS] attention: 2 (0.40), 3 (0.20), then the 0.10 tie goes to the lower index: 0, 1.
EXPECTED = {
    1: [[3], [2]],
    2: [[1, 3], [2, 3]],
    3: [[0, 1, 3], [0, 2, 3]],
    4: [[0, 1, 3, 4], [0, 1, 2, 3]],
    6: [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]],
}


def make_ctx(region=REGION, cls=CLS, region_context=True):
  b, n = cls.shape
  tokens = (10 * np.arange(b)[:, None] + np.arange(n)[None, :]).astype(np.float32)  # (B, N)
  fields = dict(
      tokens=jnp.asarray(np.repeat(tokens[..., None], 4, axis=-1)),  # (B, N, 4)
      features=jnp.zeros((b, n, 3)), cls_attn=jnp.asarray(cls), question=jnp.zeros((b, 2, 4)),
      question_mask=jnp.ones((b, 2), bool), rng=jax.random.PRNGKey(0), grid=(2, 3))
  if not region_context:
    return base.PruneContext(**fields)
  return oracle.RegionContext(**fields, region_mask=jnp.asarray(region))


@pytest.mark.parametrize('k', sorted(EXPECTED))
def test_keeps_region_first_then_cls_attention(k):
  kept = jax.jit(functools.partial(oracle.prune, k=k))(make_ctx())
  np.testing.assert_array_equal(np.asarray(kept.index), EXPECTED[k])
  # The kept tokens are the tokens of those patches: value 10 b + n.
  want = 10 * np.arange(2)[:, None] + np.asarray(EXPECTED[k])
  np.testing.assert_array_equal(np.asarray(kept.tokens)[..., 0], want)


def test_region_larger_than_budget_keeps_its_most_attended_patches():
  region = np.array([[1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
  kept = oracle.prune(make_ctx(region), 2)
  # Example 0: region {0, 1, 2, 4} by attention 0 (0.30), 4 (0.25); example 1: all region: 2, 3.
  np.testing.assert_array_equal(np.asarray(kept.index), [[0, 4], [2, 3]])


def test_needs_the_region():
  with pytest.raises(ValueError, match='RegionContext'):
    oracle.prune(make_ctx(region_context=False), 2)
  with pytest.raises(ValueError, match='region_mask has shape'):
    oracle.prune(make_ctx(region=REGION[:, :4]), 2)
  with pytest.raises(ValueError, match='k=7 is out of range'):
    oracle.prune(make_ctx(), 7)


def test_registered_as_a_reference_not_a_baseline():
  assert pruning.get('oracle') is oracle.prune
  assert 'oracle' in pruning.REFERENCE_PRUNERS and 'oracle' not in pruning.METHODS
  assert 'oracle' in evaluate.ORACLE_METHODS and 'oracle' in evaluate.known_methods()
  config = helpers.load_config('gripbench_dense')
  assert 'oracle' in config.eval.methods and 'oracle' in config.ablation.references


def _region_batch():
  """A batch of 8 dense smoke examples (48 x 48 images, G = 6), encoded by the pipeline."""
  examples = [dense.render_features((0, 'test', i, 48, 8))[1] for i in range(8)]
  return next(pipeline.eval_batches(examples, runtime.tokenizer(), 8, 16))


def test_eval_step_passes_the_batch_region_to_the_oracle():
  """With a random smoke VLM, the oracle row keeps min(k, |region|) answer patches of each example."""
  config = helpers.load_config('gripbench_dense', 'smoke')
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  params = runtime.init_params(vlm, jax.random.PRNGKey(0))
  batch = {key: jnp.asarray(v) for key, v in _region_batch().items() if key != 'valid'}
  region = np.asarray(batch['region_mask'])
  size = region.sum(-1)  # (B,) answer patches; 0 for a "zero" count
  assert size.max() <= 4 and (size > 0).sum() >= 6
  enc = evaluate.make_encode(vlm)(params, batch)
  rng = jax.random.PRNGKey(0)
  k = 3  # below the largest region (4 patches) when one is in the batch, above the others
  _, recall, index = evaluate.make_eval_step(vlm, 'oracle', k)(params, enc, batch, rng,
                                                               np.asarray(False))
  hit = np.take_along_axis(region, np.asarray(index), axis=1).sum(-1)  # kept answer patches (B,)
  np.testing.assert_array_equal(hit, np.minimum(k, size))  # as many answer patches as fit
  want = np.where(size > 0, hit / np.maximum(size, 1), np.nan)
  np.testing.assert_allclose(np.asarray(recall), want)
