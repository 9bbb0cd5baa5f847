"""CLIP vision tower (the LLaVA-1.5 image encoder), as Flax Linen modules.

Module names follow HF `CLIPVisionModel.vision_model` so weights import one-to-one:

  HF (vision_tower.vision_model.)               here (params['vision'])
  embeddings.patch_embedding.weight (O,I,kh,kw) embeddings/patch_embedding/kernel (kh,kw,I,O)
  embeddings.class_embedding (D,)               embeddings/class_embedding
  embeddings.position_embedding.weight          embeddings/position_embedding/embedding
  pre_layrnorm.{weight,bias}                    pre_layrnorm/{scale,bias}
  encoder.layers.{i}.self_attn.{q,k,v,out}_proj layers_{i}/self_attn/{q,k,v,out}_proj/{kernel (=W.T),bias}
  encoder.layers.{i}.layer_norm{1,2}            layers_{i}/layer_norm{1,2}/{scale,bias}
  encoder.layers.{i}.mlp.fc{1,2}                layers_{i}/mlp/fc{1,2}/{kernel (=W.T),bias}
  post_layernorm.{weight,bias}                  post_layernorm/{scale,bias}

Attention is written out (einsum + float32 softmax) rather than fused, because pruners read the
CLS row of the attention weights.

Config fields that an HF checkpoint sets (gripjax/models/hf_llava.py maps them): `feature_layer`
(LLaVA's vision_feature_layer), `feature_select_strategy` ('default' drops the CLS token, 'full'
keeps it), `hidden_act` (CLIP's quick_gelu), `layer_norm_eps`, and the processor's `image_mean` /
`image_std`, with which the tower normalizes the pixels it is given.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# OpenAI CLIP preprocessing statistics (per RGB channel, for pixels in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FEATURE_SELECT_STRATEGIES = ('default', 'full')


def quick_gelu(x):
  # CLIP's activation; differs from exact GELU enough that imported weights need it.
  return x * jax.nn.sigmoid(1.702 * x)


# HF `hidden_act` names -> functions (transformers' ACT2FN semantics for the names we support).
ACTIVATIONS = {
    'quick_gelu': quick_gelu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf) GELU, torch's default
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'silu': jax.nn.silu,
    'relu': jax.nn.relu,
}


def activation(name: str, what: str):
  """The activation called `name` (an HF hidden_act); `what` names the field in the error."""
  if name not in ACTIVATIONS:
    raise ValueError(f'{what}={name!r} is not supported: expected one of {tuple(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


def fields_from(cls, c) -> dict:
  """Values of dataclass `cls`'s fields read from a config mapping `c`.

  A field with a default may be absent (configs and exported bundles written before it existed);
  sequences become tuples so the frozen dataclass stays hashable.
  """
  kw = {}
  for f in dataclasses.fields(cls):
    if f.name in c:
      value = c[f.name]
      kw[f.name] = tuple(value) if isinstance(value, list) else value
    elif f.default is dataclasses.MISSING:
      raise ValueError(f'the model config lacks the field {f.name!r} ({cls.__name__}).')
  return kw


@dataclasses.dataclass(frozen=True)
class VitConfig:
  """Geometry of the vision tower (mirrors `config.model.vit`); frozen so modules stay hashable."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  feature_layer: int = -2
  layer_norm_eps: float = 1e-5
  feature_select_strategy: str = 'default'
  hidden_act: str = 'quick_gelu'
  image_mean: tuple = CLIP_MEAN
  image_std: tuple = CLIP_STD

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f'vit.image_size={self.image_size} is not a multiple of '
                       f'vit.patch_size={self.patch_size}.')
    if self.width % self.num_heads:
      raise ValueError(f'vit.num_heads={self.num_heads} does not divide vit.width={self.width}.')
    _ = self.feature_index  # Fails at construction, not at the first forward.
    if self.feature_select_strategy not in FEATURE_SELECT_STRATEGIES:
      raise ValueError(f'vit.feature_select_strategy={self.feature_select_strategy!r}: expected one of '
                       f'{FEATURE_SELECT_STRATEGIES}.')
    activation(self.hidden_act, 'vit.hidden_act')
    for name in ('image_mean', 'image_std'):
      value = getattr(self, name)
      if len(value) != 3 or (name == 'image_std' and min(value) <= 0):
        raise ValueError(f'vit.{name}={value!r}: expected 3 per-channel (RGB) values'
                         + (', all positive.' if name == 'image_std' else '.'))

  @classmethod
  def from_config(cls, c) -> 'VitConfig':
    if isinstance(c, cls):
      return c
    return cls(**fields_from(cls, c))

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def num_tokens(self) -> int:
    """Visual tokens the tower returns: the patches, plus the CLS token under 'full'."""
    return self.num_patches + (self.feature_select_strategy == 'full')

  @property
  def feature_index(self) -> int:
    """`feature_layer` resolved into hidden_states[0..depth] (HF indexing: hidden_states[0] is the
    pre-layernormed embeddings, hidden_states[i] the output of layer i)."""
    f = self.feature_layer
    i = f if f >= 0 else self.depth + 1 + f
    if isinstance(f, bool) or not isinstance(f, int) or not 0 <= i <= self.depth:
      raise ValueError(f'vit.feature_layer={f!r} is invalid: expected an int in '
                       f'[-{self.depth + 1}, {self.depth}] (HF hidden_states indexing, depth {self.depth}).')
    return i


def num_visual_tokens(config) -> int:
  """N, the visual tokens of one image under a full config (`config.model.vit`): the patches, plus
  the CLS token under feature_select_strategy='full'. The one definition every module reads."""
  return VitConfig.from_config(config.model.vit).num_tokens


def preprocess(pixels: jax.Array, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> jax.Array:
  """Checks pixels and normalizes them in float32: (x - mean) / std, x in [0, 1].

  Args:
    pixels: uint8 (B, H, W, 3) in [0, 255] or float32 (B, H, W, 3) in [0, 1].
    image_size: the expected H = W.
    mean, std: per-channel statistics (the image processor's image_mean / image_std).
  Returns:
    float32 (B, H, W, 3), normalized.
  """
  expected = f'(B, {image_size}, {image_size}, 3)'
  if pixels.ndim != 4 or pixels.shape[1:] != (image_size, image_size, 3):
    raise ValueError(f'pixels have shape {tuple(pixels.shape)}; expected {expected} (RGB, channels last).')
  if pixels.dtype == jnp.uint8:
    x = pixels.astype(jnp.float32) / 255.0
  elif pixels.dtype == jnp.float32:
    x = pixels
  else:
    raise ValueError(f'pixels have dtype {pixels.dtype}; expected uint8 in [0, 255] or float32 in [0, 1].')
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (x - mean) / std


def in_float32(norm: nn.Module, x: jax.Array, dtype) -> jax.Array:
  # Norm statistics in bf16 are too coarse; compute in float32 and cast back to the activation dtype.
  return norm(x.astype(jnp.float32)).astype(dtype)


class ClipEmbeddings(nn.Module):
  """Patch embedding + class token + learned positions: (B, H, W, 3) -> (B, 1 + N, D)."""
  config: VitConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    b = x.shape[0]
    x = nn.Conv(c.width, kernel_size=(c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                padding='VALID', use_bias=False, dtype=self.dtype, name='patch_embedding')(x.astype(self.dtype))
    # Row-major over the grid, as HF's flatten(2) of (B, D, g, g).
    x = x.reshape(b, c.num_patches, c.width)  # (B, N, D)
    cls = self.param('class_embedding', nn.initializers.normal(stddev=c.width ** -0.5), (c.width,))
    cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.width))  # (B, 1, D)
    x = jnp.concatenate([cls, x], axis=1)  # (B, 1 + N, D)
    pos = nn.Embed(c.num_patches + 1, c.width, embedding_init=nn.initializers.normal(stddev=0.02),
                   name='position_embedding')
    return x + pos.embedding.astype(self.dtype)[None]


class ClipAttention(nn.Module):
  """Multi-head self-attention with biases; returns the output and the float32 weights."""
  config: VitConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    b, l, _ = x.shape
    h, dh = c.num_heads, c.width // c.num_heads
    dense = lambda name: nn.Dense(c.width, dtype=self.dtype, name=name)
    q = dense('q_proj')(x).reshape(b, l, h, dh)  # (B, L, H, Dh)
    k = dense('k_proj')(x).reshape(b, l, h, dh)  # (B, L, H, Dh)
    v = dense('v_proj')(x).reshape(b, l, h, dh)  # (B, L, H, Dh)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * dh ** -0.5
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # (B, H, L, L)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v)
    out = out.reshape(b, l, c.width)  # (B, L, D)
    return dense('out_proj')(out), probs


class ClipMlp(nn.Module):
  config: VitConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    act = activation(self.config.hidden_act, 'vit.hidden_act')
    x = nn.Dense(self.config.mlp_dim, dtype=self.dtype, name='fc1')(x)
    return nn.Dense(self.config.width, dtype=self.dtype, name='fc2')(act(x))


class ClipEncoderLayer(nn.Module):
  """Pre-norm transformer block; returns (x, attention weights (B, H, L, L))."""
  config: VitConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    eps = self.config.layer_norm_eps
    norm = lambda name, y: in_float32(nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name), y, self.dtype)
    attn_out, probs = ClipAttention(self.config, self.dtype, name='self_attn')(norm('layer_norm1', x))
    x = x + attn_out
    x = x + ClipMlp(self.config, self.dtype, name='mlp')(norm('layer_norm2', x))
    return x, probs


class ClipVisionTower(nn.Module):
  """CLIP ViT: pixels -> dict(features (B, N, Dv), cls_attn (B, N), pooled (B, Dv)).

  `features` is hidden_states[feature_layer]: without the CLS token under feature_select_strategy
  'default' (N = patches, LLaVA's "patch" select), with it first under 'full' (N = 1 + patches).
  `cls_attn` is the head-averaged softmax row of the CLS query over those N tokens in the layer that
  produced the features (the CLS column dropped under 'default', not renormalized); for
  feature_layer 0 (the embeddings) it is the first layer's, the one that reads them. `pooled` is
  post_layernorm of the last layer's CLS token (HF's pooler_output), for image-level auxiliary heads.
  """
  config: VitConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    c = self.config
    x = preprocess(pixels, c.image_size, c.image_mean, c.image_std)
    x = ClipEmbeddings(c, self.dtype, name='embeddings')(x)  # (B, 1 + P, D)
    x = in_float32(nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.float32, name='pre_layrnorm'), x, self.dtype)
    first = 0 if c.feature_select_strategy == 'full' else 1  # 'default' drops the CLS token.
    features = x[:, first:] if c.feature_index == 0 else None  # (B, N, D)
    cls_attn = None
    for i in range(c.depth):
      x, probs = ClipEncoderLayer(c, self.dtype, name=f'layers_{i}')(x)
      if i + 1 == max(c.feature_index, 1):  # hidden_states[i + 1] is the output of layer i.
        cls_attn = probs[:, :, 0, first:].mean(axis=1)  # (B, N)
      if i + 1 == c.feature_index:
        features = x[:, first:]  # (B, N, D)
    post_layernorm = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.float32, name='post_layernorm')
    pooled = in_float32(post_layernorm, x[:, 0], self.dtype)  # (B, D)
    return dict(features=features, cls_attn=cls_attn, pooled=pooled)
