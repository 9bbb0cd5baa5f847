"""Supervised warm-up of the agent: a teacher ranking of visual tokens from the frozen VLM, and ListMLE.

Before GRPO, the scorer learns to rank tokens the way the frozen VLM itself uses them, so RL starts
from a policy whose samples already keep useful tokens (GRPO with a random scorer spends its first
hundreds of steps on groups whose rewards barely differ).

Teachers (importance per visual token, (B, N), computed with every token kept):

  attention  a_j = (1 / L) sum_l (1 / H) sum_h A^l_h[answer slot, visual slot j], renormalized over j.
             The answer slot is the last text slot (`<sep>`, which predicts the one-word answer);
             visual slot j sits at sequence slot P + j after the P prefix slots (`SequenceLayout`).
             One forward, layer by layer (`run_layers(..., i, i + 1, attn_layer=i)`).
  loo        a_j = log p(y | all tokens) - log p(y | all tokens but j): the drop of the answer's
             log-probability when token j is removed. Exact for what the reward measures, but it
             costs N + 1 full forwards per example (N = 576 for LLaVA-1.5: ~577x a forward), run
             `chunk` tokens at a time; meant for small N (the tiny benchmark's 144) or offline use.

Both run the frozen VLM on the batch's own sequence `[prefix][visual][text]`: the prefix is <bos>
alone by default, or a chat template's head (`prefix_ids` / `prefix_valid`, as `VLM.assemble`).

Loss. With the scorer's logits s and the teacher's top-m tokens o = (o_1, ..., o_m) in decreasing
importance, ListMLE (Xia et al. 2008) is the negative Plackett-Luce log-likelihood of that order:

  L_ListMLE = -log P_PL(o | s) = -sum_{t<=m} [ s_{o_t} - logsumexp_{j not in o_<t} s_j ].

It is the agent's own policy distribution (`policy.log_prob`), so the warm-up is behaviour cloning
of the teacher's greedy trajectory in the same MDP GRPO later optimizes, and the GRPO KL term
anchors to exactly this fitted policy. Only the top m count: the budget decides which tokens are
kept, and the order among the teacher's near-zero tail is noise. Optionally

  L_KL = KL(softmax(log a) || softmax(s)) = sum_j a_j (log a_j - log softmax(s)_j)

calibrates the whole logit vector (the tail's scale too), which ListMLE on the top m leaves free;
its weight is `config.train.warmup_kl_coef` (0 by default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gripjax.models.vlm import DEFAULT_PREFIX_LEN, ModelConfig, SequenceLayout
from gripjax.rl import phase as phase_lib
from gripjax.rl import policy

TEACHERS = ('attention', 'loo')


def _full_slots(visual):
  b, n, _ = visual.shape
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))  # (B, N)
  return index, jnp.ones((b, n), bool)


def teacher_attention(vlm, vlm_params, visual, question_ids, question_valid, position_mode=None, *,
                      prefix_ids=None, prefix_valid=None):
  """Answer-slot attention to each visual slot, mean over heads and all LM layers.

  Args:
    vlm: the `VLM` module; vlm_params: its inner 'params'.
    visual: (B, N, D) visual tokens (all kept).
    question_ids, question_valid: (B, T) left-padded question (last slot predicts the answer).
    position_mode: None takes the VLM config's.
    prefix_ids, prefix_valid: optional (B, P) text before the image; None: <bos> alone (P = 1).

  Returns:
    importance: (B, N) float32, >= 0, summing to 1 over N (each row).
    full_logits: (B, vocab) the answer logits with every token kept.
  """
  variables = {'params': vlm_params}
  index, valid = _full_slots(visual)
  h, positions, key_valid = vlm.apply(variables, visual, index, valid, question_ids, question_valid,
                                      position_mode, method='assemble', prefix_ids=prefix_ids,
                                      prefix_valid=prefix_valid)
  prefix_len = DEFAULT_PREFIX_LEN if prefix_ids is None else prefix_ids.shape[1]
  slots = SequenceLayout(prefix_len, visual.shape[1], question_ids.shape[1]).visual  # P .. P+N-1
  depth = ModelConfig.from_config(vlm.config).llm.depth
  total = jnp.zeros(visual.shape[:2], jnp.float32)  # (B, N)
  for i in range(depth):
    h, attn = vlm.apply(variables, h, positions, key_valid, i, i + 1, attn_layer=i,
                        method='run_layers')  # attn (B, H, L, L)
    total = total + jnp.mean(attn[:, :, -1, slots].astype(jnp.float32), axis=1)  # (B, N)
  mean = total / depth
  importance = mean / jnp.maximum(jnp.sum(mean, axis=-1, keepdims=True), 1e-12)  # (B, N)
  full_logits = vlm.apply(variables, h[:, -1:], method='logits')[:, 0]  # (B, vocab)
  return jax.lax.stop_gradient(importance), jax.lax.stop_gradient(full_logits)


def teacher_loo(vlm, vlm_params, visual, question_ids, question_valid, answer_id=None,
                position_mode=None, chunk=16, *, prefix_ids=None, prefix_valid=None):
  """Leave-one-out importance: drop of log p(answer) when one token is removed.

  Cost: N + 1 forwards of the full sequence per example; `chunk` removed tokens are batched into
  one (B * chunk)-row forward (`lax.map(..., batch_size=chunk)`), so peak memory is chunk x a forward.

  Args:
    answer_id: (B,) int target; None uses the full model's own argmax answer (label-free).
    chunk: tokens removed per batched forward (static).
    prefix_ids, prefix_valid: optional (B, P) text before the image; None: <bos> alone.

  Returns:
    importance: (B, N) float32 (may be negative: removing a token can help).
    full_logits: (B, vocab).
  """
  variables = {'params': vlm_params}
  index, valid = _full_slots(visual)
  n = visual.shape[1]

  def answer_logits(v):
    return vlm.apply(variables, visual, index, v, question_ids, question_valid, position_mode,
                     method='answer_logits', prefix_ids=prefix_ids,
                     prefix_valid=prefix_valid)  # (B, vocab)

  full_logits = answer_logits(valid)
  target = jnp.argmax(full_logits, -1) if answer_id is None else jnp.asarray(answer_id, jnp.int32)

  def logp(logits):
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[:, None], -1)[:, 0]  # (B,)

  def without(j):
    return logp(answer_logits(valid & (jnp.arange(n) != j)[None, :]))  # (B,)

  dropped = jax.lax.map(without, jnp.arange(n), batch_size=max(1, min(int(chunk), n)))  # (N, B)
  importance = logp(full_logits)[:, None] - dropped.T  # (B, N)
  return jax.lax.stop_gradient(importance), jax.lax.stop_gradient(full_logits)


def teacher_importance(name, vlm, vlm_params, visual, question_ids, question_valid, answer_id=None,
                       position_mode=None, chunk=16, *, prefix_ids=None, prefix_valid=None):
  """Dispatches to `teacher_<name>`; returns (importance (B, N), full_logits (B, vocab))."""
  prefix = dict(prefix_ids=prefix_ids, prefix_valid=prefix_valid)
  if name == 'attention':
    return teacher_attention(vlm, vlm_params, visual, question_ids, question_valid, position_mode,
                             **prefix)
  if name == 'loo':
    return teacher_loo(vlm, vlm_params, visual, question_ids, question_valid, answer_id,
                       position_mode, chunk, **prefix)
  raise ValueError(f'teacher={name!r} is invalid: expected one of {TEACHERS}.')


def teacher_order(importance, m: int):
  """The teacher's top-m tokens, most important first: (B, N) -> (B, m) int32."""
  return policy.greedy(importance, m)


def listmle_loss(logits, order):
  """Per-example ListMLE: -log P_PL(order | logits). (B, N), (B, m) -> (B,)."""
  return -policy.log_prob(logits, order)


def softmax_kl(logits, importance, eps=1e-8):
  """KL(p_teacher || softmax(logits)) per example, with p_teacher = importance clipped >= 0, normalized."""
  p = jnp.maximum(jnp.asarray(importance, jnp.float32), 0.0)
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), eps)  # (B, N)
  logq = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  terms = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0)
  return jnp.sum(terms, axis=-1)  # (B,)


def topk_recall(logits, importance, k: int):
  """Fraction of the teacher's top-k that the scorer's greedy top-k also keeps, per example (B,)."""
  n = logits.shape[-1]
  mine = policy.keep_mask(policy.greedy(logits, k), n)  # (B, N)
  theirs = policy.keep_mask(policy.greedy(importance, k), n)  # (B, N)
  return jnp.sum(mine & theirs, axis=-1) / k


def warmup_loss(logits, importance, m: int, kl_coef=0.0):
  """Mean over the batch of ListMLE on the teacher's top-m order (+ kl_coef * softmax KL).

  Returns:
    loss: scalar; metrics: `warmup/listmle`, `warmup/kl`, `warmup/teacher_topk_recall` (at m).
  """
  order = teacher_order(jax.lax.stop_gradient(importance), m)  # (B, m)
  listmle = jnp.mean(listmle_loss(logits, order))
  kl = jnp.mean(softmax_kl(logits, jax.lax.stop_gradient(importance)))
  loss = listmle + kl_coef * kl
  recall = jnp.mean(topk_recall(jax.lax.stop_gradient(logits), importance, m))
  return loss, {'warmup/listmle': listmle, 'warmup/kl': kl, 'warmup/teacher_topk_recall': recall}


def make_warmup_phase(config):
  """The train step's first phase: ListMLE on the teacher's top-m order (+ the optional KL).

  Reads `train.teacher`, `train.warmup_top` (m = min(this, N)), `train.loo_chunk` and
  `train.warmup_kl_coef`. Returns `phase(params, opt_state, inputs, update)` (see `rl/phase.py`).
  """
  t = config.train
  teacher, top, chunk, kl_coef = t.teacher, int(t.warmup_top), int(t.loo_chunk), float(t.warmup_kl_coef)

  def phase(params, opt_state, inputs: phase_lib.PhaseInputs, update):
    m = min(top, inputs.visual.shape[1])
    importance, _ = teacher_importance(teacher, inputs.vlm, inputs.vlm_params, inputs.visual,
                                       inputs.question_ids, inputs.question_valid, inputs.answer_id,
                                       inputs.position_mode, chunk, **inputs.prefix())  # (B, N)

    def loss_fn(p):
      return warmup_loss(inputs.score(p), importance, m, kl_coef)

    return phase_lib.one_update(loss_fn, params, opt_state, update, phase=0.0)

  return phase
