"""The general sequence layout `[prefix text][visual slots][suffix text]` (text before and after the image).

Run: .venv/bin/python -m pytest -q tests/test_layout.py

References are brute force: the sequence is built physically (padding and dropped tokens removed),
embedded by hand from the embedding table, and run through an independent numpy Llama
(`tests.test_models.reference_llm`) at positions written out from the layout's definition. Positions,
slot offsets and the in-LM pruners' rows are checked on hand-made cases.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax import pruning
from gripjax import runtime
from gripjax.inference import PrunedGenerator
from gripjax.models import vlm as vlm_lib
from gripjax.pruning import dart
from gripjax.pruning import fastv
from gripjax.pruning import inlm
from gripjax.pruning import sparsevlm
from tests.helpers import load_config
from tests.test_inference import random_tree
from tests.test_inference import tiny_config as inference_config
from tests.test_models import reference_llm
from tests.test_pruning_inlm import random_params  # LM-only random variables

N, DEPTH, D, HEADS, K = 16, 3, 32, 4, 5  # (32 / 8) ** 2 visual tokens; 3 layers so PyramidDrop drops twice.
MODES = ('keep', 'renumber')
BOS = 1
ATOL = 1e-5  # JAX against JAX
REF_ATOL = 1e-4  # float32 JAX against the float64 numpy reference
# Left-padded prefixes (P = 4): 4, 3 and 2 real tokens; a chat template's head such as `<s> USER :`.
PREFIX = np.array([[BOS, 5, 6, 7], [0, BOS, 8, 9], [0, 0, BOS, 5]], np.int32)
SUFFIX = np.array([[3, 4, 5, 6, 7], [0, 4, 5, 6, 7], [0, 0, 0, 6, 7]], np.int32)  # (3, T), left-padded
P, T = PREFIX.shape[1], SUFFIX.shape[1]
DROPPED = np.ones((3, N), bool)  # visual slots in use, a different k per example
DROPPED[0, 3:9] = DROPPED[2, ::2] = False


def tiny_config():
  c = load_config('gripbench_tiny')
  c.model.vit.update(dict(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                          feature_layer=-1))
  c.model.projector_hidden = 32
  c.model.llm.update(dict(vocab_size=20, width=D, depth=DEPTH, num_heads=HEADS, num_kv_heads=2, mlp_dim=64,
                          max_len=64))
  return c


@pytest.fixture(scope='module')
def setup():
  model = vlm_lib.make_vlm(tiny_config().model)
  params = random_params(model)
  visual = jax.random.normal(jax.random.key(1), (3, N, D))  # (B, N, D)
  return model, params, visual


@functools.lru_cache(maxsize=None)
def jitted(model, method, *static, **static_kw):
  """`model.apply(variables, *args, *static, method=method, **kw)`, compiled once per (method, static)."""
  return jax.jit(lambda variables, *args, **kw: model.apply(variables, *args, *static, method=method, **kw,
                                                             **static_kw))


def full_index(b=3):
  return jnp.broadcast_to(jnp.arange(N), (b, N))


def brute_force(params, visual, visual_keep, prefix, suffix, mode, suffix_valid=None):
  """Per example: logits (L', V) of the physically built sequence, real prefix + kept visual + real
  suffix, through the numpy reference, at the layout's positions written out by hand:
    prefix 0 .. P'-1;  keep: visual P' + source index, text P' + N + 0, 1, ..
                       renumber: visual P' + 0, 1, .., text after them, contiguous."""
  llm = params['params']['llm']
  emb = np.asarray(llm['embed_tokens']['embedding'])
  out = []
  for b in range(visual.shape[0]):
    pre = prefix[b][prefix[b] > 0]
    suf = suffix[b][suffix[b] > 0 if suffix_valid is None else suffix_valid[b]]
    src = np.flatnonzero(visual_keep[b])
    h = np.concatenate([emb[pre], np.asarray(visual[b])[src], emb[suf]])[None]  # (1, L', D)
    p0 = len(pre)
    if mode == 'keep':
      pos = np.concatenate([np.arange(p0), p0 + src, p0 + N + np.arange(len(suf))])
    else:
      pos = np.arange(h.shape[1])
    out.append(reference_llm(llm, h, pos[None], heads=HEADS)[0])
  return out


def real_slots(prefix, visual_keep, suffix):
  """(B, P + k + T) bool: the slots of the padded layout that hold a real token."""
  return np.concatenate([prefix > 0, visual_keep, suffix > 0], axis=1)


# --- Positions and offsets by hand. ----------------------------------------------------------------

def test_positions_by_hand(setup):
  model, params, visual = setup
  # One example: prefix [pad, bos, 5, 6] (P' = 3), visual sources [0, 3, 5] with the middle slot unused,
  # text [pad, 4, 7].
  prefix, prefix_valid = np.array([[0, BOS, 5, 6]]), np.array([[False, True, True, True]])
  index, valid = np.array([[0, 3, 5]]), np.array([[True, False, True]])
  text = np.array([[0, 4, 7]])
  v = visual[:1, :3]
  want = {'keep': [-1, 0, 1, 2, 3, 6, 8, -1 + 3 + N, 3 + N, 4 + N],  # visual P' + index; text P' + N + rank
          'renumber': [-1, 0, 1, 2, 3, 3, 4, 4, 5, 6]}  # visual P' - 1 + cumsum(valid); text after 2 kept
  for mode in MODES:
    _, pos, key_valid = model.apply(params, v, index, valid, text, text > 0, mode, prefix_ids=prefix,
                                    prefix_valid=prefix_valid, method='assemble')
    assert np.asarray(pos)[0].tolist() == want[mode], mode
    assert np.asarray(key_valid)[0].tolist() == [False, True, True, True, True, False, True, False, True, True]
  # The default prefix is <bos> at position 0: [bos][visual][text], as before the general layout.
  h, pos, _ = model.apply(params, v, index, valid, text, text > 0, 'keep', method='assemble')
  assert np.asarray(pos)[0].tolist() == [0, 1, 4, 6, N, N + 1, N + 2]
  emb = params['params']['llm']['embed_tokens']['embedding']
  np.testing.assert_array_equal(h[0, 0], emb[BOS])

  layout = vlm_lib.SequenceLayout(prefix_len=4, num_visual=3, text_len=2)
  assert (layout.length, layout.prefix, layout.visual, layout.text) == (9, slice(0, 4), slice(4, 7), slice(7, 9))
  assert vlm_lib.SequenceLayout.from_length(9, 2, 4) == layout
  assert layout.with_visual(1).text == slice(5, 7)
  with pytest.raises(ValueError, match='cannot hold a prefix of 4 and 6 text slots'):
    vlm_lib.SequenceLayout.from_length(9, 6, 4)
  with pytest.raises(ValueError, match=r'prefix_valid has shape \(1, 3\); expected \(1, 4\)'):
    model.apply(params, v, index, valid, text, text > 0, prefix_ids=prefix, prefix_valid=prefix_valid[:, 1:],
                method='assemble')
  with pytest.raises(ValueError, match='prefix_valid was given without prefix_ids'):
    model.apply(params, v, index, valid, text, text > 0, prefix_valid=prefix_valid, method='assemble')


def test_drop_visual_with_prefix_by_hand():
  # P = 2 (one padding slot, P' = 1), n = 4 visual slots, T = 2; keep visual slots 1 and 3.
  h = jnp.arange(8, dtype=jnp.float32)[None, :, None]  # (1, 8, 1): slot s holds s
  key_valid = jnp.asarray([[False] + [True] * 7])
  keep = jnp.asarray([[1, 3]])
  positions = {'keep': [-1, 0, 1, 2, 3, 4, 17, 18],  # as `assemble` numbers them: text at P' + N = 17
               'renumber': [-1, 0, 1, 2, 3, 4, 5, 6]}
  for mode, want_pos in (('keep', [-1, 0, 2, 4, 17, 18]), ('renumber', [-1, 0, 1, 2, 3, 4])):
    pos = jnp.asarray([positions[mode]])
    h2, pos2, kv2 = inlm.drop_visual(h, pos, key_valid, keep, 2, mode, prefix_len=2)
    assert np.asarray(h2)[0, :, 0].tolist() == [0, 1, 3, 5, 6, 7], mode
    assert np.asarray(pos2)[0].tolist() == want_pos, mode
    assert np.asarray(kv2)[0].tolist() == [False, True, True, True, True, True], mode
  merged = jnp.asarray([[[10.0], [30.0]]])
  h2, *_ = inlm.drop_visual(h, jnp.asarray([positions['keep']]), key_valid, keep, 2, 'keep', merged, prefix_len=2)
  assert np.asarray(h2)[0, :, 0].tolist() == [0, 1, 10, 30, 6, 7]


def test_inlm_scores_read_the_visual_slots_after_the_prefix():
  # P = 3 prefix slots, n = 4 visual, T = 2 text; heads agree. The last row pays most to visual slots
  # 1 and 3 (sequence slots 4 and 6); read with the old offset 1 the top two would be slots 0 and 1
  # of the prefix / first visual (0.3, 0.25 at sequence slots 1, 2).
  p, n, t = 3, 4, 2
  length = p + n + t
  attn = np.zeros((1, 2, length, length), np.float32)
  attn[0, :, -1, :] = [0.05, 0.3, 0.25, 0.0, 0.2, 0.0, 0.15, 0.0, 0.05]
  attn[0, :, -2, :] = [0.0, 0.0, 0.0, 0.6, 0.0, 0.1, 0.0, 0.3, 0.0]  # the other text row
  np.testing.assert_allclose(fastv.visual_scores(jnp.asarray(attn), n, p), [[0.0, 0.2, 0.0, 0.15]])
  h = jnp.zeros((1, length, 3))
  keep, merged = inlm.select_by_last_token_attention(
      h, jnp.asarray(attn), 2, jnp.ones((1, t), bool), layout=vlm_lib.SequenceLayout(p, n, t))
  assert np.asarray(keep)[0].tolist() == [1, 3] and merged is None
  # SparseVLM: the raters' rows (the text slots after the image), visual columns after the prefix.
  raters = jnp.asarray([[True, True]])
  np.testing.assert_allclose(sparsevlm.rater_scores(jnp.asarray(attn), n, raters, p),
                             [[0.3, 0.1, 0.05, 0.075]], atol=1e-6)
  with pytest.raises(ValueError, match='does not describe a sequence of 9 slots'):
    inlm.select_by_last_token_attention(h, jnp.asarray(attn), 2, jnp.ones((1, t), bool),
                                        layout=vlm_lib.SequenceLayout(2, n, t))


def test_dart_pivots_with_prefix_by_hand():
  # P = 2, n = 4, T = 1. Keys' L1 (one head, Dh 2): prefix slots are huge, so reading visual keys at the
  # old offset 1 would make prefix slot 1 an image pivot. With k = 1 the one image pivot is the
  # visual slot of largest L1: slot 2 (|2| + |2|).
  p, n, t = 2, 4, 1
  keys = np.zeros((1, p + n + t, 1, 2), np.float32)
  keys[0, :p, 0] = [[50, 50], [60, 60]]
  keys[0, p:p + n, 0] = [[3, 0], [1, 0], [2, 2], [0, 1]]
  h = jnp.asarray(np.random.default_rng(0).normal(size=(1, p + n + t, 2)), jnp.float32)
  select = dart.make_select(pivot_image=4, pivot_text=4)
  keep, _ = select(h, None, 1, jnp.ones((1, t), bool), keys=jnp.asarray(keys), norm=lambda x: x,
                   layout=vlm_lib.SequenceLayout(p, n, t))
  assert np.asarray(keep)[0].tolist() == [2]


def test_layer_lengths_and_flops_count_the_prefix():
  c = tiny_config()
  drops = fastv.schedule(N, K, DEPTH)  # ((2, K),)
  assert inlm.layer_lengths(N, T, DEPTH, drops, prefix_len=P) == (P + N + T,) * 2 + (P + K + T,)
  assert inlm.layer_lengths(N, T, DEPTH, drops) == (1 + N + T,) * 2 + (1 + K + T,)
  longer = inlm.inlm_prefill_flops(c, 'fastv', K, T, prefix_len=P)
  assert longer > inlm.inlm_prefill_flops(c, 'fastv', K, T)
  assert inlm.inlm_prefill_flops(c, 'fastv', K, T + P - 1) == longer  # only the length counts


# --- The model on the general layout against brute force. -------------------------------------------

def test_all_kept_equals_brute_force(setup):
  model, params, visual = setup
  keep_all = np.ones((3, N), bool)
  for mode in MODES:  # nothing dropped: both modes are the contiguous sequence
    got = jitted(model, 'forward', mode)(params, visual, full_index(), jnp.asarray(keep_all), SUFFIX, SUFFIX > 0,
                                         prefix_ids=PREFIX, prefix_valid=PREFIX > 0)
    want = brute_force(params, visual, keep_all, PREFIX, SUFFIX, 'renumber')
    real = real_slots(PREFIX, keep_all, SUFFIX)
    for b in range(3):
      np.testing.assert_allclose(np.asarray(got[b])[real[b]], want[b], atol=REF_ATOL, err_msg=f'{mode} {b}')


@pytest.mark.parametrize('mode', MODES)
def test_dropped_tokens_equal_brute_force(setup, mode):
  """Masked visual slots (and padding in prefix and suffix) compute as the physically shortened
  sequence: renumbered contiguously, or, in keep mode, at each token's full-sequence position."""
  model, params, visual = setup
  got = jitted(model, 'forward', mode)(params, visual, full_index(), jnp.asarray(DROPPED), SUFFIX, SUFFIX > 0,
                                       prefix_ids=PREFIX, prefix_valid=PREFIX > 0)
  want = brute_force(params, visual, DROPPED, PREFIX, SUFFIX, mode)
  real = real_slots(PREFIX, DROPPED, SUFFIX)
  for b in range(3):
    np.testing.assert_allclose(np.asarray(got[b])[real[b]], want[b], atol=REF_ATOL, err_msg=f'{mode} {b}')
  # Gathered (physically dropped) kept tokens give the same answer logits as the masked slots.
  b = 2
  src = np.flatnonzero(DROPPED[b])[None]
  gathered = jitted(model, 'answer_logits', mode)(
      params, visual[b:b + 1, src[0]], src, np.ones(src.shape, bool), SUFFIX[b:b + 1], SUFFIX[b:b + 1] > 0,
      prefix_ids=PREFIX[b:b + 1], prefix_valid=PREFIX[b:b + 1] > 0)
  np.testing.assert_allclose(gathered[0], want[b][-1], atol=REF_ATOL)


@pytest.mark.parametrize('mode', MODES)
def test_prefill_and_decode_with_prefix(setup, mode):
  """Prefill + decode steps give the full forward's next-token logits at every step; the greedy
  tokens equal the numpy reference's. (`generate` with a prefix runs in the PrunedGenerator test.)"""
  model, params, visual = setup
  steps = 3
  args = (visual, full_index(), DROPPED, SUFFIX, SUFFIX > 0)
  prefix = dict(prefix_ids=PREFIX, prefix_valid=PREFIX > 0)
  logits, cache = jitted(model, 'prefill', mode, P + N + T + steps)(params, *args, **prefix)
  assert int(cache['length']) == P + N + T
  tokens = np.zeros((3, steps), np.int32)
  for step in range(steps):
    # The full forward over the suffix grown by the tokens so far, in a fixed-length left-padded buffer.
    text = np.concatenate([np.zeros((3, steps - step), np.int32), SUFFIX, tokens[:, :step]], axis=1)
    valid = np.concatenate([np.zeros((3, steps - step), bool), SUFFIX > 0, np.ones((3, step), bool)], axis=1)
    full = jitted(model, 'forward', mode)(params, visual, full_index(), DROPPED, text, valid, **prefix)[:, -1]
    np.testing.assert_allclose(logits, full, atol=ATOL, err_msg=f'step {step}')
    tokens[:, step] = np.argmax(full, -1)
    logits, cache = jitted(model, 'decode_step')(params, cache, tokens[:, step])
  # Greedy tokens against the numpy reference on the physically built sequence of example 0.
  grown = np.concatenate([SUFFIX[:1], tokens[:1, :steps - 1]], axis=1)
  want = brute_force(params, visual[:1], DROPPED[:1], PREFIX[:1], grown, mode,
                     np.concatenate([SUFFIX[:1] > 0, np.ones((1, steps - 1), bool)], axis=1))[0]
  np.testing.assert_array_equal(np.argmax(want[-steps:], -1), tokens[0])
  with pytest.raises(ValueError, match=r'cache_len=27.*>= 4 \+ k \+ T \+ max_new_tokens = 28'):
    vlm_lib.generate(model, params, *args, max_new_tokens=3, eos_id=0, cache_len=27, **prefix)


def test_default_prefix_is_bit_identical(setup):
  """No prefix and an explicit [<bos>] prefix give identical results (the layout before prefixes):
  the forward, the weighted answer logits and the prefill cache. (The in-LM methods' default results
  are checked against hand-written references in test_pruning_inlm.py.)"""
  model, params, visual = setup
  bos = dict(prefix_ids=np.full((3, 1), BOS, np.int32), prefix_valid=np.ones((3, 1), bool))
  weight = np.random.default_rng(0).uniform(size=(3, N)).astype(np.float32)

  @jax.jit
  def outputs(params, visual, **prefix):
    args = (visual, full_index(), DROPPED, SUFFIX, SUFFIX > 0)
    out = dict(
        forward=model.apply(params, *args, 'renumber', method='forward', **prefix),
        answer=model.apply(params, *args, 'keep', weight, method='answer_logits', **prefix),
        prefill=model.apply(params, *args, 'keep', 1 + N + T + 2, method='prefill', **prefix))
    return out

  default, explicit = outputs(params, visual), outputs(params, visual, **bos)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(default), jax.tree_util.tree_leaves(explicit)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


# --- In-LM pruners on the general layout. -----------------------------------------------------------

def test_inlm_with_prefix_all_kept_equals_forward(setup):
  """k = N: nothing is dropped, so every in-LM method gives the plain forward's answer logits with the
  prefix (checked against brute force above) and keeps every patch. (Both position modes are the
  same here.)"""
  model, params, visual = setup
  mode = 'keep'
  lm = inlm.LmHandle(params=params, model=model)
  prefix = dict(prefix_ids=jnp.asarray(PREFIX), prefix_valid=jnp.asarray(PREFIX > 0))

  @jax.jit
  def runs(lm, visual):
    full = lm.apply('answer_logits', visual, full_index(), jnp.ones((3, N), bool), SUFFIX, SUFFIX > 0, mode,
                    **prefix)
    return full, [inlm.run(name, lm, visual, SUFFIX, SUFFIX > 0, N, mode, **prefix)
                  for name in pruning.IN_LM_METHODS]

  full, outs = runs(lm, visual)
  for name, (logits, index) in zip(pruning.IN_LM_METHODS, outs):
    np.testing.assert_array_equal(index, full_index(), err_msg=name)
    np.testing.assert_allclose(logits, full, atol=ATOL, err_msg=name)


def test_fastv_with_prefix_equals_hand_written_reference(setup):
  """FastV with a prefix: layers [0, K) on the whole sequence, the last row's attention over the visual
  slots P .. P + N - 1, the gathered sequence with positions written out by hand, layers [K, depth)."""
  model, params, visual = setup
  lm = inlm.LmHandle(params=params, model=model)
  layer, b = 2, 3
  prefix = dict(prefix_ids=jnp.asarray(PREFIX), prefix_valid=jnp.asarray(PREFIX > 0))
  p_real = (PREFIX > 0).sum(1, keepdims=True)  # (B, 1)

  @jax.jit
  def reference(lm):
    outs = {}
    for mode in MODES:
      h, pos, kv = lm.apply('assemble', visual, full_index(), jnp.ones((b, N), bool), SUFFIX, SUFFIX > 0, mode,
                            **prefix)
      h, attn = lm.apply('run_layers', h, pos, kv, 0, layer, layer - 1)
      scores = attn[:, :, -1, P:P + N].mean(axis=1)  # (B, N)
      keep = jnp.sort(jnp.argsort(-scores, axis=1, stable=True)[:, :K], axis=1)  # (B, K)
      slots = jnp.concatenate([jnp.broadcast_to(jnp.arange(P), (b, P)), P + keep,
                               jnp.broadcast_to(jnp.arange(P + N, P + N + T), (b, T))], axis=1)
      h = jnp.take_along_axis(h, slots[..., None], axis=1)
      kv, pos = jnp.take_along_axis(kv, slots, axis=1), jnp.take_along_axis(pos, slots, axis=1)
      if mode == 'renumber':  # prefix 0 .. P'-1, then K visual, then the text, contiguous
        pos = jnp.concatenate([jnp.cumsum(PREFIX > 0, axis=1) - 1, p_real + jnp.arange(K),
                               p_real + K + jnp.cumsum(SUFFIX > 0, axis=1) - 1], axis=1)
      h, _ = lm.apply('run_layers', h, pos, kv, layer, DEPTH)
      outs[mode] = lm.apply('logits', h)[:, -1], keep
    return outs

  for mode, (want, keep) in reference(lm).items():
    out = jax.jit(lambda lm, v: fastv.run_staged(lm, v, SUFFIX, SUFFIX > 0, K, mode, **prefix))(lm, visual)
    np.testing.assert_array_equal(out.index, keep, err_msg=mode)
    np.testing.assert_allclose(out.logits, want, atol=ATOL, err_msg=mode)
    assert out.trace == (P + N + T,) * layer + (P + K + T,) * (DEPTH - layer)


@pytest.mark.parametrize('name', ('pyramiddrop', 'sparsevlm', 'dart'))
def test_inlm_prefix_padding_equals_unpadded(setup, name):
  """Example 2's prefix [pad, pad, bos, 5] run alone equals the unpadded [bos, 5]: the same kept set
  and answer (the padding is never read and moves no position, before or after a drop). FastV's
  padded prefixes are checked against its hand-written reference above."""
  model, params, visual = setup
  lm = inlm.LmHandle(params=params, model=model)
  run = jax.jit(lambda lm, v, pre: inlm.run(name, lm, v, SUFFIX[2:], SUFFIX[2:] > 0, K, 'renumber',
                                            prefix_ids=pre, prefix_valid=pre > 0))
  padded, plain = run(lm, visual[2:], jnp.asarray(PREFIX[2:])), run(lm, visual[2:], jnp.asarray(PREFIX[2:, 2:]))
  np.testing.assert_array_equal(padded[1], plain[1])
  np.testing.assert_allclose(padded[0], plain[0], atol=ATOL)


# --- Pruned generation with a prefix. ---------------------------------------------------------------

def test_pruned_generator_with_prefix():
  """PrunedGenerator with a prefix: the kept tokens of its pruner, then greedy decoding, equal the
  greedy tokens of the plain forward over prefix + gathered kept tokens + question, step by step."""
  config = inference_config()
  tok = runtime.tokenizer()
  model = runtime.make_model(config, tok)
  abstract = jax.eval_shape(functools.partial(vlm_lib.init_params, model), jax.random.PRNGKey(0))
  params = random_tree(abstract['params'], 0)
  prefix = (tok.bos_id, tok.sep_id, 7)
  gen = PrunedGenerator(config, model, params, tok, 'fastervlm', prefix_ids=prefix, batch_sizes=(2,))
  images = np.random.default_rng(1).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
  questions = ['how many digits are there?', 'what color is the 3?']
  steps = 3
  _, tokens = gen.generate(images, questions, budget=0.5, max_new_tokens=steps, return_tokens=True)

  q_ids, q_valid = gen._encode_questions(questions)
  k = gen.kept_tokens(0.5)[0]
  kept = jax.jit(functools.partial(gen.kept, k=k))({'params': params}, None, images, q_ids, q_valid,
                                                   np.full((2,), 0.5, np.float32), gen._request_keys(2))
  pre = np.broadcast_to(np.asarray(prefix, np.int32), (2, len(prefix)))
  fwd = jax.jit(lambda v, i, t, tv: model.apply({'params': params}, v, i, jnp.ones(i.shape, bool), t, tv,
                                                prefix_ids=pre, method='answer_logits'))
  text, valid = np.concatenate([q_ids, np.zeros((2, steps), np.int32)], 1), np.concatenate(
      [q_valid, np.zeros((2, steps), bool)], 1)
  for step in range(steps):
    # The question grown by the tokens so far, kept left-padded by rolling the buffer.
    shifted = np.roll(text, steps - step, axis=1), np.roll(valid, steps - step, axis=1)
    nxt = np.argmax(np.asarray(fwd(kept.tokens, kept.index, *shifted)), -1)
    np.testing.assert_array_equal(tokens[:, step], nxt, err_msg=f'step {step}')
    text[:, q_ids.shape[1] + step], valid[:, q_ids.shape[1] + step] = nxt, True
  assert gen.prefix_len == 3
  with pytest.raises(ValueError, match=r'prefix_ids=\(1, -2\): expected a sequence of token ids'):
    PrunedGenerator(config, model, params, tok, 'fastervlm', prefix_ids=(1, -2))
