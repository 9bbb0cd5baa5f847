"""Llama-style decoder (LLaVA-1.5's Vicuna), as Flax Linen modules.

Module names follow HF `LlamaForCausalLM` so weights import one-to-one:

  HF (language_model.)                            here (params['llm'])
  model.embed_tokens.weight                       embed_tokens/embedding
  model.layers.{i}.input_layernorm.weight         layers_{i}/input_layernorm/scale
  model.layers.{i}.self_attn.{q,k,v,o}_proj       layers_{i}/self_attn/{q,k,v,o}_proj/kernel (= W.T)
  model.layers.{i}.post_attention_layernorm       layers_{i}/post_attention_layernorm/scale
  model.layers.{i}.mlp.{gate,up,down}_proj        layers_{i}/mlp/{gate,up,down}_proj/kernel (= W.T)
  model.norm.weight                               norm/scale
  lm_head.weight                                  lm_head/kernel (= W.T); absent when tied

Config fields an HF LlamaConfig sets (gripjax/models/hf_llava.py maps them): grouped-query attention
(`num_kv_heads`), `head_dim` (may differ from width / num_heads; 0 takes that quotient), `rope_theta`,
`rms_norm_eps`, `hidden_act`, `attention_bias` / `mlp_bias`, and `tie_word_embeddings` (logits from
the embedding table, no lm_head).

RoPE uses HF's rotate_half convention (HF checkpoints are already permuted for it). Attention is
explicit (einsum, additive mask, float32 softmax) so in-LM pruners such as FastV can read the
weights. Every layer takes the key/value of its attention from outside when given a cache, so the
same layer serves the full forward, prefill and single-token decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gripjax.models.vit import activation, fields_from


@dataclasses.dataclass(frozen=True)
class LlmConfig:
  """Geometry of the decoder (mirrors `config.model.llm`); frozen so modules stay hashable."""
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  max_len: int = 2048
  bos_id: int = 1
  head_dim: int = 0  # 0: width // num_heads (resolved in __post_init__).
  hidden_act: str = 'silu'
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False

  def __post_init__(self):
    if not isinstance(self.vocab_size, int) or self.vocab_size <= 0:
      raise ValueError(f'llm.vocab_size={self.vocab_size!r}: expected a positive int; set it from the '
                       'tokenizer before building the model (make_vlm(config.model, vocab_size=...)).')
    if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 0:
      raise ValueError(f'llm.head_dim={self.head_dim!r}: expected a non-negative int (0: width // num_heads).')
    if self.head_dim == 0:
      if self.width % self.num_heads:
        raise ValueError(f'llm.num_heads={self.num_heads} must divide llm.width={self.width} '
                         '(or set llm.head_dim).')
      object.__setattr__(self, 'head_dim', self.width // self.num_heads)
    if self.head_dim % 2:
      raise ValueError(f'llm.head_dim={self.head_dim} (width {self.width} / num_heads {self.num_heads} '
                       'unless set) must be even: RoPE rotates pairs.')
    activation(self.hidden_act, 'llm.hidden_act')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'llm.num_kv_heads={self.num_kv_heads} must divide llm.num_heads={self.num_heads}.')
    if not 0 <= self.bos_id < self.vocab_size:
      raise ValueError(f'llm.bos_id={self.bos_id} is outside the vocabulary [0, {self.vocab_size}).')

  @classmethod
  def from_config(cls, c, vocab_size: Optional[int] = None) -> 'LlmConfig':
    if isinstance(c, cls):
      return c if vocab_size is None else dataclasses.replace(c, vocab_size=vocab_size)
    kw = fields_from(cls, c)
    if vocab_size is not None:
      kw['vocab_size'] = vocab_size
    return cls(**kw)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF rotate_half layout: pairs are (i, i + Dh/2), not interleaved.

  Args:
    x: (B, L, H, Dh) queries or keys.
    positions: (B, L) integer positions.
    theta: RoPE base.
  Returns:
    x rotated, in x's dtype (angles computed in float32 so large positions stay exact enough).
  """
  dh = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)  # (Dh/2,)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, Dh/2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, L, 1, Dh)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)  # rotate_half
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


# Cap on a key-weighted attention logit above its row's stabilizer (guards exp against overflow).
_SCORE_CAP = 20.0


def weighted_softmax(scores, mask, key_weight):
  """p_ij = w_j e^{s_ij} / sum_l w_l e^{s_il} over the keys that `mask` allows.

  The key bias log(w_j) of attention masking (DynamicViT, arXiv 2106.02034), computed
  multiplicatively so that its gradient at w_j = 0 is finite; with weights in {0, 1} it equals the
  softmax masked by `mask & (w > 0)`. Some allowed key of every query row must have w > 0.

  Args:
    scores: (B, H, Lq, Lk) float32 logits; mask: bool broadcastable to them.
    key_weight: (B, Lk) float >= 0.
  """
  w = jnp.asarray(key_weight, jnp.float32)[:, None, None, :]  # (B, 1, 1, Lk)
  live = mask & (w > 0)  # (B, 1, Lq, Lk)
  log_w = jnp.log(jnp.where(live, w, 1.0))
  # Stabilizer: max_j (s_ij + log w_j) over live keys (not differentiated: it cancels).
  top = jnp.max(jnp.where(live, scores + log_w, -jnp.inf), axis=-1, keepdims=True)  # (B, H, Lq, 1)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  # w * exp(.) rather than exp(. + log w): the gradient w.r.t. w_j stays finite at w_j = 0.
  e = jnp.where(mask, w * jnp.exp(jnp.minimum(scores - top, _SCORE_CAP)), 0.0)  # (B, H, Lq, Lk)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def attend(q, k, v, mask, key_weight=None):
  """Grouped-query attention with an explicit float32 softmax.

  Args:
    q: (B, Lq, H, Dh); k, v: (B, Lk, KVH, Dh) with H a multiple of KVH (query head h reads kv head
      h // (H / KVH), as HF's repeat_kv).
    mask: bool, broadcastable to (B, 1, Lq, Lk); True where the query may read the key.
    key_weight: optional (B, Lk) float weights of the keys (`weighted_softmax`): how a soft keep-mask
      reaches the frozen LM (the relaxation baselines). None: the plain masked softmax.
  Returns:
    out (B, Lq, H, Dh) in q's dtype, probs (B, H, Lq, Lk) float32.
  """
  b, lq, h, dh = q.shape
  kvh = k.shape[2]
  g = h // kvh
  q = q.reshape(b, lq, kvh, g, dh)  # (B, Lq, KVH, G, Dh)
  scores = jnp.einsum('bqkgd,bskd->bkgqs', q, k, preferred_element_type=jnp.float32) * dh ** -0.5
  scores = scores.reshape(b, h, lq, k.shape[1])  # (B, H, Lq, Lk)
  if key_weight is not None:
    probs = weighted_softmax(scores, mask, key_weight)  # (B, H, Lq, Lk)
  else:
    # A finite floor (not -inf) keeps fully masked rows (padding queries) free of NaNs.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # (B, H, Lq, Lk)
  p = probs.reshape(b, kvh, g, lq, k.shape[1]).astype(v.dtype)  # (B, KVH, G, Lq, Lk)
  out = jnp.einsum('bkgqs,bskd->bqkgd', p, v)
  return out.reshape(b, lq, h, dh), probs  # (B, Lq, H, Dh)


class RMSNorm(nn.Module):
  """Llama RMSNorm in float32, cast back to `dtype`."""
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale).astype(self.dtype)


class LlamaAttention(nn.Module):
  """Self-attention with RoPE and GQA; with `cache=(k, v)` it writes this call's keys/values into the
  cache at `cache_index` and attends over the whole cache (single-step decoding)."""
  config: LlmConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None, key_weight=None):
    c = self.config
    b, l, _ = x.shape
    dh = c.head_dim
    dense = lambda n, name: nn.Dense(n, use_bias=c.attention_bias, dtype=self.dtype, name=name)
    q = dense(c.num_heads * dh, 'q_proj')(x).reshape(b, l, c.num_heads, dh)  # (B, L, H, Dh)
    k = dense(c.num_kv_heads * dh, 'k_proj')(x).reshape(b, l, c.num_kv_heads, dh)  # (B, L, KVH, Dh)
    v = dense(c.num_kv_heads * dh, 'v_proj')(x).reshape(b, l, c.num_kv_heads, dh)  # (B, L, KVH, Dh)
    q = rope(q, positions, c.rope_theta)
    k = rope(k, positions, c.rope_theta)
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), cache_index, axis=1)
    out, probs = attend(q, k, v, mask, key_weight)
    out = out.reshape(b, l, c.num_heads * dh)  # (B, L, H * Dh)
    return dense(c.width, 'o_proj')(out), probs, (k, v)


class LlamaMlp(nn.Module):
  config: LlmConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda n, name: nn.Dense(n, use_bias=c.mlp_bias, dtype=self.dtype, name=name)
    gate = dense(c.mlp_dim, 'gate_proj')(x)
    up = dense(c.mlp_dim, 'up_proj')(x)
    return dense(c.width, 'down_proj')(activation(c.hidden_act, 'llm.hidden_act')(gate) * up)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm block; returns (x, attention probs (B, H, Lq, Lk), (k, v) as attended)."""
  config: LlmConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None, key_weight=None):
    eps = self.config.rms_norm_eps
    h = RMSNorm(eps, self.dtype, name='input_layernorm')(x)
    attn_out, probs, kv = LlamaAttention(self.config, self.dtype, name='self_attn')(
        h, positions, mask, cache, cache_index, key_weight)
    x = x + attn_out
    x = x + LlamaMlp(self.config, self.dtype, name='mlp')(
        RMSNorm(eps, self.dtype, name='post_attention_layernorm')(x))
    return x, probs, kv


def causal_mask(key_valid: jax.Array) -> jax.Array:
  """(B, L) key validity -> bool (B, 1, L, L): slot i reads slot j iff j <= i and j is valid."""
  l = key_valid.shape[1]
  causal = jnp.tril(jnp.ones((l, l), bool))  # (L, L)
  return causal[None, None] & key_valid[:, None, None, :].astype(bool)  # (B, 1, L, L)


class Llama(nn.Module):
  """Decoder split into named steps (embed, layers [start, stop), logits) so pruners can step in."""
  config: LlmConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    # Unit-variance token embeddings (norm ~sqrt(width)). With HF's std 0.02 a from-scratch LM's
    # text residuals (norm ~0.2) are swamped at the first layer by attention outputs that average
    # the far larger projected visual tokens, so each text position forgets which word it is
    # (measured: answers stayed at the question-only prior for 250 steps). Pretrained weights
    # bring their own scale, so this only affects training from scratch.
    self.embed_tokens = nn.Embed(c.vocab_size, c.width, embedding_init=nn.initializers.normal(stddev=1.0),
                                 name='embed_tokens')
    self.layers = [LlamaDecoderLayer(c, self.dtype, name=f'layers_{i}') for i in range(c.depth)]
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype, name='norm')
    if not c.tie_word_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, name='lm_head')

  def embed(self, ids: jax.Array) -> jax.Array:
    """(B, T) int ids -> (B, T, D) embeddings in the activation dtype."""
    return self.embed_tokens(ids).astype(self.dtype)

  def run_layers(self, h, positions, key_valid, start: int, stop: int, attn_layer: Optional[int] = None,
                 collect_kv: bool = False, key_weight=None):
    """Runs decoder layers [start, stop) over a full sequence with a causal, key-valid mask.

    Args:
      h: (B, L, D) hidden states; positions: (B, L) RoPE positions; key_valid: (B, L) bool.
      start, stop: static layer range, 0 <= start <= stop <= depth.
      attn_layer: static layer index in [start, stop) whose attention probs to return, or None.
      collect_kv: also return each layer's (k, v), each (B, L, KVH, Dh) (for prefill).
      key_weight: optional (B, L) float weights of the keys in every layer (`weighted_softmax`).
    Returns:
      (h, attn (B, H, L, L) or None), plus a tuple of (k, v) per layer when collect_kv.
    """
    depth = self.config.depth
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= depth):
      raise ValueError(f'layer range [start={start!r}, stop={stop!r}) is invalid: expected static ints '
                       f'with 0 <= start <= stop <= depth={depth}.')
    if attn_layer is not None and not start <= attn_layer < stop:
      raise ValueError(f'attn_layer={attn_layer!r} is not in the layer range [{start}, {stop}).')
    mask = causal_mask(key_valid)
    attn, kvs = None, []
    for i in range(start, stop):
      h, probs, kv = self.layers[i](h, positions, mask, key_weight=key_weight)
      if i == attn_layer:
        attn = probs
      kvs.append(kv)
    return (h, attn, tuple(kvs)) if collect_kv else (h, attn)

  def decode_layers(self, h, positions, mask, caches: Sequence, cache_index):
    """One step through every layer against a KV cache.

    Args:
      h: (B, 1, D); positions: (B, 1); mask: (B, 1, 1, S) bool over cache slots.
      caches: per layer (k, v), each (B, S, KVH, Dh); cache_index: scalar slot to write this step.
    Returns:
      h (B, 1, D) and the updated per-layer (k, v).
    """
    new = []
    for layer, cache in zip(self.layers, caches):
      h, _, kv = layer(h, positions, mask, cache, cache_index)
      new.append(kv)
    return h, tuple(new)

  def logits(self, h: jax.Array) -> jax.Array:
    """(B, L, D) -> (B, L, vocab) float32 logits: final norm, then lm_head, or with tied embeddings
    h @ E^T for the (vocab, D) embedding table E."""
    h = self.norm(h)
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(h).astype(jnp.float32)
    return self.lm_head(h).astype(jnp.float32)
