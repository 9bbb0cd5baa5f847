"""Helpers for start-up config checks, and path resolution. A leaf: it imports nothing of gripjax.

Each package checks its own fields with these helpers (`check(config)` in `models/vlm.py`,
`data/pipeline.py`, `train/pretrain.py`, `train/step.py`, `train/sharding.py`, `rl/relaxation.py`,
`eval/evaluate.py`, `eval/ablations.py`, `demo.py`); `gripjax.checks.check_config` composes them and
is what `main` (every mode, `--mode=validate_config` included) and `export` call. Every check names
the field, the bad value and what was expected, so a wrong command-line override
(`--config.model.position_mode=kept`) fails before any compilation or data preparation.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Iterable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
  """A config field holds a value the code cannot run with."""


def fail(field: str, value: Any, expected: str):
  """Raises ConfigError: `config.FIELD=VALUE is invalid: expected EXPECTED.`"""
  raise ConfigError(f'config.{field}={value!r} is invalid: expected {expected}.')


def get(c, field: str):
  """c['a']['b'] for field 'a.b'."""
  node = c
  for part in field.split('.'):
    node = node[part]
  return node


def require_section(c, section: str, where: str = 'configs/gripbench_tiny.py'):
  if section not in c:
    raise ConfigError(f'config.{section} is missing: expected the section of {where}.')


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def integer(c, field: str, minimum: int = 1) -> int:
  """The int at `field`, checked >= minimum."""
  value = get(c, field)
  if not is_int(value) or value < minimum:
    fail(field, value, f'an integer >= {minimum}')
  return value


def number(c, field: str, minimum: float = 0.0, strict: bool = True) -> float:
  """The finite number at `field`, checked > minimum (strict) or >= minimum."""
  value = get(c, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not ok or (value <= minimum if strict else value < minimum):
    fail(field, value, f'a finite number {">" if strict else ">="} {minimum}')
  return value


def fraction(c, field: str) -> float:
  """The number at `field`, checked in [0, 1]."""
  value = get(c, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
    fail(field, value, 'a fraction in [0, 1]')
  return value


def choice(c, field: str, choices: Iterable[str]):
  value = get(c, field)
  if value not in tuple(choices):
    fail(field, value, f'one of {tuple(choices)}')
  return value


def keep_ratio(value, field: str) -> float:
  """`value` as a float after checking it is a keep ratio in (0, 1]."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not ok or not 0.0 < value <= 1.0:
    fail(field, value, 'a keep ratio in (0, 1]')
  return float(value)


def nonempty_tuple(c, field: str, what: str) -> tuple:
  value = get(c, field)
  if not isinstance(value, tuple) or not value:
    fail(field, value, f'a non-empty tuple of {what}')
  return value


# Nullable string fields: the command line cannot pass a Python None to a str field, so the
# strings 'None', 'none' and '' clear them (`--config.vlm_checkpoint=None`).
NULLABLE_STR_FIELDS = ('vlm_checkpoint', 'data.data_dir', 'agent.checkpoint',
                       'pretrain.init_vision_from', 'pretrain.init_from',
                       'export.dir')


def normalize_nullable(c) -> None:
  """Sets every nullable string field that reads 'None', 'none' or '' to None."""
  for field in NULLABLE_STR_FIELDS:
    *parents, leaf = field.split('.')
    node = c
    try:
      for part in parents:
        node = node[part]
      value = node[leaf]
    except KeyError:
      continue
    if isinstance(value, str) and value.strip() in ('None', 'none', ''):
      node[leaf] = None


def resolve_path(path: str | None) -> str | None:
  """Resolves a config path: absolute paths and None pass; relative ones are taken from the repo root."""
  if path is None or os.path.isabs(path) or path.startswith(('gs://', 's3://')):
    return path
  return os.path.join(REPO_ROOT, path)


def load_config_file(path: str, arg=None):
  """`get_config(arg)` of the config file at `path` (configs/ is not a package: files load by path,
  as ml_collections' config_flags loads them)."""
  name = 'config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
