"""LLaVA-1.5-style VLM: CLIP tower -> 2-layer GELU projector -> Llama decoder, with pruning hooks.

Sequence layout seen by the decoder (L = P + k + T slots; `SequenceLayout` names the ranges):

  [prefix slot 0 .. P-1] [visual slot 0 .. k-1] [text slot 0 .. T-1]

The prefix is the text before the image: `<bos>` alone by default (P = 1, the layout
`[<bos>][visual][text]`), or a chat template's head such as LLaVA-1.5's `<s> USER:` (the prompt
`USER: <image>\n{question} ASSISTANT:` splits at the image into prefix and text). Visual slots hold
projected image tokens (any k <= N of them, in increasing source index; a `visual_valid` mask marks
slots in use). Prefix and text are both LEFT-padded (`*_valid` False at the start): a batch of
prefixes stands right-aligned against the image, and the last slot is the last real text token, so
generation appends after it. Invalid slots are never read as keys; their own outputs are garbage and
must be ignored. Positions come from cumulative sums of the validity masks, so a padded slot anywhere
computes as a dropped one. RoPE positions, with N = full image tokens and P' = sum(prefix_valid) the
real prefix tokens:

  keep      prefix p -> (cumsum(prefix_valid) - 1)[p];  visual j -> P' + index[j];
            text t -> P' + N + (cumsum(text_valid) - 1)[t]
  renumber  prefix as keep;  visual j -> P' - 1 + cumsum(valid)[j];
            text t -> P' + sum(valid) + (cumsum(text_valid) - 1)[t]

`keep` gives every kept token its position in the unpruned sequence; `renumber` equals physically
dropping tokens from an HF LLaVA input. Either way masked slots compute the same as dropped ones.
With the default prefix (P = P' = 1) these are the positions of `[<bos>][visual][text]`.

`assemble` is the one place where image embeddings enter the language model; `run_layers` and
`logits` finish the forward, so an in-LM pruner (FastV) can run [0, K), gather along L and go on.

Param tree (HF LLaVA name in brackets): vision [vision_tower.vision_model], projector
[multi_modal_projector] with linear_1/linear_2, llm [language_model]; see vit.py and llm.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gripjax import config_lib
from gripjax.models.llm import Llama, LlmConfig
from gripjax.models.vit import ClipVisionTower, VitConfig, activation, fields_from

POSITION_MODES = ('keep', 'renumber')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
DEFAULT_PREFIX_LEN = 1  # The default prefix is <bos> alone.
PREFIX_KEYS = ('prefix_ids', 'prefix_valid')  # A batch's text before the image, when it has any.


def prefix_of(batch) -> dict:
  """The batch's `prefix_ids` / `prefix_valid` (a chat template's head) as `answer_logits` /
  `assemble` keywords; {} when it carries none (the default prefix, <bos> alone)."""
  return {key: batch[key] for key in PREFIX_KEYS if key in batch}


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
  """Static slot ranges of a decoder sequence `[prefix P][visual k][text T]`, L = P + k + T.

  The one definition of where the visual slots and the text rows sit: `assemble` lays sequences out
  this way and the in-LM pruners read through it (also after a drop, with fewer visual slots).
  """
  prefix_len: int
  num_visual: int
  text_len: int

  def __post_init__(self):
    for name in ('prefix_len', 'num_visual', 'text_len'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'SequenceLayout.{name}={value!r}: expected a static int >= 0.')

  @classmethod
  def from_length(cls, length: int, text_len: int, prefix_len: int = DEFAULT_PREFIX_LEN) -> 'SequenceLayout':
    """The layout of a sequence of `length` slots whose last `text_len` are text after `prefix_len`."""
    num_visual = length - prefix_len - text_len
    if num_visual < 0:
      raise ValueError(f'a sequence of {length} slots cannot hold a prefix of {prefix_len} and {text_len} '
                       'text slots: expected length >= prefix_len + text_len.')
    return cls(prefix_len, num_visual, text_len)

  @property
  def length(self) -> int:
    return self.prefix_len + self.num_visual + self.text_len

  @property
  def prefix(self) -> slice:
    return slice(0, self.prefix_len)

  @property
  def visual(self) -> slice:
    return slice(self.prefix_len, self.prefix_len + self.num_visual)

  @property
  def text(self) -> slice:
    return slice(self.prefix_len + self.num_visual, self.length)

  def with_visual(self, num_visual: int) -> 'SequenceLayout':
    """The same prefix and text around `num_visual` visual slots (after a drop)."""
    return dataclasses.replace(self, num_visual=num_visual)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Frozen, hashable copy of `config.model` (so a VLM can be a static jit argument)."""
  vit: VitConfig
  llm: LlmConfig
  projector_hidden: int
  position_mode: str = 'keep'
  dtype: str = 'float32'
  projector_bias: bool = True  # HF multimodal_projector_bias.
  projector_act: str = 'gelu'  # HF projector_hidden_act (LLaVA: exact GELU).

  def __post_init__(self):
    check_position_mode(self.position_mode)
    if self.dtype not in DTYPES:
      raise ValueError(f'model.dtype={self.dtype!r}: expected one of {tuple(DTYPES)}.')
    activation(self.projector_act, 'model.projector_act')

  @classmethod
  def from_config(cls, c, vocab_size: Optional[int] = None) -> 'ModelConfig':
    """Builds from a ConfigDict / FrozenConfigDict / ModelConfig; `vocab_size` overrides llm's."""
    if isinstance(c, cls):
      return c if vocab_size is None else dataclasses.replace(c, llm=LlmConfig.from_config(c.llm, vocab_size))
    kw = fields_from(cls, c)
    kw.update(vit=VitConfig.from_config(c['vit']), llm=LlmConfig.from_config(c['llm'], vocab_size))
    return cls(**kw)

  @property
  def num_visual_tokens(self) -> int:
    """N: the image's tokens (the patches, plus CLS under vit.feature_select_strategy='full')."""
    return self.vit.num_tokens

  @property
  def activation_dtype(self):
    return DTYPES[self.dtype]


def check_position_mode(mode):
  """Returns `mode`: 'keep' | 'renumber', or a bool scalar array (True: renumber).

  The array form picks the mode at run time, so one compiled function serves both modes (the
  evaluation harness compiles each pruner once per budget instead of once per budget and mode).
  """
  if isinstance(mode, (jax.Array, np.ndarray)):
    if mode.shape != () or mode.dtype != bool:
      raise ValueError(f'position_mode as an array must be a bool scalar (True: renumber); got '
                       f'{mode.dtype}{list(mode.shape)}.')
    return mode
  if mode not in POSITION_MODES:
    raise ValueError(f'position_mode={mode!r}: expected one of {POSITION_MODES} or a bool scalar array.')
  return mode


def select_by_mode(mode, keep: Callable[[], Any], renumber: Callable[[], Any]):
  """keep() or renumber() for a named mode; for a run-time flag, both, selected leaf by leaf."""
  if isinstance(mode, str):
    return keep() if mode == 'keep' else renumber()
  return jax.tree.map(lambda r, k: jnp.where(mode, r, k), renumber(), keep())


def _check_shape(name, x, shape):
  """`shape` entries of None match anything."""
  if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
    want = '(' + ', '.join('?' if s is None else str(s) for s in shape) + ')'
    raise ValueError(f'{name} has shape {tuple(x.shape)}; expected {want}.')


class Projector(nn.Module):
  """LLaVA-1.5 mlp2x_gelu: Linear(Dv -> hidden) -> act -> Linear(hidden -> D); act = exact GELU and
  biases on by default (HF projector_hidden_act, multimodal_projector_bias)."""
  hidden: int
  out: int
  dtype: Any = jnp.float32
  use_bias: bool = True
  act: str = 'gelu'

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.hidden, use_bias=self.use_bias, dtype=self.dtype, name='linear_1')(x)
    x = activation(self.act, 'model.projector_act')(x)
    return nn.Dense(self.out, use_bias=self.use_bias, dtype=self.dtype, name='linear_2')(x)


class VLM(nn.Module):
  """The frozen LLaVA-style VLM. Call methods with `model.apply(variables, ..., method='name')`."""
  config: Any  # ModelConfig (make_vlm builds one); a config.model ConfigDict is converted in setup.

  def setup(self):
    c = ModelConfig.from_config(self.config)
    self.cfg = c
    dtype = c.activation_dtype
    self.vision = ClipVisionTower(c.vit, dtype)
    self.projector = Projector(c.projector_hidden, c.llm.width, dtype, c.projector_bias, c.projector_act)
    self.llm = Llama(c.llm, dtype)

  def __call__(self, pixels, text_ids):
    """Unpruned forward (touches every parameter; used by init). -> logits (B, 1 + N + T, vocab)."""
    visual, _ = self.encode_image(pixels)
    b, n, _ = visual.shape
    index = jnp.broadcast_to(jnp.arange(n), (b, n))  # (B, N)
    valid = jnp.ones((b, n), bool)
    return self.forward(visual, index, valid, text_ids, jnp.ones(text_ids.shape, bool))

  # --- Image side. -------------------------------------------------------------------------------

  def vision_features(self, pixels):
    """pixels (B, H, W, 3) -> dict(features (B, N, Dv), cls_attn (B, N), pooled (B, Dv))."""
    return self.vision(pixels)

  def project(self, features):
    """(B, N, Dv) vision features -> (B, N, D) visual tokens in the LM's embedding space."""
    return self.projector(features)

  def encode_image(self, pixels):
    """pixels -> (V (B, N, D), cls_attn (B, N))."""
    out = self.vision(pixels)
    return self.project(out['features']), out['cls_attn']

  # --- Text side. --------------------------------------------------------------------------------

  def embed_text(self, ids):
    """(B, T) token ids -> (B, T, D)."""
    return self.llm.embed(ids)

  # --- Decoder. ----------------------------------------------------------------------------------

  def prefix_inputs(self, batch_size: int, prefix_ids=None, prefix_valid=None):
    """The prefix of `batch_size` sequences: (ids (B, P) int32, valid (B, P) bool).

    Args:
      prefix_ids: (B, P) int text before the image, left-padded; None: <bos> alone (P = 1).
      prefix_valid: (B, P) bool, False on the left padding; None: every prefix slot is real.
    """
    if prefix_ids is None:
      if prefix_valid is not None:
        raise ValueError('prefix_valid was given without prefix_ids: expected both, or neither for the '
                         'default prefix <bos>.')
      prefix_ids = jnp.full((batch_size, DEFAULT_PREFIX_LEN), self.cfg.llm.bos_id, jnp.int32)
    _check_shape('prefix_ids', prefix_ids, (batch_size, None))
    if prefix_valid is None:
      prefix_valid = jnp.ones(prefix_ids.shape, bool)
    _check_shape('prefix_valid', prefix_valid, tuple(prefix_ids.shape))
    return jnp.asarray(prefix_ids).astype(jnp.int32), jnp.asarray(prefix_valid).astype(bool)

  def assemble(self, visual, visual_index, visual_valid, text_ids, text_valid, position_mode=None,
               text_embeds=None, *, prefix_ids=None, prefix_valid=None):
    """Builds the decoder input `[prefix][visual][text]`: where image tokens enter the language model.

    Args:
      visual: (B, k, D) kept visual tokens, k <= N, in increasing source order.
      visual_index: (B, k) int source index of each slot in [0, N).
      visual_valid: (B, k) bool, False for unused slots.
      text_ids: (B, T) int, left-padded; ignored (may be None) when text_embeds is given.
      text_valid: (B, T) bool, False on the left padding.
      position_mode: 'keep' | 'renumber'; None takes config.model.position_mode.
      text_embeds: optional (B, T, D) embeddings used instead of embedding text_ids.
      prefix_ids: optional (B, P) int text before the image, left-padded; None: <bos> alone.
      prefix_valid: optional (B, P) bool, False on the prefix's left padding; None: all real.
    Returns:
      h (B, P + k + T, D), positions (B, P + k + T) int32, key_valid (B, P + k + T) bool.
    """
    c = self.cfg
    mode = check_position_mode(c.position_mode if position_mode is None else position_mode)
    n, d = c.num_visual_tokens, c.llm.width
    _check_shape('visual', visual, (None, None, d))
    b, k, _ = visual.shape
    if k > n:
      raise ValueError(f'visual has {k} slots; expected at most the image\'s {n} tokens.')
    _check_shape('visual_index', visual_index, (b, k))
    _check_shape('visual_valid', visual_valid, (b, k))
    if text_embeds is None:
      _check_shape('text_ids', text_ids, (b, None))
      text = self.embed_text(text_ids)
    else:
      _check_shape('text_embeds', text_embeds, (b, None, d))
      text = text_embeds.astype(c.activation_dtype)
    t = text.shape[1]
    _check_shape('text_valid', text_valid, (b, t))
    visual_valid = visual_valid.astype(bool)
    text_valid = text_valid.astype(bool)
    prefix_ids, prefix_valid = self.prefix_inputs(b, prefix_ids, prefix_valid)

    prefix = self.embed_text(prefix_ids)  # (B, P, D)
    h = jnp.concatenate([prefix, visual.astype(c.activation_dtype), text], axis=1)  # (B, P + k + T, D)

    prefix_pos = jnp.cumsum(prefix_valid, axis=1, dtype=jnp.int32) - 1  # (B, P), -1 on left padding
    start = jnp.sum(prefix_valid, axis=1, keepdims=True, dtype=jnp.int32)  # (B, 1): P', first visual position
    text_rank = jnp.cumsum(text_valid, axis=1, dtype=jnp.int32) - 1  # (B, T), -1 on left padding
    def keep_positions():
      return start + visual_index.astype(jnp.int32), start + n + text_rank

    def renumber_positions():
      visual_pos = start - 1 + jnp.cumsum(visual_valid, axis=1, dtype=jnp.int32)
      return visual_pos, (1 + visual_pos[:, -1:] + text_rank if k else start + text_rank)

    visual_pos, text_pos = select_by_mode(mode, keep_positions, renumber_positions)
    positions = jnp.concatenate([prefix_pos, visual_pos, text_pos], axis=1)  # (B, L)
    key_valid = jnp.concatenate([prefix_valid, visual_valid, text_valid], axis=1)  # (B, L)
    return h, positions, key_valid

  def run_layers(self, h, positions, key_valid, start: int, stop: int, attn_layer: Optional[int] = None,
                 key_weight=None):
    """Decoder layers [start, stop) -> (h, attention probs (B, H, L, L) of attn_layer or None).

    `key_weight` (B, L), optional: soft weights of the keys in every layer (`llm.weighted_softmax`).
    """
    return self.llm.run_layers(h, positions, key_valid, start, stop, attn_layer, key_weight=key_weight)

  def logits(self, h):
    """(B, L, D) -> (B, L, vocab) float32 (final norm + lm_head)."""
    return self.llm.logits(h)

  def forward(self, visual, visual_index, visual_valid, text_ids, text_valid, position_mode=None,
              text_embeds=None, *, prefix_ids=None, prefix_valid=None):
    """Pruned (or full) forward -> logits (B, P + k + T, vocab). Arguments as in `assemble`."""
    h, positions, key_valid = self.assemble(visual, visual_index, visual_valid, text_ids, text_valid,
                                            position_mode, text_embeds, prefix_ids=prefix_ids,
                                            prefix_valid=prefix_valid)
    h, _ = self.run_layers(h, positions, key_valid, 0, self.cfg.llm.depth)
    return self.logits(h)

  def answer_logits(self, visual, visual_index, visual_valid, text_ids, text_valid, position_mode=None,
                    visual_weight=None, *, prefix_ids=None, prefix_valid=None):
    """Logits at the answer slot only (the last one): (B, k, D) kept tokens -> (B, vocab) float32.

    `forward(...)[:, -1]` without the LM head over every slot (B x L x vocab for a 7B vocabulary):
    what every reward, teacher and training loss of the agent reads.

    Args:
      visual_weight: optional (B, k) float soft weights of the visual slots (the relaxation
        baselines' masks); valid prefix and text keys weigh 1, padding 0. Slots with weight 0 are
        read by no query, so a {0, 1} weight equals dropping those slots (with positions as
        `visual_valid` gives them).
      Others as in `assemble`.
    """
    h, positions, key_valid = self.assemble(visual, visual_index, visual_valid, text_ids, text_valid,
                                            position_mode, prefix_ids=prefix_ids, prefix_valid=prefix_valid)
    key_weight = None
    if visual_weight is not None:
      b, k = visual.shape[:2]
      t = text_valid.shape[1]
      layout = SequenceLayout(h.shape[1] - k - t, k, t)
      _check_shape('visual_weight', visual_weight, visual_valid.shape)
      prefix_valid, text_valid = key_valid[:, layout.prefix], key_valid[:, layout.text]
      key_weight = jnp.concatenate([prefix_valid.astype(jnp.float32), jnp.asarray(visual_weight, jnp.float32),
                                    text_valid.astype(jnp.float32)], axis=1)  # (B, L)
      # Every visual key stays allowed: its weight, not the boolean mask, removes it.
      key_valid = jnp.concatenate([prefix_valid, jnp.ones((b, k), bool), text_valid], axis=1)  # (B, L)
    h, _ = self.run_layers(h, positions, key_valid, 0, self.cfg.llm.depth, key_weight=key_weight)
    return self.logits(h[:, -1:])[:, 0].astype(jnp.float32)  # (B, vocab)

  # --- Generation with a KV cache. ---------------------------------------------------------------

  def prefill(self, visual, visual_index, visual_valid, text_ids, text_valid, position_mode=None,
              cache_len: int = 0, text_embeds=None, *, prefix_ids=None, prefix_valid=None):
    """Runs the prompt `[prefix][visual][text]` and fills a KV cache with room for cache_len slots.

    Returns:
      last_logits (B, vocab) float32 at the last slot, and the cache pytree:
        layers: per layer dict(k, v), each (B, cache_len, KVH, Dh) in the activation dtype;
        key_valid (B, cache_len) bool; next_position (B,) int32; length () int32 (slots used).
    Decoding past cache_len is not checked under jit (the write would clamp onto the last slot);
    `generate` sizes the cache for you. Arguments as in `assemble`.
    """
    h, positions, key_valid = self.assemble(visual, visual_index, visual_valid, text_ids, text_valid,
                                            position_mode, text_embeds, prefix_ids=prefix_ids,
                                            prefix_valid=prefix_valid)
    b, l, _ = h.shape
    max_len = self.cfg.llm.max_len
    if not isinstance(cache_len, int) or not l <= cache_len <= max_len:
      raise ValueError(f'cache_len={cache_len!r}: expected an int in [{l}, {max_len}] (the prompt has {l} '
                       f'slots; llm.max_len={max_len}).')
    h, _, kvs = self.llm.run_layers(h, positions, key_valid, 0, self.cfg.llm.depth, collect_kv=True)
    last_logits = self.logits(h[:, -1:])[:, 0]  # (B, vocab): left padding puts the last token last
    pad = ((0, 0), (0, cache_len - l), (0, 0), (0, 0))
    layers = tuple(dict(k=jnp.pad(k, pad), v=jnp.pad(v, pad)) for k, v in kvs)
    cache = dict(
        layers=layers,
        key_valid=jnp.pad(key_valid, ((0, 0), (0, cache_len - l))),  # (B, S)
        next_position=jnp.max(jnp.where(key_valid, positions, -1), axis=1) + 1,  # (B,)
        length=jnp.asarray(l, jnp.int32),
    )
    return last_logits, cache

  def decode_step(self, cache, token):
    """Appends one token (B,) int at slot cache['length'] -> (logits (B, vocab), updated cache)."""
    _check_shape('token', token, (cache['key_valid'].shape[0],))
    idx = cache['length']
    key_valid = cache['key_valid'].at[:, idx].set(True)  # (B, S)
    mask = key_valid[:, None, None, :]  # (B, 1, 1, S): later slots are still invalid, so causal.
    positions = cache['next_position'][:, None]  # (B, 1)
    h = self.embed_text(token[:, None].astype(jnp.int32))  # (B, 1, D)
    h, kvs = self.llm.decode_layers(h, positions, mask, [(x['k'], x['v']) for x in cache['layers']], idx)
    logits = self.logits(h)[:, 0]  # (B, vocab)
    cache = dict(layers=tuple(dict(k=k, v=v) for k, v in kvs), key_valid=key_valid,
                 next_position=cache['next_position'] + 1, length=idx + 1)
    return logits, cache


def generate(model: VLM, params, visual, visual_index, visual_valid, text_ids, text_valid, *,
             position_mode: Optional[str] = None, max_new_tokens: int, eos_id: int,
             cache_len: Optional[int] = None, prefix_ids=None, prefix_valid=None):
  """Greedy decoding -> tokens (B, max_new_tokens) int32; after eos every slot holds eos_id.

  jit-compatible with model, position_mode, max_new_tokens, eos_id and cache_len static, e.g.
  `jax.jit(functools.partial(generate, model), static_argnames=('position_mode', 'max_new_tokens',
  'eos_id'))`. cache_len defaults to the prompt length P + k + T plus max_new_tokens (P = 1 for the
  default prefix <bos>; `prefix_ids` / `prefix_valid` as in `VLM.assemble`).
  """
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens!r}: expected a positive int.')
  prefix_len = DEFAULT_PREFIX_LEN if prefix_ids is None else prefix_ids.shape[1]
  prompt_len = prefix_len + visual.shape[1] + text_valid.shape[1]
  need = prompt_len + max_new_tokens
  cache_len = need if cache_len is None else cache_len
  if cache_len < need:
    raise ValueError(f'cache_len={cache_len} is too small: expected >= {prefix_len} + k + T + max_new_tokens = '
                     f'{need} (prefix P={prefix_len}, k={visual.shape[1]}, T={text_valid.shape[1]}).')
  logits, cache = model.apply(params, visual, visual_index, visual_valid, text_ids, text_valid,
                              position_mode, cache_len, prefix_ids=prefix_ids, prefix_valid=prefix_valid,
                              method=VLM.prefill)
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (B,)

  def step(carry, _):
    cache, token, done = carry
    logits, cache = model.apply(params, cache, token, method=VLM.decode_step)
    done = done | (token == eos_id)
    nxt = jnp.where(done, eos_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return (cache, nxt, done), nxt

  (_, _, _), rest = jax.lax.scan(step, (cache, first, jnp.zeros_like(first, bool)), None,
                                 length=max_new_tokens - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1)  # (B, max_new_tokens)


def make_vlm(model_config, vocab_size: Optional[int] = None) -> VLM:
  """VLM from `config.model` (ConfigDict or ModelConfig); `vocab_size` overrides llm.vocab_size."""
  return VLM(ModelConfig.from_config(model_config, vocab_size))


def init_params(model: VLM, rng, batch_size: int = 1, text_len: int = 4):
  """Random float32 variables `{'params': ...}` ready for `model.apply`.

  Works under `jax.eval_shape(functools.partial(init_params, model), rng)` for shapes without
  allocating (e.g. the 7B config). Compiled as one program: run op by op, the initializers of every
  layer would each compile on their own.
  """
  c = ModelConfig.from_config(model.config)
  s = c.vit.image_size
  pixels = jnp.zeros((batch_size, s, s, 3), jnp.float32)
  ids = jnp.zeros((batch_size, text_len), jnp.int32)
  return jax.jit(model.init)(rng, pixels, ids)


def count_params(tree) -> int:
  """Number of scalars in a (possibly abstract) param tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))



def check(c) -> None:
  """Start-up check of `config.model` (geometry, HF fields and modes); raises config_lib.ConfigError.

  Integer fields are checked here by name; the geometry rules (head sizes, feature layer, strategy,
  activations, image statistics) are the model dataclasses' own (`ModelConfig.from_config`), so
  there is one definition of each, and their ValueError becomes a ConfigError.
  """
  cl = config_lib
  cl.require_section(c, 'model')
  for f in ('image_size', 'patch_size', 'width', 'depth', 'num_heads', 'mlp_dim'):
    cl.integer(c, f'model.vit.{f}')
  cl.integer(c, 'model.projector_hidden')
  cl.integer(c, 'model.llm.vocab_size', minimum=0)
  for f in ('width', 'depth', 'num_heads', 'num_kv_heads', 'mlp_dim', 'max_len'):
    cl.integer(c, f'model.llm.{f}')
  llm = c.model.llm
  if llm.num_heads % llm.num_kv_heads:
    cl.fail('model.llm.num_kv_heads', llm.num_kv_heads,
            f'a divisor of model.llm.num_heads={llm.num_heads} (grouped-query attention)')
  cl.number(c, 'model.llm.rope_theta')
  cl.choice(c, 'model.position_mode', POSITION_MODES)
  cl.choice(c, 'model.dtype', tuple(DTYPES))
  try:
    # vocab_size 0 means the tokenizer's, known only once it is loaded: any size passes here.
    model = ModelConfig.from_config(c.model, vocab_size=int(llm.vocab_size) or 1 << 30)
  except (ValueError, TypeError) as e:  # The dataclasses name fields as vit.*, llm.* or model.*.
    text = str(e)
    text = 'config.' + text if text.startswith('model.') else (
        'config.model.' + text if text.startswith(('vit.', 'llm.')) else f'config.model is invalid: {text}')
    raise config_lib.ConfigError(text) from None
  n_visual = model.num_visual_tokens
  if llm.max_len <= n_visual + 2:
    cl.fail('model.llm.max_len', llm.max_len, f'more than the {n_visual} visual tokens plus <bos> and a prompt')
