"""Analytic FLOPs of the VLM: vision tower, LM prefill and one decoded token.

Counts multiply-adds as 2 FLOPs, for matmuls only (norms, softmax and RoPE are lower order).
Attention is counted over the full (causal, unmasked-square) score matrix, as the explicit attention
code computes it. The LM head is counted for the last position only (what generation needs).
"""

from __future__ import annotations


def _llm_dims(config, vocab_size: int | None = None):
  llm = config.model.llm
  d, h, kvh, f = llm.width, llm.num_heads, llm.num_kv_heads, llm.mlp_dim
  hd = d // h
  v = vocab_size or llm.vocab_size
  return d, hd, kvh, f, v, llm.depth


def llm_layer_flops(config, length: int, context: int | None = None) -> int:
  """FLOPs of one decoder layer for `length` query tokens attending to `context` keys."""
  d, hd, kvh, f, _, _ = _llm_dims(config)
  context = length if context is None else context
  proj = 2 * length * d * (d + 2 * kvh * hd + d)  # q, k, v, o
  mlp = 2 * length * d * f * 3  # gate, up, down
  attn = 2 * 2 * length * context * d  # scores and weighted values, all heads
  return proj + mlp + attn


def prefill_flops(config, kept_tokens: int, text_len: int, vocab_size: int | None = None) -> int:
  """FLOPs of the LM prefill over <bos> + `kept_tokens` visual tokens + `text_len` text tokens."""
  d, _, _, _, v, depth = _llm_dims(config, vocab_size)
  length = 1 + int(kept_tokens) + int(text_len)
  return depth * llm_layer_flops(config, length) + 2 * d * max(v, 0)


def decode_flops(config, context: int, vocab_size: int | None = None) -> int:
  """FLOPs of decoding one token against a KV cache of `context` entries."""
  d, _, _, _, v, depth = _llm_dims(config, vocab_size)
  return depth * llm_layer_flops(config, 1, context + 1) + 2 * d * max(v, 0)


def vision_flops(config) -> int:
  """FLOPs of the vision tower (up to its last layer) and the projector for one image."""
  vit = config.model.vit
  n = (vit.image_size // vit.patch_size) ** 2
  length = n + 1
  d, f = vit.width, vit.mlp_dim
  patch = 2 * n * (vit.patch_size ** 2 * 3) * d
  layer = 2 * length * d * 4 * d + 2 * length * d * f * 2 + 2 * 2 * length * length * d
  proj = 2 * n * (d * config.model.projector_hidden + config.model.projector_hidden * config.model.llm.width)
  return patch + vit.depth * layer + proj


def kv_cache_bytes(config, length: int, bytes_per_value: int = 2) -> int:
  """Bytes of the KV cache for `length` positions (bf16 by default)."""
  d, hd, kvh, _, _, depth = _llm_dims(config)
  del d
  return depth * 2 * length * kvh * hd * bytes_per_value
