"""Shared machinery of the in-LM pruners (FastV, PyramidDrop, SparseVLM, DART).

A pre-LM pruner chooses k visual tokens and the LM then runs on `prefix + kept + text`. An in-LM
pruner runs the first LM layers on all N visual tokens and drops visual tokens *inside* the LM: the
hidden sequence is gathered along L and really gets shorter for the later layers (nothing is masked).
Each in-LM module exposes

  IN_LM = True
  schedule(n, k, depth, **hparams) -> drops         # static: ((layer, count), ...)
  prune_in_lm(lm, visual, text_ids, text_valid, k, position_mode=None, *, prefix_ids=None,
              prefix_valid=None, **hparams)
      -> (answer_logits (B, V) at the last text slot, kept_index (B, k) sorted)
  prune(ctx, k)                                     # raises: use `run` (see below)

and the harness calls `run(name, lm, visual, text_ids, text_valid, k, position_mode)` (with
`prefix_ids=`, `prefix_valid=` for text before the image, e.g. a chat template). A drop
`(layer, count)` means: layers [.., layer) saw more visual tokens, layers [layer, ..) see `count`.
Drops happen at layers in [1, depth - 1] and the last one leaves exactly k, so the LM's last layer
sees exactly k visual tokens (the budget), and `kept_index` names those k source patches.

Sequence layout (`gripjax.models.vlm`): `prefix + visual + text`, prefix and text left-padded; the
prefix is `<bos>` alone unless `prefix_ids` are given. Every index into a sequence (visual slots, text
rows, the prefix) goes through `vlm.SequenceLayout`, rebuilt with the current visual count after each
drop; the prefix and the text are never dropped. Positions after a drop:
  keep      every surviving slot keeps the RoPE position it had in the full sequence (positions are
            gathered with h). This is what FastV's released code does (it keeps the position ids).
  renumber  the surviving sequence is renumbered contiguously: visual j -> P' + j (P' the real prefix
            tokens), text shifted down by the number of dropped tokens, i.e. exactly what `assemble`
            gives for the shorter input. This matches dropping tokens from an HF sequence at layer K
            and recomputing position_ids.
Before the first drop all N tokens are present, and both modes give the same positions, so with
nothing dropped (k = N) both equal the unpruned forward.

FLOPs: `inlm_prefill_flops` sums `costs.llm_layer_flops` over layers with the length each layer
actually sees, so in-LM methods can be compared honestly with pre-LM ones at equal final k (FastV at
k spends the first K layers on all N tokens, so it costs more than a pre-LM method at k).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp

from gripjax.models import costs
from gripjax.models import vit as vit_lib
from gripjax.models.vlm import check_position_mode
from gripjax.models.vlm import select_by_mode
from gripjax.models.vlm import DEFAULT_PREFIX_LEN
from gripjax.models.vlm import ModelConfig
from gripjax.models.vlm import SequenceLayout
from gripjax.pruning import base

# Registered in-LM methods -> module under gripjax.pruning (imported lazily: they import this file).
_MODULES = {'fastv': 'fastv', 'pyramiddrop': 'pyramiddrop', 'sparsevlm': 'sparsevlm', 'dart': 'dart'}

Drops = tuple[tuple[int, int], ...]


@flax.struct.dataclass
class LmHandle:
  """What an in-LM pruner needs to run LM layers: the frozen VLM and its parameters. A pytree
  (`model` is static), so it can be passed straight through `jax.jit`.

  Attributes:
    params: the VLM's variables `{'params': tree}` (as `init_params` returns) or the bare param tree
      (as the train step holds it); `variables` accepts both.
    model: the `VLM` module (static).
  """
  params: Any
  model: Any = flax.struct.field(pytree_node=False)

  @property
  def variables(self):
    return self.params if 'params' in self.params else {'params': self.params}

  @property
  def config(self) -> ModelConfig:
    return ModelConfig.from_config(self.model.config)

  def apply(self, method: str, *args, **kwargs):
    return self.model.apply(self.variables, *args, method=method, **kwargs)


class InLmResult(NamedTuple):
  """Output of `run_schedule`.

  Attributes:
    logits: (B, V) float32 answer logits at the last slot (the last real text token).
    index: (B, k) int32 source patches of the visual tokens that reach the last layer, sorted.
    trace: static tuple, per LM layer, of the sequence length L that layer actually ran on.
  """
  logits: jax.Array
  index: jax.Array
  trace: tuple[int, ...]


def module(name: str):
  """The module of in-LM method `name` (fastv, pyramiddrop, sparsevlm, dart)."""
  if name not in _MODULES:
    raise ValueError(f'{name!r} is not an in-LM pruning method; in-LM methods: {", ".join(_MODULES)}.')
  return importlib.import_module(f'gripjax.pruning.{_MODULES[name]}')


def not_a_pre_lm_pruner(name: str, ctx: base.PruneContext, k: int):
  """The body of an in-LM module's `prune(ctx, k)`: checks k, then raises a ValueError that says how
  to call the method (its answer comes from inside the LM, so it has no `Kept` to return)."""
  base.check_k(k, ctx.num_tokens)
  if ctx.lm is None:
    raise ValueError(f'{name} runs inside the LM (ctx.lm is None); call it through '
                     'gripjax.pruning.inlm.run / the eval harness.')
  raise ValueError(f'{name} runs inside the LM and returns answer logits, not a Kept set; call '
                   f'gripjax.pruning.inlm.run({name!r}, lm, visual, text_ids, text_valid, k, position_mode).')


def run(name: str, lm: LmHandle, visual, text_ids, text_valid, k: int, position_mode=None, **hparams):
  """Runs in-LM method `name`: -> (answer_logits (B, V), kept_index (B, k) int32 sorted).

  jit-compatible with name, k, position_mode and hparams static (`lm` is a pytree). `hparams` also
  carries `prefix_ids` (B, P) / `prefix_valid` (B, P), the text before the image (arrays, not static).
  """
  return module(name).prune_in_lm(lm, visual, text_ids, text_valid, k, position_mode, **hparams)


def check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
  """Returns `value` after checking it is a static int in [low, high]."""
  bad_type = isinstance(value, bool) or not isinstance(value, int)
  if bad_type or value < low or (high is not None and value > high):
    want = f'>= {low}' if high is None else f'in [{low}, {high}]'
    raise ValueError(f'{name}={value!r}: expected a static int {want}.')
  return value


def check_drops(drops: Sequence[tuple[int, int]], n: int, k: int, depth: int) -> Drops:
  """Checks a schedule: layers strictly increasing in [1, depth - 1], counts non-increasing, the last
  count k (an empty schedule only when k == n)."""
  drops = tuple((int(layer), int(count)) for layer, count in drops)
  if not drops:
    if k != n:
      raise ValueError(f'empty drop schedule with k={k} < N={n}: the last layer would see N tokens.')
    return drops
  layers = [layer for layer, _ in drops]
  counts = [n] + [count for _, count in drops]
  if (layers[0] < 1 or layers[-1] > depth - 1 or any(a >= b for a, b in zip(layers, layers[1:]))
      or any(a < b for a, b in zip(counts, counts[1:])) or counts[-1] != k):
    raise ValueError(f'invalid drop schedule {drops} for N={n}, k={k}, depth={depth}: expected layers '
                     f'strictly increasing in [1, {depth - 1}] and counts non-increasing from N down to k.')
  return drops


def layer_lengths(n: int, text_len: int, depth: int, drops: Drops,
                  prefix_len: int = DEFAULT_PREFIX_LEN) -> tuple[int, ...]:
  """Sequence length prefix + visual + text that each of the `depth` layers sees under `drops`."""
  lengths, count, d = [], n, dict(drops)
  for layer in range(depth):
    count = d.get(layer, count)
    lengths.append(SequenceLayout(prefix_len, count, text_len).length)
  return tuple(lengths)


def resolve_position_mode(lm: LmHandle, position_mode) -> str:
  return check_position_mode(lm.config.position_mode if position_mode is None else position_mode)


def head_mean(attn: jax.Array) -> jax.Array:
  """Attention probs (B, H, L, L) -> mean over heads (B, L, L) float32."""
  return jnp.mean(attn.astype(jnp.float32), axis=1)


def sequence_layout(h, text_valid, layout: Optional[SequenceLayout] = None) -> SequenceLayout:
  """The layout of the sequence `h` (B, L, D) with text_valid (B, T): `layout` after checking it
  matches, or, when None, the default prefix <bos> with the visual slots in between."""
  if layout is None:
    return SequenceLayout.from_length(h.shape[1], text_valid.shape[1])
  if layout.length != h.shape[1] or layout.text_len != text_valid.shape[1]:
    raise ValueError(f'{layout} does not describe a sequence of {h.shape[1]} slots ending in '
                     f'{text_valid.shape[1]} text slots.')
  return layout


def last_token_visual_attention(attn: jax.Array, num_visual: int,
                                prefix_len: int = DEFAULT_PREFIX_LEN) -> jax.Array:
  """Attention the last slot (the last real text token) pays each visual slot, mean over heads.

  Args:
    attn: (B, H, L, L) attention probs of one layer, sequence `prefix + visual + text`.
    num_visual: number of visual slots in that sequence.
    prefix_len: P, the prefix slots before them (1: <bos> alone).
  Returns:
    (B, num_visual) float32 scores.
  """
  layout = SequenceLayout(prefix_len, num_visual, attn.shape[-1] - prefix_len - num_visual)
  row = attn[:, :, -1, layout.visual]  # (B, H, n)
  return jnp.mean(row.astype(jnp.float32), axis=1)  # (B, n)


def select_by_last_token_attention(h, attn, count, text_valid, *, layout: Optional[SequenceLayout] = None):
  """An `inlm.Select` keeping the `count` visual slots the last text token attends to most."""
  layout = sequence_layout(h, text_valid, layout)
  return top_k_sorted(last_token_visual_attention(attn, layout.num_visual, layout.prefix_len), count), None


def top_k_sorted(scores: jax.Array, k: int) -> jax.Array:
  """Top-k slots by score (ties to the lower slot), returned in increasing slot order: (B, n) -> (B, k)."""
  return jnp.sort(base.top_k_indices(scores, k), axis=-1)


def drop_visual(h, positions, key_valid, keep, text_len: int, position_mode: str, visual_h=None,
                prefix_len: int = DEFAULT_PREFIX_LEN):
  """Physically drops visual slots: gathers `prefix + kept visual + text` along L.

  Args:
    h: (B, L, D) hidden states, L = P + n + text_len; positions (B, L) int32; key_valid (B, L) bool.
    keep: (B, m) int32 visual slots to keep, in [0, n), sorted ascending.
    text_len: T, the number of text slots at the end of the sequence.
    position_mode: 'keep' (gather the positions) or 'renumber' (contiguous, as `assemble` would give),
      or a bool scalar array (True: renumber).
    visual_h: optional (B, m, D) replacement hidden states for the kept visual slots (merged tokens).
    prefix_len: P, the prefix slots at the start (1: <bos> alone).
  Returns:
    h (B, P + m + T, D), positions (B, P + m + T), key_valid (B, P + m + T).
  """
  b, length, _ = h.shape
  before = SequenceLayout.from_length(length, text_len, prefix_len)
  m = keep.shape[1]
  after = before.with_visual(m)
  arange = lambda sl: jnp.broadcast_to(jnp.arange(sl.start, sl.stop, dtype=jnp.int32), (b, sl.stop - sl.start))
  slots = jnp.concatenate([arange(before.prefix), before.visual.start + keep.astype(jnp.int32),
                           arange(before.text)], axis=1)  # (B, L')
  h = jnp.take_along_axis(h, slots[..., None], axis=1)  # (B, L', D)
  if visual_h is not None:
    h = h.at[:, after.visual].set(visual_h.astype(h.dtype))
  key_valid = jnp.take_along_axis(key_valid, slots, axis=1)  # (B, L')
  positions = jnp.take_along_axis(positions, slots, axis=1)  # (B, L')
  def renumbered():
    # Visual slots are all valid here, so `assemble`'s positions are P' .. P' + m - 1 (P' the real
    # prefix tokens, the prefix is never dropped); text moves down by the n - m dropped slots.
    start = jnp.sum(key_valid[:, after.prefix], axis=1, keepdims=True, dtype=jnp.int32)  # (B, 1)
    visual_pos = start + jnp.arange(m, dtype=jnp.int32)  # (B, m)
    return jnp.concatenate([positions[:, after.prefix], visual_pos,
                            positions[:, after.text] - (before.num_visual - m)], axis=1)
  positions = select_by_mode(position_mode, lambda: positions, renumbered)
  return h, positions, key_valid


# select(h, attn, count, text_valid, *, layout) -> (keep (B, count) sorted visual slots, replacement
# visual h or None); h (B, L, D) and attn (B, H, L, L) are those of the last layer before the drop, and
# `layout` (a `SequenceLayout`) says where the visual slots and the text rows of h sit (None: the
# default prefix <bos>). With `run_schedule(..., with_keys=True)` it is also given `keys=`
# (B, L, KVH, Dh), that layer's keys after RoPE, and `norm=`, the LM's final RMSNorm as a function of h.
Select = Callable[..., tuple]


def _layers_with_keys(module, h, positions, key_valid, start: int, stop: int):
  """Layers [start, stop) -> (h, attn probs of layer stop - 1, keys (B, L, KVH, Dh) of layer stop - 1)."""
  h, attn, kvs = module.llm.run_layers(h, positions, key_valid, start, stop, attn_layer=stop - 1,
                                       collect_kv=True)
  return h, attn, kvs[-1][0]


def _final_norm(module, h):
  return module.llm.norm(h)


def run_schedule(lm: LmHandle, visual, text_ids, text_valid, position_mode, drops: Drops, select: Select,
                 text_embeds=None, with_keys: bool = False, rank_layer: str = 'previous', *,
                 prefix_ids=None, prefix_valid=None) -> InLmResult:
  """Runs the LM with visual tokens dropped at the layers of `drops`; the engine of every in-LM method.

  Args:
    lm: the VLM handle.
    visual: (B, N, D) all projected visual tokens, in patch order.
    text_ids: (B, T) int, left-padded (may be None with text_embeds); text_valid: (B, T) bool.
    position_mode: 'keep' | 'renumber' | None (the model config's).
    drops: static schedule ((layer, count), ...), checked by `check_drops`.
    select: picks the `count` visual slots to keep at each drop (see `Select`).
    text_embeds: optional (B, T, D) used instead of embedding text_ids.
    with_keys: also give `select` the keys of the last layer before each drop and the final norm.
    rank_layer: whose attention probs `select` gets at a drop at layer l: 'previous' (layer l - 1, the
      last layer that ran on the longer sequence, as FastV) or 'next' (layer l's own attention over the
      longer sequence, computed for ranking only, as PyramidDrop; its output is discarded).
    prefix_ids, prefix_valid: optional (B, P) text before the image, left-padded (`VLM.assemble`);
      None: <bos> alone. The prefix is never dropped.
  Returns:
    InLmResult(logits (B, V), index (B, k), trace).
  """
  mode = resolve_position_mode(lm, position_mode)
  if rank_layer not in ('previous', 'next'):
    raise ValueError(f"rank_layer={rank_layer!r}: expected 'previous' or 'next'.")
  depth = lm.config.llm.depth
  b, n, _ = visual.shape
  t = text_valid.shape[1]
  if t < 1:
    raise ValueError(f'text_valid has shape {tuple(text_valid.shape)}: in-LM pruners score visual tokens by '
                     'the attention of the last text token, so at least one text slot is needed.')
  src = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))  # (B, n) source patch of each slot
  h, positions, key_valid = lm.apply('assemble', visual, src, jnp.ones((b, n), bool), text_ids, text_valid,
                                     mode, text_embeds, prefix_ids=prefix_ids,
                                     prefix_valid=prefix_valid)  # (B, P + N + T, ...)
  layout = SequenceLayout.from_length(h.shape[1], t, DEFAULT_PREFIX_LEN if prefix_ids is None
                                      else prefix_ids.shape[1])
  text_valid = text_valid.astype(bool)
  trace, start = [], 0
  for layer, count in drops:
    trace += [h.shape[1]] * (layer - start)
    if with_keys:
      h, attn, keys = lm.model.apply(lm.variables, h, positions, key_valid, start, layer,
                                     method=_layers_with_keys)
      norm = lambda x: lm.model.apply(lm.variables, x, method=_final_norm)
      keep, visual_h = select(h, attn, count, text_valid, keys=keys, norm=norm, layout=layout)  # (B, count)
    elif rank_layer == 'next':
      h, _ = lm.apply('run_layers', h, positions, key_valid, start, layer)
      _, attn = lm.apply('run_layers', h, positions, key_valid, layer, layer + 1, layer)  # ranking only
      keep, visual_h = select(h, attn, count, text_valid, layout=layout)  # (B, count)
    else:
      h, attn = lm.apply('run_layers', h, positions, key_valid, start, layer, layer - 1)
      keep, visual_h = select(h, attn, count, text_valid, layout=layout)  # (B, count)
    h, positions, key_valid = drop_visual(h, positions, key_valid, keep, t, mode, visual_h, layout.prefix_len)
    layout = layout.with_visual(count)
    src = jnp.take_along_axis(src, keep, axis=1)  # (B, count)
    start = layer
  h, _ = lm.apply('run_layers', h, positions, key_valid, start, depth)
  trace += [h.shape[1]] * (depth - start)
  logits = lm.apply('logits', h[:, -1:])[:, 0]  # (B, V): left padding puts the last token last
  return InLmResult(logits=logits, index=src, trace=tuple(trace))


def inlm_schedule(config, method: str, k: int, **hparams) -> Drops:
  """The static drop schedule of `method` at final budget k for `config` (a full config)."""
  n = vit_lib.num_visual_tokens(config)
  return module(method).schedule(n, k, config.model.llm.depth, **hparams)


def inlm_prefill_flops(config, method: str, k: int, text_len: int, vocab_size: int | None = None, *,
                       prefix_len: int = DEFAULT_PREFIX_LEN, **hparams) -> int:
  """Analytic prefill FLOPs of `method`'s staged schedule (same counting as `costs.prefill_flops`).

  Each layer is counted with `costs.llm_layer_flops` at the length it actually sees; the LM head
  is counted for the last position. Selection work is not counted here: FastV, SparseVLM and DART
  reuse the attention or keys a layer computes anyway (plus lower-order similarities to a few
  pivots or anchors); PyramidDrop ranks with the next layer's q/k projections and one attention row
  over the longer sequence at each boundary. `prefix_len`: P, the slots before the image (1: <bos>).
  """
  n, depth = vit_lib.num_visual_tokens(config), config.model.llm.depth
  drops = inlm_schedule(config, method, k, **hparams)
  lengths = layer_lengths(n, int(text_len), depth, drops, prefix_len)
  head = 2 * config.model.llm.width * max(vocab_size or config.model.llm.vocab_size, 0)
  return sum(costs.llm_layer_flops(config, length) for length in lengths) + head


def inlm_kv_cache_bytes(config, method: str, k: int, text_len: int, *, prefix_len: int = DEFAULT_PREFIX_LEN,
                        **hparams) -> int:
  """Bytes of one prompt's KV cache after `method`'s prefill: each layer holds the slots it ran on."""
  n, depth = vit_lib.num_visual_tokens(config), config.model.llm.depth
  lengths = layer_lengths(n, int(text_len), depth, inlm_schedule(config, method, k, **hparams), prefix_len)
  per_slot_and_layer = costs.kv_cache_bytes(config, 0, 0) // depth  # one slot, k and v
  return per_slot_and_layer * sum(lengths)


def inlm_average_tokens(config, method: str, k: int, **hparams) -> float:
  """Visual tokens per LM layer averaged over layers (the 'average token count' PyramidDrop reports)."""
  n, depth = vit_lib.num_visual_tokens(config), config.model.llm.depth
  lengths = layer_lengths(n, 0, depth, inlm_schedule(config, method, k, **hparams))
  return sum(length - 1 for length in lengths) / depth
