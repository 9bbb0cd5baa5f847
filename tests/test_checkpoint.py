"""Agent-training checkpoints: 8 devices -> 4, corrupted checkpoints, and a run killed with SIGKILL.

Run: .venv/bin/python -m pytest -q tests/test_checkpoint.py

Multi-device parts run in subprocesses with `XLA_FLAGS=--xla_force_host_platform_device_count=N`
set before JAX starts. The fault test runs `--mode=train_agent` on the smoke config (random VLM)
with a persistent compilation cache shared by its runs, so only the first one compiles.
"""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax.models import scorer as scorer_lib
from gripjax.train import checkpoint as ckpt_lib
from gripjax.train import sharding
from gripjax.train import step as step_lib
from gripjax.train import trainer
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, D, T = 16, 32, 6  # Visual tokens, VLM width and question slots of the agent's inputs.


def agent_config(mesh_spec=(('data', -1), ('fsdp', 1))):
  c = helpers.load_config('gripbench_tiny')
  c.agent.update(dict(width=16, depth=0, num_heads=2))
  c.train.mesh = mesh_spec
  c.train.sharding.update(dict(agent_params='fsdp', fsdp_min_size=64))
  return c


def abstract_state(config, mesh):
  """The TrainState's abstract tree (as the trainer saves it), with the mesh's shardings."""
  scorer = scorer_lib.make_scorer(config)
  init = step_lib.make_init(scorer, step_lib.make_optimizer(config), config, N, D, T)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = step_lib.state_shardings(abstract, mesh, config)
  tree = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                      shardings)
  return init, shardings, trainer.state_tree(tree)


def state_at(init, shardings, step):
  """A distinct state per step: init from PRNGKey(step), step counter = step."""
  state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(step))
  state = state.replace(step=jax.device_put(jnp.asarray(step, jnp.int32), shardings.step))
  return trainer.state_tree(state)


def split_leaves(tree) -> int:
  return sum(any(e is not None for e in x.sharding.spec) for x in jax.tree.leaves(tree))


def save_main():
  """8 devices, mesh (data=4, fsdp=2): saves steps 1, 2, 3 (2 kept) and their values as .npz."""
  directory, out = sys.argv[1], sys.argv[2]
  assert jax.device_count() == 8, jax.devices()
  config = agent_config((('data', 4), ('fsdp', 2)))
  mesh = sharding.make_mesh(config)
  init, shardings, _ = abstract_state(config, mesh)
  manager = ckpt_lib.make_train_manager(directory, max_to_keep=2)
  split = 0
  for step in (1, 2, 3):
    tree = state_at(init, shardings, step)
    split = split_leaves(tree)
    ckpt_lib.save_train_state(manager, step, tree, {'data': {'next_step': step}})
    np.savez(f'{out}.{step}.npz', *jax.tree.leaves(tree))
  manager.wait_until_finished()
  manager.close()
  print(json.dumps({'split': split}))


def restore_main():
  """4 devices, mesh (data=2, fsdp=2): restores the newest checkpoint; compares it to the .npz."""
  directory, out = sys.argv[1], sys.argv[2]
  assert jax.device_count() == 4, jax.devices()
  config = agent_config((('data', 2), ('fsdp', 2)))
  mesh = sharding.make_mesh(config)
  _, _, abstract = abstract_state(config, mesh)
  step, tree, meta = ckpt_lib.restore_train_state(ckpt_lib.make_train_manager(directory), abstract)
  saved = np.load(f'{out}.{step}.npz')
  leaves = jax.tree.leaves(tree)
  assert len(saved.files) == len(leaves)
  for i, x in enumerate(leaves):
    np.testing.assert_array_equal(np.asarray(x), saved[f'arr_{i}'])
    assert x.sharding == jax.tree.leaves(abstract)[i].sharding  # The 4-device shardings.
  print(json.dumps({'step': step, 'data': meta['data'], 'split': split_leaves(tree),
                    'devices': sorted({d.id for x in leaves for d in x.sharding.device_set})}))


def _python(code, *args, devices=1):
  r = subprocess.run([sys.executable, '-c', code, *args], cwd=ROOT, env=helpers.subprocess_env(devices),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-4000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def saved_on_8(tmp_path_factory):
  root = tmp_path_factory.mktemp('ckpt8')
  directory, out = str(root / 'checkpoints'), str(root / 'values')
  res = _python('from tests.test_checkpoint import save_main; save_main()', directory, out,
                devices=8)
  assert res['split'] > 0  # The saved state really was split over 'fsdp'.
  return directory, out


def test_saved_on_8_devices_restores_on_4(saved_on_8):
  directory, out = saved_on_8
  assert sorted(int(p) for p in os.listdir(directory) if p.isdigit()) == [2, 3]  # keep 2
  res = _python('from tests.test_checkpoint import restore_main; restore_main()', directory, out,
                devices=4)
  assert res['step'] == 3 and res['data'] == {'next_step': 3}
  assert res['split'] > 0 and res['devices'] == [0, 1, 2, 3]


def _restore_one_device(directory):
  config = agent_config()
  _, _, abstract = abstract_state(config, sharding.make_mesh(config, jax.devices()[:1]))
  manager = ckpt_lib.make_train_manager(directory)
  try:
    return ckpt_lib.restore_train_state(manager, abstract)
  finally:
    manager.close()
    gc.collect()  # Runs the failed reads' leftover callbacks here, under the test's warning filter.


def _copy(directory, dest):
  shutil.copytree(directory, dest)
  return str(dest)


def truncate_latest(directory) -> int:
  """Truncates the data files of the newest checkpoint (as a write cut short would); its step."""
  step = max(int(p) for p in os.listdir(directory) if p.isdigit())
  data = [os.path.join(root, f) for root, _, files in os.walk(os.path.join(directory, str(step)))
          for f in files if os.path.basename(root) == 'd']
  assert data, f'no data files under {directory}/{step}'
  for path in data:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  return step


# Orbax's reader leaves an event-loop warning behind when a checkpoint's files fail to read.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_corrupted_latest_falls_back_to_previous(saved_on_8, tmp_path, caplog):
  directory, out = saved_on_8
  # Truncated files: Orbax fails to read step 3; step 2 is used (restored here on one device).
  bad = _copy(directory, tmp_path / 'truncated')
  assert truncate_latest(bad) == 3
  step, tree, _ = _restore_one_device(bad)
  assert step == 2
  saved = np.load(f'{out}.2.npz')
  for i, x in enumerate(jax.tree.leaves(tree)):
    np.testing.assert_array_equal(np.asarray(x), saved[f'arr_{i}'])
  assert 'checkpoint at step 3' in caplog.text
  assert 'cannot be restored: truncated, corrupted' in caplog.text
  assert 'falling back to step 2' in caplog.text
  # Set aside (not deleted), so the resumed run can write step 3 again.
  assert sorted(os.listdir(bad)) == ['2'] and os.listdir(f'{bad}.unusable') == ['3']
  # Files that read back but hold other values: the fingerprint saved with them catches it.
  caplog.clear()
  bad = _copy(directory, tmp_path / 'altered')
  meta_path = os.path.join(bad, '3', ckpt_lib.META_ITEM, 'metadata')
  with open(meta_path) as f:
    meta = json.load(f)
  meta['fingerprint']['params/token_in/kernel'][0] ^= 1
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  assert _restore_one_device(bad)[0] == 2
  assert 'do not match the fingerprint' in caplog.text and "'params/token_in/kernel'" in caplog.text


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_no_restorable_checkpoint_is_an_error(saved_on_8, tmp_path):
  bad = _copy(saved_on_8[0], tmp_path / 'all_bad')
  truncate_latest(bad)
  shutil.rmtree(os.path.join(bad, '2', ckpt_lib.STATE_ITEM))
  message = r'none of the 2 checkpoints in .* \(steps \[3, 2\]\) could be restored'
  with pytest.raises(ckpt_lib.CheckpointError, match=message):
    _restore_one_device(bad)
  assert _restore_one_device(str(tmp_path / 'empty')) is None


# --- Fault: SIGKILL after the second checkpoint, restart, same final params. ---------------------

STEPS = 8
SMOKE = ('--config=configs/gripbench_tiny.py:smoke', '--mode=train_agent',
         f'--config.train.steps={STEPS}', '--config.train.checkpoint_every=2')


def _train_cmd(workdir, data_dir):
  return [sys.executable, '-m', 'gripjax.main', *SMOKE, f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}']


def _env(cache):
  return helpers.subprocess_env(cache_dir=cache)


def _train(workdir, data_dir, cache):
  r = subprocess.run(_train_cmd(workdir, data_dir), cwd=ROOT, env=_env(cache), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, f'train_agent failed:\n{r.stderr[-6000:]}'
  return r


def _complete_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def _final_params(workdir):
  return jax.tree.leaves(ckpt_lib.load_params(os.path.join(workdir, 'agent')))


def _metrics(workdir):
  """{step: row} of metrics.jsonl; each step logged once (the resumed run drops the killed run's
  rows after its checkpoint before redoing those steps)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  # Step 0: the validation curve's row before the first update.
  assert [row['step'] for row in rows] == list(range(STEPS + 1)), rows
  return {row['step']: row for row in rows}


def test_killed_run_resumes_and_matches_uninterrupted(tmp_path):
  data_dir, cache = str(tmp_path / 'tfds'), str(tmp_path / 'jax_cache')
  full = tmp_path / 'uninterrupted'
  _train(full, data_dir, cache)

  killed = tmp_path / 'killed'
  proc = subprocess.Popen(_train_cmd(killed, data_dir), cwd=ROOT, env=_env(cache),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while len(_complete_steps(killed)) < 2 and proc.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  kept = _complete_steps(killed)
  assert proc.returncode == -signal.SIGKILL and not (killed / 'agent').exists(), kept
  assert len(kept) >= 2 and kept[-1] < STEPS, kept
  corrupted = tmp_path / 'corrupted'
  shutil.copytree(killed, corrupted)

  # Restart: it resumes at the newest complete checkpoint and ends where the uninterrupted run did.
  r = _train(killed, data_dir, cache)
  assert f'resuming at step {kept[-1]} of {STEPS}' in r.stderr
  # The same run with its newest checkpoint truncated: reported, and the one before it used.
  step = truncate_latest(str(corrupted / 'checkpoints'))
  r2 = _train(corrupted, data_dir, cache)
  assert f'checkpoint at step {step} ' in r2.stderr
  assert 'cannot be restored: truncated, corrupted' in r2.stderr
  assert f'resuming at step {kept[-2]} of {STEPS}' in r2.stderr

  want = _final_params(full)
  for work in (killed, corrupted):
    got = _final_params(work)
    assert len(got) == len(want)
    for x, y in zip(got, want):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    rows, ref = _metrics(work), _metrics(full)
    for s in ref:
      for key in ('loss', 'reward/mean', 'tokens_kept') if s else ('val/reward', 'val/accuracy'):
        np.testing.assert_allclose(rows[s][key], ref[s][key], rtol=1e-6, atol=1e-7,
                                   err_msg=f'{work.name} step {s} {key}')
