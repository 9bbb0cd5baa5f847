"""The agent's train step: warm-up loss and teacher, one compile for both phases, NaN rewards, sharding."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gripjax.models import init_params, make_vlm
from gripjax.models import scorer as scorer_lib
from gripjax.rl import policy
from gripjax.rl import rewards as rewards_lib
from gripjax.rl import warmup
from gripjax.train import sharding
from gripjax.train import step as step_lib
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, T, VOCAB = 16, 6, 20  # Tiny geometry: 32 px images, 8 px patches.


def tiny_config(**train):
  c = helpers.load_config('gripbench_tiny')
  c.model.vit.update(dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64))
  c.model.projector_hidden = 32
  c.model.llm.update(dict(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                          max_len=64))
  c.agent.update(dict(width=16, depth=1, num_heads=2))
  c.train.update(dict(batch_size=8, group_size=4, steps=4, warmup_steps=1, warmup_top=4,
                      rho_range=(1 / 8, 1 / 2), lr=1e-2))
  c.train.update(train)
  return c


def fake_batch(b, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, size=(b, T)).astype(np.int32)
  valid = np.ones((b, T), bool)
  for i in range(b):  # Left padding of i % 3 slots.
    valid[i, :i % 3] = False
    ids[i, :i % 3] = 0
  return dict(pixels=rng.integers(0, 256, size=(b, 32, 32, 3)).astype(np.uint8), question_ids=ids,
              question_valid=valid, answer_id=rng.integers(3, VOCAB, size=(b,)).astype(np.int32))


def build(config, tx=None, mesh=None, seed=0):
  vlm = make_vlm(config.model)
  vlm_params = init_params(vlm, jax.random.PRNGKey(1))['params']
  scorer = scorer_lib.make_scorer(config)
  tx = tx or step_lib.make_optimizer(config)
  init = step_lib.make_init(scorer, tx, config, N, config.model.llm.width, T)
  if mesh is None:
    state = jax.jit(init)(jax.random.PRNGKey(seed))
  else:
    rep = sharding.replicated(mesh)
    state = jax.jit(init, out_shardings=rep)(jax.random.PRNGKey(seed))
    vlm_params = jax.device_put(vlm_params, rep)
  return vlm, vlm_params, scorer, state, step_lib.make_train_step(vlm, scorer, tx, config, mesh)


def host(tree):
  return jax.tree.map(np.asarray, tree)


# --- Warm-up pieces. ---------------------------------------------------------------------------

def test_listmle_hand_case():
  logits = jnp.asarray([[0.0, 1.0, 2.0, -1.0]])
  importance = jnp.asarray([[0.1, 0.5, 0.3, 0.1]])
  order = warmup.teacher_order(importance, 2)
  np.testing.assert_array_equal(order, [[1, 2]])
  lse = lambda *x: np.log(np.sum(np.exp(x)))
  expect = -((1.0 - lse(0.0, 1.0, 2.0, -1.0)) + (2.0 - lse(0.0, 2.0, -1.0)))
  np.testing.assert_allclose(warmup.listmle_loss(logits, order), [expect], rtol=1e-6)
  np.testing.assert_allclose(-policy.log_prob(logits, order), [expect], rtol=1e-6)
  loss, metrics = warmup.warmup_loss(logits, importance, 2)
  np.testing.assert_allclose(loss, expect, rtol=1e-6)
  assert float(metrics['warmup/teacher_topk_recall']) == 1.0  # both top-2 are {1, 2}
  _, metrics = warmup.warmup_loss(-logits, importance, 2)
  assert float(metrics['warmup/teacher_topk_recall']) == 0.0  # {0, 3} vs {1, 2}


@pytest.fixture(scope='module')
def vlm_setup():
  config = tiny_config()
  vlm = make_vlm(config.model)
  params = init_params(vlm, jax.random.PRNGKey(1))['params']
  batch = {k: jnp.asarray(v) for k, v in fake_batch(3).items()}
  visual, _ = jax.jit(lambda p, x: vlm.apply({'params': p}, x, method='encode_image'))(params, batch['pixels'])
  return vlm, params, batch, visual


def test_teacher_attention(vlm_setup):
  vlm, params, batch, visual = vlm_setup
  fn = jax.jit(lambda p, v, ids, valid: warmup.teacher_attention(vlm, p, v, ids, valid))
  importance, full = fn(params, visual, batch['question_ids'], batch['question_valid'])
  assert importance.shape == (3, N)
  assert np.all(np.asarray(importance) >= 0)
  np.testing.assert_allclose(np.sum(importance, -1), 1.0, rtol=1e-5)
  # The layer-by-layer pass ends in the unpruned answer logits.
  index = jnp.broadcast_to(jnp.arange(N), (3, N))
  ref = jax.jit(lambda p, v: step_lib.answer_logits(vlm, p, v, index, jnp.ones((3, N), bool),
                                                    batch['question_ids'], batch['question_valid']))
  np.testing.assert_allclose(full, ref(params, visual), atol=1e-5)


def test_teacher_loo(vlm_setup):
  vlm, params, batch, visual = vlm_setup
  ids, valid, answer = batch['question_ids'], batch['question_valid'], batch['answer_id']
  fn = jax.jit(lambda p, v: warmup.teacher_loo(vlm, p, v, ids, valid, answer, chunk=5))
  importance, full = fn(params, visual)
  assert importance.shape == (3, N) and np.all(np.isfinite(importance))
  index = jnp.broadcast_to(jnp.arange(N), (3, N))
  j = 7
  keep = jnp.ones((3, N), bool).at[:, j].set(False)
  dropped = step_lib.answer_logits(vlm, params, visual, index, keep, ids, valid)
  logp = lambda x: np.take_along_axis(np.asarray(jax.nn.log_softmax(x)), np.asarray(answer)[:, None], 1)[:, 0]
  np.testing.assert_allclose(importance[:, j], logp(full) - logp(dropped), atol=1e-5)


# --- The step: warm-up then GRPO in one compiled function, with one NaN reward. ------------------

def _nan_for_first(logits, target):
  """logprob reward, NaN for sample (0, 0): a failed reward computation."""
  r = rewards_lib.answer_logprob(logits, target)  # (B, G)
  return r.at[0, 0].set(jnp.nan)


@pytest.fixture(scope='module')
def two_steps():
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(rewards_lib.REWARDS, 'nan_first', _nan_for_first)
    config = tiny_config(reward='nan_first')
    vlm, vlm_params, _, state, train_step = build(config)
  batch = {k: jnp.asarray(v) for k, v in fake_batch(8).items()}
  history = [host(state.params)]
  metrics = []
  ref_at_rl = None
  for _ in range(2):
    before = host(state.params)
    state, m = train_step(state, batch, vlm_params)  # state is donated
    metrics.append(host(m))
    history.append(host(state.params))
    if ref_at_rl is None and int(state.step) == 2:
      ref_at_rl = (before, host(state.ref_params))
  return train_step, state, metrics, history, ref_at_rl


def test_one_compile_for_both_phases(two_steps):
  train_step, _, metrics, _, _ = two_steps
  assert train_step._cache_size() == 1
  assert [float(m['phase']) for m in metrics] == [0.0, 1.0]
  assert set(metrics[0]) == set(metrics[1]) == set(step_lib.METRIC_KEYS)


def test_metrics_finite_and_params_change(two_steps):
  _, state, metrics, history, _ = two_steps
  for m in metrics:
    assert all(np.isfinite(v) for v in m.values()), m
  assert metrics[0]['warmup/listmle'] > 0 and metrics[0]['tokens_kept'] == 0
  assert metrics[1]['tokens_kept'] >= 2 and metrics[1]['entropy'] > 0
  for a, b in zip(history, history[1:]):
    diff = max(np.max(np.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert diff > 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(host(state.params)))
  assert int(state.step) == 2


def test_nan_reward_masked_and_counted(two_steps):
  _, _, metrics, _, _ = two_steps
  assert metrics[1]['reward/num_nonfinite'] == 1
  assert np.isfinite(metrics[1]['reward/mean']) and np.isfinite(metrics[1]['loss'])
  assert metrics[0]['reward/num_nonfinite'] == 0  # warm-up: no rewards


def test_reference_is_snapshot_at_first_grpo_step(two_steps):
  *_, (before, ref) = two_steps
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(x, y)


def test_validate_config_names_the_field():
  from gripjax import config_lib
  for field, value, message in [('group_size', 1, 'config.train.group_size=1 is invalid'),
                                ('rho_range', (0.5, 0.1), 'config.train.rho_range=(0.5, 0.1)'),
                                ('reward', 'acc', "config.train.reward='acc' is invalid"),
                                ('mesh', (('model', 2),), "a 'data' axis")]:
    with pytest.raises(config_lib.ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
      step_lib.validate_config(tiny_config(**{field: value}))


# --- Sharded == single device (8 fake CPU devices, in a subprocess). -----------------------------

def sharded_main():
  """Runs 2 steps (warm-up, GRPO) on 1 device and on an 8-device mesh; prints the max differences."""
  assert jax.device_count() == 8, jax.devices()
  config = tiny_config()
  # Plain SGD: Adam's first step is lr * sign(g), which turns rounding noise in a near-zero gradient
  # into a full-size difference and would hide what this test checks (equal losses and gradients).
  tx = optax.sgd(0.1)
  batch = fake_batch(8)
  out = {}
  for name, devices in (('single', jax.devices()[:1]), ('sharded', jax.devices())):
    mesh = sharding.make_mesh(config, devices)
    _, vlm_params, _, state, train_step = build(config, tx, mesh)
    sharded = sharding.shard_batch(batch, mesh)
    losses = []
    for _ in range(2):
      state, m = train_step(state, sharded, vlm_params)
      losses.append(float(m['loss']))
    out[name] = (losses, host(state.params), train_step._cache_size())
  (l1, p1, c1), (l8, p8, c8) = out['single'], out['sharded']
  param_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
  print(json.dumps({'loss_single': l1, 'loss_sharded': l8, 'param_diff': param_diff,
                    'compiles': [c1, c8]}))


def test_sharded_equals_single_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-c', 'from tests.test_step import sharded_main; sharded_main()'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(res['loss_single'], res['loss_sharded'], atol=1e-5)
  assert res['param_diff'] < 1e-5, res
  assert res['compiles'] == [1, 1]
