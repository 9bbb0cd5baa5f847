"""Bad input is refused with a message naming the problem, instead of answering wrongly.

Images out of range or not finite, unknown or too many question words, a workdir in use by another
run (nothing of the first run lost), a stale lock, an unwritable workdir, a resume whose config
changed the train state, and library INFO logs at the default verbosity. (Damaged bundles:
tests/test_export.py.)

Run: .venv/bin/python -m pytest -q tests/test_bad_input.py
"""

import errno
import functools
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from absl import logging as absl_logging
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gripjax import checks
from gripjax import config_lib
from gripjax import inference
from gripjax import logs
from gripjax import runtime
from gripjax import workdir
from gripjax.data import pipeline
from gripjax.data import tokenizer as tokenizer_lib
from gripjax.models import scorer as scorer_lib
from gripjax.train import checkpoint as ckpt_lib
from gripjax.train import step as step_lib
from gripjax.train import trainer
from tests import helpers

ROOT = helpers.ROOT
ENV = dict(os.environ, JAX_PLATFORMS='cpu')


def smoke_config():
  return checks.check_config(helpers.load_config('gripbench_tiny', 'smoke'))


@pytest.fixture(scope='module')
def generator():
  """A PrunedGenerator on random smoke weights (the checks run before anything compiles)."""
  config = smoke_config()
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  abstract = jax.eval_shape(functools.partial(runtime.init_params, vlm), jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  return inference.PrunedGenerator(config, vlm, params, tok, 'uniform')


def _images(n, size=48, seed=0):
  return np.random.default_rng(seed).random((n, size, size, 3)).astype(np.float32)  # in [0, 1)


# --- Pixels. ---------------------------------------------------------------------------------------

def test_float_pixels_in_0_255_are_refused_with_the_range(generator):
  images = _images(3)
  images[1] *= 255.0  # One image scaled as uint8 would be, but float.
  images[1, 0, 0, 0] = 255.0
  images[1, 0, 0, 1] = 0.0
  questions = ['how many digits are there ?'] * 3
  with pytest.raises(ValueError, match=r'images\[1\] has float pixels in \[0, 255\]: expected floats '
                     r'in \[0, 1\] .* 1 of 3 images are out of range.*divide by 255'):
    generator.generate(images, questions, 0.5)
  with pytest.raises(ValueError, match=r'images\[0\] has float pixels in \[-0.5, 0.7'):
    shifted = images[:1] - 0.25
    shifted[0, 3, 3, 2] = -0.5
    generator.generate(shifted, questions[:1], 0.5)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused_naming_the_image(generator, bad):
  images = _images(4)
  images[2, 5, 7, 1] = bad
  with pytest.raises(ValueError, match=rf'images\[2\] has 1 non-finite pixel value\(s\) \(first: '
                     rf'{bad} at row 5, column 7, channel 1\): expected finite pixels'):
    generator.generate(images, ['how many digits are there ?'] * 4, 0.5)


def _example(image):
  """A GRIP-Bench-shaped example around `image` (36 patches of the smoke geometry)."""
  return {'image': image, 'question': 'how many digits are there ?', 'answer': 'two',
          'task': pipeline.TASKS[0], 'region': np.zeros((0,), np.int64),
          'patch_digit': np.full((36,), 10, np.int32), 'patch_color': np.zeros((36,), np.int32)}


def test_pipeline_refuses_float_images_out_of_range():
  tok = runtime.tokenizer()
  good = [_example(np.zeros((48, 48, 3), np.uint8)) for _ in range(2)]
  batch = next(pipeline.eval_batches(good, tok, 2, 16))
  assert batch['pixels'].dtype == np.uint8
  bad = good[:1] + [_example(np.full((48, 48, 3), 200.0, np.float32))]  # Was cast to uint8 silently.
  with pytest.raises(ValueError, match=r'images\[1\] \(source example 1\) has float pixels '
                     r'in \[200, 200\]'):
    next(pipeline.eval_batches(bad, tok, 2, 16))


# --- Question words. ------------------------------------------------------------------------------

def test_unknown_words_warn_with_the_words_by_default(caplog):
  tok = runtime.tokenizer()
  with caplog.at_level(logging.WARNING):
    ids, _ = tok.encode_question('how many 7s are there near the cat ?', 16)
  assert "words not in the vocabulary (44 tokens) that become <unk>: ['7s', 'near', 'cat']" in \
      caplog.text
  assert (ids == tok.unk_id).sum() == 3
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    tok.encode_question('how many digits are there ?', 16)
  assert not caplog.text  # In-vocabulary questions stay quiet.


def test_unknown_words_are_refused_with_error():
  tok = runtime.tokenizer()
  with pytest.raises(tokenizer_lib.QuestionError,
                     match=r"question 'what colour is the 3 \?' has words not in the vocabulary .*"
                     r"\['colour', '3'\]"):
    tok.encode_question('what colour is the 3 ?', 16, on_bad_question='error')


def test_over_long_questions_name_the_dropped_words(caplog):
  tok = runtime.tokenizer()
  question = 'is there a red digit above the blue digit left of the green digit in the top left ?'
  words = tokenizer_lib.split_words(question)  # 19 words + <sep> = 20 tokens: 4 dropped.
  assert len(words) == 19
  with caplog.at_level(logging.WARNING):
    ids, valid = tok.encode_question(question, 16)
  assert "20 tokens with <sep>, more than max_len=16: its first words ['is', 'there', 'a', 'red'] " \
      'are dropped' in caplog.text
  assert valid.all() and ids[0] == tok.encode('digit')[0] and ids[1] == tok.encode('above')[0]
  with pytest.raises(tokenizer_lib.QuestionError, match=r"its first words \['is', 'there'"):
    tok.encode_question(question, 16, on_bad_question='error')


def test_on_bad_question_config_is_checked_and_reaches_generate(generator):
  config = helpers.load_config('gripbench_tiny', 'smoke')
  config.data.on_bad_question = 'ignore'
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.data.on_bad_question='ignore' is invalid: expected one of "
                     r"\('warn', 'error'\)"):
    checks.check_config(config)
  config = smoke_config()
  config.data.on_bad_question = 'error'
  strict = inference.PrunedGenerator(config, generator.vlm, generator.variables, generator.tokenizer,
                                     'uniform')
  with pytest.raises(tokenizer_lib.QuestionError, match=r"questions\[1\]: question 'how many 5s "
                     r"are there \?' has words not in the vocabulary .*\['5s'\]"):
    strict.generate(_images(2), ['how many digits are there ?', 'how many 5s are there ?'], 0.5)


# --- The workdir: one run at a time, writable. ----------------------------------------------------

HOLDER = """
import sys
from gripjax import workdir
workdir.claim(sys.argv[1], 'train_agent', process_index=0)
print('locked', flush=True)
sys.stdin.read()  # Holds the lock until stdin closes (then exits normally) or it is killed.
"""


def _hold(path):
  """A second process that claims `path` (as a run would) and holds it; returns the Popen."""
  proc = subprocess.Popen([sys.executable, '-c', HOLDER, str(path)], cwd=ROOT, env=ENV,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  line = proc.stdout.readline()
  assert line.strip() == 'locked', proc.stderr.read()
  return proc


def _snapshot(root):
  """{relative path: sha256} of every file under `root`."""
  out = {}
  for directory, _, files in os.walk(root):
    for name in files:
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _first_run_files(work):
  """What a first run leaves mid-way: checkpoints 2 and 4, one being written, metrics up to 6."""
  manager = ckpt_lib.make_train_manager(str(work / 'checkpoints'), async_save=False)
  tree = {'params': {'kernel': np.arange(12, dtype=np.float32).reshape(3, 4)}, 'step': np.int32(0)}
  for step in (2, 4):
    ckpt_lib.save_train_state(manager, step, tree, {'data': {'next_step': step}})
  manager.close()
  tmp = work / 'checkpoints' / '6.orbax-checkpoint-tmp-1234567'  # The save in progress.
  tmp.mkdir()
  (tmp / 'partial').write_bytes(b'\0' * 100)
  (work / 'metrics.jsonl').write_text(''.join(json.dumps({'step': s, 'loss': 1.0 / s}) + '\n'
                                              for s in range(1, 7)))


def test_second_run_in_a_workdir_is_refused_and_the_first_is_intact(tmp_path):
  work = tmp_path / 'work'
  work.mkdir()
  _first_run_files(work)
  before = _snapshot(work)
  holder = _hold(work)
  try:
    lock_file = json.loads((work / workdir.LOCK_NAME).read_text())
    assert lock_file['pid'] == holder.pid and lock_file['host'] == socket.gethostname()
    # The same train_agent command as the first run's, as a second process.
    t0 = time.time()
    r = subprocess.run([sys.executable, '-m', 'gripjax.main',
                        '--config=configs/gripbench_tiny.py:smoke', '--mode=train_agent',
                        f'--workdir={work}'], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    seconds = time.time() - t0
    assert r.returncode == 1, r.stderr[-3000:]
    want = (f'error: --workdir={work} is in use by another gripjax run: pid {holder.pid} on host '
            f'{socket.gethostname()} (mode=train_agent, started ')
    assert want in r.stderr, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    during = _snapshot(work)
    assert during.pop(workdir.LOCK_NAME) and during == before  # Only the holder's lock file added.
    assert seconds < 60  # Refused at start-up, before any loading.
    with pytest.raises(workdir.WorkdirError, match=rf'pid {holder.pid} on host'):
      workdir.claim(str(work), 'eval', process_index=0)
  finally:
    holder.stdin.close()  # The holder exits normally: its lock is released and the file removed.
    holder.wait(timeout=60)
  assert holder.returncode == 0, holder.stderr.read()
  assert not (work / workdir.LOCK_NAME).exists()
  assert _snapshot(work) == before  # Nothing of the first run lost: checkpoints, temp, metrics.
  with workdir.claim(str(work), 'eval', process_index=0) as lock:  # Free again.
    assert lock.held


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  holder = _hold(tmp_path)
  holder.send_signal(signal.SIGKILL)  # No exit handler runs: the lock file stays behind.
  holder.wait(timeout=60)
  assert json.loads((tmp_path / workdir.LOCK_NAME).read_text())['pid'] == holder.pid
  with caplog.at_level(logging.WARNING):
    lock = workdir.claim(str(tmp_path), 'train_agent', process_index=0)
  try:
    assert f'took over the stale lock {tmp_path / workdir.LOCK_NAME} left by pid {holder.pid} on ' \
        f'host {socket.gethostname()}' in caplog.text
    assert 'no longer running' in caplog.text
    assert json.loads((tmp_path / workdir.LOCK_NAME).read_text())['pid'] == os.getpid()
  finally:
    lock.release()
  assert not (tmp_path / workdir.LOCK_NAME).exists()


def test_stale_lock_file_without_a_holder_is_taken_over(tmp_path, caplog):
  done = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                        text=True, check=True)
  dead_pid = int(done.stdout)  # A pid that has exited.
  stale = {'pid': dead_pid, 'host': socket.gethostname(), 'mode': 'pretrain_vlm', 'started': 0}
  (tmp_path / workdir.LOCK_NAME).write_text(json.dumps(stale))
  with caplog.at_level(logging.WARNING):
    with workdir.claim(str(tmp_path), 'eval', process_index=0):
      pass
  assert f'left by pid {dead_pid} on host {socket.gethostname()} (mode=pretrain_vlm, started ' \
      '1970-01-01 00:00:00 UTC), no longer running' in caplog.text


def test_unwritable_workdir_fails_at_start_up_naming_it(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  bad = blocker / 'work'  # Cannot be created: its parent is a file.
  t0 = time.time()
  r = subprocess.run([sys.executable, '-m', 'gripjax.main', '--config=configs/gripbench_tiny.py:smoke',
                      '--mode=eval', f'--workdir={bad}'], cwd=ROOT, env=ENV, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 1 and time.time() - t0 < 60, r.stderr[-3000:]
  assert f'error: --workdir={bad} is not writable (NotADirectoryError: Not a directory)' in r.stderr
  assert 'Traceback' not in r.stderr


@pytest.mark.parametrize('code,reason', [(errno.ENOSPC, 'No space left on device'),
                                         (errno.EROFS, 'Read-only file system')])
def test_full_or_read_only_workdir_is_named(tmp_path, monkeypatch, code, reason):
  real_write = os.write

  def write(fd, data):
    if os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith(workdir.PROBE_NAME):
      raise OSError(code, os.strerror(code))
    return real_write(fd, data)

  monkeypatch.setattr(os, 'write', write)
  with pytest.raises(workdir.WorkdirError, match=rf'--workdir={tmp_path} is not writable \(OSError: '
                     rf'{reason}'):
    workdir.claim(str(tmp_path), 'eval', process_index=0)
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.gripjax')]  # Probe removed, no lock.


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes through read-only permissions')
def test_read_only_directory_is_named(tmp_path):
  os.chmod(tmp_path, 0o555)
  try:
    with pytest.raises(workdir.WorkdirError, match=rf'--workdir={tmp_path} is not writable '
                       r'\(PermissionError'):
      workdir.check_writable(str(tmp_path))
  finally:
    os.chmod(tmp_path, 0o755)


# --- Resume with a changed model field. ------------------------------------------------------------

def _abstract_state(config):
  scorer = scorer_lib.make_scorer(config)
  init = step_lib.make_init(scorer, step_lib.make_optimizer(config), config,
                            runtime.num_visual_tokens(config), config.model.llm.width,
                            config.data.max_question_len)
  return init, trainer.state_tree(jax.eval_shape(init, jax.random.PRNGKey(0)))


def test_resume_with_changed_agent_width_names_the_field_and_shapes(tmp_path, monkeypatch):
  saved_config = smoke_config()
  init, _ = _abstract_state(saved_config)
  state = trainer.state_tree(jax.jit(init)(jax.random.PRNGKey(0)))
  manager = ckpt_lib.make_train_manager(str(tmp_path / 'checkpoints'), async_save=False)
  ckpt_lib.save_train_state(manager, 4, state, {'config': json.loads(saved_config.to_json())})
  manager.close()
  width = saved_config.agent.width

  config = smoke_config()
  config.agent.width = 2 * width
  _, abstract = _abstract_state(config)
  called = []
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', lambda *a, **k: called.append(1))
  manager = ckpt_lib.make_train_manager(str(tmp_path / 'checkpoints'))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.restore_train_state(manager, abstract, config=config)
  message = str(e.value)
  assert not called  # Found before Orbax reads anything.
  assert 'holds a train state of another geometry than this config builds' in message
  # Parameter leaves first, with both shapes: the attention output bias has the scorer's width.
  assert (f'params/block_0/attn/out/bias: shape ({width},) float32 in the checkpoint, shape '
          f'({2 * width},) float32 for this config') in message
  assert f'agent.width: {width} then, {2 * width} now' in message
  assert len(message.splitlines()) < 20
  assert os.listdir(tmp_path / 'checkpoints') == ['4']  # Nothing set aside or removed.


# --- Log output. ------------------------------------------------------------------------------------

def _record(pathname, level):
  return logging.LogRecord('absl', level, pathname, 1, 'message', None, None)


def test_library_info_logs_only_at_verbosity_1():
  orbax_file = os.path.join(os.path.dirname(ocp.__file__), 'checkpoint_manager.py')
  ours = os.path.join(os.path.dirname(logs.__file__), 'train', 'trainer.py')
  quiet = logs.QuietLibraries()
  old = absl_logging.get_verbosity()
  try:
    absl_logging.set_verbosity(0)
    assert not quiet.filter(_record(orbax_file, logging.INFO))
    assert quiet.filter(_record(orbax_file, logging.WARNING))
    assert quiet.filter(_record(ours, logging.INFO))
    absl_logging.set_verbosity(1)
    assert quiet.filter(_record(orbax_file, logging.INFO))
  finally:
    absl_logging.set_verbosity(old)
