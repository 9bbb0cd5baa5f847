"""Tests for the in-LM pruners (FastV, PyramidDrop, SparseVLM, DART) on a tiny random VLM.

Run: .venv/bin/python -m pytest -q tests/test_pruning_inlm.py
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax import pruning
from gripjax.models import costs
from gripjax.models import init_params, make_vlm
from gripjax.pruning import base
from gripjax.pruning import dart
from gripjax.pruning import fastv
from gripjax.pruning import inlm
from gripjax.pruning import pyramiddrop
from gripjax.pruning import sparsevlm
from tests.helpers import load_config

N, DEPTH, D, T, K = 16, 3, 32, 5, 5  # (32 / 8) ** 2 visual tokens; 3 layers: FastV K = 2, 3 stages.
MODES = ('keep', 'renumber')
IDS = np.array([[3, 4, 5, 6, 7], [0, 4, 5, 6, 7], [0, 0, 0, 6, 7]], np.int32)  # (3, T), left-padded
ATOL = 1e-5


def tiny_config():
  c = load_config('gripbench_tiny')
  c.model.vit.update(dict(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                          feature_layer=-1))
  c.model.projector_hidden = 32
  c.model.llm.update(dict(vocab_size=20, width=D, depth=DEPTH, num_heads=4, num_kv_heads=2, mlp_dim=64,
                          max_len=64))
  return c


def random_params(model):
  """LM-only variables with random values, shaped by an abstract init (no compile; the in-LM methods
  never touch the vision tower). Kernels ~ N(0, 1 / fan_in) keep the attention peaked (no near-ties)."""
  abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
  rng = np.random.default_rng(0)

  def fill(path, x):
    if path[-1].key == 'scale':
      return jnp.ones(x.shape, x.dtype)
    std = 1.0 if path[-1].key == 'embedding' else x.shape[0] ** -0.5
    return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)

  return {'params': {'llm': jax.tree_util.tree_map_with_path(fill, abstract['params']['llm'])}}


@pytest.fixture(scope='module')
def setup():
  model = make_vlm(tiny_config().model)
  lm = inlm.LmHandle(params=random_params(model), model=model)
  visual = jax.random.normal(jax.random.key(1), (3, N, D))  # (B, N, D)
  return lm, visual, jnp.asarray(IDS), jnp.asarray(IDS > 0)


@functools.lru_cache(maxsize=None)
def staged(name, k, mode):
  """jit of `run_staged` of method `name` (the trace is static, so it comes out as Python ints)."""
  fn = inlm.module(name).run_staged
  return jax.jit(lambda lm, visual, ids, valid: fn(lm, visual, ids, valid, k, mode))


def test_fastv_all_kept_equals_full(setup):
  lm, visual, ids, valid = setup

  @jax.jit  # one compile for the three runs
  def runs(lm, visual, ids, valid):
    b = visual.shape[0]
    full = lm.apply('forward', visual, jnp.broadcast_to(jnp.arange(N), (b, N)), jnp.ones((b, N), bool), ids,
                    valid, 'keep')[:, -1]  # with nothing dropped both modes give these positions
    return full, [inlm.run('fastv', lm, visual, ids, valid, N, mode) for mode in MODES]  # harness entry

  full, outs = runs(lm, visual, ids, valid)
  for mode, (logits, index) in zip(MODES, outs):
    np.testing.assert_array_equal(index, np.broadcast_to(np.arange(N), (3, N)), err_msg=mode)
    np.testing.assert_allclose(logits, full, atol=ATOL, err_msg=mode)


@pytest.mark.parametrize('name', pruning.IN_LM_METHODS)
def test_contract(setup, name):
  lm, visual, ids, valid = setup
  mode = 'keep' if name != 'pyramiddrop' else 'renumber'
  out = staged(name, K, mode)(lm, visual, ids, valid)
  index = np.asarray(out.index)
  assert out.logits.shape == (3, 20) and np.all(np.isfinite(out.logits)), name
  assert index.shape == (3, K) and out.index.dtype == jnp.int32, name
  assert np.all((index >= 0) & (index < N)) and np.all(np.diff(index, axis=1) > 0), f'{name}: {index}'
  # The sequence really shrinks: the lengths the layers ran on follow the schedule and end at 1 + k + T.
  drops = inlm.module(name).schedule(N, K, DEPTH)
  assert out.trace == inlm.layer_lengths(N, T, DEPTH, drops), name
  assert out.trace[0] == 1 + N + T and out.trace[-1] == 1 + K + T, (name, out.trace)
  # Batch == per example: example 2 alone gives its row of the batch; and in another batch (a new
  # example first, the others swapped) every example still gives its own result.
  one = staged(name, K, mode)(lm, visual[2:], ids[2:], valid[2:])
  np.testing.assert_array_equal(one.index[0], index[2], err_msg=name)
  np.testing.assert_allclose(one.logits[0], out.logits[2], atol=ATOL, err_msg=name)
  order = np.array([0, 2, 1])
  other = staged(name, K, mode)(lm, visual[order].at[0].set(-visual[0]), ids[order], valid[order])
  np.testing.assert_array_equal(other.index[1:], index[[2, 1]], err_msg=name)
  np.testing.assert_allclose(other.logits[1:], np.asarray(out.logits)[[2, 1]], atol=ATOL, err_msg=name)


def test_run_time_position_mode_equals_named_modes(setup):
  """A bool scalar position mode (as the harness passes, one compile for both modes) gives what
  the named mode gives, for every in-LM method and for the plain pruned forward."""
  lm, visual, ids, valid = setup
  b = visual.shape[0]
  index = jnp.asarray(np.sort(np.random.default_rng(0).permutation(N)[:K]))[None].repeat(b, 0)
  kept = jnp.take_along_axis(visual, index[..., None], axis=1)

  def outputs(mode):
    forward = lm.apply('forward', kept, index, jnp.ones((b, K), bool), ids, valid, mode)[:, -1]
    return forward, [inlm.run(name, lm, visual, ids, valid, K, mode)
                     for name in pruning.IN_LM_METHODS]

  flagged = jax.jit(outputs)
  for mode in MODES:
    want = jax.jit(outputs, static_argnums=0)(mode)
    got = flagged(np.asarray(mode == 'renumber'))
    np.testing.assert_allclose(got[0], want[0], atol=ATOL, err_msg=mode)
    for name, (g, w) in zip(pruning.IN_LM_METHODS, zip(got[1], want[1])):
      np.testing.assert_array_equal(g[1], w[1], err_msg=f'{name} {mode}')
      np.testing.assert_allclose(g[0], w[0], atol=ATOL, err_msg=f'{name} {mode}')
  # The modes differ here, so the flag really switches (not a test that cannot fail).
  assert not np.allclose(flagged(np.asarray(True))[0], flagged(np.asarray(False))[0], atol=1e-3)
  with pytest.raises(ValueError, match='bool scalar'):
    lm.apply('forward', kept, index, jnp.ones((b, K), bool), ids, valid, np.asarray([True, False]))


def test_pyramiddrop_schedule():
  assert pyramiddrop.schedule(N, K, 4) == ((1, 11), (2, 7), (3, K))  # 16 * (5 / 16) ** (s / 3), rounded
  assert pyramiddrop.schedule(N, K, DEPTH) == ((1, 9), (2, K))  # S = 4 stages clipped to depth 3
  assert pyramiddrop.schedule(576, 72, 32) == ((8, 288), (16, 144), (24, 72))  # the paper's lambda = 0.5
  assert pyramiddrop.schedule(N, K, 2) == ((1, K),)  # stages clipped to depth
  assert pyramiddrop.schedule(N, N, DEPTH) == ((1, N), (2, N))


def test_schedules_clip_and_check():
  assert fastv.schedule(N, K, DEPTH) == ((2, K),)
  assert fastv.schedule(N, K, 2) == ((1, K),)  # K = 2 clipped to depth - 1
  assert sparsevlm.schedule(N, K, DEPTH, layer=9) == ((2, K),)
  with pytest.raises(ValueError, match='depth=1'):
    fastv.schedule(N, K, 1)
  with pytest.raises(ValueError, match='layer K=0'):
    fastv.schedule(N, K, DEPTH, layer=0)
  with pytest.raises(ValueError, match='k=17'):
    pyramiddrop.schedule(N, N + 1, DEPTH)
  with pytest.raises(ValueError, match='invalid drop schedule'):
    inlm.check_drops(((2, 8), (1, K)), N, K, DEPTH)
  assert [sparsevlm.num_recycled(N, k) for k in (1, 2, 8, 15, 16)] == [0, 1, 1, 1, 0]
  assert sparsevlm.num_recycled(576, 64) == 8


def test_fastv_equals_hand_written_reference(setup):
  lm, visual, ids, valid = setup
  layer = 2  # the default K, below depth - 1
  b = visual.shape[0]

  @jax.jit
  def reference(lm, visual, ids, valid):
    outs = {}
    for mode in MODES:
      index = jnp.broadcast_to(jnp.arange(N), (b, N))
      h, pos, kv = lm.apply('assemble', visual, index, jnp.ones((b, N), bool), ids, valid, mode)
      h, attn = lm.apply('run_layers', h, pos, kv, 0, layer, layer - 1)
      scores = attn[:, :, -1, 1:1 + N].mean(axis=1)  # (B, N): the last text token's row, mean over heads
      keep = jnp.sort(jnp.argsort(-scores, axis=1, stable=True)[:, :K], axis=1)  # (B, K)
      slots = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), 1 + keep,
                               jnp.broadcast_to(jnp.arange(1 + N, 1 + N + T), (b, T))], axis=1)
      h = jnp.take_along_axis(h, slots[..., None], axis=1)
      kv, pos = jnp.take_along_axis(kv, slots, axis=1), jnp.take_along_axis(pos, slots, axis=1)
      if mode == 'renumber':  # as `assemble` numbers an input of K visual tokens
        pos = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.broadcast_to(jnp.arange(1, K + 1), (b, K)),
                               K + jnp.cumsum(valid, axis=1)], axis=1)
      h, _ = lm.apply('run_layers', h, pos, kv, layer, DEPTH)
      outs[mode] = lm.apply('logits', h)[:, -1], keep
    return outs

  for mode, (want, keep) in reference(lm, visual, ids, valid).items():
    out = staged('fastv', K, mode)(lm, visual, ids, valid)
    np.testing.assert_array_equal(out.index, keep, err_msg=mode)
    np.testing.assert_allclose(out.logits, want, atol=ATOL, err_msg=mode)


def test_fastv_scores_use_last_text_token_row():
  b, h, n, t = 2, 3, 6, 4
  length = 1 + n + t
  attn = np.full((b, h, length, length), 0.01, np.float32)
  attn[:, :, :-1, 1:4] = 0.5  # every other token prefers visual slots 0..2
  attn[:, :, -1, 1 + np.array([1, 4, 5])] = 0.9  # the last text token prefers 1, 4, 5
  np.testing.assert_array_equal(inlm.top_k_sorted(fastv.visual_scores(jnp.asarray(attn), n), 3),
                                [[1, 4, 5]] * b)
  assert not np.array_equal(inlm.top_k_sorted(jnp.asarray(attn).mean((1, 2))[:, 1:1 + n], 3), [[1, 4, 5]] * b)


def test_sparsevlm_raters_and_recycling():
  b, n, t, d = 1, 6, 3, 4
  length = 1 + n + t
  attn = np.zeros((b, 1, length, length), np.float32)
  attn[0, 0, 1 + n + 0, 1:1 + n] = [0.0, 0.0, 0.0, 0.0, 0.9, 0.0]  # not a rater: ignored
  attn[0, 0, 1 + n + 1, 1:1 + n] = [0.4, 0.1, 0.0, 0.2, 0.0, 0.0]
  attn[0, 0, 1 + n + 2, 1:1 + n] = [0.2, 0.1, 0.3, 0.0, 0.0, 0.0]
  raters = jnp.asarray([[False, True, True]])
  scores = sparsevlm.rater_scores(jnp.asarray(attn), n, raters)  # mean of the two raters' rows
  np.testing.assert_allclose(scores, [[0.3, 0.1, 0.15, 0.1, 0.0, 0.0]], atol=1e-6)
  # Keep 2 by score (slots 0, 2) + 2 recycled: the anchors are the best deleted slots 1 and 3 (score
  # 0.1 each), and the other deleted slots join the anchor they resemble: 4 -> 1, 5 -> 3.
  e = np.eye(d, dtype=np.float32)
  vh = np.stack([e[0], e[1], e[2], e[3], e[1] + 0.1 * e[0], e[3] + 0.2 * e[2]])[None]  # (1, n, d)
  h = np.zeros((b, length, d), np.float32)
  h[:, 1:1 + n] = vh
  select = jax.jit(sparsevlm.make_select(2, 1.0, raters), static_argnums=2)
  keep, tokens = select(jnp.asarray(h), jnp.asarray(attn), 4, jnp.ones((b, t), bool))
  np.testing.assert_array_equal(keep, [[0, 1, 2, 3]])
  v = vh[0]
  np.testing.assert_allclose(tokens[0], [v[0], (v[1] + v[4]) / 2, v[2], (v[3] + v[5]) / 2], atol=1e-6)


def test_inlm_prefill_flops_fastv():
  c = tiny_config()
  by_hand = (2 * costs.llm_layer_flops(c, 1 + N + T) + costs.llm_layer_flops(c, 1 + K + T)
             + 2 * D * 20)  # K = 2 layers on all tokens, 1 on k, the LM head at the last slot
  assert inlm.inlm_prefill_flops(c, 'fastv', K, T) == by_hand
  assert inlm.inlm_prefill_flops(c, 'dart', K, T) == by_hand  # DART drops at the same layer K = 2
  pre_lm = costs.prefill_flops(c, K, T)
  full = costs.prefill_flops(c, N, T)
  assert inlm.inlm_prefill_flops(c, 'fastv', N, T) == full
  for name in pruning.IN_LM_METHODS:  # in-LM at k costs more than pre-LM at k, less than unpruned
    assert pre_lm < inlm.inlm_prefill_flops(c, name, K, T) < full, name
  assert inlm.inlm_average_tokens(c, 'fastv', K) == (2 * N + K) / 3


@pytest.mark.parametrize('name', pruning.IN_LM_METHODS)
def test_prune_without_handle_raises(name):
  ctx = base.PruneContext(tokens=jnp.zeros((1, N, D)), features=jnp.zeros((1, N, 4)),
                          cls_attn=jnp.zeros((1, N)), question=jnp.zeros((1, T, D)),
                          question_mask=jnp.ones((1, T), bool), rng=jax.random.PRNGKey(0), grid=(4, 4))
  assert pruning.is_in_lm(name) and not pruning.is_in_lm('fastervlm')
  with pytest.raises(ValueError, match=rf'{name} runs inside the LM .*inlm.run'):
    pruning.get(name)(ctx, K)
  with pytest.raises(ValueError, match='k=0'):
    pruning.get(name)(ctx, 0)
  with pytest.raises(ValueError, match="'nope' is not an in-LM"):
    inlm.module('nope')


def test_dart_pivots_from_layer_k_minus_1_keys(setup):
  """DART's kept set equals its selection rule applied to the keys of layer K - 1 as the KV cache of a
  full prefill holds them (an independent path to the same keys) and the hidden states entering
  layer K (the final norm's scale is 1 here, so it does not change cosines)."""
  lm, visual, ids, valid = setup
  layer, b = 2, visual.shape[0]
  index = jnp.broadcast_to(jnp.arange(N), (b, N))

  @jax.jit
  def reference(lm, visual, ids, valid):
    _, cache = lm.apply('prefill', visual, index, jnp.ones((b, N), bool), ids, valid, 'keep', 1 + N + T)
    keys = cache['layers'][layer - 1]['k']  # (B, L, KVH, Dh), after RoPE
    l1 = jnp.abs(keys).sum(axis=(-2, -1))  # (B, L)
    h, pos, kv = lm.apply('assemble', visual, index, jnp.ones((b, N), bool), ids, valid, 'keep')
    h, _ = lm.apply('run_layers', h, pos, kv, 0, layer)
    return dart.select_visual(h[:, 1:1 + N], h[:, 1 + N:], l1[:, 1:1 + N], l1[:, 1 + N:], valid, K,
                              pivot_image=2, pivot_text=2)

  run = jax.jit(lambda *a: dart.run_staged(*a, K, 'keep', pivot_image=2, pivot_text=2))
  out = run(lm, visual, ids, valid)
  np.testing.assert_array_equal(out.index, reference(lm, visual, ids, valid))
  assert out.trace == (1 + N + T,) * layer + (1 + K + T,) * (DEPTH - layer)


def test_pyramiddrop_ranks_with_the_next_layers_attention(setup):
  """At a boundary into layer l, PyramidDrop ranks by the last token's row of layer l's own attention
  over the longer sequence (the released `pdrop_rank_drop`), not by layer l - 1's."""
  lm, visual, ids, valid = setup
  b = visual.shape[0]
  drops = pyramiddrop.schedule(N, K, DEPTH)
  assert drops == ((1, 9), (2, K))

  @jax.jit
  def reference(lm, visual, ids, valid):
    index = jnp.broadcast_to(jnp.arange(N), (b, N))
    h, pos, kv = lm.apply('assemble', visual, index, jnp.ones((b, N), bool), ids, valid, 'renumber')
    src, start = index, 0
    for layer, count in drops:
      h, _ = lm.apply('run_layers', h, pos, kv, start, layer)
      _, attn = lm.apply('run_layers', h, pos, kv, layer, layer + 1, layer)  # layer l on the longer input
      n = src.shape[1]
      scores = attn[:, :, -1, 1:1 + n].mean(axis=1)  # (B, n)
      keep = jnp.sort(jnp.argsort(-scores, axis=1, stable=True)[:, :count], axis=1)
      slots = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), 1 + keep,
                               jnp.broadcast_to(jnp.arange(1 + n, 1 + n + T), (b, T))], axis=1)
      h = jnp.take_along_axis(h, slots[..., None], axis=1)
      kv = jnp.take_along_axis(kv, slots, axis=1)
      visual_pos = jnp.broadcast_to(jnp.arange(1, count + 1), (b, count))
      pos = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), visual_pos, count + jnp.cumsum(valid, axis=1)],
                            axis=1)  # renumbered, as released
      src, start = jnp.take_along_axis(src, keep, axis=1), layer
    h, _ = lm.apply('run_layers', h, pos, kv, start, DEPTH)
    return lm.apply('logits', h)[:, -1], src

  want_logits, want_index = reference(lm, visual, ids, valid)
  out = staged('pyramiddrop', K, 'renumber')(lm, visual, ids, valid)
  np.testing.assert_array_equal(out.index, want_index)
  np.testing.assert_allclose(out.logits, want_logits, atol=ATOL)
