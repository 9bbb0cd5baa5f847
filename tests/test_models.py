"""Invariants of the VLM: kept-all == unpruned, masked == dropped, padding, KV cache, batching."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax.models import VLM, count_params, generate, init_params, make_vlm
from gripjax.models.llm import rope

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5
N = 16  # Visual tokens of the tiny geometry: (32 / 8) ** 2.
MODES = ('keep', 'renumber')


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_model_config():
  m = load_config('gripbench_tiny').model
  m.vit.update(dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64))
  m.projector_hidden = 32
  m.llm.update(dict(vocab_size=20, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=64))
  return m


@functools.lru_cache(maxsize=None)
def jitted(model, method, *static):
  """`model.apply(variables, *args, *static, method=method)`, compiled once per (method, static)."""
  return jax.jit(lambda variables, *args: model.apply(variables, *args, *static, method=method))


def fwd(model, params, visual, index, valid, ids, text_valid, mode='keep'):
  return jitted(model, 'forward', mode)(params, visual, index, valid, ids, text_valid)


# Shared shapes keep the number of compilations (the cost of this file) small.
IDS_ALL = np.array([[3, 4, 5, 6, 7]] * 3, np.int32)  # (3, 5), no padding.
IDS = np.array([[3, 4, 5, 6, 7], [0, 4, 5, 6, 7], [0, 0, 0, 6, 7]], np.int32)  # (3, 5), left-padded text.
DROPPED = np.ones((3, N), bool)  # Kept-slot mask with a different k per example.
DROPPED[0, 3:9] = DROPPED[2, ::2] = False


def full_slots(b):
  return jnp.broadcast_to(jnp.arange(N), (b, N)), jnp.ones((b, N), bool)


@pytest.fixture(scope='module')
def setup():
  model = make_vlm(tiny_model_config())
  pixels = jax.random.randint(jax.random.key(1), (3, 32, 32, 3), 0, 256).astype(jnp.uint8)
  # init_params' shapes are checked on the 7B config; here init also returns the unpruned logits
  # of IDS_ALL, which saves compiling the whole model twice.
  unpruned, params = jax.jit(model.init_with_output)(jax.random.key(0), pixels, IDS_ALL)
  visual, cls_attn = jitted(model, 'encode_image')(params, pixels)
  return model, params, pixels, visual, cls_attn, unpruned


def subset(visual, k=8):
  """Per example, k kept slots out of N (sorted source indices): gathered tokens, index, mask over N."""
  rng = np.random.default_rng(0)
  index = np.sort(np.stack([rng.permutation(N)[:k] for _ in range(visual.shape[0])]), axis=1)
  mask = np.zeros((visual.shape[0], N), bool)
  np.put_along_axis(mask, index, True, axis=1)
  gathered = jnp.take_along_axis(visual, jnp.asarray(index)[..., None], axis=1)  # (B, k, D)
  return gathered, jnp.asarray(index), jnp.asarray(mask)


def reference_llm(p, h, positions, heads, theta=10000.0, eps=1e-5):
  """Independent numpy Llama (HF semantics: repeat_kv, rotate_half); every slot valid, causal."""
  p = jax.tree_util.tree_map(np.asarray, p)
  h = np.asarray(h, np.float64)
  length = h.shape[1]
  pos = np.asarray(positions, np.float64)

  def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

  def rot(x):  # x: (B, L, H, Dh)
    dh = x.shape[-1]
    ang = pos[..., None] * theta ** (-np.arange(0, dh, 2) / dh)
    ang = np.concatenate([ang, ang], -1)[:, :, None]
    half = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], -1)
    return x * np.cos(ang) + half * np.sin(ang)

  i = 0
  while f'layers_{i}' in p:
    lp = p[f'layers_{i}']
    a = lp['self_attn']
    x = rms(h, lp['input_layernorm']['scale'])
    q = x @ a['q_proj']['kernel']
    k = x @ a['k_proj']['kernel']
    v = x @ a['v_proj']['kernel']
    dh = q.shape[-1] // heads
    kvh = k.shape[-1] // dh
    q = rot(q.reshape(*q.shape[:2], heads, dh))  # (B, L, H, Dh)
    k = np.repeat(rot(k.reshape(*k.shape[:2], kvh, dh)), heads // kvh, axis=2)  # (B, L, H, Dh)
    v = np.repeat(v.reshape(*v.shape[:2], kvh, dh), heads // kvh, axis=2)  # (B, L, H, Dh)
    s = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(dh)
    s = np.where(np.tril(np.ones((length, length), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum('bhqk,bkhd->bqhd', w, v).reshape(h.shape[0], length, heads * dh)  # (B, L, D)
    h = h + o @ a['o_proj']['kernel']
    x = rms(h, lp['post_attention_layernorm']['scale'])
    g = x @ lp['mlp']['gate_proj']['kernel']
    g = g / (1 + np.exp(-g)) * (x @ lp['mlp']['up_proj']['kernel'])
    h = h + g @ lp['mlp']['down_proj']['kernel']
    i += 1
  return rms(h, p['norm']['scale']) @ p['lm_head']['kernel']


def test_full_keep_equals_unpruned_and_reference(setup):
  model, params, _, visual, _, unpruned = setup
  ids = IDS_ALL
  index, valid = full_slots(3)
  for mode in MODES:  # Nothing dropped: both position modes are the unpruned sequence.
    np.testing.assert_allclose(fwd(model, params, visual, index, valid, ids, ids > 0, mode), unpruned, atol=ATOL)
  # By hand: [bos] + V + text embeddings at positions 0..L-1, through an independent numpy decoder.
  emb = params['params']['llm']['embed_tokens']['embedding']
  h = np.concatenate([emb[np.full((3, 1), 1)], visual, emb[ids]], axis=1)
  positions = np.broadcast_to(np.arange(h.shape[1]), h.shape[:2])
  np.testing.assert_allclose(reference_llm(params['params']['llm'], h, positions, heads=4), unpruned, atol=1e-4)


def test_masked_equals_physically_dropped(setup):
  model, params, _, visual, *_ = setup
  gathered, index, mask = subset(visual)
  text = IDS > 0
  out = {}
  index_all, _ = full_slots(3)
  for mode in MODES:
    masked = fwd(model, params, visual, index_all, mask, IDS, text, mode)
    dropped = fwd(model, params, gathered, index, jnp.ones(index.shape, bool), IDS, text, mode)
    for b in range(3):
      np.testing.assert_allclose(masked[b, 1 + N:][text[b]], dropped[b, 1 + 8:][text[b]], atol=ATOL)
    out[mode] = masked
  # Dropping tokens: the two modes give different positions, hence different logits.
  assert np.abs(np.asarray(out['keep'] - out['renumber'])[:, -2:]).max() > 1e-4


def test_left_padding_equals_unpadded(setup):
  model, params, _, visual, *_ = setup
  gathered, index, _ = subset(visual)
  valid = jnp.ones(index.shape, bool).at[:, -1].set(False)  # An unused slot as well.
  padded = jnp.array([[0, 0, 5, 6, 7]] * 3)
  plain = padded[:, 2:]
  a = fwd(model, params, gathered, index, valid, padded, padded > 0)
  b = fwd(model, params, gathered, index, valid, plain, plain > 0)
  np.testing.assert_allclose(a[:, -3:], b[:, -3:], atol=ATOL)


def test_batch_equals_per_example(setup):
  model, params, _, visual, *_ = setup
  index, _ = full_slots(3)
  batch = fwd(model, params, visual, index, DROPPED, IDS, IDS > 0)
  key_valid = np.concatenate([np.ones((3, 1), bool), DROPPED, IDS > 0], axis=1)
  for b in range(3):
    alone = fwd(model, params, visual[b:b + 1], index[b:b + 1], DROPPED[b:b + 1], IDS[b:b + 1], IDS[b:b + 1] > 0)
    np.testing.assert_allclose(batch[b][key_valid[b]], alone[0][key_valid[b]], atol=ATOL)


@pytest.mark.parametrize('mode', MODES)
def test_kv_cache_decode_equals_recompute(setup, mode):
  model, params, _, visual, *_ = setup
  index, _ = full_slots(3)
  steps = 3
  # eos_id left traced so that both calls below share one compilation.
  gen = jax.jit(functools.partial(generate, model), static_argnames=('position_mode', 'max_new_tokens'))
  tokens = gen(params, visual, index, DROPPED, IDS, IDS > 0, position_mode=mode, max_new_tokens=steps, eos_id=-1)
  assert tokens.shape == (3, steps)

  # Recompute the whole sequence at every step. The tokens generated so far are appended to a
  # left-padded buffer of fixed length, so every step reuses one compilation.
  logits, cache = jitted(model, 'prefill', mode, 1 + N + 5 + steps)(params, visual, index, DROPPED, IDS, IDS > 0)
  for step in range(steps):
    text = jnp.concatenate([jnp.zeros((3, steps - step), IDS.dtype), IDS, tokens[:, :step]], axis=1)
    text_valid = jnp.concatenate([jnp.zeros((3, steps - step), bool), IDS > 0, jnp.ones((3, step), bool)], axis=1)
    full = fwd(model, params, visual, index, DROPPED, text, text_valid, mode)[:, -1]
    np.testing.assert_allclose(logits, full, atol=ATOL)
    np.testing.assert_array_equal(tokens[:, step], jnp.argmax(full, -1))
    logits, cache = jitted(model, 'decode_step')(params, cache, tokens[:, step])

  # After eos every token is eos: make the first generated token of example 0 the eos.
  eos = tokens[0, 0]
  after = gen(params, visual, index, DROPPED, IDS, IDS > 0, position_mode=mode, max_new_tokens=steps, eos_id=eos)
  np.testing.assert_array_equal(after[0], np.full(steps, eos))
  np.testing.assert_array_equal(after[1:, 0], tokens[1:, 0])


def test_gqa_and_rope_relative_positions(setup):
  model, params, _, visual, *_ = setup
  assert model.config.llm.num_kv_heads < model.config.llm.num_heads
  assert params['params']['llm']['layers_0']['self_attn']['k_proj']['kernel'].shape == (32, 16)
  # RoPE: q.k depends only on the position difference.
  q, k = jax.random.normal(jax.random.key(2), (2, 1, 5, 2, 8))
  score = lambda pq, pk: jnp.einsum('bqhd,bkhd->bhqk', rope(q, jnp.array([[pq] * 5]), 1e4),
                                    rope(k, jnp.array([[pk] * 5]), 1e4))
  np.testing.assert_allclose(score(3, 7), score(40, 44), atol=1e-4)
  assert np.abs(score(3, 7) - score(3, 8)).max() > 1e-3
  # In-LM hooks: running [0, 1) then [1, 2) equals the forward; attention rows sum to one.
  index, valid = full_slots(3)

  def split_forward(m, *args):
    h, positions, key_valid = m.assemble(*args)
    h, attn = m.run_layers(h, positions, key_valid, 0, 1, attn_layer=0)
    h, _ = m.run_layers(h, positions, key_valid, 1, 2)
    return m.logits(h), attn

  logits, attn = jax.jit(functools.partial(model.apply, method=split_forward))(
      params, visual, index, valid, IDS, IDS > 0)
  assert attn.shape == (3, 4, 1 + N + 5, 1 + N + 5)
  np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(logits, fwd(model, params, visual, index, valid, IDS, IDS > 0), atol=ATOL)


def test_vision_tower(setup):
  model, params, pixels, visual, cls_attn, _ = setup
  assert visual.shape == (3, N, 32) and cls_attn.shape == (3, N)
  assert np.all(cls_attn > 0) and np.all(cls_attn.sum(-1) < 1)  # The CLS column is left out.
  features = jitted(model, 'vision_features')
  out = features(params, pixels.astype(jnp.float32) / 255)
  np.testing.assert_allclose(model.apply(params, out['features'], method=VLM.project), visual, atol=ATOL)
  assert out['pooled'].shape == (3, 32)
  # feature_layer=-2 of depth 2 is the output of layer 0: the last layer changes only `pooled`.
  bumped = jax.tree_util.tree_map(lambda x: x, params)
  bumped['params']['vision']['layers_1'] = jax.tree_util.tree_map(
      lambda x: x + 0.5, params['params']['vision']['layers_1'])
  other = features(bumped, pixels.astype(jnp.float32) / 255)
  np.testing.assert_allclose(other['features'], out['features'], atol=ATOL)
  np.testing.assert_allclose(other['cls_attn'], out['cls_attn'], atol=ATOL)
  assert np.abs(other['pooled'] - out['pooled']).max() > 1e-3


def test_bad_inputs(setup):
  model, params, pixels, visual, *_ = setup
  enc = functools.partial(model.apply, params, method=VLM.encode_image)
  with pytest.raises(ValueError, match=r'\(3, 30, 32, 3\).*\(B, 32, 32, 3\)'):
    enc(jnp.zeros((3, 30, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match=r'\(3, 32, 32, 4\)'):
    enc(jnp.zeros((3, 32, 32, 4), jnp.uint8))
  with pytest.raises(ValueError, match=r'\(32, 32, 3\)'):
    enc(jnp.zeros((32, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match='float16.*uint8.*float32'):
    enc(pixels.astype(jnp.float16))
  index, valid = full_slots(3)
  args = (params, visual, index, valid, IDS, IDS > 0)
  with pytest.raises(ValueError, match="'kept'.*'keep', 'renumber'"):
    fwd(model, *args, 'kept')
  with pytest.raises(ValueError, match=r'cache_len=10.*\[22, 64\]'):
    model.apply(*args, 'keep', 10, method=VLM.prefill)
  with pytest.raises(ValueError, match=r'cache_len=23.*>= 1 \+ k \+ T \+ max_new_tokens = 24'):
    generate(model, *args, max_new_tokens=2, eos_id=0, cache_len=23)
  with pytest.raises(ValueError, match=r'visual has shape \(3, 16, 8\); expected \(\?, \?, 32\)'):
    fwd(model, params, visual[..., :8], index, valid, IDS, IDS > 0)
  with pytest.raises(ValueError, match='vocab_size=0'):
    make_vlm(load_config('gripbench_tiny').model)


def test_llava_7b_shapes_without_allocating():
  config = load_config('llava_1p5_7b')
  model = make_vlm(config.model)
  variables = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
  n = count_params(variables)
  assert 6.9e9 <= n <= 7.2e9, n
  pixels = jax.ShapeDtypeStruct((1, 336, 336, 3), jnp.uint8)
  visual, cls_attn = jax.eval_shape(functools.partial(model.apply, method=VLM.encode_image), variables, pixels)
  assert visual.shape == (1, 576, 4096) and cls_attn.shape == (1, 576)
  assert visual.dtype == jnp.bfloat16
  # Greedy generation traces at full scale with half the tokens kept.
  slots = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype)
  tokens = jax.eval_shape(lambda *a: generate(model, *a, max_new_tokens=4, eos_id=2), variables,
                          slots(jnp.bfloat16, 2, 288, 4096), slots(jnp.int32, 2, 288), slots(bool, 2, 288),
                          slots(jnp.int32, 2, 16), slots(bool, 2, 16))
  assert tokens.shape == (2, 4) and tokens.dtype == jnp.int32
