"""GRPO for the token-selection agent: group advantages and the clipped loss.

For each (image, question, rho) the trainer samples G ordered keep-sets with
`policy.sample_orders`, scores each with a reward from `rewards.py`, turns the
G rewards into advantages with `group_advantages`, and minimizes `grpo_loss`
(Shao et al. 2024, DeepSeekMath, arXiv 2402.03300; clipping as in PPO).

Sequence-level ratios. One action of this agent is the whole ordered
selection, and the reward is only defined for the whole kept set, so every
term below is per sampled keep-set: `logp` is one Plackett-Luce log-prob
(`policy.log_prob`, a sum over the k steps), the ratio is
exp(logp - old_logp), and the clip acts on that one ratio. Token-level
GRPO in LLMs clips each generated token's ratio instead; here the per-step
factors share one advantage and one scorer pass, and clipping the product
bounds the change of the probability of the keep-set itself (as GSPO,
Zheng et al. 2025, does, without its length normalization: k is the budget).

| Piece | Reference | Here |
| --- | --- | --- |
| advantages | (r - mean) / std per group | population std (ddof=0), + eps; zero-spread groups and non-finite rewards give exactly 0 |
| ratio | per generated token | per keep-set (one PL log-prob) |
| KL to reference | k3 estimator, per token | exact per selection step (`train.kl_estimator='step'`, default: the mean over the k steps of KL between the current and the warm-up policy's step distributions, nats per step) or k3 per keep-set (`'k3'`); coefficient `train.kl_coef` (0.02), no target |
| normalization | mean over tokens / sequences | masked mean over (example, sample) pairs |
| epochs | several updates per rollout batch | `train.ppo_epochs` (E); the clip acts from the second update on |

Settings that make it learn (GRIP-Bench dense, `configs/gripbench_dense.py`; validation reward is
the mean answer log-probability of greedy keep-sets on 256 validation examples at 1/9, 1/18, 1/36,
logged in `metrics.jsonl`; single runs unless said):

  * The learning rate after the warm-up matters most. At the warm-up's 1e-3, 400 GRPO steps after
    1200 warm-up steps pulled the validation reward from -0.73 to -0.96, the per-step KL to 2 nats.
    `train.second_lr` sets the rate of the phase after the warm-up (3e-4 in the dense recipe).
  * Two clipped updates per rollout batch (`ppo_epochs=2`; 4-12% of the keep-sets clipped) with one
    batch-wide advantage scale (`adv_scale='batch'`: groups weigh by how much their keep-sets'
    rewards actually differ, instead of each group's near-ties blown up to unit spread) keep the
    per-step KL at 0.2-0.9 nats with `kl_coef` 0.02.
  * A sampling temperature below 1 (PL(s / 0.3)) made every step's KL 11 nats and the reward worse.
  * Where GRPO has room it raises the validation reward: from the 600-step warm-up of the
    ablations (3 seeds), 200 GRPO steps moved it from -0.884 / -1.312 / -1.011 to -0.879 / -0.977 /
    -0.950. After a 2000-step warm-up it stays flat (-0.696 before, -0.716 after 300 steps; on
    1,000 validation examples 76.0 / 75.3 / 69.9% accuracy against the warm-up's 76.8 / 74.5 / 71.7
    at 1/9 / 1/18 / 1/36): the warm-up's teacher (answer-slot attention) is already close to the
    oracle on this benchmark, and what is left is the scorer's fit to it.

The functions are pure and wrapped in `jax.jit` (eager calls compile once per
shape; inside the jitted train step they inline); `eps`, `clip_eps` and
`kl_coef` may be Python floats or traced scalars (e.g. from a schedule).
"""

import functools

import jax
import jax.numpy as jnp

from gripjax.rl import phase as phase_lib
from gripjax.rl import policy
from gripjax.rl import rewards as rewards_lib


def _masked_mean(x, mask):
  """sum(mask * x) / max(sum(mask), 1), with x ignored (not multiplied) off-mask."""
  mask = jnp.asarray(mask, jnp.float32)
  total = jnp.sum(jnp.where(mask > 0, mask * x, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


# How `group_advantages` scales the centred rewards (`train.adv_scale`).
ADV_SCALES = ('group', 'batch', 'none')


@functools.partial(jax.jit, static_argnames='scale')
def group_advantages(rewards, eps=1e-6, scale='group'):
  """Group-centred advantages, scaled by the group's std (GRPO), the batch's, or not at all.

  For a group r_1..r_G (the last axis), over its finite members F:

    mean = (1/|F|) sum_{g in F} r_g,
    std  = sqrt((1/|F|) sum_{g in F} (r_g - mean)^2),
    A_g  = (r_g - mean) / (S + eps)   for g in F,   A_g = 0 otherwise,

  with S, by `scale`:
    'group'  S = the group's own std (GRPO, Shao et al. 2024): every group gets unit spread, so a
             group whose keep-sets differ by 0.01 nats pushes as hard as one where they differ by
             2 nats (a near-tie's noise amplified to full strength).
    'batch'  S = sqrt(mean over all finite members of the batch of (r_g - mean)^2): one scale for
             every group, so groups weigh by how much their keep-sets' rewards actually differ;
             the advantages still have unit spread overall, so `kl_coef` keeps its meaning.
    'none'   S = 1 (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783): centred rewards in reward units.

  A group whose finite rewards are all equal (including one with fewer than
  two finite members) carries no learning signal: its advantages are exactly
  0 (no NaN, no 1e-11 noise) and it counts in `frac_reward_zero_std`.
  Non-finite rewards (NaN, +-inf: a failed reward computation) are excluded
  from the group and never propagate; callers may also drop them from the loss
  mask with `jnp.isfinite(rewards)`.

  Args:
    rewards: (..., G) rewards; leading dims index groups.
    eps: added to the scale.
    scale: 'group', 'batch' or 'none' (above).

  Returns:
    adv: (..., G) float32.
    metrics: `reward/mean` (over finite rewards), `reward/std` (mean over
      groups of the within-group std), `frac_reward_zero_std`,
      `reward/num_nonfinite`.
  """
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim < 1:
    raise ValueError(f'rewards must have a group axis, got shape {r.shape}.')
  finite = jnp.isfinite(r)  # (..., G)
  r0 = jnp.where(finite, r, 0.0)
  count = jnp.sum(finite, axis=-1, keepdims=True)  # (..., 1)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  mean = jnp.sum(r0, axis=-1, keepdims=True) / denom  # (..., 1)
  dev = jnp.where(finite, r0 - mean, 0.0)  # (..., G)
  hi = jnp.max(jnp.where(finite, r, -jnp.inf), axis=-1, keepdims=True)
  lo = jnp.min(jnp.where(finite, r, jnp.inf), axis=-1, keepdims=True)
  zero_std = (count < 2) | (hi == lo)  # (..., 1)
  var = jnp.sum(dev * dev, axis=-1, keepdims=True) / denom  # (..., 1)
  # sqrt'(0) is inf: keep zero-spread groups off it so gradients stay finite.
  std = jnp.where(zero_std, 0.0, jnp.sqrt(jnp.where(zero_std, 1.0, var)))
  if scale == 'group':
    divisor = std + eps
  elif scale == 'batch':
    divisor = jnp.sqrt(jnp.sum(dev * dev) / jnp.maximum(jnp.sum(finite), 1)) + eps
  elif scale == 'none':
    divisor = 1.0
  else:
    raise ValueError(f'scale={scale!r}: expected one of {ADV_SCALES}.')
  adv = jnp.where(finite & ~zero_std, dev / divisor, 0.0)  # (..., G)
  metrics = {
      'reward/mean': jnp.sum(r0) / jnp.maximum(jnp.sum(finite), 1),
      'reward/std': jnp.mean(std),
      'frac_reward_zero_std': jnp.mean(zero_std.astype(jnp.float32)),
      'reward/num_nonfinite': jnp.sum(~finite).astype(jnp.int32),
  }
  return adv, metrics


@jax.jit
def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, kl_coef):
  """Clipped GRPO objective with a k3 KL penalty to the reference policy.

  Per sampled keep-set i (all inputs share one shape, e.g. (B, G)):

    ratio_i         = exp(logp_i - old_logp_i)
    clipped_ratio_i = clip(ratio_i, 1 - clip_eps, 1 + clip_eps)
    obj_i           = min(ratio_i * A_i, clipped_ratio_i * A_i)
    kl_i            = exp(ref_logp_i - logp_i) - (ref_logp_i - logp_i) - 1   (k3 >= 0)
    loss            = - sum_i m_i (obj_i - kl_coef * kl_i) / max(sum_i m_i, 1)

  `logp` carries the gradient; `old_logp` (the sampling policy) and
  `ref_logp` (the frozen warm-up policy) are constants (stop_gradient is
  applied here, so passing traced values is safe). k3 is an unbiased,
  non-negative estimator of KL(pi || pi_ref) under samples from pi, zero iff
  logp == ref_logp. Off-mask entries are excluded with `where`, so a -inf or
  NaN there affects neither the loss nor its gradient.

  Args:
    logp, old_logp, ref_logp: (...,) Plackett-Luce log-probs of the keep-sets.
    adv: (...,) advantages (from `group_advantages`).
    mask: (...,) bool or float weights (0 drops an entry).
    clip_eps: clip range epsilon.
    kl_coef: weight of the KL penalty (0 disables it).

  Returns:
    loss: scalar.
    metrics: `policy_loss` (-masked mean obj), `kl_ref` (masked mean kl),
      `approx_kl` (k3 estimate of KL(old || new): mean((ratio - 1) - log ratio)),
      `clip_ratio` (fraction of entries where the clipped branch is active in
      the min, i.e. where the entry's gradient is cut: ratio > 1 + eps with
      A > 0, or ratio < 1 - eps with A < 0).
  """
  on = jnp.asarray(mask, jnp.float32) > 0
  ref_logp = jax.lax.stop_gradient(ref_logp)
  log_ref_ratio = jnp.where(on, ref_logp - logp, 0.0)
  kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
  return _clipped_loss(logp, old_logp, adv, mask, clip_eps, kl_coef, kl)


@jax.jit
def grpo_loss_step_kl(logp, old_logp, step_kl, adv, mask, clip_eps, kl_coef):
  """Clipped GRPO objective with the exact per-step KL to the reference policy.

  As `grpo_loss`, with kl_i = `policy.step_kl` of keep-set i (the mean over its selection steps of
  the exact KL between the current and the reference step distributions, carrying the gradient):

    loss = - sum_i m_i (obj_i - kl_coef * step_kl_i) / max(sum_i m_i, 1)

  Metrics as `grpo_loss`'s (`kl_ref` is the masked mean step KL, in nats per step).
  """
  return _clipped_loss(logp, old_logp, adv, mask, clip_eps, kl_coef, step_kl)


def _clipped_loss(logp, old_logp, adv, mask, clip_eps, kl_coef, kl):
  """The clipped ratio objective minus kl_coef * kl, and the metrics; see `grpo_loss`."""
  on = jnp.asarray(mask, jnp.float32) > 0
  old_logp = jax.lax.stop_gradient(old_logp)
  adv = jax.lax.stop_gradient(jnp.asarray(adv, jnp.float32))

  log_ratio = jnp.where(on, logp - old_logp, 0.0)
  ratio = jnp.exp(log_ratio)
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  obj = jnp.minimum(ratio * adv, clipped_ratio * adv)
  kl = jnp.where(on, kl, 0.0)

  loss = -_masked_mean(obj - kl_coef * kl, mask)

  ratio_sg = jax.lax.stop_gradient(ratio)
  clipped = ((ratio_sg > 1.0 + clip_eps) & (adv > 0)) | (
      (ratio_sg < 1.0 - clip_eps) & (adv < 0))
  metrics = {
      'policy_loss': -_masked_mean(jax.lax.stop_gradient(obj), mask),
      'kl_ref': _masked_mean(jax.lax.stop_gradient(kl), mask),
      'approx_kl': _masked_mean(
          (ratio_sg - 1.0) - jax.lax.stop_gradient(log_ratio), mask),
      'clip_ratio': _masked_mean(clipped.astype(jnp.float32), mask),
  }
  return loss, metrics


@jax.jit
def reinforce_loss(logp, adv, mask):
  """Plain policy gradient (no ratio, no clip, no KL), a GRPO ablation.

    loss = - sum_i m_i A_i logp_i / max(sum_i m_i, 1)

  Its gradient equals `grpo_loss`'s at old_logp == logp, kl_coef == 0.
  """
  on = jnp.asarray(mask, jnp.float32) > 0
  adv = jax.lax.stop_gradient(jnp.asarray(adv, jnp.float32))
  return -_masked_mean(adv * jnp.where(on, logp, 0.0), mask)


# The KL term of the GRPO objective, by `train.kl_estimator`.
KL_ESTIMATORS = ('step', 'k3')


def grpo_objective(logits, ref_logits, old_logp, orders, order_valid, adv, mask, clip_eps, kl_coef,
                   kl_estimator='step'):
  """GRPO loss of sampled keep-sets given their advantages; gradients flow through `logits` only.

    logp_bg = log PL(o_bg | s_b),  old_logp_bg = log PL(o_bg | s at sampling time)
    kl_estimator 'step': loss = grpo_loss_step_kl(logp, old_logp, step_kl(s, s_ref, o), A, mask, ...)
    kl_estimator 'k3':   loss = grpo_loss(logp, old_logp, log PL(o | s_ref), A, mask, ...)

  Args:
    logits, ref_logits: (B, N) current and reference scores.
    old_logp: (B, G) log-probabilities of the orders under the policy that sampled them.
    orders: (B, G, k_max) sampled orders; order_valid: (B, 1 or G, k_max) step mask.
    adv: (B, G) advantages; mask: (B, G) bool, the keep-sets with a finite reward.

  Returns:
    loss and metrics (the loss's, and `entropy`).
  """
  logp = policy.log_prob(logits[:, None, :], orders, None, order_valid)  # (B, G)
  ref = jax.lax.stop_gradient(ref_logits)[:, None, :]
  if kl_estimator == 'step':
    kl = policy.step_kl(logits[:, None, :], ref, orders, None, order_valid)  # (B, G)
    loss, metrics = grpo_loss_step_kl(logp, old_logp, kl, adv, mask, clip_eps, kl_coef)
  elif kl_estimator == 'k3':
    ref_logp = policy.log_prob(ref, orders, None, order_valid)  # (B, G)
    loss, metrics = grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, kl_coef)
  else:
    raise ValueError(f'kl_estimator={kl_estimator!r} is invalid: expected one of {KL_ESTIMATORS}.')
  ent = policy.entropy(jax.lax.stop_gradient(logits)[:, None, :], orders, None, order_valid)
  return loss, dict(metrics, entropy=jnp.mean(ent))


def make_grpo_phase(config):
  """The train step's GRPO phase. Returns `phase(params, opt_state, inputs, update)` (rl/phase.py).

  Reads `train.group_size` (G), `train.reward`, `train.clip_eps`, `train.kl_coef`,
  `train.kl_estimator` and `train.ppo_epochs` (E):

    s_b = scorer(V_b, Q_b, rho_b)                                             (B, N)
    o_bg ~ PL(s_b) by Gumbel-top-k_max, g < G; slots t >= k_b masked          (B, G, k_max)
    r_bg = reward(VLM(V_b[sorted o_bg], question_b)[answer slot], target_b)   (B, G), on B * G rollouts
    A = group_advantages(r),  old_logp = log PL(o | s_b) at sampling time
    E times:  params <- update(params, grad grpo_objective(s(params), s(ref_params), old_logp, o, A))

  The B x G rollouts are the expensive part (one (B * G)-row forward of the frozen VLM, split over
  the mesh's data axis); the E updates reuse them and cost only scorer passes. In the first update
  the ratio is exactly 1 (its gradient is the policy gradient A * grad log pi); from the second on
  the ratio moves away from 1 and the clip bounds how far one batch can push the policy
  (`clip_ratio`, `approx_kl` are the last update's). Metrics other than those are from the first
  update (the loss at the sampling policy).
  """
  t = config.train
  group = int(t.group_size)
  reward_fn = rewards_lib.get(t.reward)
  clip_eps, kl_coef = float(t.clip_eps), float(t.kl_coef)
  kl_estimator = t.get('kl_estimator', 'step')
  epochs = int(t.get('ppo_epochs', 1))
  adv_scale = t.get('adv_scale', 'group')

  def phase(params, opt_state, inputs: phase_lib.PhaseInputs, update):
    b = inputs.visual.shape[0]
    rows = inputs.rows
    logits = jax.lax.stop_gradient(inputs.score(params))  # (B, N)
    order_valid = policy.step_mask(inputs.k, inputs.k_max)[:, None, :]  # (B, 1, k_max)
    orders = policy.sample_orders(inputs.rng, logits, inputs.k_max, group)  # (B, G, k_max)
    index, index_valid = policy.sorted_index(orders, order_valid)  # (B, G, k_max) each
    kept = jnp.take_along_axis(inputs.visual[:, None], index[..., None], axis=2)  # (B, G, k_max, D)
    flat = lambda x: phase_lib.flatten_group(x, rows)  # (B * G, ...), row b * G + g
    # The question and any prefix tiled G times alongside.
    out = inputs.answer_logits(flat(kept), flat(index), flat(index_valid), times=group)  # (B * G, vocab)
    out = out.reshape(b, group, -1)  # (B, G, vocab)
    target = inputs.reward_target()  # (B,) or (B, vocab)
    target = jnp.broadcast_to(target[:, None], (b, group) + target.shape[1:])  # (B, G[, vocab])
    reward = reward_fn(out, target)  # (B, G)
    adv, reward_metrics = group_advantages(reward, scale=adv_scale)  # (B, G)
    mask = jnp.isfinite(reward)  # (B, G)
    old_logp = policy.log_prob(logits[:, None, :], orders, None, order_valid)  # (B, G)
    ref_logits = inputs.score(inputs.ref_params)  # (B, N)

    def loss_fn(p):
      return grpo_objective(inputs.score(p), ref_logits, old_logp, orders, order_valid, adv, mask,
                            clip_eps, kl_coef, kl_estimator)

    def one_update(carry, _):
      p, opt = carry
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
      p, opt, grad_norm = update(p, opt, grads)
      return (p, opt), dict(metrics, loss=loss, grad_norm=grad_norm)

    (params, opt_state), per_epoch = jax.lax.scan(one_update, (params, opt_state), None, length=epochs)
    first = jax.tree.map(lambda x: x[0], per_epoch)
    metrics = dict(first, **reward_metrics, phase=1.0,
                   tokens_kept=jnp.mean(inputs.k.astype(jnp.float32)),
                   clip_ratio=per_epoch['clip_ratio'][-1], approx_kl=per_epoch['approx_kl'][-1])
    return params, opt_state, metrics

  return phase
