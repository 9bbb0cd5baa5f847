"""Pruned generation: the pruner picks k visual tokens and the LM runs on the shorter sequence.

  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  gen = PrunedGenerator(config, vlm, runtime.load_vlm_params(config, vlm), tok, 'grip', agent_params)
  answers = gen.generate(pixels, ['how many digits are there?', ...], budget=[0.5, 1 / 9, ...])

For each request, with N image tokens and k = ceil(rho * N) (`pruning.base.budget_to_k`):

  pixels ─► ViT + projector ─► V (N, D) ─► pruner(ctx, k) ─► kept (k, D), index (k,)
  prefix + kept + question ─► LM prefill (P + k + T slots) ─► KV cache of P + k + T + m slots
  ─► m greedy decode steps against that cache ─► answer

The prefix is the text before the image: <bos> alone (P = 1) unless `prefix_ids` gives a chat
template's head (e.g. the ids of `<s> USER:`); the question is the text after it.

Nothing is masked: the kept tokens are gathered, so prefill and every decode step touch only the
k kept tokens' keys and values (`visual_index` carries their source patches, so the `keep` position
mode gives them their full-sequence RoPE positions).

Requests with different budgets are bucketed by k. Each bucket runs one compiled function for its
(k, padded batch size, max_new_tokens, pixel dtype); the batch is padded up to the next size in
`batch_sizes` (by repeating its last request; padding rows are dropped), and buckets larger than the
largest size are split. Functions are compiled ahead of time (`jit(...).lower(...).compile()`) and
cached, so once every (k, size) has been seen nothing compiles again; `num_compiled()` says how many
there are.

| Pruner | Here |
| --- | --- |
| name in `pruning.METHODS` | a pre-LM method, called as `prune(ctx, k)` |
| `'grip'` | the agent (`models/scorer.py`, params required): greedy top-k of its logits, fed each
  request's own rho (not k / N), as in training |
| callable | any `prune(ctx, k) -> Kept` (e.g. `pruning.grip.make_grip_prune(...)`) |
| `None` or `'full'` | no pruning: every budget must be 1 |
| in-LM (`fastv`, `pyramiddrop`, `sparsevlm`) | refused: they drop tokens inside the LM and have no
  KV cache of kept tokens to decode from |

Randomized pruners (`random`) get one PRNG key per request, `fold_in(PRNGKey(seed), i)` with i the
request's position in the call, so a request's tokens do not depend on which bucket it lands in.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from gripjax import pruning
from gripjax.data import images as images_lib
from gripjax.data import tokenizer as tokenizer_lib
from gripjax.models import scorer as scorer_lib
from gripjax.models import vlm as vlm_lib
from gripjax.pruning import base
from gripjax.rl import policy

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
NO_PRUNING = 'full'


def _variables(params):
  """Accepts the VLM's `{'params': tree}` or the bare param tree."""
  return params if isinstance(params, dict) and set(params) == {'params'} else {'params': params}


def _check_batch_sizes(batch_sizes) -> tuple[int, ...]:
  try:
    sizes = tuple(int(s) for s in batch_sizes)
  except (TypeError, ValueError):
    raise ValueError(f'batch_sizes={batch_sizes!r}: expected a sequence of positive ints.') from None
  if not sizes or any(s < 1 for s in sizes) or any(int(s) != s for s in batch_sizes):
    raise ValueError(f'batch_sizes={batch_sizes!r}: expected a non-empty sequence of positive ints.')
  return tuple(sorted(set(sizes)))


class PrunedGenerator:
  """Batched greedy generation with a pre-LM pruner, bucketed by kept-token count.

  Attributes:
    num_tokens: N, the image's visual tokens.
    text_len: T, question slots (questions are left-padded to it).
    position_mode: 'keep' or 'renumber' (from `config.model.position_mode` unless overridden).
    batch_sizes: the padded batch sizes a bucket may run at, ascending.
  """

  def __init__(self, config, vlm: vlm_lib.VLM, vlm_params, tokenizer,
               pruner: Union[str, Callable, None] = 'grip', agent_params=None, *,
               position_mode: Optional[str] = None, text_len: Optional[int] = None,
               batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, seed: int = 0,
               prefix_ids: Optional[Sequence[int]] = None):
    """Builds the generator; nothing compiles until the first `generate`.

    Args:
      config: the ConfigDict (reads `model`, `data.max_question_len` and, for 'grip', `agent`).
      vlm: the VLM module (`runtime.make_model`).
      vlm_params: its params, `{'params': tree}` or the bare tree.
      tokenizer: a `gripjax.data.tokenizer.Tokenizer`.
      pruner: a method name of `pruning.METHODS`, 'grip', a callable `prune(ctx, k) -> Kept`, or
        None / 'full' for no pruning (see the module docstring).
      agent_params: the scorer's params (inner 'params' tree); required for 'grip' only.
      position_mode: overrides `config.model.position_mode`.
      text_len: question slots T; default `config.data.max_question_len`.
      batch_sizes: sizes a bucket is padded up to (each new one compiles once per k).
      seed: PRNG seed of randomized pruners.
      prefix_ids: token ids of the text before the image, the same for every request (the
        sequence is prefix + kept visual tokens + question); None: <bos> alone.
    """
    self.config = config
    self.vlm = vlm
    self.model_config = vlm_lib.ModelConfig.from_config(vlm.config)
    self.variables = _variables(vlm_params)
    self.tokenizer = tokenizer
    self.num_tokens = self.model_config.num_visual_tokens
    self.image_size = self.model_config.vit.image_size
    grid = self.model_config.vit.grid
    self.grid = (grid, grid)
    self.position_mode = vlm_lib.check_position_mode(
        self.model_config.position_mode if position_mode is None else position_mode)
    self.text_len = int(config.data.max_question_len if text_len is None else text_len)
    if self.text_len < 1:
      raise ValueError(f'text_len={text_len!r}: expected a positive int.')
    self.batch_sizes = _check_batch_sizes(batch_sizes)
    self.seed = int(seed)
    self.prefix_ids = self._check_prefix(prefix_ids)
    self.prefix_len = vlm_lib.DEFAULT_PREFIX_LEN if self.prefix_ids is None else len(self.prefix_ids)
    # Unknown words and over-long questions: 'warn' (default) or 'error' (config.data.on_bad_question).
    self.on_bad_question = tokenizer_lib.on_bad_question(config)
    self.agent_params = None
    self._scorer = None
    self._prune = None
    self.pruner_name = self._set_pruner(pruner, agent_params)
    self._compiled = {}

  def _set_pruner(self, pruner, agent_params) -> str:
    if pruner is None or pruner == NO_PRUNING:
      return NO_PRUNING
    if callable(pruner):
      self._prune = pruner
      return getattr(pruner, '__name__', 'callable')
    if not isinstance(pruner, str):
      raise ValueError(f'pruner={pruner!r}: expected a method name, a callable prune(ctx, k) or None.')
    if pruner == 'grip':
      if agent_params is None:
        raise ValueError("pruner='grip' needs agent_params: expected the trained scorer's params "
                         '(evaluate.load_agent or checkpoint.load_params).')
      self._scorer = scorer_lib.make_scorer(self.config)
      self.agent_params = agent_params
      return pruner
    if pruning.is_in_lm(pruner):
      raise ValueError(
          f'pruner={pruner!r} drops tokens inside the LM, so there is no shorter prefill or KV cache '
          'of kept tokens to generate from; expected a pre-LM method: '
          f'{", ".join(sorted(m for m in pruning.METHODS if not pruning.is_in_lm(m)))}, or grip.')
    self._prune = pruning.get(pruner)
    return pruner

  # --- Public API. -------------------------------------------------------------------------------

  def num_compiled(self) -> int:
    """Number of compiled bucket functions held (one per (k, batch size, max_new_tokens, dtype))."""
    return len(self._compiled)

  def compiled_keys(self) -> list[tuple]:
    """The (k, batch size, max_new_tokens, pixel dtype) of every compiled bucket function."""
    return sorted(self._compiled, key=str)

  def kept_tokens(self, budget, num_requests: int = 1) -> list[int]:
    """k of every request: ceil(rho * N) of each budget (checked as in `generate`)."""
    return self._budgets_to_k(budget, num_requests)[1]

  def generate(self, images, questions: Sequence[str], budget=1.0, max_new_tokens: int = 1, *,
               return_tokens: bool = False):
    """Answers every (image, question) with its own keep ratio.

    Args:
      images: (B, H, W, 3) pixels, uint8 in [0, 255] (as `data.pipeline` feeds them) or float in
        [0, 1]; H = W = config.model.vit.image_size. Floats outside [0, 1] (e.g. 0-255) and NaN or
        inf pixels raise ValueError naming the image (`data.images.check_pixels`).
      questions: B non-empty question strings; unknown words or more than T tokens warn, or raise
        `tokenizer.QuestionError` with config.data.on_bad_question='error'.
      budget: one keep ratio rho in (0, 1] for every request, or B of them.
      max_new_tokens: tokens generated per request (a positive int; static: each value compiles).
      return_tokens: also return the generated ids.

    Returns:
      B answer strings in request order (decoded up to <eos>); with return_tokens, also the ids,
      int32 (B, max_new_tokens), every slot after <eos> holding <eos>.
    """
    pixels = self._check_images(images)
    b = pixels.shape[0]
    if isinstance(questions, str) or not isinstance(questions, Sequence):
      raise ValueError(f'questions must be a list of B={b} strings; got {type(questions).__name__}.')
    if len(questions) != b:
      raise ValueError(f'got {b} images but {len(questions)} questions: expected one question per image.')
    rhos, ks = self._budgets_to_k(budget, b)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens!r}: expected a positive int.')
    max_new_tokens = int(max_new_tokens)
    k_max = max(ks, default=0)
    need = self.prefix_len + k_max + self.text_len + max_new_tokens
    if need > self.model_config.llm.max_len:
      raise ValueError(f'max_new_tokens={max_new_tokens} is too many: P={self.prefix_len} + k={k_max} + '
                       f'T={self.text_len} + max_new_tokens = {need} exceeds '
                       f'llm.max_len={self.model_config.llm.max_len}.')
    q_ids, q_valid = self._encode_questions(questions)
    tokens = np.zeros((b, max_new_tokens), np.int32)
    keys = self._request_keys(b)  # (B, 2)
    pending = []  # every bucket is dispatched before any result is read (dispatch is asynchronous)
    for k in sorted(set(ks)):
      rows = np.flatnonzero(np.asarray(ks) == k)
      for chunk in self._chunks(rows):
        size = self._padded_size(len(chunk))
        idx = np.concatenate([chunk, np.full(size - len(chunk), chunk[-1])])  # (size,)
        fn = self._function(k, size, max_new_tokens, pixels)
        pending.append((chunk, fn(self.variables, self.agent_params, pixels[idx], q_ids[idx],
                                  q_valid[idx], rhos[idx], keys[idx])))
    for chunk, out in pending:
      tokens[chunk] = np.asarray(out)[:len(chunk)]  # padding rows dropped
    answers = [self.tokenizer.decode(row) for row in tokens]
    return (answers, tokens) if return_tokens else answers

  def _request_keys(self, b: int) -> np.ndarray:
    """(B, 2) uint32: key i = fold_in(PRNGKey(seed), i), so a request's key ignores its bucket."""
    if not b:
      return np.zeros((0, 2), np.uint32)
    root = jax.random.PRNGKey(self.seed)
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(b)))

  # --- Input checks. -----------------------------------------------------------------------------

  def _check_prefix(self, prefix_ids) -> Optional[np.ndarray]:
    """None, or the prefix as int32 (P,) after checking every id is in the vocabulary."""
    if prefix_ids is None:
      return None
    vocab = self.model_config.llm.vocab_size
    ids = np.asarray(prefix_ids)
    if (ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0)
        or np.any(ids < 0) or np.any(ids >= vocab)):
      raise ValueError(f'prefix_ids={prefix_ids!r}: expected a sequence of token ids in [0, {vocab}).')
    return ids.astype(np.int32)

  def _check_images(self, images) -> np.ndarray:
    """uint8 as is, floats as float32; refuses NaN/inf and floats outside [0, 1], naming the image."""
    return images_lib.check_pixels(images, self.image_size)

  def _budgets_to_k(self, budget, b: int):
    """-> (rho float32 (B,), k per request) after checking every budget."""
    try:
      rho = np.asarray(budget, np.float64)
    except (TypeError, ValueError):
      raise ValueError(f'budget={budget!r}: expected a keep ratio in (0, 1] or a list of B={b} of them.') from None
    if rho.ndim == 0:
      rho = np.full((b,), float(rho))
    elif rho.shape != (b,):
      raise ValueError(f'budget has shape {rho.shape}; expected one keep ratio or B={b} of them.')
    ks = []
    for i, r in enumerate(rho.tolist()):
      if not 0.0 < r <= 1.0:  # Also rejects NaN; budget_to_k would too, without the request index.
        raise ValueError(f'budget[{i}]={r!r} is out of range: expected a keep ratio rho in (0, 1] '
                         f'(rho <= 0 keeps no token, rho > 1 more than the image\'s N={self.num_tokens}).')
      ks.append(base.budget_to_k(r, self.num_tokens))
    if self.pruner_name == NO_PRUNING and any(k != self.num_tokens for k in ks):
      bad = next(i for i, k in enumerate(ks) if k != self.num_tokens)
      raise ValueError(f'budget[{bad}]={float(rho[bad])!r} with pruner=None: expected 1 (no pruner, every '
                       'token kept); pass a pruner to prune.')
    return rho.astype(np.float32), ks

  def _encode_questions(self, questions):
    ids, valid = [], []
    for i, q in enumerate(questions):
      if not isinstance(q, str) or not self.tokenizer.encode(q):
        raise ValueError(f'questions[{i}]={q!r}: expected a non-empty question string.')
      try:
        row_ids, row_valid = self.tokenizer.encode_question(q, self.text_len, self.on_bad_question)
      except tokenizer_lib.QuestionError as e:
        raise tokenizer_lib.QuestionError(f'questions[{i}]: {e}') from None
      ids.append(row_ids)
      valid.append(row_valid)
    t = self.text_len
    return (np.stack(ids) if ids else np.zeros((0, t), np.int32),
            np.stack(valid) if valid else np.zeros((0, t), bool))

  # --- Buckets. ----------------------------------------------------------------------------------

  def _chunks(self, rows: np.ndarray):
    top = self.batch_sizes[-1]
    return [rows[i:i + top] for i in range(0, len(rows), top)]

  def _padded_size(self, n: int) -> int:
    return next(s for s in self.batch_sizes if s >= n)

  def _function(self, k: int, size: int, max_new_tokens: int, pixels: np.ndarray):
    key = (k, size, max_new_tokens, str(pixels.dtype))
    if key not in self._compiled:
      s, t = self.image_size, self.text_len
      args = (self.variables, self.agent_params,
              jax.ShapeDtypeStruct((size, s, s, 3), pixels.dtype),
              jax.ShapeDtypeStruct((size, t), jnp.int32), jax.ShapeDtypeStruct((size, t), jnp.bool_),
              jax.ShapeDtypeStruct((size,), jnp.float32), jax.ShapeDtypeStruct((size, 2), jnp.uint32))
      fn = jax.jit(functools.partial(self._run, k=k, max_new_tokens=max_new_tokens))
      self._compiled[key] = fn.lower(*args).compile()
    return self._compiled[key]

  def kept(self, variables, agent_params, pixels, question_ids, question_valid, rho, rng, *, k: int):
    """The pruner's choice for one bucket (traceable): -> Kept(tokens (B, k, D), index (B, k))."""
    feats = self.vlm.apply(variables, pixels, method='vision_features')
    visual = self.vlm.apply(variables, feats['features'], method='project')  # (B, N, D)
    b, n, _ = visual.shape
    if self.pruner_name == NO_PRUNING:
      return base.Kept(tokens=visual, index=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)))
    question = self.vlm.apply(variables, question_ids, method='embed_text')  # (B, T, D)
    if self._scorer is not None:
      logits = self._scorer.apply({'params': agent_params}, visual, question, question_valid, rho)  # (B, N)
      return base.gather_kept(visual, policy.greedy(logits, k))
    ctx = base.PruneContext(tokens=visual, features=feats['features'], cls_attn=feats['cls_attn'],
                            question=question, question_mask=question_valid, rng=rng, grid=self.grid)
    return self._prune(ctx, k)

  def _run(self, variables, agent_params, pixels, question_ids, question_valid, rho, rng, *, k: int,
           max_new_tokens: int):
    """One bucket: encode, prune to k, prefill the P + k + T slots, decode -> (B, max_new_tokens)."""
    kept = self.kept(variables, agent_params, pixels, question_ids, question_valid, rho, rng, k=k)
    valid = jnp.ones(kept.index.shape, bool)  # (B, k): every gathered slot is real
    prefix = None
    if self.prefix_ids is not None:
      prefix = jnp.broadcast_to(jnp.asarray(self.prefix_ids), (pixels.shape[0], self.prefix_len))  # (B, P)
    return vlm_lib.generate(self.vlm, variables, kept.tokens, kept.index, valid, question_ids,
                            question_valid, position_mode=self.position_mode,
                            max_new_tokens=max_new_tokens, eos_id=self.tokenizer.eos_id, prefix_ids=prefix)
