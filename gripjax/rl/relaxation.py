"""The relaxation baselines: the GRIP scorer trained by backpropagating the answer loss through the VLM.

The ablation the paper's central claim needs (RL beats continuous relaxations under aggressive
budgets): the SAME `BudgetAwareScorer` (same params, so `pruning/grip.make_grip_prune` and the eval
harness evaluate it unchanged, as a top-ceil(rho N) ranker of its logits) is trained without RL, by
gradient descent on the frozen VLM's answer loss through a relaxation of the keep mask. Three
relaxations, each a second phase of the one train step (`train.algorithm`):

  'relaxation'      straight-through Gumbel top-k           `make_straight_through_phase`
  'gumbel_sigmoid'  Gumbel-sigmoid gates + budget penalty   `make_gumbel_sigmoid_phase`
  'perturbed_topk'  top-k by perturbed optimizers           `make_perturbed_topk_phase`

Each draws S masks per example (`train.relax_samples`, default `train.group_size`): S frozen-VLM
forwards per example per step, as GRPO's G rollouts; the value of every mask is a hard keep-set
(0/1), so the forward equals hard pruning, and only the backward pass is relaxed.

Straight-through top-k (per example b with budget k_b, sample s, N visual tokens;
`straight_through_top_k`):

  z_bs   = s_b + g_bs,  g_bs ~ Gumbel(0, 1)^N                      perturbed scores     (B, S, N)
  hard   = 1[j in top-k_b(z_bs)]                                    a Gumbel-top-k (PL) sample
  soft   = relaxed_top_k(z_bs, k_b, tau)                            Xie & Ermon (below), sum = k_b
  m      = hard + soft - stop_gradient(soft)                        value: hard; gradient: soft's

Relaxed top-k (Xie & Ermon 2019, "Reparameterizable Subset Sampling via Continuous Relaxations",
arXiv 1901.10517): k rounds of a Gumbel-softmax that discounts what earlier rounds took,

  alpha^1 = z,   a^t = softmax(alpha^t / tau),   alpha^{t+1} = alpha^t + log(1 - a^t),
  soft    = sum_{t <= k} a^t,

which tends to the hard top-k of z as tau -> 0 (the straight-through estimator then has the
Gumbel-top-k sample as its forward value: Bengio et al. 2013, arXiv 1308.3432).

Gumbel-sigmoid gates (`gumbel_sigmoid_gates`, `budget_penalty`): DynamicViT's keep/drop decision
(Rao et al. 2021, arXiv 2106.02034) as Dynamic-LLaVA trains its visual-token predictor (arXiv
2412.00876): one gate per token whose logit IS the scorer's logit s_bj, so the logits the gates are
trained on are exactly the ones `pruning/grip.py` sorts at evaluation (it keeps the top ceil(rho N),
whatever their gate values; a gate count above or below k_b only changes training),

  l_bsj  ~ Logistic(0, 1)                                 (= g1 - g2, two Gumbel(0, 1))
  soft   = sigmoid((s_bj + l_bsj) / tau)                  the relaxed Bernoulli (binary Concrete)
  hard   = 1[soft > 0.5]  ~ Bernoulli(sigmoid(s_bj))      whatever tau
  m      = hard + soft - stop_gradient(soft)              value: hard; gradient: the sigmoid's
  loss   = mean_bs [ answer_loss_bs + lambda (mean_j m_bsj - k_b / N)^2 ],

a binary Gumbel-softmax with the straight-through hard gate (`F.gumbel_softmax(hard=True)` of
DynamicViT over (keep, drop) logits is this with s = l_keep - l_drop). The budget term is
DynamicViT's ratio loss (released `losses.py`: `ratio_weight * ((mask.mean(1) - keep_ratio)**2)
.mean()` on the straight-through mask, ratio_weight 2 by default) with the target keep ratio of
each example: its own budget k_b / N (`budget.budget_k`, the ceil of rho_b N), not one ratio for
the whole run. The gate count is free per sample (its mean is pulled to k_b); the VLM reads exactly
the tokens whose gate is open.

Top-k by perturbed optimizers (`perturbed_top_k`; Berthet et al. 2020, "Learning with
Differentiable Perturbed Optimizers", arXiv 2002.08676, as differentiable top-k token and patch
selectors use it, e.g. Cordonnier et al. 2021, arXiv 2104.03059):

  y(s)        = 1[j in top-k(s)]                          hard top-k indicator        (N,)
  y*_sigma(s) = E_Z[y(s + sigma Z)],  Z ~ N(0, I_N)       the smoothed top-k
  J(s)        = d y*_sigma / d s = E_Z[y(s + sigma Z) Z^T] / sigma                    (N, N)

estimated with the S samples of each example: y_bs = y(s_b + sigma Z_bs) and
J_b ~ (1 / S) sum_s y_bs Z_bs^T / sigma. Every sample's hard mask y_bs goes through the VLM (S
forwards, the forward loss averaged over the samples: a Monte-Carlo estimate of the loss at
y*_sigma), and the gradient reaches s through J: with c_bs = d loss / d y_bs (the key-weight
gradient, as for the straight-through mask),

  d loss / d s_b = J_b^T sum_s c_bs = (1 / (S sigma)) sum_s Z_bs (y_bs . sum_s' c_bs').

In code: m_bs = y_bs + r_b - stop_gradient(r_b), r_b = (1 / (S sigma)) sum_s y_bs (Z_bs . s_b),
whose Jacobian in s_b is exactly the estimate J_b. Two deviations, both ours: (1) the pooled form
(every sample's upstream gradient against the S-sample Jacobian): Berthet et al. feed the averaged
y*_sigma to the next layer, which would be one VLM forward on a fractional mask instead of S hard
keep-sets; (2) the centered estimate J_b ~ (1 / (S - 1)) sum_s (y_bs - ybar_b) Z_bs^T / sigma (the
sample covariance; unbiased as well, and 0 when all S samples keep the same tokens, where the plain
one is pure noise: in a 60-step run on the tiny default, 20 of them warm-up, validation accuracy
fell from 0.86 to 0.68 at step 50 with the plain estimate and stayed at 0.85-0.86 with the
centered one).

How a mask enters the VLM (`soft_answer_logits`): the decoder runs over ALL N visual slots, in
their source order, and every query's attention to visual key j is weighted by m_j and renormalized,

  p_ij = w_j exp(q_i . k_j / sqrt(d)) / sum_l w_l exp(q_i . k_l / sqrt(d)),
  w = prefix_valid for the prefix (<bos>, or a chat template's head), m_j for visual slot j,
      text_valid for text slots,

i.e. the key bias log(m_j) of attention masking (DynamicViT, Rao et al. 2021, arXiv 2106.02034),
computed multiplicatively so its gradient at m_j = 0 is finite. With m's forward value hard, the
weights of dropped tokens are exactly 0: no query reads them, so the value equals the VLM on only
the kept tokens (positions as `assemble` gives them for the hard mask: `keep` or `renumber`).
The gradient d loss / d m_j also exists for a DROPPED token j: it is what admitting a little of j
would change, which a boolean validity mask (dropped tokens invalid) would zero out.

| Piece | Reference | Here |
| --- | --- | --- |
| relaxation | Gumbel-softmax relaxed top-k (Xie & Ermon 2019) | per-example k as a masked scan over k_max rounds; log(1 - a) floored at 1e-12 |
| estimator | straight-through (Bengio et al. 2013) | forward = the Gumbel-top-k sample, so it equals hard pruning |
| gates | Gumbel-sigmoid, straight-through (DynamicViT; Dynamic-LLaVA) | gate logit = the scorer's ranking logit; tau `train.relax_gate_tau` (1, as `F.gumbel_softmax`) |
| budget term | DynamicViT ratio loss, weight 2 | target k_b / N per example; weight `train.relax_budget_weight` |
| perturbed top-k | Berthet et al. 2020, Gaussian Z | S hard samples through the VLM; pooled, centered Jacobian estimate; sigma `train.relax_perturb_sigma` |
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


def gumbel_sigmoid_gates(rng, logits, tau, num_samples: int = 1):
  """S straight-through Gumbel-sigmoid gate masks per example.

  Args:
    rng: PRNG key.
    logits: (B, N) scorer logits s: the gate logits, the same ones the evaluation ranker sorts.
    tau: temperature of the relaxed Bernoulli (the backward pass).
    num_samples: static S.

  Returns:
    `straight_through_gates(logits, noise, tau)` with noise ~ Logistic(0, 1)^(B, S, N): mask
    (B, S, N) float32 (value 0/1), hard (B, S, N) bool, hard_bsj ~ Bernoulli(sigmoid(s_bj)).
  """
  s = jnp.asarray(logits, jnp.float32)
  b, n = s.shape
  noise = jax.random.logistic(rng, (b, num_samples, n), jnp.float32)  # (B, S, N)
  return straight_through_gates(s, noise, tau)


def straight_through_gates(logits, noise, tau):
  """Gumbel-sigmoid gates for given noise: (B, N) logits, (B, S, N) logistic noise -> mask, hard.

    soft = sigmoid((s + l) / tau),   hard = 1[soft > 0.5],   m = hard + soft - stop_gradient(soft)

  Returns:
    mask: (B, S, N) float32, value exactly `hard`, gradient d soft / d s = soft (1 - soft) / tau.
    hard: (B, S, N) bool open gates.
  """
  s = jnp.asarray(logits, jnp.float32)
  soft = jax.nn.sigmoid((s[:, None, :] + noise) / tau)  # (B, S, N)
  hard = soft > 0.5
  return hard.astype(jnp.float32) + (soft - jax.lax.stop_gradient(soft)), hard


def budget_penalty(mask, target, weight):
  """DynamicViT's keep-ratio penalty per sample: (B, S, N) mask, (B,) target -> (B, S).

    penalty_bs = weight * (mean_j mask_bsj - target_b)^2
  """
  frac = jnp.mean(jnp.asarray(mask, jnp.float32), axis=-1)  # (B, S)
  return weight * jnp.square(frac - jnp.asarray(target, jnp.float32)[:, None])


def perturbed_top_k(rng, logits, k, k_max: int, sigma, num_samples: int = 1, centered: bool = True):
  """S perturbed top-k masks per example (Berthet et al. 2020), Z ~ N(0, I).

  Args:
    rng: PRNG key.
    logits: (B, N) scorer logits s.
    k: (B,) int budgets; k_max: static max budget (>= every k_b).
    sigma: perturbation scale (> 0).
    num_samples: static S (>= 1), the samples of both the forward and the Jacobian estimate.
    centered: the centered Jacobian estimate (used when S >= 2), else the plain one.

  Returns:
    `perturbed_top_k_from_noise(logits, Z, k, k_max, sigma, centered)`.
  """
  s = jnp.asarray(logits, jnp.float32)
  b, n = s.shape
  noise = jax.random.normal(rng, (b, num_samples, n), jnp.float32)  # (B, S, N)
  return perturbed_top_k_from_noise(s, noise, k, k_max, sigma, centered)


def perturbed_top_k_from_noise(logits, noise, k, k_max: int, sigma, centered: bool = True):
  """Hard top-k_b masks of s + sigma Z with the perturbed-optimizer gradient.

    y_bs = 1[j in top-k_b(s_b + sigma Z_bs)]                                    (B, S, N)
    r_b  = (1 / (S sigma)) sum_s y_bs (Z_bs . s_b)
    d r_b / d s_b = (1 / (S sigma)) sum_s y_bs Z_bs^T                                  (B, N, N)
    m_bs = y_bs + r_b - stop_gradient(r_b)

  so a loss L(m) gets d L / d s_b = J_b^T sum_s d L / d m_bs with J_b the S-sample estimate of
  E[y(s_b + sigma Z) Z^T] / sigma, the Jacobian of the smoothed top-k E[y(s_b + sigma Z)].

  Centered (S >= 2): y_bs - mean_s' y_bs' in place of y_bs and 1 / (S - 1) in place of 1 / S, the
  sample covariance of y and Z. It is unbiased too (E[Z] = 0 and samples are independent, so
  E[(y_s - ybar) Z_s^T] = (1 - 1 / S) E[y Z^T]) and exactly 0 when every sample keeps the same
  tokens, where the plain estimate is y (mean_s Z_s)^T / sigma: noise of zero mean whose size does
  not shrink as the top-k becomes certain.

  Args:
    logits: (B, N) s; noise: (B, S, N) Z; k: (B,) int budgets; k_max: static; sigma: scale > 0.
    centered: the centered estimate when S >= 2 (the plain one for S = 1 or False).

  Returns:
    mask: (B, S, N) float32, value exactly `hard`.
    hard: (B, S, N) bool, k_b kept tokens per row.
  """
  s = jnp.asarray(logits, jnp.float32)
  z = jnp.asarray(noise, jnp.float32)
  n = s.shape[-1]
  samples = z.shape[1]
  perturbed = jax.lax.stop_gradient(s)[:, None, :] + sigma * z  # (B, S, N)
  _, order = jax.lax.top_k(perturbed, k_max)  # (B, S, k_max)
  hard = policy.keep_mask(order, n, policy.step_mask(k, k_max)[:, None, :])  # (B, S, N)
  y = hard.astype(jnp.float32)
  proj = jnp.einsum('bsn,bn->bs', z, s)  # (B, S) Z_bs . s_b
  if centered and samples > 1:
    centred = y - jnp.mean(y, axis=1, keepdims=True)  # (B, S, N)
    r = jnp.einsum('bsn,bs->bn', centred, proj) / ((samples - 1) * sigma)  # (B, N)
  else:
    r = jnp.einsum('bsn,bs->bn', y, proj) / (samples * sigma)  # (B, N)
  return y + (r - jax.lax.stop_gradient(r))[:, None, :], hard


def soft_answer_logits(vlm, vlm_params, visual, mask, hard, text_ids, text_valid,
                       position_mode=None, *, prefix_ids=None, prefix_valid=None):
  """Frozen-VLM answer logits with every visual token in place, weighted by `mask`.

  Args:
    vlm: the `VLM` module; vlm_params: its inner 'params' (constants).
    visual: (R, N, D) all visual tokens of each row, in source order.
    mask: (R, N) float key weights of the visual slots (the straight-through mask).
    hard: (R, N) bool kept tokens: the positions of `renumber` mode count only these.
    text_ids, text_valid: (R, T) left-padded question.
    position_mode: 'keep' | 'renumber'; None takes the VLM config's.
    prefix_ids, prefix_valid: optional (R, P) text before the image; None: <bos> alone.

  Returns:
    (R, vocab) float32 logits at the answer slot (`VLM.answer_logits` with `visual_weight=mask`:
    the model's own decoder layers, with the weights on the keys of every layer). With `mask` equal
    (in value) to `hard`, they equal the VLM's forward on only the kept tokens.
  """
  r, n, _ = visual.shape
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (r, n))  # (R, N)
  prefix = {k: v for k, v in (('prefix_ids', prefix_ids), ('prefix_valid', prefix_valid))
            if v is not None}
  return vlm.apply({'params': vlm_params}, visual, index, hard, text_ids, text_valid, position_mode,
                   mask, method='answer_logits', **prefix)  # (R, vocab)


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


DEFAULT_TAU = 0.5  # Straight-through top-k temperature.
DEFAULT_GATE_TAU = 1.0  # Gumbel-sigmoid temperature (F.gumbel_softmax's default, as in DynamicViT).
DEFAULT_BUDGET_WEIGHT = 2.0  # DynamicViT's ratio_weight.
DEFAULT_PERTURB_SIGMA = 1.0  # Perturbation scale of the perturbed top-k.


def _positive(t, field: str, default: float) -> float:
  value = t.get(field, default)
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
      or value <= 0):
    config_lib.fail(f'train.{field}', value, 'a finite number > 0')
  return float(value)


def relax_samples(config) -> int:
  """S, the masks (frozen-VLM forwards) per example per step of every relaxation phase.

  `train.relax_samples`, None (the default) for `train.group_size`: the relaxation then runs as many
  VLM forwards per training example as GRPO's G rollouts, so they are compared on equal terms.
  """
  t = config.train
  samples = t.get('relax_samples', None)
  samples = t.group_size if samples is None else samples
  if not config_lib.is_int(samples) or samples < 1:
    config_lib.fail('train.relax_samples', samples, 'an integer >= 1, or None for train.group_size')
  return samples


def relax_options(config) -> tuple[float, int]:
  """(tau, S) of the straight-through phase from `config.train`; raises config_lib.ConfigError."""
  return _positive(config.train, 'relax_tau', DEFAULT_TAU), relax_samples(config)


def gate_options(config) -> tuple[float, float, int]:
  """(tau, lambda, S) of the Gumbel-sigmoid phase: `train.relax_gate_tau` (> 0),
  `train.relax_budget_weight` (>= 0), `train.relax_samples`; raises config_lib.ConfigError."""
  t = config.train
  weight = t.get('relax_budget_weight', DEFAULT_BUDGET_WEIGHT)
  if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)
      or weight < 0):
    config_lib.fail('train.relax_budget_weight', weight, 'a finite number >= 0')
  return _positive(t, 'relax_gate_tau', DEFAULT_GATE_TAU), float(weight), relax_samples(config)


def perturb_options(config) -> tuple[float, int]:
  """(sigma, S) of the perturbed top-k phase: `train.relax_perturb_sigma` (> 0),
  `train.relax_samples`; raises config_lib.ConfigError."""
  sigma = _positive(config.train, 'relax_perturb_sigma', DEFAULT_PERTURB_SIGMA)
  return sigma, relax_samples(config)


def check(config) -> None:
  """Start-up check of the relaxations' fields of `config.train` (whatever `train.algorithm`)."""
  if 'train' in config:
    relax_options(config)
    gate_options(config)
    perturb_options(config)


def _relaxation_phase(config, draw, samples: int):
  """A relaxation's phase: S masks per example through the frozen VLM, one optimizer update.

    m_bs, penalty_bs = draw(s(params), inputs)                                (B, S, N), (B, S)
    loss = mean_bs answer_loss(VLM(V_b weighted by m_bs, question_b)[answer slot], target_b)
           + mean_bs penalty_bs

  Args:
    config: the full config (reads `train.reward`).
    draw: (logits (B, N), inputs) -> (mask (B, S, N) float, hard (B, S, N) bool, penalty (B, S) or
      None, metrics dict of METRIC_KEYS entries).
    samples: S.

  The VLM runs over all N tokens per sample (P + N + T slots, dropped ones weighted 0; P = 1 for
  <bos> alone), against P + k_max + T for a GRPO rollout: the price of a gradient that reaches
  dropped tokens. Metrics: `loss` (the answer loss plus any penalty), `reward/*` (`train.reward` of
  the hard keep-sets, the S samples of an example forming its group, as GRPO logs its rollouts),
  and `draw`'s.
  """
  reward_fn = rewards_lib.get(config.train.reward)

  def phase(params, opt_state, inputs: phase_lib.PhaseInputs, update):
    b = inputs.visual.shape[0]
    rows = inputs.rows
    tile = lambda x: phase_lib.tile(x, samples, rows)  # (B * S, ...), row b * S + s
    flat = lambda x: phase_lib.flatten_group(x, rows)
    target = tile(inputs.reward_target())  # (B * S[, vocab])

    def loss_fn(p):
      logits = inputs.score(p)  # (B, N)
      mask, hard, penalty, metrics = draw(logits, inputs)  # (B, S, N) x2, (B, S) or None
      out = soft_answer_logits(inputs.vlm, inputs.vlm_params, tile(inputs.visual), flat(mask),
                               flat(hard), tile(inputs.question_ids), tile(inputs.question_valid),
                               inputs.position_mode, **inputs.prefix(samples))  # (B * S, vocab)
      per_row = answer_loss(out, target, inputs.label_free)  # (B * S,)
      ok = jnp.isfinite(per_row)
      loss = jnp.sum(jnp.where(ok, per_row, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
      if penalty is not None:
        loss = loss + jnp.mean(penalty)
      reward = reward_fn(jax.lax.stop_gradient(out), target).reshape(b, samples)  # (B, S)
      _, reward_metrics = grpo.group_advantages(reward)
      return loss, dict(metrics, **reward_metrics)

    return phase_lib.one_update(loss_fn, params, opt_state, update, phase=1.0)

  return phase


def make_straight_through_phase(config):
  """The train step's second phase for the straight-through top-k baseline ('relaxation').

    m_bs = straight_through_top_k(s_b + Gumbel, k_b, tau), s < S            (B, S, N)
    loss = mean_bs answer_loss(VLM(V_b weighted by m_bs, question_b)[answer slot], target_b)

  Metrics (besides `_relaxation_phase`'s): `entropy` (of the Plackett-Luce policy the samples come
  from, per step), `tokens_kept` (mean k_b).
  """
  tau, samples = relax_options(config)

  def draw(logits, inputs):
    mask, hard, order = straight_through_top_k(inputs.rng, logits, inputs.k, inputs.k_max, tau,
                                               samples)  # (B, S, N) x2, (B, S, k_max)
    order_valid = policy.step_mask(inputs.k, inputs.k_max)[:, None, :]  # (B, 1, k_max)
    ent = policy.entropy(jax.lax.stop_gradient(logits)[:, None, :], order, None, order_valid)
    return mask, hard, None, dict(entropy=jnp.mean(ent),
                                  tokens_kept=jnp.mean(inputs.k.astype(jnp.float32)))

  return _relaxation_phase(config, draw, samples)


def make_gumbel_sigmoid_phase(config):
  """The second phase for the Gumbel-sigmoid gate baseline ('gumbel_sigmoid').

    m_bs = gumbel_sigmoid_gates(s_b, tau), s < S                             (B, S, N)
    loss = mean_bs [answer_loss(VLM(V_b weighted by m_bs)[answer slot], target_b)
                    + lambda (mean_j m_bsj - k_b / N)^2]

  The gate logits are the scorer's logits s, which evaluation ranks (top-ceil(rho N)); training
  never sees that top-k, only gates whose open count is pulled towards k_b by the penalty.
  Metrics: `entropy` (of the gates' keep-set distribution, sum_j H(Bernoulli(sigmoid(s_bj))), mean
  over b, nats), `tokens_kept` (mean open gates per sample: what the VLM read, not k_b).
  """
  tau, weight, samples = gate_options(config)

  def draw(logits, inputs):
    n = logits.shape[-1]
    mask, hard = gumbel_sigmoid_gates(inputs.rng, logits, tau, samples)  # (B, S, N) x2
    penalty = budget_penalty(mask, inputs.k.astype(jnp.float32) / n, weight)  # (B, S)
    s = jax.lax.stop_gradient(logits)
    p = jax.nn.sigmoid(s)
    ent = -jnp.sum(p * jax.nn.log_sigmoid(s) + (1.0 - p) * jax.nn.log_sigmoid(-s), axis=-1)  # (B,)
    return mask, hard, penalty, dict(entropy=jnp.mean(ent),
                                     tokens_kept=jnp.mean(jnp.sum(hard, -1).astype(jnp.float32)))

  return _relaxation_phase(config, draw, samples)


def make_perturbed_topk_phase(config):
  """The second phase for the perturbed-optimizer top-k baseline ('perturbed_topk').

    m_bs = perturbed_top_k(s_b + sigma Z_bs, k_b), s < S                     (B, S, N)
    loss = mean_bs answer_loss(VLM(V_b weighted by m_bs)[answer slot], target_b)

  the gradient reaching s through the centered S-sample Jacobian estimate of the smoothed top-k
  (the plain one when S = 1). Metrics:
  `tokens_kept` (mean k_b); no `entropy` (the Gaussian-perturbed top-k has no closed-form one; 0).
  """
  sigma, samples = perturb_options(config)

  def draw(logits, inputs):
    mask, hard = perturbed_top_k(inputs.rng, logits, inputs.k, inputs.k_max, sigma, samples)
    return mask, hard, None, dict(tokens_kept=jnp.mean(inputs.k.astype(jnp.float32)))

  return _relaxation_phase(config, draw, samples)
