"""The ablations' shared warm-up: a variant started from the warm-up's checkpoint equals one from step 0.

The runs are `--mode=train_agent` subprocesses on the smoke config (random frozen VLM: the
equivalence does not need a trained one), so they compile with the tests' fast XLA options and the
two runs of one schedule share their compiled step through the tests' compilation cache.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gripjax.eval import ablations
from gripjax.train import checkpoint as ckpt_lib
from tests import helpers


def _train(workdir, data_dir, steps, warmup_steps, algorithm='grpo'):
  """Trains the smoke agent in `workdir` (resuming from its checkpoints, as ablations.run does)."""
  cmd = [sys.executable, '-m', 'gripjax.main', '--config=configs/gripbench_tiny.py:smoke',
         '--mode=train_agent', f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
         f'--config.train.steps={steps}', f'--config.train.warmup_steps={warmup_steps}',
         f'--config.train.algorithm={algorithm}', '--config.train.val_examples=0',
         '--config.train.checkpoint_every=2', '--config.train.log_every=1', '--config.train.second_lr=3e-4']
  r = subprocess.run(cmd, cwd=helpers.ROOT, env=helpers.subprocess_env(), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, f'train_agent failed:\n{r.stderr[-6000:]}'
  return os.path.join(workdir, 'agent')


@pytest.fixture(scope='module')
def warmup_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('abl')
  data_dir = str(root / 'tfds')
  warm = str(root / 'warmup_only')
  _train(warm, data_dir, 2, 2)
  return data_dir, warm, root


def test_run_from_the_shared_warmup_equals_a_run_from_step_zero(warmup_run):
  data_dir, warm, root = warmup_run
  algorithm = 'grpo'  # the relaxations' warm-up is the same phase (train/step.py)
  shared = str(root / f'shared_{algorithm}')
  assert ablations.start_from_warmup(shared, warm, 2)
  assert os.listdir(os.path.join(shared, 'checkpoints')) == ['2']
  got = _train(shared, data_dir, 4, 2, algorithm)
  want = _train(str(root / f'scratch_{algorithm}'), data_dir, 4, 2, algorithm)
  a, b = ckpt_lib.load_params(got), ckpt_lib.load_params(want)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  warm_params = ckpt_lib.load_params(os.path.join(warm, 'agent'))
  assert any(not np.array_equal(np.asarray(x), np.asarray(y))  # the second phase did train
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(warm_params)))
  steps = [json.loads(line)['step'] for line in open(os.path.join(shared, 'metrics.jsonl'))]
  assert steps == [1, 2, 3, 4]  # the warm-up's log, then the second phase's


def test_start_from_warmup_keeps_a_runs_own_checkpoints_and_names_a_missing_one(warmup_run, tmp_path):
  _, warm, _ = warmup_run
  assert ablations.start_from_warmup(str(tmp_path / 'a'), warm, 2)
  assert not ablations.start_from_warmup(str(tmp_path / 'a'), warm, 2)  # resumes its own
  with pytest.raises(FileNotFoundError, match='no checkpoint at step 3'):
    ablations.start_from_warmup(str(tmp_path / 'b'), warm, 3)


def test_which_variants_share_the_warmup():
  c = helpers.load_config('gripbench_tiny')
  c.ablation.update(train_steps=400, warmup_steps=300)
  assert [v for v in ablations.VARIANTS if ablations.shares_warmup(c, v)] == [
      'budget_aware', 'relaxation', 'gumbel_sigmoid', 'perturbed_topk']
  c.ablation.update(train_steps=120, warmup_steps=40)  # learning-rate ramps 4 and 10 differ
  assert not ablations.shares_warmup(c, 'budget_aware')
  c.ablation.update(train_steps=400, warmup_steps=300, variants=('budget_aware', 'relaxation'))
  assert not ablations.shares_warmup(c, 'budget_aware')  # no warmup_only run to start from
