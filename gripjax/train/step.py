"""The agent's one jitted train step: supervised warm-up, then GRPO, chosen by the step counter.

  init = make_init(scorer, tx, config, n, d, t)
  state_sh = state_shardings(jax.eval_shape(init, rng), mesh, config)   # config.train.sharding
  vlm_sh = vlm_param_shardings(vlm_params, mesh, config)
  state = jax.jit(init, out_shardings=state_sh)(rng)
  train_step = make_train_step(vlm, scorer, tx, config, mesh, state_sharding=state_sh,
                               vlm_sharding=vlm_sh)
  state, metrics = train_step(state, batch, jax.device_put(vlm_params, vlm_sh))  # state is donated

Phases (one compiled function; `jax.lax.cond` on `state.step`, so the switch never recompiles):

  step <  train.warmup_steps   warm-up: ListMLE of the teacher's top-m order (`rl/warmup.py`)
  step >= train.warmup_steps   GRPO (`rl/grpo.py`); at step == warmup_steps the reference policy
                               of the KL term is set to the current (warmed-up) params

GRPO on one batch of B examples (every shape static; per-example budgets are masks):

  rho_b ~ U(rho_min, rho_max),   k_b = budget_k(rho_b, N),   k_max = budget_k(rho_max, N)
  s_b = scorer(V_b, Q_b, rho_b)                                             (B, N)
  o_bg ~ PL(s_b) by Gumbel-top-k_max, g < G; slots t >= k_b masked          (B, G, k_max)
  r_bg = reward(VLM(V_b[sorted o_bg], question_b)[answer slot], target_b)   (B, G), on B * G rollouts
  A = group_advantages(r),  mask = isfinite(r)
  loss = grpo_loss(log PL(o | s), stop_gradient(log PL(o | s)), log PL(o | s_ref), A, mask, ...)

One optimizer update per batch: the samples come from the current params, so old_logp equals logp
and the ratio is exactly 1 (its gradient is the policy gradient A * grad log pi); the clip only acts
when several updates reuse one batch, which this step does not do (clip_ratio and approx_kl stay 0,
and are logged so a future multi-epoch variant shows them). The B x G rollouts are the expensive
part: they run as one (B * G)-row forward of the frozen VLM, sharded over the mesh's 'data' axis.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from gripjax import config_lib
from gripjax.models.vlm import ModelConfig
from gripjax.rl import grpo
from gripjax.rl import policy
from gripjax.rl import rewards as rewards_lib
from gripjax.rl import warmup

# Every metric the step returns, in both phases (the other phase's are 0).
METRIC_KEYS = (
    'loss', 'phase', 'grad_norm',
    'reward/mean', 'reward/std', 'frac_reward_zero_std', 'reward/num_nonfinite',
    'policy_loss', 'kl_ref', 'approx_kl', 'clip_ratio', 'entropy', 'tokens_kept',
    'warmup/listmle', 'warmup/kl', 'warmup/teacher_topk_recall',
)


@flax.struct.dataclass
class TrainState:
  """Everything that changes during agent training (the frozen VLM's params are not in it).

  Attributes:
    step: () int32 global step.
    params: the scorer's params (inner 'params' collection).
    opt_state: optax state of `params`.
    ref_params: the reference policy of GRPO's KL term: the params at the first GRPO step.
    rng: raw uint32 PRNG key (2,); split every step, so a resumed run draws the same samples.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ref_params: Any
  rng: jax.Array


# --- Config. -------------------------------------------------------------------------------------

def _fail(field, value, expected):
  raise config_lib.ConfigError(f'config.{field}={value!r} is invalid: expected {expected}.')


def _int(c, field, minimum=1):
  value = c
  for part in field.split('.'):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    _fail(field, value, f'an integer >= {minimum}')
  return value


def _float(c, field, minimum=0.0, strict=True):
  value = c
  for part in field.split('.'):
    value = value[part]
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not ok or (value <= minimum if strict else value < minimum):
    _fail(field, value, f'a finite number {">" if strict else ">="} {minimum}')
  return value


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks `config.agent` and `config.train` at start-up; raises config_lib.ConfigError."""
  for section in ('agent', 'train'):
    if section not in config:
      raise config_lib.ConfigError(f'config.{section} is missing: expected the section of '
                                   'configs/gripbench_tiny.py.')
  width = _int(config, 'agent.width')
  _int(config, 'agent.depth', 0)
  heads = _int(config, 'agent.num_heads')
  if width % heads:
    _fail('agent.num_heads', heads, f'a divisor of config.agent.width={width}')
  t = config.train
  _int(config, 'train.batch_size')
  _int(config, 'train.group_size', 2)  # G = 1 has no group baseline: every advantage is 0.
  steps = _int(config, 'train.steps')
  warm = _int(config, 'train.warmup_steps', 0)
  if warm > steps:
    _fail('train.warmup_steps', warm, f'at most config.train.steps={steps}')
  _float(config, 'train.lr')
  _float(config, 'train.weight_decay', strict=False)
  _float(config, 'train.grad_clip')
  rr = t.rho_range
  if not isinstance(rr, tuple) or len(rr) != 2:
    _fail('train.rho_range', rr, 'a tuple (min, max) of keep ratios')
  for i, rho in enumerate(rr):
    try:
      config_lib.validate_budget(rho)
    except ValueError:
      _fail(f'train.rho_range[{i}]', rho, 'a keep ratio in (0, 1]')
  if rr[0] > rr[1]:
    _fail('train.rho_range', rr, 'min <= max')
  if t.reward not in rewards_lib.REWARDS:
    _fail('train.reward', t.reward, f'one of {tuple(sorted(rewards_lib.REWARDS))}')
  _float(config, 'train.clip_eps')
  _float(config, 'train.kl_coef', strict=False)
  if t.teacher not in warmup.TEACHERS:
    _fail('train.teacher', t.teacher, f'one of {warmup.TEACHERS}')
  _int(config, 'train.warmup_top')
  _float(config, 'train.warmup_kl_coef', strict=False)
  _int(config, 'train.loo_chunk')
  _int(config, 'train.log_every')
  _int(config, 'train.checkpoint_every')
  if 'checkpoint_keep' in t:
    _int(config, 'train.checkpoint_keep')
  mesh = t.mesh
  ok = isinstance(mesh, tuple) and mesh and all(
      isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int)
      and (p[1] >= 1 or p[1] == -1) for p in mesh)
  if not ok:
    _fail('train.mesh', mesh, "a non-empty tuple of (axis_name, size) pairs with size >= 1 or -1, "
          "e.g. (('data', -1),)")
  if 'data' not in [p[0] for p in mesh]:
    _fail('train.mesh', mesh, "a 'data' axis")
  return config


# --- Optimizer and state. ------------------------------------------------------------------------

def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW at train.lr after a 10-step linear ramp."""
  t = config.train
  ramp = max(1, min(10, t.steps // 10))
  lr = optax.linear_schedule(t.lr / ramp, t.lr, ramp)
  return optax.chain(optax.clip_by_global_norm(t.grad_clip),
                     optax.adamw(lr, weight_decay=t.weight_decay))


def make_init(scorer, tx, config, n_tokens: int, d_model: int, text_len: int) -> Callable:
  """init(rng) -> TrainState at step 0 (ref_params = params); jit it with out_shardings."""
  from gripjax.models import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
  del config

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = scorer_lib.init_scorer(scorer, init_rng, n_tokens, d_model, text_len)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ref_params=params, rng=state_rng)

  return init


# --- Shardings (config.train.sharding). ----------------------------------------------------------

def state_shardings(abstract_state: TrainState, mesh, config) -> TrainState:
  """A NamedSharding per leaf of the train state, by the rules of `train.sharding.agent_params`.

  params, opt_state and ref_params follow the rules (optimizer moments sit under paths that end in
  their param's path, so the same rules name them); step and rng stay replicated.
  """
  from gripjax.train import sharding  # pylint: disable=g-import-not-at-top
  rules = sharding.rules_from_config(config, 'agent_params')
  out = sharding.param_shardings(abstract_state, mesh, rules)
  rep = sharding.replicated(mesh)
  return out.replace(step=rep, rng=rep)


def vlm_param_shardings(vlm_params, mesh, config):
  """A NamedSharding per leaf of the frozen VLM's params, by `train.sharding.vlm_params`."""
  from gripjax.train import sharding  # pylint: disable=g-import-not-at-top
  rules = sharding.rules_from_config(config, 'vlm_params')
  return sharding.param_shardings(vlm_params, mesh, rules)


# --- The step. -----------------------------------------------------------------------------------

def _zero_metrics():
  return {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}


def _filled(values: dict) -> dict:
  out = _zero_metrics()
  for k, v in values.items():
    if k not in out:
      raise KeyError(f'metric {k!r} is not in METRIC_KEYS.')
    out[k] = jnp.asarray(v, jnp.float32)
  return out


def answer_logits(vlm, vlm_params, visual, index, valid, text_ids, text_valid, position_mode=None):
  """Frozen-VLM logits at the answer slot only: (R, k, D) kept tokens -> (R, vocab) float32.

  Same as `forward(...)[:, -1]` without the LM head over every slot (R x L x vocab for 7B).
  """
  variables = {'params': vlm_params}
  h, positions, key_valid = vlm.apply(variables, visual, index, valid, text_ids, text_valid,
                                      position_mode, method='assemble')
  depth = ModelConfig.from_config(vlm.config).llm.depth
  h, _ = vlm.apply(variables, h, positions, key_valid, 0, depth, method='run_layers')
  return vlm.apply(variables, h[:, -1:], method='logits')[:, 0].astype(jnp.float32)


def grpo_objective(logits, ref_logits, orders, order_valid, reward, clip_eps, kl_coef):
  """GRPO loss of sampled keep-sets given their rewards; gradients flow through `logits` only.

    A = group_advantages(r),  mask = isfinite(r)
    logp_bg = log PL(o_bg | s_b),  ref_logp_bg = log PL(o_bg | s_ref_b)
    loss = grpo_loss(logp, stop_gradient(logp), ref_logp, A, mask, clip_eps, kl_coef)

  Args:
    logits, ref_logits: (B, N) current and reference scores.
    orders: (B, G, k_max) sampled orders; order_valid: (B, 1 or G, k_max) step mask.
    reward: (B, G) rewards; non-finite ones are masked out (and counted).

  Returns:
    loss and metrics (grpo_loss's, group_advantages', and `entropy`).
  """
  adv, reward_metrics = grpo.group_advantages(reward)  # (B, G)
  mask = jnp.isfinite(reward)  # (B, G)
  ref_logp = policy.log_prob(jax.lax.stop_gradient(ref_logits)[:, None, :], orders, None,
                             order_valid)  # (B, G)
  logp = policy.log_prob(logits[:, None, :], orders, None, order_valid)  # (B, G)
  loss, metrics = grpo.grpo_loss(logp, jax.lax.stop_gradient(logp), ref_logp, adv, mask, clip_eps,
                                 kl_coef)
  ent = policy.entropy(jax.lax.stop_gradient(logits)[:, None, :], orders, None, order_valid)
  return loss, dict(metrics, **reward_metrics, entropy=jnp.mean(ent))


def make_train_step(vlm, scorer, tx, config, mesh=None, jit: bool = True,
                    compiler_options: dict | None = None, state_sharding=None,
                    vlm_sharding=None) -> Callable:
  """Builds `train_step(state, batch, vlm_params) -> (state, metrics)`.

  Args:
    vlm: the frozen `VLM` module (its config a ModelConfig, as `make_vlm` builds).
    scorer: the `BudgetAwareScorer`.
    tx: optax transformation of the scorer params (`make_optimizer`).
    config: the full config (reads `train` and `model.position_mode`).
    mesh: optional mesh with a 'data' axis: batch rows and rollouts are split over it. None: no
      sharding annotations (one device).
    jit: False returns the plain Python function (for debugging).
    compiler_options: passed to `jax.jit`, e.g. {'xla_backend_optimization_level': 0} for compiles
      about 3x faster on CPU in tests.
    state_sharding: with a mesh, the TrainState's shardings (`state_shardings`; in and out, so the
      donated buffers are reused); None: replicated.
    vlm_sharding: with a mesh, the VLM params' shardings (`vlm_param_shardings`); None: replicated.

  Returns:
    A jitted function donating `state`. `batch` needs pixels, question_ids, question_valid and
    answer_id (other keys are ignored); `vlm_params` is the inner 'params' of the VLM.
    Metrics: `METRIC_KEYS`, float32 scalars, the same keys in both phases.
  """
  validate_config(config)
  t = config.train
  group = int(t.group_size)
  warmup_steps = int(t.warmup_steps)
  rho_lo, rho_hi = (float(x) for x in t.rho_range)
  reward_fn = rewards_lib.get(t.reward)
  label_free = t.reward in rewards_lib.LABEL_FREE
  position_mode = config.model.position_mode
  teacher, top, loo_chunk = t.teacher, int(t.warmup_top), int(t.loo_chunk)
  warmup_kl_coef, clip_eps, kl_coef = float(t.warmup_kl_coef), float(t.clip_eps), float(t.kl_coef)

  rows = row_constraint(mesh)

  def train_step(state: TrainState, batch: dict, vlm_params) -> tuple[TrainState, dict]:
    vlm_params = jax.lax.stop_gradient(vlm_params)
    variables = {'params': vlm_params}
    rng, rho_rng, sample_rng = jax.random.split(state.rng, 3)
    ids = batch['question_ids']
    qvalid = batch['question_valid'].astype(bool)
    visual, _ = vlm.apply(variables, batch['pixels'], method='encode_image')  # (B, N, D)
    question = vlm.apply(variables, ids, method='embed_text')  # (B, T, D)
    b, n, _ = visual.shape
    m = min(top, n)
    rho = jax.random.uniform(rho_rng, (b,), jnp.float32, rho_lo, rho_hi)  # (B,)
    k = policy.budget_k(rho, n)  # (B,)
    k_max = policy.budget_k(rho_hi, n)  # static

    def score(params):
      return scorer.apply({'params': params}, visual, question, qvalid, rho)  # (B, N)

    # The reference policy is the warmed-up one: snapshot it at the first GRPO step.
    first_rl = state.step == warmup_steps
    ref_params = jax.tree.map(lambda r, p: jnp.where(first_rl, p, r), state.ref_params, state.params)

    def warmup_phase(params):
      importance, _ = warmup.teacher_importance(
          teacher, vlm, vlm_params, visual, ids, qvalid,
          None if label_free else batch['answer_id'], position_mode, loo_chunk)  # (B, N)

      def loss_fn(p):
        return warmup.warmup_loss(score(p), importance, m, warmup_kl_coef)

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return grads, _filled(dict(metrics, loss=loss, phase=0.0))

    def grpo_phase(params):
      logits = jax.lax.stop_gradient(score(params))  # (B, N)
      order_valid = policy.step_mask(k, k_max)[:, None, :]  # (B, 1, k_max)
      orders = policy.sample_orders(sample_rng, logits, k_max, group)  # (B, G, k_max)
      index, index_valid = policy.sorted_index(orders, order_valid)  # (B, G, k_max) each
      kept = jnp.take_along_axis(visual[:, None], index[..., None], axis=2)  # (B, G, k_max, D)
      flat = lambda x: rows(x.reshape((b * group,) + x.shape[2:]))
      tile = lambda x: rows(jnp.repeat(x, group, axis=0))  # (B * G, ...), row b * G + g
      out = answer_logits(vlm, vlm_params, flat(kept), flat(index), flat(index_valid), tile(ids),
                          tile(qvalid), position_mode)  # (B * G, vocab)
      out = out.reshape(b, group, -1)  # (B, G, vocab)
      if label_free:
        full_index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        target = answer_logits(vlm, vlm_params, visual, full_index, jnp.ones((b, n), bool), ids,
                               qvalid, position_mode)[:, None, :]  # (B, 1, vocab)
        target = jnp.broadcast_to(target, out.shape)  # (B, G, vocab)
      else:
        target = jnp.broadcast_to(batch['answer_id'][:, None], (b, group))  # (B, G)
      reward = reward_fn(out, target)  # (B, G)
      ref_logits = score(ref_params)  # (B, N)

      def loss_fn(p):
        return grpo_objective(score(p), ref_logits, orders, order_valid, reward, clip_eps, kl_coef)

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      metrics = dict(metrics, loss=loss, phase=1.0, tokens_kept=jnp.mean(k.astype(jnp.float32)))
      return grads, _filled(metrics)

    grads, metrics = jax.lax.cond(state.step < warmup_steps, warmup_phase, grpo_phase, state.params)
    metrics['grad_norm'] = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ref_params=ref_params,
                     rng=rng)
    return new, metrics

  return jit_train_step(train_step, mesh, jit, compiler_options, state_sharding, vlm_sharding)


def row_constraint(mesh) -> Callable:
  """x -> x with its leading (row) axis split over the mesh's 'data' axis (identity without a mesh)."""
  if mesh is None:
    return lambda x: x
  from gripjax.train import sharding  # pylint: disable=g-import-not-at-top
  row_sharding = sharding.data_sharding(mesh)
  return lambda x: jax.lax.with_sharding_constraint(x, row_sharding)


def jit_train_step(train_step, mesh=None, jit: bool = True, compiler_options: dict | None = None,
                   state_sharding=None, vlm_sharding=None):
  """`train_step(state, batch, vlm_params)` jitted with the state donated: state and VLM params
  placed by the given shardings (default replicated), batch rows over 'data', metrics replicated."""
  if not jit:
    return train_step
  if mesh is None:
    return jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options)
  from gripjax.train import sharding  # pylint: disable=g-import-not-at-top
  rep = sharding.replicated(mesh)
  state_sharding = rep if state_sharding is None else state_sharding
  vlm_sharding = rep if vlm_sharding is None else vlm_sharding
  return jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options,
                 in_shardings=(state_sharding, sharding.data_sharding(mesh), vlm_sharding),
                 out_shardings=(state_sharding, rep))


# --- Inference: the agent as a pruner. -----------------------------------------------------------

def make_grip_prune(scorer, scorer_params, rho=None):
  """See `gripjax.pruning.grip.make_grip_prune` (re-exported here for the trainer and tests)."""
  from gripjax.pruning import grip  # pylint: disable=g-import-not-at-top
  return grip.make_grip_prune(scorer, scorer_params, rho)
