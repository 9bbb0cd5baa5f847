"""What one phase of the agent's train step receives and returns.

The train step (`train/step.make_train_step`) encodes the batch, draws each example's budget and
builds a `PhaseInputs`; a phase is a function

  phase(params, opt_state, inputs: PhaseInputs, update) -> (params, opt_state, metrics)
  update(params, opt_state, grads) -> (params, opt_state, grad_norm)     # the optimizer, given

that updates the scorer's params once (the warm-up, a relaxation) or several times on one batch
(GRPO's `train.ppo_epochs`). The warm-up
(`rl/warmup.make_warmup_phase`) is the first phase; GRPO (`rl/grpo.make_grpo_phase`) or a
continuous relaxation (`rl/relaxation.make_*_phase`) is the second. Phases return a subset of
`METRIC_KEYS`; `filled` gives every step the same metric keys whatever the phase.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Every metric the step returns, in both phases (the other phase's are 0).
METRIC_KEYS = (
    'loss', 'phase', 'grad_norm',
    'reward/mean', 'reward/std', 'frac_reward_zero_std', 'reward/num_nonfinite',
    'policy_loss', 'kl_ref', 'approx_kl', 'clip_ratio', 'entropy', 'tokens_kept',
    'warmup/listmle', 'warmup/kl', 'warmup/teacher_topk_recall',
)


@dataclasses.dataclass(frozen=True)
class PhaseInputs:
  """One batch, encoded, with its budgets; built inside the jitted step (fields are traced arrays).

  Attributes:
    vlm: the frozen `VLM` module; vlm_params: its inner 'params' (stop-gradient constants).
    visual: (B, N, D) visual tokens; question_ids, question_valid: (B, T) left-padded question.
    answer_id: (B,) int answers, or None for a label-free reward.
    rho: (B,) the keep ratio of each example (what the scorer is fed); k: (B,) int32 its budget.
    k_max: static int, the largest budget (`budget_to_k(rho_max, N)`): sampled orders have k_max slots.
    score: params -> (B, N) scorer logits on this batch at `rho`.
    ref_params: the reference policy's params (GRPO's KL term).
    rng: PRNG key of this step's sampling.
    rows: x -> x with its leading (row) axis split over the mesh's data axis.
    position_mode: the VLM's position mode ('keep' | 'renumber').
    prefix_ids, prefix_valid: optional (B, P) text before the image (a chat template's head),
      left-padded, as `VLM.assemble` takes them; None: the model's default prefix <bos> alone.
      Every frozen-VLM forward of a phase reads it; the scorer does not (it reads the question).
  """
  vlm: Any
  vlm_params: Any
  visual: jax.Array
  question_ids: jax.Array
  question_valid: jax.Array
  answer_id: jax.Array | None
  rho: jax.Array
  k: jax.Array
  k_max: int
  score: Callable[[Any], jax.Array]
  ref_params: Any
  rng: jax.Array
  rows: Callable[[jax.Array], jax.Array]
  position_mode: str
  prefix_ids: jax.Array | None = None
  prefix_valid: jax.Array | None = None

  @property
  def label_free(self) -> bool:
    return self.answer_id is None

  def prefix(self, times: int = 1) -> dict:
    """This batch's prefix as `VLM.answer_logits` keywords, each row repeated `times` times (row
    b * times + g holds example b's, as `tile`); {} for the default prefix <bos>."""
    out = {}
    for key in ('prefix_ids', 'prefix_valid'):
      value = getattr(self, key)
      if value is not None:
        out[key] = value if times == 1 else tile(value, times, self.rows)  # (B * times, P)
    return out

  def answer_logits(self, visual, index, valid, text_ids=None, text_valid=None, visual_weight=None,
                    times: int = 1):
    """The frozen VLM's answer-slot logits (`VLM.answer_logits`) -> (R, vocab) float32.

    The R = B x `times` rows of `visual` are this batch's examples each repeated `times` times (row
    b * times + g: GRPO's rollouts); the question (unless `text_ids` / `text_valid` are given) and
    the prefix are tiled to match.
    """
    tiled = lambda x: x if times == 1 else tile(x, times, self.rows)  # (B * times, ...)
    text_ids = tiled(self.question_ids) if text_ids is None else text_ids
    text_valid = tiled(self.question_valid) if text_valid is None else text_valid
    return self.vlm.apply({'params': self.vlm_params}, visual, index, valid, text_ids, text_valid,
                          self.position_mode, visual_weight, method='answer_logits',
                          **self.prefix(times))

  def reward_target(self):
    """What a reward compares answers with: the answer ids (B,), or, label-free, the full-token
    answer logits (B, vocab) of the frozen VLM."""
    if not self.label_free:
      return self.answer_id
    b, n, _ = self.visual.shape
    index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    return self.answer_logits(self.visual, index, jnp.ones((b, n), bool))  # (B, vocab)


def filled(values: dict) -> dict:
  """Every key of METRIC_KEYS as a float32 scalar: `values`' entries, 0 for the others."""
  out = {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}
  for k, v in values.items():
    if k not in out:
      raise KeyError(f'metric {k!r} is not in METRIC_KEYS.')
    out[k] = jnp.asarray(v, jnp.float32)
  return out


def tile(x, times: int, rows=lambda y: y):
  """(B, ...) -> (B * times, ...), row b * times + g holding x[b]; split over the mesh by `rows`."""
  return rows(jnp.repeat(x, times, axis=0))


def flatten_group(x, rows=lambda y: y):
  """(B, G, ...) -> (B * G, ...), row b * G + g; split over the mesh by `rows`."""
  return rows(x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]))


def one_update(loss_fn, params, opt_state, update, phase: float):
  """A phase's single optimizer update: grads of `loss_fn(params) -> (loss, metrics)`, applied.

  Returns (params, opt_state, metrics with `loss`, `phase` and `grad_norm`).
  """
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  params, opt_state, grad_norm = update(params, opt_state, grads)
  return params, opt_state, dict(metrics, loss=loss, phase=phase, grad_norm=grad_norm)
