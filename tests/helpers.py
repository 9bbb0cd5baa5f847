"""Shared test helpers: config loading and tiny configs."""

import os

from gripjax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg=None):
  """`get_config(arg)` of configs/NAME.py (configs/ is not a package)."""
  return config_lib.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'), arg)
