"""Analytic costs of the VLM and the agent: FLOPs of the vision tower, the scorer, the LM prefill and
decoded tokens, and KV-cache bytes. The pruners' own selection costs (and the prefill of an eval row,
LM + selection) are in `gripjax.pruning.selection_costs`.

Counts multiply-adds as 2 FLOPs, for matmuls only (norms, softmax and RoPE are lower order).
Attention is counted over the full (causal, unmasked-square) score matrix, as the explicit attention
code computes it. The LM head is counted for the last position only (what generation needs).

Generation (`gripjax.models.vlm.generate`, `gripjax.inference`) with k kept visual tokens, T text
slots and m new tokens allocates a cache of S = 1 + k + T + m slots; prefill yields the first token
and each of the m - 1 decode steps attends over all S slots (the not-yet-written ones are masked but
still computed), which is what `decode_token_flops` counts. Everything here is per request.
"""

from __future__ import annotations

from typing import Any

from gripjax.models import scorer as scorer_lib
from gripjax.models import vit as vit_lib

# Bytes per value of the activation dtypes of `config.model.dtype` (the KV cache is stored in it).
DTYPE_BYTES = {'float32': 4, 'bfloat16': 2}


def llm_head_dim(config) -> int:
  """Dh of the LM's attention heads: `model.llm.head_dim` where set (an HF checkpoint's may differ
  from width // num_heads), else width // num_heads."""
  llm = config.model.llm
  return int(llm.get('head_dim') or llm.width // llm.num_heads)


def _llm_dims(config, vocab_size: int | None = None):
  """(D, H Dh (all query heads' width), KVH Dh, MLP width, vocab, depth) of the LM."""
  llm = config.model.llm
  hd = llm_head_dim(config)
  v = vocab_size or llm.vocab_size
  return llm.width, llm.num_heads * hd, llm.num_kv_heads * hd, llm.mlp_dim, v, llm.depth


def llm_layer_flops(config, length: int, context: int | None = None) -> int:
  """FLOPs of one decoder layer for `length` query tokens attending to `context` keys."""
  d, qd, kvd, f, _, _ = _llm_dims(config)
  context = length if context is None else context
  proj = 2 * length * d * (qd + 2 * kvd + qd)  # q, k, v, o
  mlp = 2 * length * d * f * 3  # gate, up, down
  attn = 2 * 2 * length * context * qd  # scores and weighted values, all heads
  return proj + mlp + attn


def attention_probs_flops(config, length: int) -> int:
  """FLOPs of one decoder layer's attention probabilities alone over `length` tokens: the q and k
  projections and the (length, length) score matrix of all heads. What a pass run only to read the
  attention costs (its values, output projection and MLP feed nothing, so XLA drops them); the same
  terms as `llm_layer_flops`."""
  d, qd, kvd, _, _, _ = _llm_dims(config)
  if isinstance(length, bool) or int(length) != length or length < 0:
    raise ValueError(f'length={length!r}: expected a non-negative int.')
  return 2 * length * d * (qd + kvd) + 2 * length * length * qd


def prefill_flops(config, kept_tokens: int, text_len: int, vocab_size: int | None = None,
                  prefix_len: int = 1) -> int:
  """FLOPs of the LM prefill over the `prefix_len` slots before the image (1: <bos> alone; a chat
  template's head: its length) + `kept_tokens` visual tokens + `text_len` text tokens: every layer
  over all of them and the LM head on the last slot."""
  d, _, _, _, v, depth = _llm_dims(config, vocab_size)
  length = cache_len(kept_tokens, text_len, 0, prefix_len)
  return depth * llm_layer_flops(config, length) + 2 * d * max(v, 0)


def decode_flops(config, context: int, vocab_size: int | None = None) -> int:
  """FLOPs of decoding one token against a KV cache of `context` entries."""
  d, _, _, _, v, depth = _llm_dims(config, vocab_size)
  return depth * llm_layer_flops(config, 1, context + 1) + 2 * d * max(v, 0)


def vision_flops(config, layers: int | None = None) -> int:
  """FLOPs of the vision tower and the projector for one image.

  Args:
    config: the ConfigDict.
    layers: encoder layers counted; None counts all `vit.depth` (as HF's tower runs them). Under
      jit, `VLM.encode_image` runs only the first `vision_feature_layers(config)` of them: the later
      ones feed nothing it returns, so XLA drops them.
  """
  vit = config.model.vit
  n = num_patches(config)
  length = n + 1
  d, f = vit.width, vit.mlp_dim
  layers = vit.depth if layers is None else int(layers)
  if not 0 <= layers <= vit.depth:
    raise ValueError(f'layers={layers!r}: expected an int in [0, vit.depth={vit.depth}].')
  patch = 2 * n * (vit.patch_size ** 2 * 3) * d
  layer = 2 * length * d * 4 * d + 2 * length * d * f * 2 + 2 * 2 * length * length * d
  proj = 2 * n * (d * config.model.projector_hidden + config.model.projector_hidden * config.model.llm.width)
  return patch + layers * layer + proj


def vision_feature_layers(config) -> int:
  """Encoder layers up to `vit.feature_layer` (HF hidden_states indexing: -2 is depth - 1)."""
  vit = config.model.vit
  f = vit.feature_layer
  return f if f >= 0 else vit.depth + 1 + f


def num_patches(config) -> int:
  """N, the visual tokens of one image (`vit.num_visual_tokens`)."""
  return vit_lib.num_visual_tokens(config)


def scorer_flops(config, n_tokens: int, text_len: int) -> int:
  """FLOPs of one GRIP agent (scorer) pass for one example: N visual tokens, T question slots.

  With D the LM width, d = agent.width, F the scorer's rho features, m its MLP ratio (the
  `BudgetAwareScorer` that `make_scorer(config)` builds), counting 2 per multiply-add:

    input projections   2 N D d + 2 T D d
    condition           2 (F + 1) d + 2 d d + 2 d d + 2 * (2 d * 2d)     (rho MLP, pool, 2 FiLMs)
    cross-attention     2 N d d (q) + 2 * 2 T d d (k, v) + 2 * 2 N T d + 2 N d d (out)
    per block           2 N d 3d + 2 * 2 N N d + 2 N d d + 2 * 2 N d (m d)
    head                2 N d

  All T slots are counted (padding included): the scorer runs on them, masked.
  """
  for name, value in (('n_tokens', n_tokens), ('text_len', text_len)):
    if isinstance(value, bool) or int(value) != value or value < 0:
      raise ValueError(f'{name}={value!r}: expected a non-negative int.')
  scorer = scorer_lib.make_scorer(config)
  n, t = int(n_tokens), int(text_len)
  big_d, d, m = config.model.llm.width, scorer.width, scorer.mlp_ratio
  f = scorer.num_rho_features + 1
  proj = 2 * n * big_d * d + 2 * t * big_d * d
  cond = 2 * f * d + 2 * d * d + 2 * d * d + 2 * (2 * d * 2 * d)
  cross = 2 * n * d * d + 2 * 2 * t * d * d + 2 * 2 * n * t * d + 2 * n * d * d
  block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * m * d
  head = 2 * n * d
  return proj + cond + cross + scorer.depth * block + head


def cost_report(config, text_len: int) -> dict[str, Any]:
  """Scorer FLOPs and params against the VLM's full-token prefill + vision FLOPs for `config`."""
  n = num_patches(config)
  vocab = config.model.llm.vocab_size or 1
  vlm = prefill_flops(config, n, text_len, vocab) + vision_flops(config)
  flops = scorer_flops(config, n, text_len)
  return {'scorer_flops': flops, 'scorer_params': scorer_lib.scorer_param_count(config, n, text_len),
          'vlm_flops': vlm, 'flops_ratio': flops / vlm}


def cache_len(kept_tokens: int, text_len: int, new_tokens: int, prefix_len: int = 1) -> int:
  """Slots of the KV cache generation allocates: P prefix slots (1: <bos> alone) + k visual + T
  text + m new tokens."""
  for name, value in (('kept_tokens', kept_tokens), ('text_len', text_len), ('new_tokens', new_tokens)):
    if isinstance(value, bool) or int(value) != value or value < 0:
      raise ValueError(f'{name}={value!r}: expected a non-negative int.')
  if isinstance(prefix_len, bool) or int(prefix_len) != prefix_len or prefix_len < 1:
    raise ValueError(f'prefix_len={prefix_len!r}: expected a positive int (1: <bos> alone before the image).')
  return int(prefix_len) + int(kept_tokens) + int(text_len) + int(new_tokens)


def kv_cache_bytes(config, kept_tokens: int, text_len: int, new_tokens: int = 0,
                   dtype_bytes: int | None = None, prefix_len: int = 1) -> int:
  """Bytes of one request's KV cache: depth * 2 (k and v) * S * KVH * Dh * dtype_bytes, Dh the LM's
  `head_dim` (0: width // num_heads).

  Args:
    config: the ConfigDict.
    kept_tokens: k visual tokens in the prompt.
    text_len: T text slots (padding included: the cache holds them).
    new_tokens: m generated tokens the cache has room for; S = P + k + T + m.
    dtype_bytes: bytes per value; None takes `config.model.dtype` (the cache is stored in it).
    prefix_len: P, the slots before the image (1: <bos> alone; a chat template's head, e.g. LLaVA-1.5's
      `<s> USER: `: its length).
  """
  _, _, kvd, _, _, depth = _llm_dims(config)
  if dtype_bytes is None:
    dtype = config.model.dtype
    if dtype not in DTYPE_BYTES:
      raise ValueError(f'config.model.dtype={dtype!r}: expected one of {tuple(DTYPE_BYTES)}.')
    dtype_bytes = DTYPE_BYTES[dtype]
  if isinstance(dtype_bytes, bool) or int(dtype_bytes) != dtype_bytes or dtype_bytes < 1:
    raise ValueError(f'dtype_bytes={dtype_bytes!r}: expected a positive int (4 for float32, 2 for bfloat16).')
  slots = cache_len(kept_tokens, text_len, new_tokens, prefix_len)
  return depth * 2 * slots * kvd * int(dtype_bytes)


def decode_token_flops(config, kept_tokens: int, text_len: int, new_tokens: int,
                       vocab_size: int | None = None) -> int:
  """FLOPs of one decoded token as generation computes it: attention over all S cache slots."""
  return decode_flops(config, cache_len(kept_tokens, text_len, new_tokens) - 1, vocab_size)


def generate_flops(config, kept_tokens: int, text_len: int, new_tokens: int,
                   vocab_size: int | None = None) -> int:
  """LM FLOPs of greedy generation of m = new_tokens tokens for one request.

  prefill(1 + k + T) gives the first token; each of the m - 1 decode steps costs
  `decode_token_flops`.
  """
  if isinstance(new_tokens, bool) or int(new_tokens) != new_tokens or new_tokens < 1:
    raise ValueError(f'new_tokens={new_tokens!r}: expected a positive int.')
  return (prefill_flops(config, kept_tokens, text_len, vocab_size) +
          (int(new_tokens) - 1) * decode_token_flops(config, kept_tokens, text_len, new_tokens, vocab_size))


def request_flops(config, kept_tokens: int, text_len: int, new_tokens: int,
                  vocab_size: int | None = None, scorer: bool = False) -> dict[str, int]:
  """Per-request FLOPs of pruned generation, by stage, as `gripjax.inference` runs it.

  Returns:
    dict with vision (the tower's feature layers + projector), scorer (0 unless `scorer`), prefill,
    decode (all m - 1 steps) and total.
  """
  vision = vision_flops(config, vision_feature_layers(config))
  agent = scorer_flops(config, num_patches(config), text_len) if scorer else 0
  prefill = prefill_flops(config, kept_tokens, text_len, vocab_size)
  decode = generate_flops(config, kept_tokens, text_len, new_tokens, vocab_size) - prefill
  return {'vision': vision, 'scorer': agent, 'prefill': prefill, 'decode': decode,
          'total': vision + agent + prefill + decode}
