"""Config overrides from the command line, and start-up validation."""

import os
import re
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from gripjax import checks
from gripjax import config_lib
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _validate(*overrides):
  cmd = [sys.executable, '-m', 'gripjax.main', '--config=configs/gripbench_tiny.py',
         '--mode=validate_config', *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _check_in_process(*overrides):
  """The command line's path without a process: the config file and `overrides` parsed by the same
  ml_collections flag as gripjax.main's (a fresh flag registry), then its start-up check."""
  argv = ['gripjax.main', f"--config={os.path.join(ROOT, 'configs', 'gripbench_tiny.py')}", *overrides]
  registry = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=registry, lock_config=True, sys_argv=argv)
  registry(argv)
  return checks.check_config(registry.config)


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
    ('--config.model.vit.patch_size=7', 'config.model.vit.image_size=96 is not a multiple'),
    ('--config.pretrain.batch_size=0', 'config.pretrain.batch_size=0 is invalid'),
    ('--config.pretrain.background_dropout=1.5', 'config.pretrain.background_dropout=1.5 is invalid'),
    ("--config.ablation.references=('full','grip')", 'config.ablation.references='),
    ("--config.ablation.references=('fullx',)", "config.ablation.references contains unknown method 'fullx'"),
    ('--config.pretrain.spatial_weight=-1.0', 'config.pretrain.spatial_weight=-1.0 is invalid'),
    # What a run used to reject only after start-up: an unknown method, a mesh for other devices.
    ("--config.eval.methods=('full','fastvv')", "config.eval.methods contains unknown method 'fastvv'"),
    ("--config.train.mesh=(('data',3),)", 'does not divide the 1 devices'),
    ("--config.train.mesh=(('data',-1),('tensor',2))", 'config.train.mesh='),
    ('--config.train.batch_size=3', None),
    ("--config.eval.split=train", "config.eval.split='train' is invalid"),
    ("--config.ablation.split=tset", "config.ablation.split='tset' is invalid"),
    ('--config.train.algorithm=ppo', "config.train.algorithm='ppo' is invalid"),
    ('--config.train.relax_samples=0', 'config.train.relax_samples=0 is invalid'),
])
def test_bad_value_fails_at_start_up_naming_the_field(override, message):
  if message is None:  # Valid on one device (a batch of 3 splits over a data axis of 1).
    _check_in_process(override)
    return
  with pytest.raises(config_lib.ConfigError) as e:
    _check_in_process(override)
  assert message in str(e.value), str(e.value)


def test_a_bad_value_stops_the_command_line_naming_the_field():
  r = _validate('--config.eval.budgets=(0.5,1.5)')
  assert r.returncode != 0
  assert 'error: config.eval.budgets[1]=1.5 is invalid' in r.stderr, r.stderr


def test_mesh_and_batch_checked_against_the_device_count():
  c = helpers.load_config('gripbench_tiny')
  c.train.mesh = (('data', -1),)
  c.train.batch_size = 12
  checks.check_config(c, num_devices=4)
  with pytest.raises(config_lib.ConfigError, match='config.train.batch_size=12 is invalid.*8 devices'):
    checks.check_config(c, num_devices=8)
  c.train.mesh = (('data', 4), ('fsdp', 2))
  with pytest.raises(config_lib.ConfigError, match='do(es)? not divide the 4 devices|multiply to 8'):
    checks.check_config(c, num_devices=4)


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


def test_default_configs_validate():
  for name in ('gripbench_tiny', 'llava_1p5_7b'):
    checks.check_config(helpers.load_config(name))
