"""Tests for gripjax.inference: pruned, bucketed generation on a tiny random VLM.

Run: .venv/bin/python -m pytest -q tests/test_inference.py

Each bucket function takes seconds to compile on a small CPU, so the tests share one generator and
reuse its compiled (k, batch size) functions; the comments say which ones each test adds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax import checks
from gripjax import runtime
from gripjax.inference import PrunedGenerator
from gripjax.models import scorer as scorer_lib
from gripjax.models import vlm as vlm_lib
from tests.helpers import load_config

N = 36  # (48 / 8) ** 2 visual tokens in the smoke geometry.
T = 8  # Question slots.
M = 4  # New tokens per request.
QUESTIONS = ('how many digits are there?', 'what color is the 3?', 'is there a 7 left of the 2?')


def tiny_config():
  c = load_config('gripbench_tiny', 'smoke')
  c.model.vit.update(depth=1, feature_layer=-1)  # One ViT layer: faster compiles.
  c.data.max_question_len = T
  return checks.check_config(c)


def random_tree(abstract, seed):
  """Random values for an abstract param tree, without running init (slow on a busy CPU).

  Kernels ~ N(0, 1 / fan_in) and unit-variance embeddings keep activations O(1), so greedy tokens
  differ between requests and budgets (a collapsed model answering <eos> everywhere would make every
  equality below trivial).
  """
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = path[-1].key
    if name == 'scale':
      return jnp.ones(x.shape, x.dtype)
    if name == 'bias':
      return jnp.zeros(x.shape, x.dtype)
    std = 1.0 if name == 'embedding' or x.ndim == 1 else float(np.prod(x.shape[:-1])) ** -0.5
    return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope='module')
def setup():
  """(config, tokenizer, vlm, params, images (3, 48, 48, 3), generator with the GRIP agent)."""
  config = tiny_config()
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  abstract = jax.eval_shape(functools.partial(vlm_lib.init_params, vlm), jax.random.PRNGKey(0))
  params = random_tree(abstract['params'], 0)
  scorer = scorer_lib.make_scorer(config)
  abstract = jax.eval_shape(
      lambda r: scorer_lib.init_scorer(scorer, r, N, config.model.llm.width, T), jax.random.PRNGKey(0))
  images = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
  gen = PrunedGenerator(config, vlm, params, tok, 'grip', random_tree(abstract, 2))
  return config, tok, vlm, params, images, gen


@pytest.fixture(scope='module')
def named(setup):
  """A generator with FasterVLM (compiles faster than the agent's, so the bucket tests use it)."""
  config, tok, vlm, params, *_ = setup
  return PrunedGenerator(config, vlm, params, tok, 'fastervlm')


@functools.lru_cache(maxsize=None)
def _reference_generate():
  return jax.jit(functools.partial(vlm_lib.generate, position_mode='keep', max_new_tokens=M, eos_id=2),
                 static_argnums=0)


def encode(setup, rows):
  """-> visual tokens (B, N, D), [CLS] attention (B, N), question ids and mask (B, T) of `rows`."""
  _, tok, vlm, params, images, _ = setup
  visual, cls_attn = _jitted_apply(vlm, 'encode_image')({'params': params}, jnp.asarray(images[rows]))
  ids, valid = (np.stack(x) for x in zip(*(tok.encode_question(QUESTIONS[r], T) for r in rows)))
  return visual, cls_attn, jnp.asarray(ids), jnp.asarray(valid)


@functools.lru_cache(maxsize=None)
def _jitted_apply(module, method):
  """jit of module.apply(variables, *args, method=method): one compile instead of many eager ops."""
  return jax.jit(functools.partial(module.apply, method=method))


def reference(setup, rows, index):
  """Unpruned `vlm.generate` on the visual tokens `index` (B, k) of images[rows], gathered by hand."""
  vlm, params = setup[2], setup[3]
  visual, _, ids, valid = encode(setup, rows)
  index = jnp.asarray(index, jnp.int32)
  tokens = jnp.take_along_axis(visual, index[..., None], axis=1)  # (B, k, D)
  out = _reference_generate()(vlm, {'params': params}, tokens, index, jnp.ones(index.shape, bool), ids,
                              valid)
  return np.asarray(out)


def top_k_sorted(scores, k):
  return np.sort(np.argsort(-np.asarray(scores), axis=1, kind='stable')[:, :k], axis=1)


def test_keep_all_equals_unpruned_generate(setup):
  """k = N: the agent keeps every token and the result equals `vlm.generate`. Compiles (36, 2)."""
  _, tok, _, _, images, gen = setup
  answers, ids = gen.generate(images[:2], list(QUESTIONS[:2]), 1.0, M, return_tokens=True)
  want = reference(setup, [0, 1], np.broadcast_to(np.arange(N), (2, N)))
  np.testing.assert_array_equal(ids, want)
  assert ids.shape == (2, M) and ids.dtype == np.int32
  assert answers == [tok.decode(row) for row in want]
  assert len(np.unique(ids)) > 2, f'degenerate random model: every token is one of {np.unique(ids)}'


def test_agent_generate_runs_on_its_kept_tokens_only(setup):
  """k < N: equals `vlm.generate` on the agent's top-k, scored with each request's rho. (9, 2)."""
  *_, images, gen = setup
  visual, _, ids, valid = encode(setup, [0, 1])
  rho = jnp.asarray([0.25, 0.24])  # both keep k = 9
  question = _jitted_apply(gen.vlm, 'embed_text')({'params': setup[3]}, ids)  # (B, T, D)
  scorer = gen._scorer  # pylint: disable=protected-access
  logits = _jitted_apply(scorer, '__call__')({'params': gen.agent_params}, visual, question, valid, rho)
  _, out = gen.generate(images[:2], list(QUESTIONS[:2]), rho.tolist(), M, return_tokens=True)
  np.testing.assert_array_equal(out, reference(setup, [0, 1], top_k_sorted(logits, 9)))
  _, full = gen.generate(images[:2], list(QUESTIONS[:2]), 1.0, M, return_tokens=True)
  assert not np.array_equal(out, full), 'pruning 3/4 of the tokens changed nothing: a weak test'


def test_named_pruner_runs_on_its_kept_tokens_only(setup, named):
  """FasterVLM ([CLS] attention top-k) through the PruneContext path. Compiles (9, 2)."""
  images = setup[4]
  _, cls_attn, _, _ = encode(setup, [0, 1])
  _, out = named.generate(images[:2], list(QUESTIONS[:2]), 0.25, M, return_tokens=True)
  np.testing.assert_array_equal(out, reference(setup, [0, 1], top_k_sorted(cls_attn, 9)))


def test_mixed_budgets_equal_per_request_results(setup, named):
  """Buckets k = 9 (rows 0 and 2; (9, 2) reused) and k = 36 (row 1); per-request calls add (9, 1)."""
  images, gen = setup[4], named
  budgets = [0.25, 1.0, 0.24]
  answers, ids = gen.generate(images, list(QUESTIONS), budgets, M, return_tokens=True)
  for i, rho in enumerate(budgets):
    one_answer, one = gen.generate(images[i:i + 1], [QUESTIONS[i]], rho, M, return_tokens=True)
    np.testing.assert_array_equal(ids[i], one[0], err_msg=f'request {i} (budget {rho})')
    assert answers[i] == one_answer[0]
  assert gen.kept_tokens(budgets, 3) == [9, 36, 9]


def test_compiled_cache_does_not_grow_after_warm_up(setup, named):
  images, gen = setup[4], named
  gen.generate(images, list(QUESTIONS), [0.25, 1.0, 0.25], M)  # warm-up (no-op if already compiled)
  before = gen.num_compiled()
  keys = gen.compiled_keys()
  for budgets in ([1.0, 0.25, 0.25], [0.25, 0.25, 1.0], [0.25, 1.0, 0.25], [1 / 4 + 1e-9, 1.0, 0.24]):
    gen.generate(images, list(QUESTIONS), budgets, M)
  gen.generate(images[:1], QUESTIONS[:1], 1.0, M)
  assert gen.num_compiled() == before and gen.compiled_keys() == keys
  assert all(k in (9, 36) and size in gen.batch_sizes for k, size, *_ in keys), keys


def test_buckets_pad_to_fixed_sizes_and_split(setup):
  """Sizes round up to the next allowed one; buckets above the largest are split."""
  config, tok, vlm, params, _, gen = setup
  small = PrunedGenerator(config, vlm, params, tok, 'fastervlm', batch_sizes=(2, 1))
  assert small.batch_sizes == (1, 2)
  assert [c.tolist() for c in small._chunks(np.arange(3))] == [[0, 1], [2]]  # pylint: disable=protected-access
  assert [gen._padded_size(n) for n in (1, 3, 5, 64)] == [1, 4, 8, 64]  # pylint: disable=protected-access


@pytest.mark.parametrize('budget, match', [
    (0.0, r'budget\[0\]=0.0 is out of range: expected a keep ratio rho in \(0, 1\]'),
    (-0.5, r'budget\[0\]=-0.5 is out of range'),
    (1.5, r'budget\[0\]=1.5 is out of range.*more than the image\'s N=36'),
    (float('nan'), r'budget\[0\]=nan'),
    ([0.5, 0.0, 0.5], r'budget\[1\]=0.0'),
    ([0.5, 0.5], r'budget has shape \(2,\); expected one keep ratio or B=3'),
    ('half', r"budget='half'"),
])
def test_bad_budgets(setup, budget, match):
  *_, images, gen = setup
  before = gen.num_compiled()
  with pytest.raises(ValueError, match=match):
    gen.generate(images, list(QUESTIONS), budget, M)
  assert gen.num_compiled() == before


@pytest.mark.parametrize('images, questions, kwargs, match', [
    (np.zeros((3, 32, 32, 3), np.uint8), QUESTIONS, {}, r'images have shape \(3, 32, 32, 3\); expected \(B, 48, 48, 3\)'),
    (np.zeros((48, 48, 3), np.uint8), QUESTIONS, {}, r'expected \(B, 48, 48, 3\)'),
    (np.zeros((3, 48, 48, 3), np.int32), QUESTIONS, {}, 'images have dtype int32; expected uint8'),
    (None, QUESTIONS[:2], {}, 'got 3 images but 2 questions'),
    (None, 'how many?', {}, 'questions must be a list'),
    (None, (QUESTIONS[0], '', QUESTIONS[2]), {}, r"questions\[1\]='': expected a non-empty question"),
    (None, QUESTIONS, {'max_new_tokens': 0}, 'max_new_tokens=0: expected a positive int'),
    (None, QUESTIONS, {'max_new_tokens': 60}, 'exceeds llm.max_len=72'),
])
def test_bad_requests(setup, images, questions, kwargs, match):
  *_, default_images, gen = setup
  images = default_images if images is None else images
  with pytest.raises(ValueError, match=match):
    gen.generate(images, list(questions) if not isinstance(questions, str) else questions, 0.5,
                 kwargs.get('max_new_tokens', M))


def test_bad_pruners(setup):
  config, tok, vlm, params, images, _ = setup
  with pytest.raises(ValueError, match="pruner='fastv' drops tokens inside the LM"):
    PrunedGenerator(config, vlm, params, tok, 'fastv')
  with pytest.raises(ValueError, match="pruner='grip' needs agent_params"):
    PrunedGenerator(config, vlm, params, tok, 'grip')
  with pytest.raises(ValueError, match="Unknown pruning method 'nope'"):
    PrunedGenerator(config, vlm, params, tok, 'nope')
  with pytest.raises(ValueError, match='batch_sizes'):
    PrunedGenerator(config, vlm, params, tok, 'fastervlm', batch_sizes=(0, 2))
  full = PrunedGenerator(config, vlm, params, tok, None)
  with pytest.raises(ValueError, match=r'budget\[1\]=0.5 with pruner=None: expected 1'):
    full.generate(images[:2], list(QUESTIONS[:2]), [1.0, 0.5], M)
  assert full.generate(images[:0], [], 1.0, M) == []

