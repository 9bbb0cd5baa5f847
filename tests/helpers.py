"""Shared test helpers: config loading, tiny configs and the environment of a test's subprocess."""

import os

from gripjax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg=None):
  """`get_config(arg)` of configs/NAME.py (configs/ is not a package)."""
  return config_lib.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'), arg)


# The hand-countable cost geometry of tests/test_selection_costs.py and tests/test_prefix_train.py.
COST_VOCAB = 20


def cost_config():
  """N = 16 patches; LM width 16, depth 3, 2 query heads, 1 key-value head of 8, MLP 32; vocab 20."""
  c = load_config('gripbench_tiny')
  c.model.vit.update(dict(image_size=32, patch_size=8, width=8, depth=1, num_heads=2, mlp_dim=16,
                          feature_layer=-1))
  c.model.projector_hidden = 8
  c.model.llm.update(dict(vocab_size=COST_VOCAB, width=16, depth=3, num_heads=2, num_kv_heads=1,
                          mlp_dim=32, max_len=64))
  return c


def cost_lm_layer(length):
  """FLOPs of one decoder layer of `cost_config` over `length` slots: q, o (16 x 16) and k, v
  (16 x 8): 48 columns; SwiGLU 3 x (16 x 32); scores and weighted values 2 * 2 * L * L * 16."""
  return 2 * length * 16 * 48 + 2 * length * 16 * 32 * 3 + 2 * 2 * length * length * 16


# XLA options of every test's subprocess: the smoke programs are tiny, so compiling them fast (no
# backend optimization, no expensive LLVM passes) saves most of their run time and changes no test.
FAST_XLA = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
# Set by tests/conftest.py: the compilation cache this pytest process's subprocesses share.
CACHE_ENV = 'GRIPJAX_TEST_COMPILATION_CACHE'


def subprocess_env(devices: int | None = None, cache_dir: str | None = None) -> dict:
  """Environment of a `python -m gripjax.main` (or `-c`) subprocess of a test: the CPU platform,
  FAST_XLA (with `devices` simulated host devices where given) and JAX's persistent compilation cache
  in `cache_dir`, by default the directory tests/conftest.py made for this pytest process, so the
  programs several subprocesses compile alike (the smoke VLM's init, eval and train steps) compile
  once."""
  flags = FAST_XLA if devices is None else f'--xla_force_host_platform_device_count={devices} {FAST_XLA}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags)
  cache_dir = cache_dir or os.environ.get(CACHE_ENV)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env
