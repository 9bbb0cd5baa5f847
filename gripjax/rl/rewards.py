"""Rewards: how well the frozen VLM answers from the kept tokens.

One contract for every reward:

  reward(logits, target) -> (...,) float32, higher is better,

where `logits (..., V)` are the frozen VLM's next-token logits at the answer
position given the kept visual tokens, and `target` is what the reward
compares against: the answer token id `(...,)` int for labelled rewards, or
the logits of the same VLM with every visual token kept `(..., V)` for the
label-free one (`LABEL_FREE`), so unlabeled image-question pairs can train the
agent too. Each function is pure, batched over `...` and jit-compatible.
"""

import jax
import jax.numpy as jnp


def _gather(x, index):
  index = jnp.asarray(index, jnp.int32)
  return jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0]


def answer_logprob(logits, answer_id):
  """log p(answer | kept tokens) = log_softmax(logits)[answer_id], in (-inf, 0].

  >>> import jax.numpy as jnp
  >>> round(float(answer_logprob(jnp.array([0.0, 0.0]), 1)), 4)  # log(1/2)
  -0.6931
  >>> answer_logprob(jnp.zeros((3, 4)), jnp.array([0, 1, 2])).shape
  (3,)
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return _gather(logp, answer_id)


def exact_match(logits, answer_id):
  """1.0 if argmax(logits) == answer_id else 0.0 (greedy first-token accuracy).

  >>> import jax.numpy as jnp
  >>> exact_match(jnp.array([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]]), jnp.array([1, 2])).tolist()
  [1.0, 0.0]
  """
  pred = jnp.argmax(logits, axis=-1)
  return (pred == jnp.asarray(answer_id)).astype(jnp.float32)


def agreement(logits, full_logits):
  """Label-free: exp(-KL(p_full || p_pruned)) of the answer distributions, in (0, 1].

  KL(p_full || p_pruned) = sum_v p_full(v) [log p_full(v) - log p_pruned(v)].

  It is 1 exactly when pruning leaves the answer distribution unchanged and
  decays toward 0 as the pruned model forgets what the full one would say.
  The direction KL(full || pruned) weighs the answers the full model believes
  in, which is what pruning must preserve. exp(-KL) rather than -KL keeps the
  reward bounded, so one catastrophic sample cannot dominate a group's std.

  >>> import jax.numpy as jnp
  >>> float(agreement(jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 2.0, 3.0])))
  1.0
  >>> r = agreement(jnp.array([3.0, 2.0, 1.0]), jnp.array([1.0, 2.0, 3.0]))
  >>> 0.0 < float(r) < 1.0
  True
  """
  logp_pruned = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  logp_full = jax.nn.log_softmax(jnp.asarray(full_logits, jnp.float32), axis=-1)
  p_full = jnp.exp(logp_full)
  # Zero-probability entries of p_full contribute 0 (not 0 * -inf).
  terms = jnp.where(p_full > 0, p_full * (logp_full - logp_pruned), 0.0)
  kl = jnp.maximum(jnp.sum(terms, axis=-1), 0.0)  # (...,), >= 0 up to rounding
  return jnp.exp(-kl)


REWARDS = {
    'logprob': answer_logprob,
    'exact_match': exact_match,
    'agreement': agreement,
}

# Rewards whose `target` is the full-token logits rather than an answer id.
LABEL_FREE = frozenset({'agreement'})


def get(name):
  """Returns the reward function registered as `name`.

  >>> get('exact_match') is exact_match
  True
  """
  try:
    return REWARDS[name]
  except (KeyError, TypeError):
    raise ValueError(f'Unknown reward {name!r}; known rewards: '
                     f'{sorted(REWARDS)}.') from None
