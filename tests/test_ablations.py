"""The ablations' shared warm-up: a variant started from the warm-up's checkpoint equals one from step 0."""

import json
import os

import jax
import numpy as np
import pytest

from gripjax.eval import ablations
from gripjax.train import checkpoint as ckpt_lib
from gripjax.train import trainer
from tests import helpers


def _config(data_dir, steps, warmup_steps, algorithm='grpo'):
  c = helpers.load_config('gripbench_tiny', 'smoke')
  c.vlm_checkpoint = None  # random frozen VLM: the equivalence does not need a trained one
  c.data.data_dir = data_dir
  c.train.update(steps=steps, warmup_steps=warmup_steps, algorithm=algorithm, val_examples=0,
                 checkpoint_every=2, log_every=1, second_lr=3e-4)
  return c


@pytest.fixture(scope='module')
def warmup_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('abl')
  data_dir = str(root / 'tfds')
  warm = str(root / 'warmup_only')
  trainer.run(_config(data_dir, 2, 2), warm)
  return data_dir, warm, root


def test_run_from_the_shared_warmup_equals_a_run_from_step_zero(warmup_run):
  data_dir, warm, root = warmup_run
  algorithm = 'grpo'  # the relaxations' warm-up is the same phase (train/step.py)
  shared = str(root / f'shared_{algorithm}')
  assert ablations.start_from_warmup(shared, warm, 2)
  assert os.listdir(os.path.join(shared, 'checkpoints')) == ['2']
  got = trainer.run(_config(data_dir, 4, 2, algorithm), shared)
  scratch = str(root / f'scratch_{algorithm}')
  want = trainer.run(_config(data_dir, 4, 2, algorithm), scratch)
  a, b = ckpt_lib.load_params(got['params_path']), ckpt_lib.load_params(want['params_path'])
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
