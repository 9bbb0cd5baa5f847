"""The agent's validation curve: greedy keep-sets on a fixed validation batch, during training.

  validate = make_validator(vlm, scorer, config, batch)     # batch: the first validation examples
  row.update(validate(agent_params, vlm_params))           # {'val/reward': ..., 'val/accuracy': ...}

At each budget rho of `train.val_budgets` the agent keeps its greedy top-k (k = budget_to_k(rho, N),
fed rho), the frozen VLM answers from the kept tokens, and the metrics are the mean of
`train.reward` (the quantity GRPO maximizes, on the policy's mode rather than its samples) and the
answer accuracy, per budget and averaged over budgets. Logged before the first step and at every
log step, so whether GRPO raises the reward above the warm-up's value is read off one curve
(`val/reward` in `metrics.jsonl`, plotted in the report). The examples never change during a run.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from gripjax import budget
from gripjax.models import vlm as vlm_lib
from gripjax.rl import policy
from gripjax.rl import rewards as rewards_lib


def budget_label(rho: float) -> str:
  """'1/9' for 0.111..., else the ratio with 3 significant digits."""
  inverse = 1.0 / rho
  return f'1/{round(inverse)}' if abs(inverse - round(inverse)) < 1e-6 else f'{rho:.3g}'


def make_validator(vlm, scorer, config, batch: dict[str, Any]) -> Callable[[Any, Any], dict]:
  """A jitted `validate(agent_params, vlm_params) -> {metric: float32 scalar}` on `batch`.

  `batch` needs pixels, question_ids, question_valid and answer_id (its rows are all real
  examples), and may carry prefix_ids / prefix_valid (B, P), the text before the image that every
  VLM forward then reads (`VLM.assemble`; default <bos> alone). Metrics: `val/reward`,
  `val/accuracy` (means over `train.val_budgets`) and `val/reward@1/9`, `val/accuracy@1/9`, ... per
  budget.
  """
  t = config.train
  budgets = tuple(float(r) for r in t.val_budgets)
  reward_fn = rewards_lib.get(t.reward)
  label_free = t.reward in rewards_lib.LABEL_FREE
  position_mode = config.model.position_mode
  keys = ('pixels', 'question_ids', 'question_valid', 'answer_id') + vlm_lib.PREFIX_KEYS
  arrays = {k: jnp.asarray(batch[k]) for k in keys if k in batch}

  @jax.jit
  def run(agent_params, vlm_params, arrays):  # The batch is an argument: as a closed-over constant
    variables = {'params': vlm_params}      # XLA would constant-fold the vision tower over it.
    ids, qvalid = arrays['question_ids'], arrays['question_valid'].astype(bool)
    prefix = vlm_lib.prefix_of(arrays)
    visual, _ = vlm.apply(variables, arrays['pixels'], method='encode_image')  # (B, N, D)
    question = vlm.apply(variables, ids, method='embed_text')  # (B, T, D)
    b, n, _ = visual.shape
    full_index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    if label_free:
      target = vlm.apply(variables, visual, full_index, jnp.ones((b, n), bool), ids, qvalid,
                         position_mode, method='answer_logits', **prefix)  # (B, vocab)
    else:
      target = arrays['answer_id']
    out = {}
    for rho in budgets:
      k = budget.budget_to_k(rho, n)
      logits = scorer.apply({'params': agent_params}, visual, question, qvalid,
                            jnp.full((b,), rho, jnp.float32))  # (B, N)
      index = jnp.sort(policy.greedy(logits, k), axis=-1)  # (B, k)
      kept = jnp.take_along_axis(visual, index[..., None], axis=1)  # (B, k, D)
      answer = vlm.apply(variables, kept, index, jnp.ones((b, k), bool), ids, qvalid, position_mode,
                         method='answer_logits', **prefix)  # (B, vocab)
      label = budget_label(rho)
      out[f'val/reward@{label}'] = jnp.mean(reward_fn(answer, target))
      out[f'val/accuracy@{label}'] = jnp.mean(answer.argmax(-1) == arrays['answer_id'])
    out['val/reward'] = jnp.mean(jnp.stack([out[f'val/reward@{budget_label(r)}'] for r in budgets]))
    out['val/accuracy'] = jnp.mean(jnp.stack([out[f'val/accuracy@{budget_label(r)}']
                                              for r in budgets]))
    return out

  def validate(agent_params, vlm_params):
    return run(agent_params, vlm_params, arrays)

  return validate
