"""The GRIP agent: a small budget-aware, query-aware scorer of visual tokens (GRIP-VLM, arXiv 2605.13375).

Given the frozen VLM's visual tokens V (B, N, D), the question embeddings Q (B, T, D) with their
mask, and the keep ratio rho (B,), the scorer returns one logit per visual token, s (B, N). The
logits parameterize the Plackett-Luce policy of `gripjax.rl.policy`: greedy top-k at inference,
Gumbel-top-k samples in GRPO.

  x_i  = LN(V_i) W_in + p_i                                    tokens at width d   (B, N, d)
  q_t  = LN(Q_t) W_q                                           question at width d (B, T, d)
  c    = MLP(phi(rho)) + W_c mean_{t valid} q_t                condition: budget and question (B, d)
  x_i  = LN(x_i) (1 + a(c)) + b(c)                             FiLM
  x_i += CrossAttn(x_i -> {q_t : t valid})                     query awareness
  x    = depth x [x += SelfAttn(LN x); x += MLP(LN x)]         redundancy awareness
  s_i  = w . (LN(x_i) (1 + a'(c)) + b'(c))                     budget-dependent read-out

phi(rho) are sinusoidal features sin/cos(2^j pi rho), j < rho_features / 2, plus log(rho), so the
scorer tells 1/18 from 1/9 as clearly as 1/2 from 1. The position embedding p is factorized over the
patch grid (row + column) when N is a square, else one vector per token.

Why a budget input at all: the best k tokens are not the first k of the best 2k. At a tiny budget
the agent should spend its few tokens on the answer region; at a large one it can afford context
and coverage. The FiLM on the read-out lets the ranking itself depend on rho (a constant shift of
all logits would not change a Plackett-Luce distribution; a per-feature scale does).

The inputs come from the frozen VLM and are wrapped in `stop_gradient`: the agent never trains the
VLM. Cost is reported by `gripjax.models.costs.scorer_flops` (analytic) and `scorer_param_count`
(abstract init): for the LLaVA-1.5-7B geometry it is a few thousandths of a percent of the LM prefill.

| Piece | Here | Why |
| --- | --- | --- |
| backbone | LN + Dense to `agent.width`; `agent.depth` pre-LN blocks | cheap; self-attention sees redundancy |
| budget | sinusoidal rho features -> MLP -> FiLM (input and read-out) | ranking itself depends on rho |
| query | one masked cross-attention + masked-mean question in the condition | query-aware at init |

Every row is our design choice, not checked against the paper's exact architecture; widths live in
`config.agent`, and a change to this file should update the table.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gripjax.models import vit as vit_lib


def rho_features(rho: jax.Array, num: int) -> jax.Array:
  """Sinusoidal budget features: (B,) rho -> (B, num + 1).

  phi(rho) = [sin(2^j pi rho), cos(2^j pi rho) for j < num / 2] ++ [log(rho)].
  """
  if num % 2 or num < 2:
    raise ValueError(f'rho_features={num!r}: expected an even int >= 2.')
  rho = jnp.asarray(rho, jnp.float32)
  freqs = math.pi * 2.0 ** jnp.arange(num // 2, dtype=jnp.float32)  # (F/2,)
  angle = rho[:, None] * freqs  # (B, F/2)
  log_rho = jnp.log(jnp.clip(rho, 1e-4, 1.0))[:, None]  # (B, 1)
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle), log_rho], axis=-1)


class Film(nn.Module):
  """x -> LN(x) (1 + a(c)) + b(c): condition-dependent scale and shift per feature."""
  width: int

  @nn.compact
  def __call__(self, x, cond):  # x (B, N, d), cond (B, d)
    ab = nn.Dense(2 * self.width, kernel_init=nn.initializers.normal(0.02), name='mod')(
        nn.silu(cond))  # (B, 2d)
    a, b = jnp.split(ab[:, None, :], 2, axis=-1)  # (B, 1, d) each
    return nn.LayerNorm(use_scale=False, use_bias=False, name='norm')(x) * (1.0 + a) + b


class Attention(nn.Module):
  """Multi-head attention of queries x (B, N, d) to keys/values y (B, M, d) with a key mask (B, M)."""
  width: int
  num_heads: int

  @nn.compact
  def __call__(self, x, y, key_mask):
    h, dh = self.num_heads, self.width // self.num_heads
    q = nn.DenseGeneral((h, dh), name='query')(x)  # (B, N, H, Dh)
    k = nn.DenseGeneral((h, dh), name='key')(y)  # (B, M, H, Dh)
    v = nn.DenseGeneral((h, dh), name='value')(y)  # (B, M, H, Dh)
    scores = jnp.einsum('bnhd,bmhd->bhnm', q, k) / math.sqrt(dh)  # (B, H, N, M)
    mask = key_mask[:, None, None, :]  # (B, 1, 1, M)
    scores = jnp.where(mask, scores, -jnp.inf)
    # A row with no valid key (an empty question) attends to nothing: its output is 0, not NaN.
    any_valid = jnp.any(mask, axis=-1, keepdims=True)  # (B, 1, 1, 1)
    probs = jax.nn.softmax(jnp.where(any_valid, scores, 0.0), axis=-1)
    probs = jnp.where(any_valid & mask, probs, 0.0)
    out = jnp.einsum('bhnm,bmhd->bnhd', probs, v)  # (B, N, H, Dh)
    return nn.DenseGeneral(self.width, axis=(-2, -1), name='out')(out)  # (B, N, d)


class Block(nn.Module):
  """Pre-LN transformer block among the visual tokens (sees which tokens are redundant)."""
  width: int
  num_heads: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, x):  # (B, N, d)
    y = nn.LayerNorm(name='norm1')(x)
    x = x + Attention(self.width, self.num_heads, name='attn')(y, y, jnp.ones(y.shape[:2], bool))
    y = nn.LayerNorm(name='norm2')(x)
    y = nn.Dense(self.mlp_ratio * self.width, name='mlp_in')(y)
    return x + nn.Dense(self.width, name='mlp_out')(nn.gelu(y))


class BudgetAwareScorer(nn.Module):
  """(V (B, N, D), Q (B, T, D), question_mask (B, T), rho (B,)) -> logits (B, N) float32."""
  width: int = 64  # d_s: hidden size of the scorer.
  depth: int = 1  # Self-attention blocks among tokens.
  num_heads: int = 4  # Heads of every attention.
  mlp_ratio: int = 2  # MLP hidden size / width.
  num_rho_features: int = 16  # Sinusoidal features of rho (even).

  @nn.compact
  def __call__(self, visual, question, question_mask, rho):
    if visual.ndim != 3 or question.ndim != 3 or question.shape[0] != visual.shape[0]:
      raise ValueError(f'visual {visual.shape} and question {question.shape}: expected (B, N, D) and '
                       '(B, T, D) with the same B.')
    b, n, _ = visual.shape
    if question_mask.shape != question.shape[:2]:
      raise ValueError(f'question_mask has shape {question_mask.shape}; expected {question.shape[:2]}.')
    rho = jnp.broadcast_to(jnp.asarray(rho, jnp.float32), (b,))
    d = self.width
    # The VLM is frozen: no gradient flows into its tokens or embeddings.
    visual = jax.lax.stop_gradient(visual).astype(jnp.float32)
    question = jax.lax.stop_gradient(question).astype(jnp.float32)
    qmask = question_mask.astype(bool)

    x = nn.Dense(d, name='token_in')(nn.LayerNorm(name='token_norm')(visual))  # (B, N, d)
    x = x + self._position_embedding(n)  # (B, N, d)
    q = nn.Dense(d, name='question_in')(nn.LayerNorm(name='question_norm')(question))  # (B, T, d)

    count = jnp.maximum(jnp.sum(qmask, axis=1, keepdims=True), 1)  # (B, 1)
    q_mean = jnp.sum(jnp.where(qmask[..., None], q, 0.0), axis=1) / count  # (B, d)
    r = nn.Dense(d, name='rho_in')(rho_features(rho, self.num_rho_features))  # (B, d)
    cond = nn.Dense(d, name='rho_out')(nn.gelu(r)) + nn.Dense(d, name='question_pool')(q_mean)  # (B, d)

    x = Film(d, name='film_in')(x, cond)  # (B, N, d)
    x = x + Attention(d, self.num_heads, name='cross_attn')(
        nn.LayerNorm(name='cross_norm')(x), q, qmask)  # (B, N, d)
    for i in range(self.depth):
      x = Block(d, self.num_heads, self.mlp_ratio, name=f'block_{i}')(x)  # (B, N, d)
    x = Film(d, name='film_out')(x, cond)  # (B, N, d)
    return nn.Dense(1, name='head')(x)[..., 0].astype(jnp.float32)  # (B, N)

  def _position_embedding(self, n):
    init = nn.initializers.normal(0.02)
    side = math.isqrt(n)
    if side * side == n:  # Patch grid: row + column embeddings.
      row = self.param('pos_row', init, (side, self.width))
      col = self.param('pos_col', init, (side, self.width))
      return (row[:, None, :] + col[None, :, :]).reshape(n, self.width)  # (N, d)
    return self.param('pos', init, (n, self.width))  # (N, d)


def make_scorer(config) -> BudgetAwareScorer:
  """The scorer of `config.agent`."""
  a = config.agent
  return BudgetAwareScorer(width=a.width, depth=a.depth, num_heads=a.num_heads)


def init_scorer(scorer: BudgetAwareScorer, rng, n_tokens: int, d_model: int, text_len: int):
  """Random scorer params (the inner 'params' collection) for N tokens of width D, T text slots."""
  visual = jnp.zeros((1, n_tokens, d_model), jnp.float32)
  question = jnp.zeros((1, text_len, d_model), jnp.float32)
  mask = jnp.ones((1, text_len), bool)
  return jax.jit(scorer.init)(rng, visual, question, mask, jnp.full((1,), 0.5))['params']  # one compile


def scorer_param_count(config, n_tokens: int | None = None, text_len: int = 4) -> int:
  """Number of scorer parameters for `config` (abstract init: nothing is allocated)."""
  n = vit_lib.num_visual_tokens(config) if n_tokens is None else n_tokens
  abstract = jax.eval_shape(functools.partial(init_scorer, make_scorer(config), n_tokens=n,
                                              d_model=config.model.llm.width, text_len=text_len),
                            jax.random.PRNGKey(0))
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(abstract))

