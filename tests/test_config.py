"""Config overrides from the command line, and start-up validation."""

import os
import re
import subprocess
import sys

import pytest

from gripjax import config_lib
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _validate(*overrides):
  cmd = [sys.executable, '-m', 'gripjax.main', '--config=configs/gripbench_tiny.py',
         '--mode=validate_config', *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_nested_tuple_and_nullable_overrides():
  r = _validate('--config.pretrain.lr=3e-4', '--config.eval.budgets=(0.5,0.25)',
                '--config.eval.num_examples=7', '--config.data.data_dir=/tmp/somewhere',
                '--config.vlm_checkpoint=None', '--config.model.position_mode=renumber')
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert 'lr: 0.0003' in out
  assert '- 0.5\n  - 0.25' in out
  assert 'num_examples: 7' in out
  assert 'data_dir: /tmp/somewhere' in out
  assert 'vlm_checkpoint: null' in out
  assert 'position_mode: renumber' in out


@pytest.mark.parametrize('override, message', [
    ('--config.model.position_mode=kept', "config.model.position_mode='kept' is invalid"),
    ('--config.eval.budgets=(0.5,1.5)', 'config.eval.budgets[1]=1.5 is invalid'),
    ('--config.model.llm.num_kv_heads=3', 'config.model.llm.num_kv_heads=3 is invalid'),
    ('--config.model.vit.patch_size=7', 'config.model.vit.image_size=96 is invalid'),
    ('--config.pretrain.batch_size=0', 'config.pretrain.batch_size=0 is invalid'),
    ('--config.pretrain.background_dropout=1.5', 'config.pretrain.background_dropout=1.5 is invalid'),
    ("--config.ablation.references=('full','grip')", 'config.ablation.references='),
    ("--config.ablation.references=('fullx',)", "config.ablation.references contains unknown method 'fullx'"),
    ('--config.pretrain.spatial_weight=-1.0', 'config.pretrain.spatial_weight=-1.0 is invalid'),
])
def test_bad_value_fails_at_start_up_naming_the_field(override, message):
  r = _validate(override)
  assert r.returncode != 0
  assert message in r.stderr, r.stderr


def test_unknown_field_fails():
  r = _validate('--config.pretrain.lrr=1')
  assert r.returncode != 0
  assert 'lrr' in r.stderr and '"lr"' in r.stderr  # ml_collections suggests the closest field.


def test_every_field_has_a_comment():
  path = os.path.join(ROOT, 'configs', 'gripbench_tiny.py')
  text = open(path).read().split('def _shrink_for_smoke_tests')[0]  # the field definitions
  fields = 0
  for line in text.splitlines():
    stripped = line.strip()
    if re.match(r'^c\.[\w.]+ = ', stripped) and 'ConfigDict()' not in stripped:
      fields += 1
      assert '#' in stripped, f'config field without a comment: {stripped}'
  assert fields > 40


def test_validate_budget():
  assert config_lib.validate_budget(1.0) == 1.0
  for bad in (0.0, -0.1, 1.01, float('nan'), 'half'):
    with pytest.raises(ValueError, match='keep ratio in \\(0, 1\\]'):
      config_lib.validate_budget(bad)


def test_default_configs_validate():
  for name in ('gripbench_tiny', 'llava_1p5_7b'):
    config_lib.validate(helpers.load_config(name))
