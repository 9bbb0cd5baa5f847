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

import jax
import jax.numpy as jnp

from gripjax.models.llm import LlamaMlp, RMSNorm, causal_mask, rope
from gripjax.models.vlm import ModelConfig
from gripjax.rl import policy

# Floor of 1 - a in the relaxed top-k: a token taken with probability ~1 stays out of later rounds
# without log(0).
_LOG_FLOOR = 1e-12
# Cap of s_ij - max in the weighted softmax: it only binds on keys of weight below exp(-cap) (the
# dropped ones when m is hard), so their gradient stays finite when their score dominates.
_SCORE_CAP = 20.0


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


def weighted_attend(q, k, v, allow, weight):
  """Grouped-query attention whose keys carry weights: p_ij = w_j e^{s_ij} / sum_l w_l e^{s_il}.

  Same layout and float32 softmax as `models.llm.attend`; with weights in {0, 1} it equals
  `attend` with mask `allow & (weight > 0)`.

  Args:
    q: (B, Lq, H, Dh); k, v: (B, Lk, KVH, Dh).
    allow: bool, broadcastable to (B, 1, Lq, Lk) (causal and padding structure).
    weight: (B, Lk) float >= 0; some allowed key of every query row must have weight > 0.

  Returns:
    out (B, Lq, H, Dh) in q's dtype.
  """
  b, lq, h, dh = q.shape
  kvh, lk = k.shape[2], k.shape[1]
  g = h // kvh
  qg = q.reshape(b, lq, kvh, g, dh)  # (B, Lq, KVH, G, Dh)
  scores = jnp.einsum('bqkgd,bskd->bkgqs', qg, k, preferred_element_type=jnp.float32) * dh ** -0.5
  scores = scores.reshape(b, h, lq, lk)  # (B, H, Lq, Lk)
  w = jnp.asarray(weight, jnp.float32)[:, None, None, :]  # (B, 1, 1, Lk)
  live = allow & (w > 0)  # (B, 1, Lq, Lk)
  log_w = jnp.log(jnp.where(live, w, 1.0))
  # Stabilizer: max_j (s_ij + log w_j) over live keys (not differentiated: it cancels).
  top = jnp.max(jnp.where(live, scores + log_w, -jnp.inf), axis=-1, keepdims=True)  # (B, H, Lq, 1)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  # w * exp(.) rather than exp(. + log w): the gradient w.r.t. w_j stays finite at w_j = 0.
  e = jnp.where(allow, w * jnp.exp(jnp.minimum(scores - top, _SCORE_CAP)), 0.0)  # (B, H, Lq, Lk)
  probs = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  p = probs.reshape(b, kvh, g, lq, lk).astype(v.dtype)  # (B, KVH, G, Lq, Lk)
  out = jnp.einsum('bkgqs,bskd->bqkgd', p, v)
  return out.reshape(b, lq, h, dh)  # (B, Lq, H, Dh)


def _layer(cfg, dtype, p, x, positions, allow, weight):
  """One Llama decoder layer (`models.llm.LlamaDecoderLayer`) with key-weighted attention."""
  b, l, _ = x.shape
  dh = cfg.head_dim
  dense = lambda y, name: jnp.dot(y, p['self_attn'][name]['kernel'].astype(dtype))
  h = RMSNorm(cfg.rms_norm_eps, dtype).apply({'params': p['input_layernorm']}, x)
  q = dense(h, 'q_proj').reshape(b, l, cfg.num_heads, dh)  # (B, L, H, Dh)
  k = dense(h, 'k_proj').reshape(b, l, cfg.num_kv_heads, dh)  # (B, L, KVH, Dh)
  v = dense(h, 'v_proj').reshape(b, l, cfg.num_kv_heads, dh)  # (B, L, KVH, Dh)
  q = rope(q, positions, cfg.rope_theta)
  k = rope(k, positions, cfg.rope_theta)
  out = weighted_attend(q, k, v, allow, weight).reshape(b, l, cfg.num_heads * dh)  # (B, L, H * Dh)
  x = x + dense(out, 'o_proj')
  h = RMSNorm(cfg.rms_norm_eps, dtype).apply({'params': p['post_attention_layernorm']}, x)
  return x + LlamaMlp(cfg, dtype).apply({'params': p['mlp']}, h)


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
    (R, vocab) float32 logits at the answer slot. With `mask` equal (in value) to `hard`, they equal
    the VLM's forward on only the kept tokens.
  """
  cfg = ModelConfig.from_config(vlm.config)
  dtype = cfg.activation_dtype
  variables = {'params': vlm_params}
  r, n, _ = visual.shape
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (r, n))  # (R, N)
  h, positions, _ = vlm.apply(variables, visual, index, hard, text_ids, text_valid, position_mode,
                              method='assemble')  # (R, 1 + N + T, D), (R, 1 + N + T)
  text_valid = text_valid.astype(bool)
  ones = jnp.ones((r, 1), jnp.float32)
  weight = jnp.concatenate([ones, mask.astype(jnp.float32), text_valid.astype(jnp.float32)],
                           axis=1)  # (R, L)
  # Visual keys stay "allowed" even when dropped: their weight, not the boolean mask, removes them.
  allow = causal_mask(jnp.concatenate([ones > 0, jnp.ones((r, n), bool), text_valid], axis=1))
  for i in range(cfg.llm.depth):
    h = _layer(cfg.llm, dtype, vlm_params['llm'][f'layers_{i}'], h, positions, allow, weight)
  return vlm.apply(variables, h[:, -1:], method='logits')[:, 0].astype(jnp.float32)  # (R, vocab)


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
