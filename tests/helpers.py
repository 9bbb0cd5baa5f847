"""Shared test helpers: config loading and tiny configs."""

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
