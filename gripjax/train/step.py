"""The agent's one jitted train step: a supervised warm-up, then a second phase, by the step counter.

  init = make_init(scorer, tx, config, n, d, t)
  state_sh = state_shardings(jax.eval_shape(init, rng), mesh, config)   # config.train.sharding
  vlm_sh = vlm_param_shardings(vlm_params, mesh, config)
  state = jax.jit(init, out_shardings=state_sh)(rng)
  train_step = make_train_step(vlm, scorer, tx, config, mesh=mesh, state_sharding=state_sh,
                               vlm_sharding=vlm_sh)
  state, metrics = train_step(state, batch, jax.device_put(vlm_params, vlm_sh))  # state is donated

One skeleton (`make_train_step`) for every algorithm: it encodes the batch, draws each example's
budget, builds the phases' inputs (`rl/phase.PhaseInputs`) and applies the optimizer; the phases
are functions from rl/ (one compiled function; `jax.lax.cond` on `state.step`, so the switch never
recompiles):

  step <  train.warmup_steps   warm-up: ListMLE of the teacher's top-m order (`rl/warmup.py`)
  step >= train.warmup_steps   the second phase, `train.algorithm`: GRPO (`rl/grpo.make_grpo_phase`)
                               or a continuous relaxation baseline (`rl/relaxation.py`); at
                               step == warmup_steps the reference policy of GRPO's KL term is set
                               to the current (warmed-up) params

Per batch of B examples (every shape static; per-example budgets are masks):

  rho_b ~ U(rho_min, rho_max),   k_b = budget_k(rho_b, N),   k_max = budget_to_k(rho_max, N)
  s_b = scorer(V_b, Q_b, rho_b)                                             (B, N)

A batch may carry `prefix_ids` / `prefix_valid` (B, P), the text before the image of a chat template
(`VLM.assemble`); every frozen-VLM forward of both phases then runs `[prefix][visual][text]`, while
the scorer still reads only the question. Without them the prefix is <bos> alone.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from gripjax import budget
from gripjax import config_lib
from gripjax.models import scorer as scorer_lib
from gripjax.rl import grpo
from gripjax.rl import phase as phase_lib
from gripjax.rl import relaxation
from gripjax.rl import rewards as rewards_lib
from gripjax.rl import warmup
from gripjax.train import sharding

METRIC_KEYS = phase_lib.METRIC_KEYS


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

def check(config) -> None:
  """Start-up check of `config.agent` and `config.train`; raises config_lib.ConfigError."""
  cl = config_lib
  if 'train' not in config:
    return
  cl.require_section(config, 'agent')
  width = cl.integer(config, 'agent.width')
  cl.integer(config, 'agent.depth', 0)
  heads = cl.integer(config, 'agent.num_heads')
  if width % heads:
    cl.fail('agent.num_heads', heads, f'a divisor of config.agent.width={width}')
  t = config.train
  cl.integer(config, 'train.batch_size')
  cl.integer(config, 'train.group_size', 2)  # G = 1 has no group baseline: every advantage is 0.
  steps = cl.integer(config, 'train.steps')
  warm = cl.integer(config, 'train.warmup_steps', 0)
  if warm > steps:
    cl.fail('train.warmup_steps', warm, f'at most config.train.steps={steps}')
  cl.number(config, 'train.lr')
  cl.number(config, 'train.weight_decay', strict=False)
  cl.number(config, 'train.grad_clip')
  rr = t.rho_range
  if not isinstance(rr, tuple) or len(rr) != 2:
    cl.fail('train.rho_range', rr, 'a tuple (min, max) of keep ratios')
  for i, rho in enumerate(rr):
    cl.keep_ratio(rho, f'train.rho_range[{i}]')
  if rr[0] > rr[1]:
    cl.fail('train.rho_range', rr, 'min <= max')
  cl.choice(config, 'train.reward', tuple(sorted(rewards_lib.REWARDS)))
  cl.number(config, 'train.clip_eps')
  cl.number(config, 'train.kl_coef', strict=False)
  cl.choice(config, 'train.teacher', warmup.TEACHERS)
  cl.integer(config, 'train.warmup_top')
  cl.number(config, 'train.warmup_kl_coef', strict=False)
  cl.integer(config, 'train.loo_chunk')
  cl.integer(config, 'train.log_every')
  if 'val_examples' in t:
    cl.integer(config, 'train.val_examples', 0)
    for i, rho in enumerate(cl.nonempty_tuple(config, 'train.val_budgets', 'keep ratios in (0, 1]')):
      cl.keep_ratio(rho, f'train.val_budgets[{i}]')
  cl.integer(config, 'train.checkpoint_every')
  if 'checkpoint_keep' in t:
    cl.integer(config, 'train.checkpoint_keep')
  cl.choice(config, 'train.algorithm', tuple(SECOND_PHASES))
  if 'kl_estimator' in t:
    cl.choice(config, 'train.kl_estimator', grpo.KL_ESTIMATORS)
  if 'ppo_epochs' in t:
    cl.integer(config, 'train.ppo_epochs')
  if t.get('second_lr') is not None:
    cl.number(config, 'train.second_lr')
  if 'adv_scale' in t:
    cl.choice(config, 'train.adv_scale', grpo.ADV_SCALES)


# The phase after the warm-up, by `train.algorithm`: a factory config -> phase (see rl/phase.py).
SECOND_PHASES = {
    'grpo': grpo.make_grpo_phase,
    'relaxation': relaxation.make_straight_through_phase,
    'gumbel_sigmoid': relaxation.make_gumbel_sigmoid_phase,
    'perturbed_topk': relaxation.make_perturbed_topk_phase,
}


# --- Optimizer and state. ------------------------------------------------------------------------

def lr_ramp(steps: int) -> int:
  """Updates of the learning rate's linear ramp for a run of `steps` steps (10, fewer for short runs)."""
  return max(1, min(10, steps // 10))


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW at train.lr after a 10-step linear ramp.

  From update `train.warmup_steps` on (the second phase: each warm-up step is one update) the rate
  is `train.second_lr` when set: GRPO's and the relaxations' noisier gradients take a smaller step
  than the supervised warm-up's.
  """
  t = config.train
  ramp = lr_ramp(t.steps)
  lr = optax.linear_schedule(t.lr / ramp, t.lr, ramp)
  second = t.get('second_lr')
  if second is not None and 0 < t.warmup_steps < t.steps:
    lr = optax.join_schedules([lr, optax.constant_schedule(second)], [t.warmup_steps])
  return optax.chain(optax.clip_by_global_norm(t.grad_clip),
                     optax.adamw(lr, weight_decay=t.weight_decay))


def make_init(scorer, tx, config, n_tokens: int, d_model: int, text_len: int) -> Callable:
  """init(rng) -> TrainState at step 0 (ref_params = params); jit it with out_shardings."""
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
  rules = sharding.rules_from_config(config, 'agent_params')
  out = sharding.param_shardings(abstract_state, mesh, rules)
  rep = sharding.replicated(mesh)
  return out.replace(step=rep, rng=rep)


def vlm_param_shardings(vlm_params, mesh, config):
  """A NamedSharding per leaf of the frozen VLM's params, by `train.sharding.vlm_params`."""
  rules = sharding.rules_from_config(config, 'vlm_params')
  return sharding.param_shardings(vlm_params, mesh, rules)


# --- The step. -----------------------------------------------------------------------------------

def make_train_step(vlm, scorer, tx, config, second_phase: Callable | None = None, mesh=None,
                    jit: bool = True, compiler_options: dict | None = None, state_sharding=None,
                    vlm_sharding=None) -> Callable:
  """Builds `train_step(state, batch, vlm_params) -> (state, metrics)`.

  Args:
    vlm: the frozen `VLM` module (its config a ModelConfig, as `make_vlm` builds).
    scorer: the `BudgetAwareScorer`.
    tx: optax transformation of the scorer params (`make_optimizer`).
    config: the full config, checked at start-up (`gripjax.checks.check_config`); reads `train`
      and `model.position_mode`.
    second_phase: `phase(params, opt_state, inputs, update) -> (params, opt_state, metrics)` run
      from step `train.warmup_steps` on (see rl/phase.py); None builds
      `SECOND_PHASES[train.algorithm](config)`.
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
    answer_id, and may carry prefix_ids / prefix_valid (other keys are ignored); `vlm_params` is
    the inner 'params' of the VLM.
    Metrics: `METRIC_KEYS`, float32 scalars, the same keys in both phases.
  """
  t = config.train
  if second_phase is None:
    second_phase = SECOND_PHASES[t.get('algorithm', 'grpo')](config)
  first_phase = warmup.make_warmup_phase(config)
  warmup_steps = int(t.warmup_steps)
  rho_lo, rho_hi = (float(x) for x in t.rho_range)
  label_free = t.reward in rewards_lib.LABEL_FREE
  position_mode = config.model.position_mode
  rows = row_constraint(mesh)

  def apply_update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)

  def train_step(state: TrainState, batch: dict, vlm_params) -> tuple[TrainState, dict]:
    vlm_params = jax.lax.stop_gradient(vlm_params)
    variables = {'params': vlm_params}
    rng, rho_rng, sample_rng = jax.random.split(state.rng, 3)
    ids = batch['question_ids']
    qvalid = batch['question_valid'].astype(bool)
    visual, _ = vlm.apply(variables, batch['pixels'], method='encode_image')  # (B, N, D)
    question = vlm.apply(variables, ids, method='embed_text')  # (B, T, D)
    b, n, _ = visual.shape
    rho = jax.random.uniform(rho_rng, (b,), jnp.float32, rho_lo, rho_hi)  # (B,)

    def score(params):
      return scorer.apply({'params': params}, visual, question, qvalid, rho)  # (B, N)

    # The reference policy is the warmed-up one: snapshot it at the first step of the second phase.
    first_rl = state.step == warmup_steps
    ref_params = jax.tree.map(lambda r, p: jnp.where(first_rl, p, r), state.ref_params, state.params)
    inputs = phase_lib.PhaseInputs(
        vlm=vlm, vlm_params=vlm_params, visual=visual, question_ids=ids, question_valid=qvalid,
        answer_id=None if label_free else batch['answer_id'], rho=rho, k=budget.budget_k(rho, n),
        k_max=budget.budget_to_k(rho_hi, n), score=score, ref_params=ref_params, rng=sample_rng,
        rows=rows, position_mode=position_mode, prefix_ids=batch.get('prefix_ids'),
        prefix_valid=None if 'prefix_valid' not in batch else batch['prefix_valid'].astype(bool))

    def run(phase):
      def branch(params, opt_state):
        params, opt_state, metrics = phase(params, opt_state, inputs, apply_update)
        return params, opt_state, phase_lib.filled(metrics)
      return branch

    params, opt_state, metrics = jax.lax.cond(state.step < warmup_steps, run(first_phase),
                                              run(second_phase), state.params, state.opt_state)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ref_params=ref_params,
                     rng=rng)
    return new, metrics

  return jit_train_step(train_step, mesh, jit, compiler_options, state_sharding, vlm_sharding)


def row_constraint(mesh) -> Callable:
  """x -> x with its leading (row) axis split over the mesh's 'data' axis (identity without a mesh)."""
  if mesh is None:
    return lambda x: x
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
  rep = sharding.replicated(mesh)
  state_sharding = rep if state_sharding is None else state_sharding
  vlm_sharding = rep if vlm_sharding is None else vlm_sharding
  return jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options,
                 in_shardings=(state_sharding, sharding.data_sharding(mesh), vlm_sharding),
                 out_shardings=(state_sharding, rep))
