"""Analytic FLOPs and KV-cache bytes (`gripjax.models.costs`) against hand computations for the smoke config.

Run: .venv/bin/python -m pytest -q tests/test_efficiency.py

Smoke geometry (configs/gripbench_tiny.py:smoke): ViT 48 px / patch 8 -> N = 36 patches, width 32,
depth 2, MLP 64, feature_layer -2 (1 layer feeds the projector), projector hidden 32; LM width 32,
depth 2, 2 query heads and 1 KV head (Dh = 16), MLP 64. The vocabulary is passed as V = 60.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from gripjax.models import costs
from gripjax.models import vlm as vlm_lib
from tests import helpers
from tests.helpers import load_config
from tests.helpers import ROOT

V = 60


@pytest.fixture(scope='module')
def config():
  return load_config('gripbench_tiny', 'smoke')


def lm_layer_by_hand(length, context):
  # q, o: 32x32 each; k, v: 32x16 each -> 96 columns per token; SwiGLU: 3 matmuls of 32x64;
  # attention: scores and weighted values, 2 * 2 * L * C * 32.
  return 2 * length * 32 * 96 + 2 * length * 32 * 64 * 3 + 2 * 2 * length * context * 32


def test_prefill_flops(config):
  # <bos> + 9 visual + 16 text = 26 slots; 2 layers; LM head on the last slot: 2 * 32 * 60.
  by_hand = 2 * (6144 * 26 + 12288 * 26 + 128 * 26 * 26) + 3840
  assert by_hand == 2 * lm_layer_by_hand(26, 26) + 2 * 32 * V == 1135360
  assert costs.prefill_flops(config, 9, 16, V) == by_hand


def test_attention_probs_flops(config):
  # A ranking-only pass over 26 slots: q (32 x 32) and k (32 x 16) projections, scores 2 * 26 * 26 * 32.
  by_hand = 2 * 26 * 32 * 48 + 2 * 26 * 26 * 32
  assert by_hand == 79872 + 43264
  assert costs.attention_probs_flops(config, 26) == by_hand
  # The same terms as the full layer, which adds v, o, the MLP and the weighted values.
  assert lm_layer_by_hand(26, 26) - by_hand == 2 * 26 * 32 * 48 + 2 * 26 * 32 * 64 * 3 + 2 * 26 * 26 * 32


def test_kv_cache_bytes(config):
  # S = 1 + 36 + 16 + 4 = 57 slots; per slot and layer: k and v of 1 head x 16 values.
  assert costs.cache_len(36, 16, 4) == 57
  assert costs.kv_cache_bytes(config, 36, 16, 4) == 2 * 2 * 57 * 1 * 16 * 4 == 14592  # float32
  assert costs.kv_cache_bytes(config, 36, 16, 4, dtype_bytes=2) == 7296
  assert costs.kv_cache_bytes(config, 9, 16, 4) == 2 * 2 * 30 * 16 * 4  # 9 kept: S = 30
  config = config.copy_and_resolve_references()
  config.model.dtype = 'bfloat16'
  assert costs.kv_cache_bytes(config, 36, 16, 4) == 7296


def test_kv_cache_bytes_equal_the_cache_generation_allocates(config):
  """Bytes of the cache pytree `VLM.prefill` returns (abstract: nothing runs)."""
  model = vlm_lib.make_vlm(config.model, V)
  variables = jax.eval_shape(functools.partial(vlm_lib.init_params, model), jax.random.PRNGKey(0))
  k, t, m = 9, 16, 4
  visual = jax.ShapeDtypeStruct((1, k, 32), jnp.float32)
  index = jax.ShapeDtypeStruct((1, k), jnp.int32)
  valid = jax.ShapeDtypeStruct((1, k), jnp.bool_)
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  text_valid = jax.ShapeDtypeStruct((1, t), jnp.bool_)
  _, cache = jax.eval_shape(
      lambda *a: model.apply(*a, 'keep', 1 + k + t + m, method=vlm_lib.VLM.prefill),
      variables, visual, index, valid, ids, text_valid)
  nbytes = sum(x.size * x.dtype.itemsize for layer in cache['layers'] for x in layer.values())
  assert nbytes == costs.kv_cache_bytes(config, k, t, m)


def test_decode_and_generate_flops(config):
  # k = 9, T = 16, m = 4: S = 30 slots; each decode step runs one token against all 30.
  per_token = 2 * (6144 + 12288 + 128 * 30) + 3840
  assert per_token == 2 * lm_layer_by_hand(1, 30) + 2 * 32 * V == 48384
  assert costs.decode_token_flops(config, 9, 16, 4, V) == per_token
  assert costs.decode_token_flops(config, 9, 16, 4, V) == costs.decode_flops(config, 29, V)
  # The first token comes from prefill; 3 decode steps follow.
  assert costs.generate_flops(config, 9, 16, 4, V) == 1135360 + 3 * per_token
  assert costs.generate_flops(config, 9, 16, 1, V) == 1135360


def test_vision_flops(config):
  # 36 patches of 8 * 8 * 3 values -> width 32; 37 slots with [CLS]; MLP 64; projector 32 -> 32 -> 32.
  patch = 2 * 36 * 192 * 32
  layer = 2 * 37 * 32 * 4 * 32 + 2 * 37 * 32 * 64 * 2 + 2 * 2 * 37 * 37 * 32
  proj = 2 * 36 * (32 * 32 + 32 * 32)
  assert (patch, layer, proj) == (442368, 781440, 147456)
  assert costs.vision_flops(config) == patch + 2 * layer + proj  # both layers (HF's tower)
  assert costs.vision_feature_layers(config) == 1  # feature_layer -2 of 2 layers
  assert costs.vision_flops(config, 1) == patch + layer + proj == 1371264


def test_request_flops(config):
  out = costs.request_flops(config, 9, 16, 4, V, scorer=True)
  assert out['vision'] == 1371264
  assert out['scorer'] == costs.scorer_flops(config, 36, 16)
  assert out['prefill'] == 1135360 and out['decode'] == 3 * 48384
  assert out['total'] == sum(v for key, v in out.items() if key != 'total')
  assert costs.request_flops(config, 9, 16, 4, V)['scorer'] == 0


def test_scorer_flops_by_hand(config):
  # D = 32 (LM width), d = 64 (agent width), N = 36, T = 16, 17 rho features, 1 block, MLP ratio 2.
  d, n, t = 64, 36, 16
  proj = 2 * n * 32 * d + 2 * t * 32 * d
  cond = 2 * 17 * d + 2 * d * d * 2 + 2 * (2 * d * 2 * d)
  cross = 2 * n * d * d * 2 + 2 * 2 * t * d * d + 2 * 2 * n * t * d
  block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 2 * d
  assert costs.scorer_flops(config, n, t) == proj + cond + cross + block + 2 * n * d


@pytest.mark.parametrize('call, match', [
    (lambda c: costs.kv_cache_bytes(c, -1, 16, 4), 'kept_tokens=-1'),
    (lambda c: costs.kv_cache_bytes(c, 9, 16, 4, dtype_bytes=0), 'dtype_bytes=0'),
    (lambda c: costs.generate_flops(c, 9, 16, 0, V), 'new_tokens=0'),
    (lambda c: costs.vision_flops(c, 3), 'layers=3'),
    (lambda c: costs.attention_probs_flops(c, -2), 'length=-2'),
])
def test_bad_arguments(config, call, match):
  with pytest.raises(ValueError, match=match):
    call(config)


def test_prefill_benchmark_reports_the_agent_against_pruned_and_full_prefill(tmp_path, config):
  """Smoke run of benchmarks/prefill.py: the agent's share of the pruned and of the full prefill, in
  time and in FLOPs, side by side (timings are only checked for consistency, never for speed)."""
  out = tmp_path / 'prefill.json'
  run = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'prefill.py'),
                        '--config=configs/gripbench_tiny.py:smoke', '--batch=1', '--repeats=1',
                        '--budgets=0.25', f'--json={out}'], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=helpers.subprocess_env())
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'agent / pruned' in run.stdout and 'agent / full' in run.stdout
  result = json.loads(out.read_text())
  full, pruned = result['rows']  # the full prefill is added as the reference
  assert (full['kept_tokens'], pruned['kept_tokens']) == (36, 9)
  # The model's vocabulary is None in the config: the benchmark builds it with 64 entries.
  assert result['full_prefill_flops'] == costs.prefill_flops(config, 36, 16, 64)
  assert pruned['prefill_flops'] == 1135360 - 3840 + 2 * 32 * 64  # test_prefill_flops with V = 64
  # The agent: scorer + top_k(36, 9) = 36 * ceil(log2 10) comparisons.
  assert pruned['agent_flops'] == costs.scorer_flops(config, 36, 16) + 36 * 4
  assert pruned['agent_over_pruned_flops'] == pruned['agent_flops'] / pruned['prefill_flops']
  assert pruned['agent_over_full_flops'] == pruned['agent_flops'] / result['full_prefill_flops']
  assert pruned['agent_over_full_time'] == pytest.approx(pruned['agent_ms'] / result['full_prefill_ms'])
  assert pruned['agent_over_pruned_time'] == pytest.approx(pruned['agent_ms'] / pruned['prefill_ms'])
