"""Start-up validation of ml_collections configs and path resolution.

Every check names the field, the bad value and what was expected, so a wrong command-line override
(`--config.model.position_mode=kept`) fails before any compilation or data preparation.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

POSITION_MODES = ('keep', 'renumber')
DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """A config field holds a value the code cannot run with."""


def _fail(field: str, value: Any, expected: str):
  raise ConfigError(f'config.{field}={value!r} is invalid: expected {expected}.')


def _positive_int(c, field: str, allow_zero: bool = False):
  value = _get(c, field)
  ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    _fail(field, value, 'a non-negative integer' if allow_zero else 'a positive integer')


def _positive_float(c, field: str):
  value = _get(c, field)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
    _fail(field, value, 'a positive finite number')


def _choice(c, field: str, choices: Iterable[str]):
  value = _get(c, field)
  if value not in tuple(choices):
    _fail(field, value, f'one of {tuple(choices)}')


def _get(c, field: str):
  node = c
  for part in field.split('.'):
    node = node[part]
  return node


def validate_budget(rho, what: str = 'budget') -> float:
  """Returns rho as a float after checking it is a keep ratio in (0, 1]."""
  try:
    value = float(rho)
  except (TypeError, ValueError):
    raise ValueError(f'{what}={rho!r} is invalid: expected a keep ratio in (0, 1].') from None
  if not math.isfinite(value) or value <= 0.0 or value > 1.0:
    raise ValueError(f'{what}={rho!r} is invalid: expected a keep ratio in (0, 1].')
  return value


def validate_model(c: ml_collections.ConfigDict):
  """Checks the `model` section (geometry and modes)."""
  for f in ('image_size', 'patch_size', 'width', 'depth', 'num_heads', 'mlp_dim'):
    _positive_int(c, f'model.vit.{f}')
  vit = c.model.vit
  if vit.image_size % vit.patch_size:
    _fail('model.vit.image_size', vit.image_size,
          f'a multiple of model.vit.patch_size={vit.patch_size}')
  if vit.width % vit.num_heads:
    _fail('model.vit.num_heads', vit.num_heads, f'a divisor of model.vit.width={vit.width}')
  if not isinstance(vit.feature_layer, int) or not -vit.depth <= vit.feature_layer <= vit.depth or \
      vit.feature_layer == 0:
    _fail('model.vit.feature_layer', vit.feature_layer,
          f'a non-zero layer index in [-{vit.depth}, {vit.depth}] (HF hidden_states indexing)')
  _positive_int(c, 'model.projector_hidden')
  _positive_int(c, 'model.llm.vocab_size', allow_zero=True)
  for f in ('width', 'depth', 'num_heads', 'num_kv_heads', 'mlp_dim', 'max_len'):
    _positive_int(c, f'model.llm.{f}')
  llm = c.model.llm
  if llm.width % llm.num_heads:
    _fail('model.llm.num_heads', llm.num_heads, f'a divisor of model.llm.width={llm.width}')
  if (llm.width // llm.num_heads) % 2:
    _fail('model.llm.num_heads', llm.num_heads, 'a head size (width / num_heads) that is even, for RoPE')
  if llm.num_heads % llm.num_kv_heads:
    _fail('model.llm.num_kv_heads', llm.num_kv_heads,
          f'a divisor of model.llm.num_heads={llm.num_heads} (grouped-query attention)')
  _positive_float(c, 'model.llm.rope_theta')
  n_visual = (vit.image_size // vit.patch_size) ** 2
  if llm.max_len <= n_visual + 2:
    _fail('model.llm.max_len', llm.max_len, f'more than the {n_visual} visual tokens plus <bos> and a prompt')
  _choice(c, 'model.position_mode', POSITION_MODES)
  _choice(c, 'model.dtype', DTYPES)


# Nullable string fields: the command line cannot pass a Python None to a str field, so the
# strings 'None', 'none' and '' clear them (`--config.vlm_checkpoint=None`).
NULLABLE_STR_FIELDS = ('vlm_checkpoint', 'data.data_dir', 'agent.checkpoint',
                       'pretrain.init_vision_from', 'pretrain.init_from',
                       'export.dir')


def _normalize_nullable(c: ml_collections.ConfigDict):
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


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates a whole config at start-up (clearing nullable fields set to 'None'); returns it."""
  _normalize_nullable(c)
  validate_model(c)
  if 'data' in c:
    for f in ('num_train', 'num_validation', 'num_test', 'max_question_len'):
      _positive_int(c, f'data.{f}')
    _positive_int(c, 'data.seed', allow_zero=True)
  if 'pretrain' in c:
    for f in ('batch_size', 'log_every', 'eval_examples', 'lm_cycles'):
      _positive_int(c, f'pretrain.{f}')
    for f in ('vision_steps', 'lm_steps', 'warmup_steps'):
      _positive_int(c, f'pretrain.{f}', allow_zero=True)
    for f in ('vision_lr', 'lr'):
      _positive_float(c, f'pretrain.{f}')
    _positive_int(c, 'pretrain.ground_heads', allow_zero=True)
    if c.pretrain.ground_heads > c.model.llm.num_heads:
      _fail('pretrain.ground_heads', c.pretrain.ground_heads,
            f'at most model.llm.num_heads={c.model.llm.num_heads}')
    for f in ('ground_weight', 'spatial_weight'):
      value = c.pretrain[f]
      if not isinstance(value, (int, float)) or value < 0:
        _fail(f'pretrain.{f}', value, 'a non-negative number')
    for f in ('token_curriculum', 'curriculum_min_keep', 'background_dropout'):
      value = c.pretrain[f]
      if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        _fail(f'pretrain.{f}', value, 'a fraction in [0, 1]')
  if 'train' in c:
    from gripjax.train import sharding  # pylint: disable=g-import-not-at-top
    from gripjax.train import step  # pylint: disable=g-import-not-at-top
    step.validate_config(c)
    try:
      sharding.validate_config(c)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    if 'algorithm' in c.train:
      _choice(c, 'train.algorithm', ('grpo', 'relaxation'))
      from gripjax.train import relax_step  # pylint: disable=g-import-not-at-top
      try:
        relax_step.relax_options(c)
      except ValueError as e:
        raise ConfigError(str(e)) from None
  if 'ablation' in c:
    from gripjax.eval import ablations  # pylint: disable=g-import-not-at-top
    from gripjax.eval import evaluate  # pylint: disable=g-import-not-at-top
    try:
      ablations.check_variants(c.ablation.variants)
      evaluate.check_methods(c.ablation.references, 'config.ablation.references')
    except ValueError as e:
      raise ConfigError(str(e)) from None
    if 'grip' in c.ablation.references:
      _fail('ablation.references', c.ablation.references,
            "reference and baseline methods only: the agent's rows are the variants")
    seeds = c.ablation.seeds
    if not isinstance(seeds, tuple) or not seeds or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
      _fail('ablation.seeds', seeds, 'a non-empty tuple of non-negative ints')
    for f in ('train_steps', 'eval_examples'):
      _positive_int(c, f'ablation.{f}')
    _positive_int(c, 'ablation.warmup_steps', allow_zero=True)
  if 'demo' in c:
    for f in ('train_steps', 'eval_examples'):
      _positive_int(c, f'demo.{f}')
    _positive_int(c, 'demo.warmup_steps', allow_zero=True)
  if 'eval' in c:
    _positive_int(c, 'eval.batch_size')
    _positive_int(c, 'eval.picture_examples', allow_zero=True)
    if c.eval.num_examples is not None:
      _positive_int(c, 'eval.num_examples')
    if not isinstance(c.eval.budgets, tuple) or not c.eval.budgets:
      _fail('eval.budgets', c.eval.budgets, 'a non-empty tuple of keep ratios in (0, 1]')
    for i, rho in enumerate(c.eval.budgets):
      try:
        validate_budget(rho)
      except ValueError:
        _fail(f'eval.budgets[{i}]', rho, 'a keep ratio in (0, 1]')
    if not isinstance(c.eval.position_modes, tuple) or not c.eval.position_modes:
      _fail('eval.position_modes', c.eval.position_modes, f'a non-empty tuple drawn from {POSITION_MODES}')
    for i, mode in enumerate(c.eval.position_modes):
      if mode not in POSITION_MODES:
        _fail(f'eval.position_modes[{i}]', mode, f'one of {POSITION_MODES}')
    if not isinstance(c.eval.methods, tuple) or not c.eval.methods:
      _fail('eval.methods', c.eval.methods, 'a non-empty tuple of method names')
  return c


def resolve_path(path: str | None) -> str | None:
  """Resolves a config path: absolute paths and None pass; relative ones are taken from the repo root."""
  if path is None or os.path.isabs(path) or path.startswith(('gs://', 's3://')):
    return path
  return os.path.join(REPO_ROOT, path)
