"""The relaxation baseline: straight-through top-k equals hard pruning forward, gradients, its step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gripjax import config_lib
from gripjax.models import scorer as scorer_lib
from gripjax.rl import policy
from gripjax.rl import relaxation
from gripjax.rl import rewards as rewards_lib
from gripjax.train import step as step_lib
from tests.test_step import FAST, N, T, fake_batch, tiny_config, tiny_vlm


def test_relaxed_top_k_sums_to_k_and_tends_to_hard():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(3, 2, 10)) * 2.0, jnp.float32)  # (B, S, N)
  k = jnp.asarray([1, 3, 5])
  soft = relaxation.relaxed_top_k(z, k, 5, 1.0)
  np.testing.assert_allclose(np.sum(soft, -1), np.broadcast_to(k[:, None], (3, 2)), rtol=1e-4)
  assert np.all(soft >= 0)
  cold = relaxation.relaxed_top_k(z, k, 5, 1e-3)
  hard = policy.keep_mask(jax.lax.top_k(z, 5)[1], 10, policy.step_mask(k, 5)[:, None, :])
  np.testing.assert_allclose(cold, hard.astype(np.float32), atol=1e-3)


@pytest.fixture(scope='module')
def inputs():
  vlm, params = tiny_vlm()
  batch = {k: jnp.asarray(v) for k, v in fake_batch(4).items()}
  visual, _ = jax.jit(functools.partial(vlm.apply, method='encode_image'), compiler_options=FAST)(
      {'params': params}, batch['pixels'])
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, N)), jnp.float32)
  k = jnp.asarray([2, 4, 5, 8])
  return vlm, params, batch, visual, logits, k


@pytest.mark.parametrize('mode', ['keep', 'renumber'])
def test_straight_through_forward_equals_hard_pruning(inputs, mode):
  """The value of the relaxed forward is the VLM on only the k_b sampled tokens."""
  vlm, params, batch, visual, logits, k = inputs
  ids, qvalid = batch['question_ids'], batch['question_valid']

  @functools.partial(jax.jit, compiler_options=FAST)
  def run(logits):
    mask, hard, order = relaxation.straight_through_top_k(jax.random.PRNGKey(3), logits, k, 8, 0.5)
    soft = relaxation.soft_answer_logits(vlm, params, visual, mask[:, 0], hard[:, 0], ids, qvalid,
                                         mode)
    index, valid = policy.sorted_index(order[:, 0], policy.step_mask(k, 8))  # (B, 8)
    kept = jnp.take_along_axis(visual, index[..., None], axis=1)  # (B, 8, D)
    pruned = vlm.apply({"params": params}, kept, index, valid, ids, qvalid, mode, method="answer_logits")
    return soft, pruned, mask, hard

  soft, pruned, mask, hard = run(logits)
  np.testing.assert_array_equal(mask, hard.astype(np.float32))  # Exactly 0/1 in value.
  np.testing.assert_array_equal(np.sum(hard, -1)[:, 0], k)
  np.testing.assert_allclose(soft, pruned, atol=2e-5, rtol=1e-5)
  # And the mask matters: another keep-set gives other logits.
  other, *_ = run(-logits)
  assert np.max(np.abs(other - soft)) > 1e-3


def test_gradients_finite_and_reach_dropped_tokens(inputs):
  vlm, params, batch, visual, logits, k = inputs
  config = tiny_config()
  scorer = scorer_lib.make_scorer(config)
  question = vlm.apply({'params': params}, batch['question_ids'], method='embed_text')
  qvalid = batch['question_valid'].astype(bool)
  scorer_params = scorer_lib.init_scorer(scorer, jax.random.PRNGKey(0), N, visual.shape[-1], T)
  rho = k / N

  def loss(p):
    s = scorer.apply({'params': p}, visual, question, qvalid, rho)  # (B, N)
    mask, hard, _ = relaxation.straight_through_top_k(jax.random.PRNGKey(5), s, k, 8, 0.5)
    out = relaxation.soft_answer_logits(vlm, params, visual, mask[:, 0], hard[:, 0],
                                        batch['question_ids'], qvalid)
    return jnp.mean(relaxation.answer_loss(out, batch['answer_id'], False)), hard[:, 0]

  def mask_loss(m, hard):  # The loss as a function of the mask values themselves.
    out = relaxation.soft_answer_logits(vlm, params, visual, m, hard, batch['question_ids'], qvalid)
    return jnp.mean(relaxation.answer_loss(out, batch['answer_id'], False))

  @functools.partial(jax.jit, compiler_options=FAST)
  def run(p):
    (_, hard), grads = jax.value_and_grad(loss, has_aux=True)(p)
    mask_grad = jax.grad(mask_loss)(hard.astype(jnp.float32), hard)
    return grads, mask_grad, hard

  grads, mask_grad, hard = run(scorer_params)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert float(optax.global_norm(grads)) > 0
  assert np.abs(np.asarray(grads['head']['kernel'])).max() > 0
  # Attention weights (not a validity mask) carry the relaxation: dropped tokens get a gradient too.
  dropped = np.abs(np.asarray(mask_grad))[~np.asarray(hard)]
  assert np.all(np.isfinite(mask_grad)) and dropped.max() > 0


def build(config):
  vlm, vlm_params = tiny_vlm()
  scorer = scorer_lib.make_scorer(config)
  tx = step_lib.make_optimizer(config)
  init = step_lib.make_init(scorer, tx, config, N, config.model.llm.width, T)
  state = jax.jit(init, compiler_options=FAST)(jax.random.PRNGKey(0))
  train_step = step_lib.make_train_step(vlm, scorer, tx, config, compiler_options=FAST)
  return vlm_params, state, train_step


def host(tree):
  return jax.tree.map(np.asarray, tree)


def test_relax_step_changes_params_and_compiles_once():
  config = tiny_config(warmup_steps=1, algorithm='relaxation', relax_tau=0.5, relax_samples=2)
  vlm_params, state, train_step = build(config)
  batch = {k: jnp.asarray(v) for k, v in fake_batch(8).items()}
  history, metrics = [host(state.params)], []
  for _ in range(3):
    state, m = train_step(state, batch, vlm_params)  # state is donated
    metrics.append(host(m))
    history.append(host(state.params))
  assert train_step._cache_size() == 1
  assert [float(m['phase']) for m in metrics] == [0.0, 1.0, 1.0]
  assert all(set(m) == set(step_lib.METRIC_KEYS) for m in metrics)
  for m in metrics:
    assert all(np.isfinite(v) for v in m.values()), m
  assert metrics[1]['loss'] > 0 and metrics[1]['tokens_kept'] >= 2 and metrics[1]['entropy'] > 0
  assert metrics[1]['grad_norm'] > 0
  for a, b in zip(history, history[1:]):
    diff = max(np.max(np.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert diff > 0
  # The trained params have the GRPO agent's structure (what make_grip_prune evaluates).
  assert jax.tree.structure(history[-1]) == jax.tree.structure(history[0])
  assert int(state.step) == 3


def test_answer_loss_matches_the_rewards():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  full = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  answer = jnp.asarray([0, 1, 2, 3, 6])
  np.testing.assert_allclose(relaxation.answer_loss(logits, answer, False),
                             -rewards_lib.answer_logprob(logits, answer), rtol=1e-6)
  np.testing.assert_allclose(relaxation.answer_loss(logits, full, True),
                             -np.log(rewards_lib.agreement(logits, full)), rtol=1e-5, atol=1e-6)


def test_relax_options_validated():
  with pytest.raises(config_lib.ConfigError, match='relax_tau=0'):
    relaxation.relax_options(tiny_config(relax_tau=0))
  with pytest.raises(config_lib.ConfigError, match='relax_samples=0'):
    relaxation.relax_options(tiny_config(relax_samples=0))
  # By default the relaxation draws as many keep-sets per example as GRPO's group: the same number
  # of VLM forwards per training example.
  config = tiny_config()
  assert relaxation.relax_options(config) == (relaxation.DEFAULT_TAU, config.train.group_size)
