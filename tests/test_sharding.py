"""Parameter sharding rules: every leaf placed, memory split, odd dims replicated, sharded == single.

Rules and byte counts are checked in this process on abstract meshes (no devices needed); the
sharded forward runs on 8 fake CPU devices in a subprocess, since XLA_FLAGS must be set before JAX
starts.
"""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gripjax.models import init_params, make_vlm
from gripjax.train import sharding
from gripjax.train import sharding_report
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 20  # Not a multiple of 8: the vocab dimension must stay replicated on 8-way axes.
MESHES = {  # 8 devices each, with a data axis as in training.
    'replicate': (('data', 8),),
    'fsdp': (('data', 2), ('fsdp', 4)),
    'tensor': (('data', 2), ('tensor', 4)),
    'fsdp_tensor': (('data', 2), ('fsdp', 2), ('tensor', 2)),
}
FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def tiny_config():
  c = helpers.load_config('gripbench_tiny')
  c.model.vit.update(dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64))
  c.model.projector_hidden = 32
  c.model.llm.update(dict(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                          max_len=64))
  return c


@functools.lru_cache(maxsize=None)
def tiny_abstract():
  vlm = make_vlm(tiny_config().model)
  return jax.eval_shape(functools.partial(init_params, vlm), jax.random.PRNGKey(0))['params']


def rules(strategy, **kw):
  return sharding.ShardingRules(strategy=strategy, **kw)


def spec_of(specs, path):
  """The spec at a '/'-joined path of a spec tree."""
  node = specs
  for k in path.split('/'):
    node = node[k]
  return node


@pytest.mark.parametrize('strategy', sharding.STRATEGIES)
def test_every_param_gets_a_sharding(strategy):
  abstract = tiny_abstract()
  mesh = sharding.abstract_mesh(MESHES[strategy], 8)
  shardings = sharding.param_shardings(abstract, mesh, rules(strategy, fsdp_min_size=0))
  split = sharding.check_all_sharded(abstract, shardings, mesh)
  assert jax.tree.structure(abstract) == jax.tree.structure(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  assert (split == 0) == (strategy == 'replicate')


def test_fsdp_holds_about_an_eighth():
  abstract = tiny_abstract()
  mesh = sharding.abstract_mesh((('data', 1), ('fsdp', 8)), 8)
  full = sharding.bytes_per_device(abstract, sharding.param_shardings(abstract, mesh, 'replicate'))
  assert full == 4 * sum(x.size for x in jax.tree.leaves(abstract))
  fsdp = sharding.bytes_per_device(abstract, sharding.param_shardings(abstract, mesh,
                                                                       rules('fsdp', fsdp_min_size=0)))
  assert full / 8 <= fsdp <= 1.05 * full / 8
  bf16 = sharding.bytes_per_device(abstract, sharding.param_shardings(abstract, mesh,
                                                                       rules('fsdp', fsdp_min_size=0)),
                                   dtype='bfloat16')
  assert bf16 * 2 == fsdp
  # With the default threshold every tiny leaf is "small": all of them stay replicated.
  default = sharding.param_shardings(abstract, mesh, 'fsdp')
  assert sharding.check_all_sharded(abstract, default, mesh) == 0


def test_megatron_layout_and_replicated_norms():
  specs = sharding.param_specs(tiny_abstract(), sharding.abstract_mesh(MESHES['tensor'], 8), 'tensor')
  assert spec_of(specs, 'llm/layers_0/self_attn/q_proj/kernel') == P(None, 'tensor')  # columns
  assert spec_of(specs, 'llm/layers_0/self_attn/k_proj/kernel') == P(None, 'tensor')  # 2 kv heads x 8
  assert spec_of(specs, 'llm/layers_0/self_attn/o_proj/kernel') == P('tensor', None)  # rows
  assert spec_of(specs, 'llm/layers_1/mlp/gate_proj/kernel') == P(None, 'tensor')
  assert spec_of(specs, 'llm/layers_1/mlp/down_proj/kernel') == P('tensor', None)
  assert spec_of(specs, 'vision/layers_0/mlp/fc1/kernel') == P(None, 'tensor')
  assert spec_of(specs, 'vision/layers_0/self_attn/out_proj/kernel') == P('tensor', None)
  assert spec_of(specs, 'projector/linear_2/kernel') == P('tensor', None)
  assert spec_of(specs, 'llm/embed_tokens/embedding') == P('tensor', None)  # 20 words over 4
  for path in ('llm/norm/scale', 'llm/layers_0/input_layernorm/scale', 'vision/layers_0/mlp/fc1/bias',
               'vision/embeddings/class_embedding'):
    assert all(e is None for e in spec_of(specs, path)), path


def test_indivisible_dims_stay_replicated():
  tree = {'llm': {'lm_head': {'kernel': jax.ShapeDtypeStruct((6, VOCAB), jnp.float32)},
                  'embed_tokens': {'embedding': jax.ShapeDtypeStruct((VOCAB, 12), jnp.float32)}},
          'odd': jax.ShapeDtypeStruct((3, 5), jnp.float32),
          'count': jax.ShapeDtypeStruct((), jnp.int32)}
  mesh8 = sharding.abstract_mesh((('data', 1), ('fsdp', 1), ('tensor', 8)), 8)
  specs = sharding.param_specs(tree, mesh8, 'tensor')
  assert spec_of(specs, 'llm/lm_head/kernel') == P(None, None)  # 20 % 8 != 0
  mesh = sharding.abstract_mesh((('data', 1), ('fsdp', 2), ('tensor', 4)), 8)
  specs = sharding.param_specs(tree, mesh, rules('fsdp_tensor', fsdp_min_size=0))
  assert spec_of(specs, 'llm/lm_head/kernel') == P('fsdp', 'tensor')  # vocab over tensor, 6 over fsdp
  assert spec_of(specs, 'llm/embed_tokens/embedding') == P('tensor', 'fsdp')
  assert spec_of(specs, 'odd') == P(None, None)
  assert spec_of(specs, 'count') == P()
  shardings = sharding.param_shardings(tree, mesh, rules('fsdp_tensor', fsdp_min_size=0))
  sharding.check_all_sharded(tree, shardings, mesh)
  assert sharding.bytes_per_device(tree, shardings) == 4 * (6 * 20 // 8 + 20 * 12 // 8 + 15) + 4


def test_agent_state_and_optimizer_moments_follow_the_params():
  from gripjax.models import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
  from gripjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.agent.update(dict(width=16, depth=1, num_heads=2))
  scorer = scorer_lib.make_scorer(c)
  init = step_lib.make_init(scorer, step_lib.make_optimizer(c), c, 16, 32, 6)
  state = jax.eval_shape(init, jax.random.PRNGKey(0))
  mesh = sharding.abstract_mesh(MESHES['fsdp'], 8)
  specs = sharding.param_specs(state, mesh, rules('fsdp', fsdp_min_size=0))
  by_path = {sharding.path_str(p): s for p, s in
             jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))}
  params = [k for k in by_path if k.startswith('params/')]
  assert any(any(e is not None for e in by_path[k]) for k in params)
  for k in params:
    rest = k[len('params/'):]
    moments = [v for p, v in by_path.items() if p.endswith('/' + rest) and '/mu/' in p or
               p.endswith('/' + rest) and '/nu/' in p]
    assert moments and all(m == by_path[k] for m in moments), k
    assert by_path['ref_params/' + rest] == by_path[k]
  assert by_path['step'] == P() and by_path['rng'] == P(None)


def test_config_section_and_start_up_errors():
  c = tiny_config()
  assert sharding.sharding_config(c).vlm_params == 'replicate'  # No section yet: the defaults.
  c.train.sharding = sharding.default_sharding_config()
  c.train.sharding.vlm_params = 'fsdp'
  c.train.mesh = (('data', -1), ('fsdp', 2))
  sharding.check(c, num_devices=4)
  assert sharding.rules_from_config(c, 'vlm_params').strategy == 'fsdp'
  c.train.sharding.agent_params = 'tensor'
  with pytest.raises(ValueError, match=r"config.train.sharding.agent_params='tensor' is invalid.*"
                     r"\['tensor'\]"):
    sharding.check(c, num_devices=4)
  c.train.sharding.agent_params = 'zero3'
  with pytest.raises(ValueError, match=r"config.train.sharding.agent_params='zero3' is invalid: "
                     r"expected one of"):
    sharding.check(c, num_devices=4)
  c.train.sharding.agent_params = 'replicate'
  c.train.sharding.param_axes = ((r'q_proj/kernel$', 'embed heads'),)
  with pytest.raises(ValueError, match=r'config.train.sharding.param_axes\[0\]=.* is invalid'):
    sharding.check(c, num_devices=4)
  with pytest.raises(ValueError, match=r"names 1 dimensions, but 'w' has 2"):
    sharding.param_specs({'w': jnp.zeros((4, 4))}, sharding.abstract_mesh((('tensor', 2),), 2),
                         rules('tensor', param_axes=((r'^w$', ('heads',)),)))
  with pytest.raises(ValueError, match=r"'fsdp'.* needs the mesh axes \['fsdp'\]"):
    sharding.param_specs({'w': jnp.zeros((4, 4))}, sharding.abstract_mesh((('data', 2),), 2), 'fsdp')


def test_parse_mesh():
  assert sharding_report.parse_mesh('data=1,fsdp=8') == (('data', 1), ('fsdp', 8))
  assert sharding_report.parse_mesh('data=-1') == (('data', -1),)
  for bad in ('data:8', 'data=x', '=4', ''):
    with pytest.raises(ValueError, match='is invalid: expected comma-separated axis=size'):
      sharding_report.parse_mesh(bad)


def test_report_skips_strategies_the_mesh_cannot_hold():
  lines = []
  rows = sharding_report.report(tiny_config(), 8, (('data', 2), ('fsdp', 4)), print_fn=lines.append)
  assert [r['strategy'] for r in rows] == list(sharding.STRATEGIES)
  assert 'skipped' in rows[2] and 'skipped' in rows[3] and rows[1]['ratio'] == 1.0  # Tiny: all small.


# --- 8 fake CPU devices, in a subprocess. --------------------------------------------------------

def eight_device_main():
  """Sharded forward vs unsharded, and bytes on real devices; prints one JSON line."""
  assert jax.device_count() == 8, jax.devices()
  c = tiny_config()
  vlm = make_vlm(c.model)
  rng = np.random.default_rng(0)
  # Random values straight from numpy: compiling init would take longer than the whole test.
  params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(a.dtype), tiny_abstract())
  pixels = rng.uniform(size=(8, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(3, VOCAB, size=(8, 5)).astype(np.int32)
  forward = lambda p, x, t: vlm.apply({'params': p}, x, t)
  expected = np.asarray(jax.jit(forward, compiler_options=FAST)(params, pixels, ids))
  out = {}
  for strategy, spec in MESHES.items():
    names, sizes = sharding.mesh_shape(spec, 8)
    mesh = jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
    shardings = sharding.param_shardings(params, mesh, rules(strategy, fsdp_min_size=0))
    placed = jax.device_put(params, shardings)
    data = sharding.data_sharding(mesh)
    if strategy == 'replicate':
      got = expected  # Nothing split: the same program as the unsharded one.
    else:
      got = jax.jit(forward, in_shardings=(shardings, data, data), compiler_options=FAST)(
          placed, jax.device_put(pixels, data), jax.device_put(ids, data))
    abstract = sharding.abstract_mesh(spec, 8)
    out[strategy] = dict(
        max_abs_diff=float(np.max(np.abs(np.asarray(got) - expected))),
        bytes=sharding.bytes_per_device(placed, shardings),
        bytes_abstract=sharding.bytes_per_device(
            params, sharding.param_shardings(params, abstract, rules(strategy, fsdp_min_size=0))),
        device_bytes=max(sum(s.data.nbytes for leaf in jax.tree.leaves(placed)
                             for s in leaf.addressable_shards if s.device == d) for d in jax.devices()),
        q_shard=list(placed['llm']['layers_0']['self_attn']['q_proj']['kernel']
                     .addressable_shards[0].data.shape))
  print(json.dumps(out))


@pytest.fixture(scope='module')
def eight_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  code = 'from tests.test_sharding import eight_device_main; eight_device_main()'
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_sharded_forward_equals_unsharded(eight_devices):
  for strategy, res in eight_devices.items():
    assert res['max_abs_diff'] < 1e-4, (strategy, res)
  assert eight_devices['fsdp']['q_shard'] == [8, 32]  # (32, 32) split 4-way over fsdp
  assert eight_devices['tensor']['q_shard'] == [32, 8]
  assert eight_devices['fsdp_tensor']['q_shard'] == [16, 16]
  assert eight_devices['replicate']['q_shard'] == [32, 32]


def test_bytes_per_device_matches_the_placed_shards(eight_devices):
  for strategy, res in eight_devices.items():
    assert res['bytes'] == res['device_bytes'] == res['bytes_abstract'], (strategy, res)
  assert eight_devices['fsdp']['bytes'] < 0.3 * eight_devices['replicate']['bytes']


def test_7b_report_without_weights():
  """The entry point on the LLaVA-1.5-7B geometry: every leaf sharded, fsdp ~1/8 of replicated."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # One CPU device: the 8-device mesh is abstract.
  r = subprocess.run([sys.executable, '-m', 'gripjax.train.sharding_report',
                      '--config=configs/llava_1p5_7b.py'], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert '7,062,902,784 scalars' in r.stdout and 'abstract mesh' in r.stdout, r.stdout
  rows = {m.group(1): m.groups() for m in re.finditer(
      r'^(\w+)\s+(\S+)\s+(\d+)/(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$', r.stdout, re.M)}
  assert set(rows) == set(sharding.STRATEGIES), r.stdout
  assert float(rows['replicate'][4]) == pytest.approx(26.311, abs=1e-3)  # GiB f32 per device
  for strategy in ('fsdp', 'tensor', 'fsdp_tensor'):
    assert 0.125 <= float(rows[strategy][6]) < 0.13, rows[strategy]
    assert float(rows[strategy][5]) * 2 == pytest.approx(float(rows[strategy][4]), abs=2e-3)


def test_config_section_overrides_from_the_command_line(tmp_path):
  """A config with `train.sharding = default_sharding_config()` takes `--config.train.sharding.*`."""
  config_file = tmp_path / 'with_sharding.py'
  config_file.write_text(
      'from gripjax.train import sharding\n'
      'from tests import helpers\n\n\n'
      'def get_config(arg=None):\n'
      '  c = helpers.load_config("gripbench_tiny", arg)\n'
      '  c.train.sharding = sharding.default_sharding_config()\n'
      '  return c\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  r = subprocess.run([sys.executable, '-m', 'gripjax.train.sharding_report', f'--config={config_file}',
                      '--config.train.sharding.fsdp_min_size=0', '--mesh=data=2,fsdp=4',
                      '--strategies=replicate,fsdp'], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  fsdp = re.search(r'^fsdp\s+data=2,fsdp=4\s+(\d+)/(\d+)\s+\S+\s+\S+\s+([\d.]+)$', r.stdout, re.M)
  assert fsdp and int(fsdp.group(1)) > 0 and float(fsdp.group(3)) < 0.3, r.stdout
