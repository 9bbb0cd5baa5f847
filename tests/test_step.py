"""The agent's train step: warm-up loss and teacher, one compile for both phases, NaN rewards, sharding."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gripjax import config_lib
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
# Unoptimized CPU code compiles ~3x faster; these graphs are tiny, so the tests run faster overall.
FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


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


@functools.lru_cache(maxsize=None)
def tiny_vlm():
  """The tiny VLM and its random params (every test here uses the same model geometry)."""
  vlm = make_vlm(tiny_config().model)
  init = jax.jit(functools.partial(init_params, vlm), compiler_options=FAST)
  params = init(jax.random.PRNGKey(1))['params']
  return vlm, params


def build(config, tx=None, mesh=None, seed=0):
  vlm, vlm_params = tiny_vlm()
  scorer = scorer_lib.make_scorer(config)
  tx = tx or step_lib.make_optimizer(config)
  init = step_lib.make_init(scorer, tx, config, N, config.model.llm.width, T)
  rng = jax.random.PRNGKey(seed)
  if mesh is None:
    state = jax.jit(init, compiler_options=FAST)(rng)
    train_step = step_lib.make_train_step(vlm, scorer, tx, config, mesh=mesh, compiler_options=FAST)
    return vlm, vlm_params, scorer, state, train_step
  # The trainer's placement: config.train.sharding rules for the state and the VLM params.
  state_sh = step_lib.state_shardings(jax.eval_shape(init, rng), mesh, config)
  vlm_sh = step_lib.vlm_param_shardings(vlm_params, mesh, config)
  state = jax.jit(init, out_shardings=state_sh, compiler_options=FAST)(rng)
  vlm_params = jax.device_put(vlm_params, vlm_sh)
  train_step = step_lib.make_train_step(vlm, scorer, tx, config, mesh=mesh, compiler_options=FAST,
                                        state_sharding=state_sh, vlm_sharding=vlm_sh)
  return vlm, vlm_params, scorer, state, train_step


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
def teachers():
  """Both teachers and an independent leave-one-out reference, in one compiled function."""
  vlm, params = tiny_vlm()
  batch = {k: jnp.asarray(v) for k, v in fake_batch(3).items()}
  ids, valid, answer = batch['question_ids'], batch['question_valid'], batch['answer_id']
  index = jnp.broadcast_to(jnp.arange(N), (3, N))

  @functools.partial(jax.jit, compiler_options=FAST)
  def run(p):
    visual, _ = vlm.apply({'params': p}, batch['pixels'], method='encode_image')
    attn = warmup.teacher_attention(vlm, p, visual, ids, valid)
    loo = warmup.teacher_loo(vlm, p, visual, ids, valid, answer, chunk=5)
    keep = jnp.ones((3, N), bool).at[:, LOO_TOKEN].set(False)
    dropped = vlm.apply({'params': p}, visual, index, keep, ids, valid, method='forward')[:, -1]
    return attn, loo, dropped

  return host(run(params)), np.asarray(answer)


LOO_TOKEN = 7


def test_teacher_attention(teachers):
  ((importance, full), (_, full_forward), _), _ = teachers
  assert importance.shape == (3, N)
  assert np.all(importance >= 0)
  np.testing.assert_allclose(np.sum(importance, -1), 1.0, rtol=1e-5)
  # The layer-by-layer pass ends in the unpruned answer logits of a plain forward.
  np.testing.assert_allclose(full, full_forward, atol=1e-5)


def test_teacher_loo(teachers):
  (_, (importance, full), dropped), answer = teachers
  assert importance.shape == (3, N) and np.all(np.isfinite(importance))
  logp = lambda x: np.take_along_axis(np.asarray(jax.nn.log_softmax(x)), answer[:, None], 1)[:, 0]
  np.testing.assert_allclose(importance[:, LOO_TOKEN], logp(full) - logp(dropped), atol=1e-5)


# --- The step: warm-up then GRPO in one compiled function, with one NaN reward. ------------------

def _nan_for_first(logits, target):
  """logprob reward, NaN for sample (0, 0): a failed reward computation."""
  r = rewards_lib.answer_logprob(logits, target)  # (B, G)
  return r.at[0, 0].set(jnp.nan)


def run_two_steps(devices=None, mesh_spec=(('data', -1),), strategy='replicate'):
  """Steps 0 (warm-up) and 1 (GRPO) with one NaN reward; devices None: no mesh (one device).

  With devices: the mesh `mesh_spec` over them, and `strategy` for both the VLM params and the
  agent's state (every leaf of at least 256 scalars is split under fsdp).

  Plain SGD: Adam's first step is lr * sign(g), which turns rounding noise in a near-zero gradient
  into a full-size update and would hide what the sharding test checks (equal losses and gradients).
  """
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(rewards_lib.REWARDS, 'nan_first', _nan_for_first)
    config = tiny_config(reward='nan_first', mesh=mesh_spec)
    config.train.sharding.update(
        dict(vlm_params=strategy, agent_params=strategy, fsdp_min_size=256))
    mesh = None if devices is None else sharding.make_mesh(config, devices)
    _, vlm_params, _, state, train_step = build(config, optax.sgd(0.1), mesh)
    if mesh is not None:
      split = {'state': _split_leaves(state.params), 'vlm': _split_leaves(vlm_params)}
  batch = fake_batch(8)
  batch = {k: jnp.asarray(v) for k, v in batch.items()} if mesh is None else sharding.shard_batch(batch, mesh)
  history, metrics, ref_at_rl = [host(state.params)], [], None
  for _ in range(2):
    before = host(state.params)
    state, m = train_step(state, batch, vlm_params)  # state is donated
    metrics.append(host(m))
    history.append(host(state.params))
    if int(state.step) == 2:
      ref_at_rl = (before, host(state.ref_params))
  if mesh is not None:
    ref_at_rl = split  # The sharded runs report which leaves were split instead.
  return train_step, state, metrics, history, ref_at_rl


def _split_leaves(tree) -> int:
  """Leaves of `tree` split over at least one mesh axis."""
  return sum(any(e is not None for e in x.sharding.spec) for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def two_steps():
  return run_two_steps()


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


def test_several_updates_per_rollout_batch_activate_the_clip():
  """ppo_epochs = 3: the first update is at ratio 1, the later ones move it and meet the clip; the
  step still compiles once and its params equal three updates' worth of change."""
  config = tiny_config(warmup_steps=0, ppo_epochs=3, clip_eps=0.02, lr=0.05, kl_coef=0.0)
  _, vlm_params, _, state, train_step = build(config)
  batch = {k: jnp.asarray(v) for k, v in fake_batch(8).items()}
  before = host(state.params)
  state, m = train_step(state, batch, vlm_params)
  m = host(m)
  assert train_step._cache_size() == 1 and float(m['phase']) == 1.0
  assert float(m['approx_kl']) > 0 and float(m['clip_ratio']) > 0, m
  assert abs(float(m['policy_loss']) - 0.0) < 1e-5  # first update: ratio 1, advantages mean 0
  assert max(np.max(np.abs(x - y)) for x, y in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(host(state.params)))) > 0


def test_check_names_the_field():
  cases = [('group_size', 1, 'config.train.group_size=1 is invalid'),
           ('rho_range', (0.5, 0.1), 'config.train.rho_range=(0.5, 0.1) is invalid'),
           ('reward', 'acc', "config.train.reward='acc' is invalid"),
           ('algorithm', 'ppo', "config.train.algorithm='ppo' is invalid")]
  for field, value, message in cases:
    with pytest.raises(config_lib.ConfigError) as e:
      step_lib.check(tiny_config(**{field: value}))
    assert message in str(e.value)
  with pytest.raises(config_lib.ConfigError, match="a 'data' axis"):
    sharding.check(tiny_config(mesh=(('model', 2),)), num_devices=2)


# --- Sharded == single device (8 fake CPU devices, in a subprocess). -----------------------------

# (mesh, strategy of the VLM params and the agent's state) of each sharded run.
SHARDED_RUNS = {'data8': ((('data', -1),), 'replicate'),
                'data4_fsdp2': ((('data', 4), ('fsdp', 2)), 'fsdp')}


def sharded_main():
  """The two steps on each 8-device mesh of SHARDED_RUNS; writes params, prints losses as JSON."""
  assert jax.device_count() == 8, jax.devices()
  out = {}
  for name, (mesh_spec, strategy) in SHARDED_RUNS.items():
    train_step, _, metrics, history, split = run_two_steps(jax.devices(), mesh_spec, strategy)
    np.savez(f'{sys.argv[1]}.{name}.npz', *jax.tree.leaves(history[-1]))
    out[name] = {'loss': [float(m['loss']) for m in metrics], 'compiles': train_step._cache_size(),
                 'split': split}
  print(json.dumps(out))


def test_sharded_equals_single_device(two_steps, tmp_path):
  """Data-parallel (data=8) and FSDP (data=4, fsdp=2) steps equal the one-device step."""
  _, _, metrics, history, _ = two_steps
  out = str(tmp_path / 'params')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  code = 'import sys; from tests.test_step import sharded_main; sharded_main()'
  r = subprocess.run([sys.executable, '-c', code, out], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  assert set(res) == set(SHARDED_RUNS)
  single = jax.tree.leaves(history[-1])
  for name, run in res.items():
    assert run['compiles'] == 1, name
    np.testing.assert_allclose(run['loss'], [float(m['loss']) for m in metrics], atol=1e-5,
                               err_msg=name)
    sharded = np.load(f'{out}.{name}.npz')
    assert len(sharded.files) == len(single)
    for i, x in enumerate(single):
      np.testing.assert_allclose(sharded[f'arr_{i}'], x, atol=1e-5, err_msg=f'{name} leaf {i}')
  assert res['data8']['split'] == {'state': 0, 'vlm': 0}
  # Under fsdp the big kernels of both trees really are split over the 'fsdp' axis.
  assert res['data4_fsdp2']['split']['state'] > 0 and res['data4_fsdp2']['split']['vlm'] > 0
