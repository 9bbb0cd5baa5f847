"""One budget: the same rho gives the same k, and the agent the same kept set, on every path."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax import budget
from gripjax.models import scorer as scorer_lib
from gripjax.pruning import base
from gripjax.pruning import grip
from gripjax.rl import policy
from tests import test_inference
from tests.test_inference import setup  # pylint: disable=unused-import  (the tiny VLM + agent fixture)

# Ratios meant to be exact (1/9, 1/18 at N = 144 and 576), one just above an integer product
# (0.0191 * 576 = 11.0016: 12 tokens, where an older tolerance of 1e-5 N gave 11 in training), and
# random ones.
RATIOS = [1 / 2, 1 / 4, 1 / 9, 1 / 18, 1 / 36, 0.0191, 1.0, 1e-9] + list(
    np.random.default_rng(0).uniform(1e-3, 1.0, 200))


def test_k_by_hand():
  # ceil(rho * N) with products meant to be exact kept exact.
  assert budget.budget_to_k(1 / 9, 144) == 16
  assert budget.budget_to_k(1 / 18, 144) == 8
  assert budget.budget_to_k(1 / 9, 576) == 64
  assert budget.budget_to_k(0.0191, 576) == 12  # 11.0016 -> 12
  assert budget.budget_to_k(0.11, 10) == 2  # 1.1 -> 2
  assert budget.budget_to_k(0.1, 10) == 1
  assert budget.budget_to_k(0.5, 7) == 4  # 3.5 -> 4
  assert budget.budget_to_k(1.0, 7) == 7
  assert budget.budget_to_k(1e-9, 7) == 1  # at least one token
  for bad in (0.0, -0.1, 1.01, float('nan'), 'half'):
    with pytest.raises(ValueError, match='keep ratio in \\(0, 1\\]'):
      budget.budget_to_k(bad, 144)
  with pytest.raises(ValueError, match='n=0 is invalid'):
    budget.budget_to_k(0.5, 0)
  assert doctest.testmod(budget).failed == 0


@pytest.mark.parametrize('n', [16, 36, 144, 576, 2880])
def test_static_and_traced_k_agree(n):
  """The train step's traced k (eager, jitted, vmapped) equals the static k of eval and inference."""
  rho = np.asarray(RATIOS, np.float32)
  static = np.array([budget.budget_to_k(float(r), n) for r in rho])
  eager = np.asarray(budget.budget_k(rho, n))
  jitted = np.asarray(jax.jit(budget.budget_k, static_argnums=1)(rho, n))
  vmapped = np.asarray(jax.jit(jax.vmap(lambda r: budget.budget_k(r, n)))(rho))
  np.testing.assert_array_equal(eager, static)
  np.testing.assert_array_equal(jitted, static)
  np.testing.assert_array_equal(vmapped, static)
  assert jitted.dtype == np.int32
  # The pruners' name for it is the same function.
  assert base.budget_to_k is budget.budget_to_k


def test_same_kept_set_in_training_eval_and_inference(setup):  # pylint: disable=redefined-outer-name
  """The agent keeps the same tokens for one rho whether it runs in the train step's form (traced
  per-example rho and k), as the eval harness's `grip` pruner, or in pruned inference."""
  config, _, vlm, params, images, gen = setup
  n = test_inference.N
  variables = {'params': params}
  rhos = [0.5, 1 / 9, 0.3, 0.0191]
  pixels = np.repeat(images[:1], len(rhos), axis=0)  # (R, H, W, 3): one image, one rho per row
  ids, valid = gen._encode_questions([test_inference.QUESTIONS[0]] * len(rhos))  # pylint: disable=protected-access
  visual, _ = vlm.apply(variables, pixels, method='encode_image')  # (R, N, D)
  question = vlm.apply(variables, ids, method='embed_text')
  scorer = scorer_lib.make_scorer(config)
  agent = gen.agent_params

  # Training: rho traced per example, k = budget_k(rho), greedy top-k of the policy's logits.
  rho = jnp.asarray(rhos, jnp.float32)
  k_train = np.asarray(budget.budget_k(rho, n))
  logits = scorer.apply({'params': agent}, visual, question, jnp.asarray(valid), rho)  # (R, N)
  rho_gen, k_gen = gen._budgets_to_k(rhos, len(rhos))  # pylint: disable=protected-access
  np.testing.assert_array_equal(k_gen, k_train)
  np.testing.assert_array_equal(rho_gen, np.asarray(rho))  # inference feeds the rho asked for
  for i, r in enumerate(rhos):
    k = budget.budget_to_k(r, n)
    assert k == k_train[i]
    train_kept = np.sort(np.asarray(policy.greedy(logits[i:i + 1], k)), axis=-1)
    ctx = base.PruneContext(tokens=visual[i:i + 1], features=visual[i:i + 1],
                            cls_attn=jnp.zeros((1, n)), question=question[i:i + 1],
                            question_mask=jnp.asarray(valid[i:i + 1]), rng=jax.random.key(0),
                            grid=(6, 6))
    eval_kept = np.asarray(grip.make_grip_prune(scorer, agent, r)(ctx, k).index)
    infer_kept = np.asarray(gen.kept(variables, agent, pixels[i:i + 1], ids[i:i + 1],
                                     valid[i:i + 1], rho_gen[i:i + 1], None, k=k).index)
    np.testing.assert_array_equal(eval_kept, train_kept, err_msg=f'rho={r}')
    np.testing.assert_array_equal(infer_kept, train_kept, err_msg=f'rho={r}')

