"""The relaxation baseline: the GRIP scorer trained by backpropagating the answer loss through the VLM.

The ablation the paper's central claim needs (RL beats continuous relaxations under aggressive
budgets): the SAME `BudgetAwareScorer` (same params, so `pruning/grip.make_grip_prune` and the eval
harness evaluate it unchanged) is trained without RL, by gradient descent on the frozen VLM's answer
loss through a straight-through relaxation of the keep-k mask.

Keep-set (per example b with budget k_b, S samples s, N visual tokens; `straight_through_top_k`):

  z_bs   = s_b + g_bs,  g_bs ~ Gumbel(0, 1)^N                      perturbed scores     (B, S, N)
  hard   = 1[j in top-k_b(z_bs)]                                    a Gumbel-top-k sample (PL policy)
  soft   = relaxed_top_k(z_bs, k_b, tau)                            Xie & Ermon (below), sum = k_b
  m      = hard + soft - stop_gradient(soft)                        value: hard; gradient: soft's

Relaxed top-k (Xie & Ermon 2019, "Reparameterizable Subset Sampling via Continuous Relaxations",
arXiv 1901.10517): k rounds of a Gumbel-softmax that discounts what earlier rounds took,

  alpha^1 = z,   a^t = softmax(alpha^t / tau),   alpha^{t+1} = alpha^t + log(1 - a^t),
  soft    = sum_{t <= k} a^t,

which tends to the hard top-k of z as tau -> 0 (the straight-through estimator then has the
Gumbel-top-k sample as its forward value: Bengio et al. 2013, arXiv 1308.3432).

How the mask enters the VLM (`soft_answer_logits`): the decoder runs over ALL N visual slots, in
their source order, and every query's attention to visual key j is weighted by m_j and renormalized,

  p_ij = w_j exp(q_i . k_j / sqrt(d)) / sum_l w_l exp(q_i . k_l / sqrt(d)),
  w = 1 for <bos>, m_j for visual slot j, text_valid for text slots,

i.e. the key bias log(m_j) of attention masking (DynamicViT, Rao et al. 2021, arXiv 2106.02034),
computed multiplicatively so its gradient at m_j = 0 is finite. With m's forward value hard, the
weights of dropped tokens are exactly 0: no query reads them, so the value equals the VLM on only
the k kept tokens (positions as `assemble` gives them for the hard mask: `keep` or `renumber`).
The gradient d loss / d m_j also exists for a DROPPED token j: it is what admitting a little of j
would change, which a boolean validity mask (dropped tokens invalid) would zero out.

| Piece | Reference | Here |
| --- | --- | --- |
| relaxation | Gumbel-softmax relaxed top-k (Xie & Ermon 2019) | per-example k as a masked scan over k_max rounds; log(1 - a) floored at 1e-12 |
| estimator | straight-through (Bengio et al. 2013) | forward = the Gumbel-top-k sample, so it equals hard pruning |
| mask in the model | DynamicViT attention masking (Rao et al. 2021) | weights on the keys of every LM layer; tokens are not scaled (see below) |
| loss | answer cross-entropy | CE of the answer id; KL from the full-token answer distribution when the reward is label-free |

Why the visual tokens are not also multiplied by m: RMSNorm makes a layer's input scale-invariant,
so scaling a kept token mostly rescales its residual stream, and a dropped token (weight 0 in
every layer) cannot reach any other slot whatever its value; the attention weights carry the
whole relaxation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gripjax import config_lib
from gripjax.rl import grpo
from gripjax.rl import phase as phase_lib
from gripjax.rl import policy
from gripjax.rl import rewards as rewards_lib

# Floor of 1 - a in the relaxed top-k: a token taken with probability ~1 stays out of later rounds
# without log(0).
_LOG_FLOOR = 1e-12


def relaxed_top_k(scores, k, k_max: int, tau):
  """Xie & Ermon's relaxed top-k: (B, ..., N) scores, (B,) k -> (B, ..., N) soft mask >= 0.

    alpha^1 = scores,  a^t = softmax(alpha^t / tau),  alpha^{t+1} = alpha^t + log(1 - a^t),
    soft = sum_{t < k_b} a^t       (rounds t >= k_b of example b are masked out).

  Args:
    scores: (B, ..., N) perturbed logits (scorer logits + Gumbel noise).
    k: (B,) int budgets, each <= k_max.
    k_max: static number of rounds.
    tau: temperature (> 0); the mask tends to the hard top-k as tau -> 0.

  Returns:
    (B, ..., N) float32, summing to k_b over N up to rounding (an entry may slightly exceed 1 at a
    high tau: the rounds discount, but do not forbid, a token already taken).
  """
  z = jnp.asarray(scores, jnp.float32)
  k = jnp.asarray(k)
  k = k.reshape(k.shape[:1] + (1,) * (z.ndim - 1))  # (B, 1, ..., 1)

  def round_(alpha, t):
    a = jax.nn.softmax(alpha / tau, axis=-1)  # (B, ..., N)
    on = t < k  # (B, 1, ..., 1)
    alpha = alpha + jnp.where(on, jnp.log(jnp.maximum(1.0 - a, _LOG_FLOOR)), 0.0)
    return alpha, jnp.where(on, a, 0.0)

  _, rounds = jax.lax.scan(round_, z, jnp.arange(k_max))  # (k_max, B, ..., N)
  return jnp.sum(rounds, axis=0)


def straight_through_top_k(rng, logits, k, k_max: int, tau, num_samples: int = 1):
  """S straight-through Gumbel-top-k masks per example.

  Args:
    rng: PRNG key.
    logits: (B, N) scorer logits s.
    k: (B,) int budgets; k_max: static max budget (>= every k_b).
    tau: temperature of the relaxed top-k (the backward pass).
    num_samples: static S.

  Returns:
    mask: (B, S, N) float32, value exactly the hard mask (0 or 1), gradient of the relaxed top-k.
    hard: (B, S, N) bool, the kept tokens (k_b per row).
    order: (B, S, k_max) int32, the Gumbel-top-k order (slots >= k_b unused), for policy metrics.
  """
  s = jnp.asarray(logits, jnp.float32)
  b, n = s.shape
  gumbel = jax.random.gumbel(rng, (b, num_samples, n), jnp.float32)  # (B, S, N)
  z = s[:, None, :] + gumbel  # (B, S, N)
  _, order = jax.lax.top_k(jax.lax.stop_gradient(z), k_max)  # (B, S, k_max)
  order = order.astype(jnp.int32)
  hard = policy.keep_mask(order, n, policy.step_mask(k, k_max)[:, None, :])  # (B, S, N)
  soft = relaxed_top_k(z, k, k_max, tau)  # (B, S, N)
  # x - stop_gradient(x) is exactly 0 for finite x, so the value is exactly `hard`.
  mask = hard.astype(jnp.float32) + (soft - jax.lax.stop_gradient(soft))
  return mask, hard, order


def soft_answer_logits(vlm, vlm_params, visual, mask, hard, text_ids, text_valid,
                       position_mode=None):
  """Frozen-VLM answer logits with every visual token in place, weighted by `mask`.

  Args:
    vlm: the `VLM` module; vlm_params: its inner 'params' (constants).
    visual: (R, N, D) all visual tokens of each row, in source order.
    mask: (R, N) float key weights of the visual slots (the straight-through mask).
    hard: (R, N) bool kept tokens: the positions of `renumber` mode count only these.
    text_ids, text_valid: (R, T) left-padded question.
    position_mode: 'keep' | 'renumber'; None takes the VLM config's.

  Returns:
    (R, vocab) float32 logits at the answer slot (`VLM.answer_logits` with `visual_weight=mask`:
    the model's own decoder layers, with the weights on the keys of every layer). With `mask` equal
    (in value) to `hard`, they equal the VLM's forward on only the kept tokens.
  """
  r, n, _ = visual.shape
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (r, n))  # (R, N)
  return vlm.apply({'params': vlm_params}, visual, index, hard, text_ids, text_valid, position_mode,
                   mask, method='answer_logits')  # (R, vocab)


def answer_loss(logits, target, label_free: bool):
  """Per-row loss of the answer logits (R, vocab) -> (R,) float32.

  Labelled: cross-entropy -log softmax(logits)[target], target (R,) answer ids.
  Label-free: KL(p_full || p) with target (R, vocab) the full-token logits (-log of the
  `agreement` reward, so both train the same preference).
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  if not label_free:
    return -jnp.take_along_axis(logp, jnp.asarray(target, jnp.int32)[:, None], axis=-1)[:, 0]
  logp_full = jax.nn.log_softmax(jax.lax.stop_gradient(jnp.asarray(target, jnp.float32)), axis=-1)
  p_full = jnp.exp(logp_full)
  return jnp.sum(jnp.where(p_full > 0, p_full * (logp_full - logp), 0.0), axis=-1)


DEFAULT_TAU = 0.5


def relax_options(config) -> tuple[float, int]:
  """(tau, S) of the straight-through phase from `config.train`; raises config_lib.ConfigError.

  S (`train.relax_samples`) defaults to `train.group_size`: the relaxation then runs as many VLM
  forwards per training example as GRPO's G rollouts, so the two are compared on equal terms.
  """
  t = config.train
  tau = t.get('relax_tau', DEFAULT_TAU)
  samples = t.get('relax_samples', None)
  samples = t.group_size if samples is None else samples
  if (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0):
    config_lib.fail('train.relax_tau', tau, 'a finite number > 0')
  if not config_lib.is_int(samples) or samples < 1:
    config_lib.fail('train.relax_samples', samples, 'an integer >= 1, or None for train.group_size')
  return float(tau), samples


def check(config) -> None:
  """Start-up check of the relaxation's fields of `config.train`."""
  if 'train' in config:
    relax_options(config)


def make_straight_through_phase(config):
  """The train step's second phase for the straight-through relaxation baseline.

    m_bs = straight_through_top_k(s_b + Gumbel, k_b, tau), s < S            (B, S, N)
    loss = mean_bs answer_loss(VLM(V_b weighted by m_bs, question_b)[answer slot], target_b)

  The VLM runs over all N tokens per sample (1 + N + T slots, dropped ones weighted 0), against
  1 + k_max + T for a GRPO rollout: the price of a gradient that reaches dropped tokens. Metrics:
  `loss` (the answer loss), `reward/*` (`train.reward` of the hard keep-sets, the S samples of an
  example forming its group, as GRPO logs its rollouts), `entropy`, `tokens_kept`.
  """
  tau, samples = relax_options(config)
  reward_fn = rewards_lib.get(config.train.reward)

  def phase(params, opt_state, inputs: phase_lib.PhaseInputs, update):
    b = inputs.visual.shape[0]
    rows = inputs.rows
    tile = lambda x: phase_lib.tile(x, samples, rows)  # (B * S, ...), row b * S + s
    flat = lambda x: phase_lib.flatten_group(x, rows)
    target = tile(inputs.reward_target())  # (B * S[, vocab])

    def loss_fn(p):
      logits = inputs.score(p)  # (B, N)
      mask, hard, order = straight_through_top_k(inputs.rng, logits, inputs.k, inputs.k_max, tau,
                                                 samples)  # (B, S, N) x2, (B, S, k_max)
      out = soft_answer_logits(inputs.vlm, inputs.vlm_params, tile(inputs.visual), flat(mask),
                               flat(hard), tile(inputs.question_ids), tile(inputs.question_valid),
                               inputs.position_mode)  # (B * S, vocab)
      per_row = answer_loss(out, target, inputs.label_free)  # (B * S,)
      ok = jnp.isfinite(per_row)
      loss = jnp.sum(jnp.where(ok, per_row, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
      reward = reward_fn(jax.lax.stop_gradient(out), target).reshape(b, samples)  # (B, S)
      return loss, (logits, order, reward)

    def with_metrics(p):
      loss, (logits, order, reward) = loss_fn(p)
      _, reward_metrics = grpo.group_advantages(reward)
      order_valid = policy.step_mask(inputs.k, inputs.k_max)[:, None, :]  # (B, 1, k_max)
      ent = policy.entropy(jax.lax.stop_gradient(logits)[:, None, :], order, None, order_valid)
      return loss, dict(reward_metrics, entropy=jnp.mean(ent),
                        tokens_kept=jnp.mean(inputs.k.astype(jnp.float32)))

    return phase_lib.one_update(with_metrics, params, opt_state, update, phase=1.0)

  return phase
