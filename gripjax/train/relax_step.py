"""The relaxation baseline's train step: warm-up, then the answer loss through a straight-through mask.

  init = step.make_init(scorer, tx, config, n, d, t)       # the same TrainState as GRPO
  train_step = make_relax_train_step(vlm, scorer, tx, config, mesh)
  state, metrics = train_step(state, batch, vlm_params)    # state is donated

Same call signature, batch format, state, metric keys and phase switch as `step.make_train_step`;
only the phase after the warm-up differs (see `gripjax/rl/relaxation.py` for the estimator):

  step <  train.warmup_steps   warm-up: ListMLE of the teacher's top-m order (as in step.py)
  step >= train.warmup_steps   relaxation:
    rho_b ~ U(rho_min, rho_max),  k_b = budget_k(rho_b, N)                  as step.py draws them
    s_b = scorer(V_b, Q_b, rho_b)                                            (B, N)
    m_bs = straight_through_top_k(s_b + Gumbel, k_b, tau), s < S            (B, S, N)
    loss = mean_bs CE(VLM(V_b weighted by m_bs, question_b)[answer slot], answer_b)

The scorer params it trains have the GRPO agent's structure, so `pruning/grip.make_grip_prune` and
the eval harness evaluate the result unchanged. Config (read with defaults, so older configs run):

  train.relax_tau       temperature of the relaxed top-k (default 0.5)
  train.relax_samples   S, Gumbel samples per example (default 1)

Metrics: `step.METRIC_KEYS`. In the relaxation phase `loss` is the answer loss, `phase` is 1,
`reward/*` is `train.reward` of the hard keep-sets (the same number GRPO logs for its rollouts, the
S samples of an example forming its group), `entropy` and `tokens_kept` as in GRPO; the GRPO-only
ratio and KL metrics stay 0. The VLM runs over all N tokens per sample (1 + N + T slots), against
1 + k_max + T for a GRPO rollout: the price of a gradient that reaches dropped tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from gripjax import config_lib
from gripjax.rl import grpo
from gripjax.rl import policy
from gripjax.rl import relaxation
from gripjax.rl import rewards as rewards_lib
from gripjax.rl import warmup
from gripjax.train import step as step_lib

_filled = step_lib._filled  # pylint: disable=protected-access

DEFAULT_TAU = 0.5
DEFAULT_SAMPLES = 1


def relax_options(config) -> tuple[float, int]:
  """(tau, samples) from `config.train`, with defaults; raises config_lib.ConfigError."""
  t = config.train
  tau = t.get('relax_tau', DEFAULT_TAU)
  samples = t.get('relax_samples', DEFAULT_SAMPLES)
  if (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau)
      or tau <= 0):
    raise config_lib.ConfigError(f'config.train.relax_tau={tau!r} is invalid: expected a finite '
                                 'number > 0.')
  if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
    raise config_lib.ConfigError(f'config.train.relax_samples={samples!r} is invalid: expected an '
                                 'integer >= 1.')
  return float(tau), samples


def make_relax_train_step(vlm, scorer, tx, config, mesh=None, jit: bool = True,
                          compiler_options: dict | None = None, state_sharding=None,
                          vlm_sharding=None) -> Callable:
  """Builds `train_step(state, batch, vlm_params) -> (state, metrics)`; arguments as
  `step.make_train_step`'s (the relaxation reads `train.relax_tau` and `train.relax_samples`)."""
  step_lib.validate_config(config)
  tau, samples = relax_options(config)
  t = config.train
  warmup_steps = int(t.warmup_steps)
  rho_lo, rho_hi = (float(x) for x in t.rho_range)
  reward_fn = rewards_lib.get(t.reward)
  label_free = t.reward in rewards_lib.LABEL_FREE
  position_mode = config.model.position_mode
  teacher, top, loo_chunk = t.teacher, int(t.warmup_top), int(t.loo_chunk)
  warmup_kl_coef = float(t.warmup_kl_coef)

  rows = step_lib.row_constraint(mesh)

  def train_step(state: step_lib.TrainState, batch: dict, vlm_params):
    vlm_params = jax.lax.stop_gradient(vlm_params)
    variables = {'params': vlm_params}
    rng, rho_rng, sample_rng = jax.random.split(state.rng, 3)  # As step.py: same rho per seed.
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

    # Kept as in step.py (the state means the same in both algorithms); the loss does not use it.
    first = state.step == warmup_steps
    ref_params = jax.tree.map(lambda r, p: jnp.where(first, p, r), state.ref_params, state.params)

    def warmup_phase(params):
      importance, _ = warmup.teacher_importance(
          teacher, vlm, vlm_params, visual, ids, qvalid,
          None if label_free else batch['answer_id'], position_mode, loo_chunk)  # (B, N)

      def loss_fn(p):
        return warmup.warmup_loss(score(p), importance, m, warmup_kl_coef)

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return grads, _filled(dict(metrics, loss=loss, phase=0.0))

    def relax_phase(params):
      tile = lambda x: rows(jnp.repeat(x, samples, axis=0))  # (B * S, ...), row b * S + s
      if label_free:
        full_index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        target = step_lib.answer_logits(vlm, vlm_params, visual, full_index, jnp.ones((b, n), bool),
                                        ids, qvalid, position_mode)  # (B, vocab)
      else:
        target = batch['answer_id']  # (B,)
      target = tile(target)  # (B * S, ...)

      def loss_fn(p):
        logits = score(p)  # (B, N)
        mask, hard, order = relaxation.straight_through_top_k(sample_rng, logits, k, k_max, tau,
                                                              samples)  # (B, S, N) x2, (B, S, k_max)
        flat = lambda x: rows(x.reshape((b * samples,) + x.shape[2:]))
        out = relaxation.soft_answer_logits(vlm, vlm_params, tile(visual), flat(mask), flat(hard),
                                            tile(ids), tile(qvalid), position_mode)  # (B * S, vocab)
        per_row = relaxation.answer_loss(out, target, label_free)  # (B * S,)
        ok = jnp.isfinite(per_row)
        loss = jnp.sum(jnp.where(ok, per_row, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
        reward = reward_fn(jax.lax.stop_gradient(out), target).reshape(b, samples)  # (B, S)
        return loss, (logits, order, reward)

      (loss, (logits, order, reward)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      _, reward_metrics = grpo.group_advantages(reward)
      order_valid = policy.step_mask(k, k_max)[:, None, :]  # (B, 1, k_max)
      ent = policy.entropy(jax.lax.stop_gradient(logits)[:, None, :], order, None, order_valid)
      metrics = dict(reward_metrics, loss=loss, phase=1.0, entropy=jnp.mean(ent),
                     tokens_kept=jnp.mean(k.astype(jnp.float32)))
      return grads, _filled(metrics)

    grads, metrics = jax.lax.cond(state.step < warmup_steps, warmup_phase, relax_phase, state.params)
    metrics['grad_norm'] = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = step_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                              ref_params=ref_params, rng=rng)
    return new, metrics

  return step_lib.jit_train_step(train_step, mesh, jit, compiler_options, state_sharding,
                                 vlm_sharding)
