"""Agent training as two processes x 4 CPU devices equals one process with 8 devices.

Run: .venv/bin/python -m pytest -q tests/test_multiprocess.py

Both runs are `--mode=train_agent` subprocesses on the smoke config (its random VLM: the VLM's
params are a seeded init, the same on any mesh), 3 steps so the warm-up and GRPO both run, over
one data dir prepared here. The two-process run goes through `launch/local_processes.py`, so
`maybe_initialize_distributed()` joins them into one 8-device cluster (gloo collectives); each
process reads its own block of every global batch, Orbax writes the checkpoint from both, process 0
the metrics.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gripjax.train import checkpoint as ckpt_lib
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Unoptimized CPU code compiles ~3x faster (as in tests/test_checkpoint.py).
STEPS = 3
LR = 1e-3
ARGS = ('--config=configs/gripbench_tiny.py:smoke', '--mode=train_agent',
        f'--config.train.steps={STEPS}', '--config.train.warmup_steps=1', f'--config.train.lr={LR}',
        '--config.train.batch_size=8', '--config.train.log_every=1',
        '--config.train.checkpoint_every=100',  # One checkpoint, at the last step.
        # One layer per tower and no agent self-attention: compiles in half the time.
        '--config.model.vit.depth=1', '--config.model.vit.feature_layer=-1',
        '--config.model.llm.depth=1', '--config.agent.depth=0')
# Entries whose gradient is zero by construction, since adding the same amount to every score
# (of an example) or to every attention logit (of a query) changes no ranking, softmax or top-k:
# the head's bias, the shift half of the last FiLM (a per-example constant through the head) and
# the cross-attention's key bias. Their gradient is float32 rounding noise, which Adam normalizes
# into steps of up to lr with a sign set by the order of the cross-device sums; they are held to
# Adam's bound (each run moves them at most lr per step) instead of to rounding error.
SHIFT_ONLY = {('head', 'bias'): 'all', ('cross_attn', 'key', 'bias'): 'all',
              ('film_out', 'mod', 'kernel'): 'shift', ('film_out', 'mod', 'bias'): 'shift'}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """The smoke GRIP-Bench, prepared once, so neither run (nor two processes at once) builds it."""
  from gripjax.data.grip_bench import builder  # pylint: disable=g-import-not-at-top
  config = helpers.load_config('gripbench_tiny', 'smoke')
  path = str(tmp_path_factory.mktemp('tfds'))
  builder.prepare(config.data, config.model.vit.image_size, config.model.vit.patch_size, path,
                  num_workers=1)
  return path


def _env(devices):
  return helpers.subprocess_env(devices=devices)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  # Step 0: the validation curve's row before the first update.
  assert [row['step'] for row in rows] == list(range(STEPS + 1)), rows
  assert [row['phase'] for row in rows] == [0, 0, 1, 1]  # warm-up (with step 0), then GRPO
  return rows


def _params(workdir):
  """{key path: array} of the final agent params, read onto this process's one device."""
  params = ckpt_lib.load_params(str(workdir / 'agent'))
  return {tuple(k.key for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(params)}


def test_two_processes_match_one_process(tmp_path, data_dir):
  one, two = tmp_path / 'one_process', tmp_path / 'two_processes'
  overrides = (f'--config.data.data_dir={data_dir}',)
  # The two runs share nothing but the prepared data: run them side by side.
  single = subprocess.Popen([sys.executable, '-m', 'gripjax.main', *ARGS, *overrides,
                             f'--workdir={one}'], cwd=ROOT, env=_env(8), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  try:
    # The launcher replaces XLA_FLAGS' device count by 4 in each process.
    cmd = [sys.executable, os.path.join('launch', 'local_processes.py'), '--num_processes=2',
           '--devices_per_process=4', '--timeout_s=240', f'--log_dir={tmp_path / "logs"}', '--',
           *ARGS, *overrides, f'--workdir={two}']
    r = subprocess.run(cmd, cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=300)
    _, single_log = single.communicate(timeout=300)
  finally:
    single.kill()
  assert single.returncode == 0, f'1 process x 8 devices failed:\n{single_log[-6000:]}'
  assert "mesh {'data': 8} over 8 devices (1 processes)" in single_log
  logs = [(tmp_path / 'logs' / f'process_{i}.log').read_text() for i in range(2)]
  assert r.returncode == 0, r.stderr[-2000:] + ''.join(f'\n--- process {i}\n{log[-4000:]}'
                                                       for i, log in enumerate(logs))
  for i, log in enumerate(logs):
    assert f'process {i} of 2; 4 local / 8 global devices' in log
    assert "mesh {'data': 8} over 8 devices (2 processes)" in log

  # Same rows in the same global order and the same PRNG draws: the runs differ only in the order
  # in which cross-device sums (gradients, metrics) add up, i.e. float32 rounding.
  want, got = _params(one), _params(two)
  assert set(got) == set(want) and SHIFT_ONLY.keys() <= set(want)
  for key in want:
    x, y = got[key].copy(), want[key].copy()
    if key in SHIFT_ONLY:
      # Film's Dense gives (scale, shift) as the two halves of its output.
      part = np.s_[...] if SHIFT_ONLY[key] == 'all' else np.s_[..., x.shape[-1] // 2:]
      np.testing.assert_array_less(np.abs(x[part] - y[part]), 2 * STEPS * LR, err_msg=str(key))
      x[part] = y[part] = 0
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=str(key))
  for a, b in zip(_metrics(two), _metrics(one)):
    assert set(a) == set(b)
    for key in sorted(set(a) - {'seconds'}):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f'step {a["step"]} {key}')
  assert os.listdir(two / 'checkpoints') == os.listdir(one / 'checkpoints') == [str(STEPS)]
