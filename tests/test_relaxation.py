"""The relaxation baseline: straight-through top-k equals hard pruning forward, gradients, its step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special, stats

from gripjax import checks
from gripjax import config_lib
from gripjax.eval import ablations
from gripjax.models import scorer as scorer_lib
from gripjax.rl import phase as phase_lib
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


@pytest.mark.parametrize('algorithm', ['relaxation', 'gumbel_sigmoid', 'perturbed_topk'])
def test_relax_step_changes_params_and_compiles_once(algorithm):
  config = tiny_config(warmup_steps=1, algorithm=algorithm, relax_tau=0.5, relax_samples=2)
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
  assert metrics[1]['loss'] > 0 and metrics[1]['tokens_kept'] > 0
  if algorithm != 'gumbel_sigmoid':  # Gates keep any number; top-k keeps k_b >= 2 (rho >= 1/8).
    assert metrics[1]['tokens_kept'] >= 2
  if algorithm != 'perturbed_topk':  # No closed-form entropy for the perturbed top-k (logged 0).
    assert metrics[1]['entropy'] > 0
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


def test_relaxation_options_validated():
  with pytest.raises(config_lib.ConfigError, match='relax_tau=0'):
    relaxation.relax_options(tiny_config(relax_tau=0))
  with pytest.raises(config_lib.ConfigError, match='relax_samples=0'):
    relaxation.relax_options(tiny_config(relax_samples=0))
  # By default the relaxation draws as many keep-sets per example as GRPO's group: the same number
  # of VLM forwards per training example.
  config = tiny_config()
  assert relaxation.relax_options(config) == (relaxation.DEFAULT_TAU, config.train.group_size)
  assert relaxation.gate_options(config) == (1.0, 2.0, config.train.group_size)
  assert relaxation.perturb_options(config) == (1.0, config.train.group_size)
  # The start-up check rejects every relaxation's bad field, whatever train.algorithm.
  for field, value, message in (
      ('relax_gate_tau', 0.0, 'relax_gate_tau=0.0 is invalid: expected a finite number > 0'),
      ('relax_budget_weight', -1.0, 'relax_budget_weight=-1.0 is invalid: expected a finite'),
      ('relax_perturb_sigma', float('nan'), 'relax_perturb_sigma=nan is invalid')):
    with pytest.raises(config_lib.ConfigError, match=message):
      checks.check_config(tiny_config(**{field: value}))
  checks.check_config(tiny_config(relax_budget_weight=0.0, algorithm='gumbel_sigmoid'))


# --- Gumbel-sigmoid gates. ------------------------------------------------------------------------

def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_gumbel_sigmoid_forward_is_the_hard_gate_and_gradient_the_sigmoids():
  s = np.asarray([[0.3, -1.2, 2.0, 0.0], [1.0, 1.0, -0.5, 0.7]], np.float32)  # (B, N)
  noise = np.asarray(np.random.default_rng(3).logistic(size=(2, 3, 4)), np.float32)  # (B, S, N)
  tau = 0.7
  mask, hard = relaxation.straight_through_gates(jnp.asarray(s), jnp.asarray(noise), tau)
  x = (s[:, None, :] + noise) / tau  # (B, S, N)
  np.testing.assert_array_equal(hard, x > 0)
  np.testing.assert_array_equal(mask, (x > 0).astype(np.float32))  # Exactly 0/1 in value.
  # d/ds sum_bsj c_bsj m_bsj = sum_s c_bsj sigma'(x_bsj) / tau, sigma' = sigma (1 - sigma).
  c = np.asarray(np.random.default_rng(4).normal(size=(2, 3, 4)), np.float32)
  grad = jax.grad(lambda v: jnp.sum(c * relaxation.straight_through_gates(v, noise, tau)[0]))(
      jnp.asarray(s))
  expect = np.sum(c * _sigmoid(x) * (1 - _sigmoid(x)) / tau, axis=1)
  np.testing.assert_allclose(grad, expect, rtol=1e-5, atol=1e-7)


def test_gumbel_sigmoid_gates_open_with_probability_sigmoid_s():
  """Logistic noise: P(s + l > 0) = sigmoid(s) (Gumbel noise would give 1 - exp(-exp(s)))."""
  s = jnp.asarray([[-2.0, -0.5, 0.0, 1.5]])
  _, hard = relaxation.gumbel_sigmoid_gates(jax.random.PRNGKey(0), s, 0.3, 40_000)  # (1, S, 4)
  freq = np.mean(np.asarray(hard)[0], axis=0)
  np.testing.assert_allclose(freq, _sigmoid(np.asarray(s[0])), atol=0.01)  # SE <= 0.0025.


def test_budget_penalty_value_and_gradient_by_hand():
  mask = jnp.asarray([[[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]]])  # (B=1, S=2, N=4)
  target = jnp.asarray([0.25])
  # Sample 0: mean 3/4, gap 1/2 -> 2 * 1/4 = 0.5. Sample 1: mean 1/4, gap 0 -> 0.
  np.testing.assert_allclose(relaxation.budget_penalty(mask, target, 2.0), [[0.5, 0.0]], rtol=1e-6)
  # d/dm_j 2 (mean m - 1/4)^2 = 2 * 2 * gap / N: 4 * 0.5 / 4 = 0.5 for sample 0, 0 for sample 1.
  grad = jax.grad(lambda m: jnp.sum(relaxation.budget_penalty(m, target, 2.0)))(mask)
  np.testing.assert_allclose(grad, [[[0.5] * 4, [0.0] * 4]], rtol=1e-6)


# --- Perturbed top-k. -----------------------------------------------------------------------------

def _smoothed_top_k(s, k, sigma):
  """E_Z[1[j in top-k(s + sigma Z)]] for each j by quadrature over x_j = s_j + sigma Z_j.

  P(j kept) = int phi_j(x) P(fewer than k of the others exceed x) dx; the count of others above x
  is Poisson-binomial, summed out by a small dynamic programme (independent of the code under test).
  """
  n = len(s)
  x = np.linspace(min(s) - 9 * sigma, max(s) + 9 * sigma, 40_001)
  out = np.zeros(n)
  for j in range(n):
    count = np.zeros((k, x.size))  # count[c] = P(c others above x), c < k.
    count[0] = 1.0
    for i in range(n):
      if i == j:
        continue
      above = special.ndtr((s[i] - x) / sigma)
      new = count * (1 - above)
      new[1:] += count[:-1] * above
      count = new
    out[j] = np.trapezoid(stats.norm.pdf(x, s[j], sigma) * count.sum(0), x)
  return out


def test_perturbed_top_k_forward_is_hard_top_k():
  s = jnp.asarray([[0.5, -0.3, 1.0, 0.0, 2.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
  k = jnp.asarray([2, 3])
  z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 5)), jnp.float32)
  mask, hard = relaxation.perturbed_top_k_from_noise(s, z, k, 3, 0.5)
  perturbed = np.asarray(s)[:, None, :] + 0.5 * np.asarray(z)
  for b in range(2):
    for g in range(6):
      expect = np.zeros(5, bool)
      expect[np.argsort(-perturbed[b, g])[:int(k[b])]] = True
      np.testing.assert_array_equal(hard[b, g], expect)
  np.testing.assert_array_equal(mask, np.asarray(hard, np.float32))


@pytest.mark.parametrize('k,centered', [(1, True), (2, True), (2, False)])
def test_perturbed_top_k_gradient_matches_the_smoothed_top_k(k, centered):
  """On 4 tokens: the estimator of d/ds c . E[topk(s + sigma Z)] against central differences of
  that smoothed objective computed by quadrature."""
  s = np.asarray([0.5, -0.3, 1.0, 0.0])
  c = np.asarray([1.0, -2.0, 0.5, 3.0])
  sigma, h = 0.8, 1e-4
  smoothed = lambda v: c @ _smoothed_top_k(v, k, sigma)
  ref = np.asarray([(smoothed(s + h * e) - smoothed(s - h * e)) / (2 * h) for e in np.eye(4)])
  samples = 200_000

  def objective(v):  # c . (mean over samples of the hard masks): the Monte-Carlo smoothed top-k.
    mask, _ = relaxation.perturbed_top_k(jax.random.PRNGKey(7), v[None], jnp.asarray([k]), k, sigma,
                                         samples, centered)
    return jnp.sum(jnp.mean(mask[0], axis=0) * c), jnp.mean(mask[0], axis=0)

  grad, mean_mask = jax.grad(objective, has_aux=True)(jnp.asarray(s, jnp.float32))
  # The forward average is the smoothed top-k itself; the estimator's standard error is ~0.005.
  np.testing.assert_allclose(mean_mask, _smoothed_top_k(s, k, sigma), atol=5e-3)
  np.testing.assert_allclose(grad, ref, atol=0.03)
  assert np.max(np.abs(ref)) > 0.3  # A gradient worth matching.


def test_centered_perturbed_gradient_is_zero_when_every_sample_agrees():
  """With logit gaps far above sigma every sample keeps tokens {0, 1}: the smoothed top-k is flat,
  so the centered estimate is exactly 0; the plain one is y (mean_s Z_s)^T / sigma by hand."""
  s = jnp.asarray([[50.0, 40.0, -40.0, -50.0]])
  z = np.asarray(np.random.default_rng(5).normal(size=(1, 3, 4)), np.float32)
  c = np.asarray([1.0, 2.0, -1.0, 0.5])

  def grad(centered):
    f = lambda v: jnp.sum(c * relaxation.perturbed_top_k_from_noise(v, z, jnp.asarray([2]), 2, 0.5,
                                                                     centered)[0])
    return np.asarray(jax.grad(f)(s))

  np.testing.assert_array_equal(grad(True), np.zeros((1, 4)))
  # Plain: sum_s c . y_s = 3 (c_0 + c_1) = 9 times J = y zbar^T / sigma: grad = (y . 3c) zbar / sigma.
  np.testing.assert_allclose(grad(False), 3 * 3.0 * z.mean(1) / 0.5, rtol=1e-5)


# --- Each relaxation's phase on a toy VLM: forwards per example; it learns the right tokens. ---

class ToyVLM:
  """Stands in for the frozen VLM: answer logits [sum_j w_j u_j, 0] with u_j = visual[..., j, 0].

  The answer id is 0, so the answer loss softplus(-sum_j w_j u_j) is lowest when the kept tokens are
  those of positive utility u. Records the rows of every answer-slot forward.
  """

  def __init__(self):
    self.rows = []

  def apply(self, variables, visual, index, valid, text_ids, text_valid, position_mode=None,
            visual_weight=None, method=None):
    del variables, index, text_ids, text_valid, position_mode
    assert method == 'answer_logits', method
    self.rows.append(visual.shape[0])
    w = jnp.asarray(valid, jnp.float32) if visual_weight is None else visual_weight  # (R, n)
    good = jnp.sum(w * visual[..., 0], axis=-1)  # (R,)
    return jnp.stack([good, jnp.zeros_like(good)], axis=-1)  # (R, 2)


TOY_B, TOY_N, TOY_K = 4, 8, 2
TOY_GOOD = ((0, 5), (1, 2), (7, 3), (4, 6))  # The two tokens of positive utility per example.


def toy_inputs(vlm, rng):
  u = -np.ones((TOY_B, TOY_N), np.float32)
  for b, good in enumerate(TOY_GOOD):
    u[b, list(good)] = 1.0
  visual = jnp.asarray(np.stack([u, np.zeros_like(u)], axis=-1))  # (B, N, 2)
  return phase_lib.PhaseInputs(
      vlm=vlm, vlm_params={}, visual=visual, question_ids=jnp.zeros((TOY_B, 1), jnp.int32),
      question_valid=jnp.ones((TOY_B, 1), bool), answer_id=jnp.zeros((TOY_B,), jnp.int32),
      rho=jnp.full((TOY_B,), TOY_K / TOY_N), k=jnp.full((TOY_B,), TOY_K, jnp.int32), k_max=TOY_K,
      score=lambda p: p['s'], ref_params={'s': jnp.zeros((TOY_B, TOY_N))}, rng=rng,
      rows=lambda x: x, position_mode='keep')


def sgd(lr):
  def update(params, opt_state, grads):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), opt_state, optax.global_norm(grads)
  return update


@pytest.mark.parametrize('algorithm', ['grpo', 'relaxation', 'gumbel_sigmoid', 'perturbed_topk'])
def test_vlm_forwards_per_example_equal_group_size(algorithm):
  config = tiny_config(algorithm=algorithm, group_size=3)
  phase = step_lib.SECOND_PHASES[algorithm](config)
  vlm = ToyVLM()
  params = {'s': jnp.zeros((TOY_B, TOY_N))}
  jax.eval_shape(lambda p: phase(p, None, toy_inputs(vlm, jax.random.PRNGKey(0)), sgd(0.1)), params)
  assert vlm.rows == [TOY_B * 3]  # One batched answer-slot forward of B x G rows.


RELAXATIONS = ('relaxation', 'gumbel_sigmoid', 'perturbed_topk')


@pytest.mark.parametrize('algorithm', RELAXATIONS)
def test_relaxation_learns_the_useful_tokens_on_a_toy_vlm(algorithm):
  """From all-zero logits, gradient steps on the toy answer loss rank the two useful tokens first
  (what the evaluation's top-k keeps) and lower the loss."""
  config = tiny_config(algorithm=algorithm, group_size=4)
  phase = step_lib.SECOND_PHASES[algorithm](config)
  vlm = ToyVLM()

  @jax.jit
  def train(params, rng):
    def one(p, r):
      p, _, m = phase(p, None, toy_inputs(vlm, r), sgd(1.0))
      return p, m['loss']
    return jax.lax.scan(one, params, jax.random.split(rng, 150))

  params, losses = train({'s': jnp.zeros((TOY_B, TOY_N))}, jax.random.PRNGKey(0))
  top = np.sort(np.asarray(jax.lax.top_k(params['s'], TOY_K)[1]), axis=-1)
  np.testing.assert_array_equal(top, np.sort(np.asarray(TOY_GOOD), axis=-1))
  losses = np.asarray(losses)
  assert losses[-20:].mean() < losses[:20].mean() - 0.1, (losses[:20].mean(), losses[-20:].mean())


def test_relaxation_ablation_variants_train_like_grpo():
  """Each relaxation variant trains its own algorithm for the GRPO agent's steps and warm-up, with
  as many VLM forwards per example (S = G) as GRPO's rollouts."""
  config = tiny_config()
  (_, grpo_run), = ablations.variant_configs(config, 'budget_aware', 0, '/data')
  assert grpo_run.train.algorithm == 'grpo'
  for variant in ablations.RELAXATION_VARIANTS:
    assert variant in ablations.VARIANTS
    (budgets, run), = ablations.variant_configs(config, variant, 0, '/data')
    assert run.train.algorithm == variant and variant in step_lib.SECOND_PHASES
    assert budgets == ablations.pruned_budgets(config)
    assert (run.train.steps, run.train.warmup_steps) == (grpo_run.train.steps,
                                                          grpo_run.train.warmup_steps)
    assert relaxation.relax_samples(run) == grpo_run.train.group_size
