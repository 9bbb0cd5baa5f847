"""Launchers (TPU pod, local processes) and `maybe_initialize_distributed`.

The dry runs print the exact commands; two real processes x 4 CPU devices on localhost form one
8-device JAX cluster through `launch/local_processes.py` (this file is also their worker:
`python -m tests.test_launch OUT_DIR`).
"""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_VARS = ('GRIPJAX_COORDINATOR', 'GRIPJAX_NUM_PROCESSES', 'GRIPJAX_PROCESS_ID',
            'GRIPJAX_LOCAL_DEVICE_IDS', 'GRIPJAX_INIT_TIMEOUT_S', 'GRIPJAX_DISTRIBUTED')


def load_script(name):
  """launch/NAME.py as a module (launch/ is a folder of scripts, not a package)."""
  path = os.path.join(ROOT, 'launch', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'launch_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# --- launch/tpu_pod.py --------------------------------------------------------------------------

POD = ['--tpu=grip-v4-32', '--zone=us-central2-b', '--config=configs/llava_1p5_7b.py',
       '--workdir=gs://my-bucket/grip/run1']


def dry_run_lines(capsys, module, argv):
  rc = module.main(['--dry_run'] + argv)
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  return [line for line in captured.out.splitlines() if not line.startswith('#')]


def test_tpu_pod_dry_run_git(capsys):
  pod = load_script('tpu_pod')
  lines = dry_run_lines(capsys, pod, POD + ['--repo=https://github.com/me/gripjax.git', '--ref=abc123',
                                            '--', '--config.train.steps=10',
                                            '--config.train.sharding.vlm_params=fsdp'])
  assert len(lines) == 3  # fetch, install, run
  cmds = [shlex.split(line) for line in lines]
  for cmd in cmds:
    assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'grip-v4-32']
    assert '--zone=us-central2-b' in cmd and '--worker=all' in cmd
  remote = [cmd[-1] for cmd in cmds]
  assert all(r.startswith('--command=') for r in remote)
  assert 'git clone --quiet https://github.com/me/gripjax.git gripjax' in remote[0]
  assert 'fetch --quiet origin abc123' in remote[0]
  assert 'checkout --quiet --force FETCH_HEAD' in remote[0]
  assert 'python3 -m pip install --quiet -e . ' in remote[1] and 'jax[tpu]' in remote[1]
  run = shlex.split(remote[2][len('--command='):])
  assert run[:3] == ['cd', 'gripjax', '&&']
  assert run[3:] == ['python3', '-m', 'gripjax.main', '--config=configs/llava_1p5_7b.py',
                     '--mode=train_agent', '--workdir=gs://my-bucket/grip/run1',
                     '--config.train.steps=10', '--config.train.sharding.vlm_params=fsdp']


def test_tpu_pod_config_with_argument(capsys):
  pod = load_script('tpu_pod')
  argv = [a if not a.startswith('--config=') else '--config=configs/llava_hf.py:/ckpt/llava-1.5-7b-hf'
          for a in POD]
  lines = dry_run_lines(capsys, pod, argv + ['--repo=https://x/y.git', '--ref=abc'])
  remote = shlex.split(lines[-1])[-1]  # --command=cd gripjax && python3 -m gripjax.main ...
  assert '--config=configs/llava_hf.py:/ckpt/llava-1.5-7b-hf' in shlex.split(remote[len('--command='):])


def test_tpu_pod_dry_run_copy_detached(capsys):
  pod = load_script('tpu_pod')
  lines = dry_run_lines(capsys, pod, POD + ['--code=copy', '--ref=HEAD', '--project=proj',
                                            '--skip_install', '--detach', '--env=LIBTPU_INIT_ARGS=-x'])
  assert lines[0].startswith(f'git -C {ROOT} archive --format=tar.gz -o ')
  assert lines[1].startswith('gcloud compute tpus tpu-vm scp ')
  assert 'grip-v4-32:gripjax_code.tar.gz' in lines[1]
  assert '--worker=all' in lines[1] and '--project=proj' in lines[1]
  assert 'tar -xzf gripjax_code.tar.gz -C gripjax' in lines[2]
  assert len(lines) == 4  # no install step
  assert 'nohup env LIBTPU_INIT_ARGS=-x python3 -m gripjax.main' in lines[3]
  assert '> ~/gripjax_run.log 2>&1 < /dev/null &' in lines[3]


@pytest.mark.parametrize('extra, message', [
    (['--workdir=/tmp/run'], "--workdir='/tmp/run' is invalid: expected gs://BUCKET/PATH"),
    (['--config=configs/nope.py'], "--config='configs/nope.py' is invalid"),
    (['--config=configs/nope.py:arg'], "--config='configs/nope.py:arg' is invalid"),
    (['--tpu=My_Pod'], "--tpu='My_Pod' is invalid"),
    (['--zone=central'], "--zone='central' is invalid"),
    (['--remote_dir=/opt/x'], "--remote_dir='/opt/x' is invalid"),
    (['--remote_dir=./'], "--remote_dir='./' is invalid"),
    (['--env=NOVALUE'], "--env='NOVALUE' is invalid: expected KEY=VALUE"),
    (['--', '--workdir=gs://b/other'], "'--workdir=gs://b/other' after -- is invalid"),
])
def test_tpu_pod_bad_flags(capsys, extra, message):
  pod = load_script('tpu_pod')
  split = extra.index('--') if '--' in extra else len(extra)
  argv = POD + ['--repo=https://x/y.git', '--ref=abc'] + extra[:split] + ['--dry_run'] + extra[split:]
  assert pod.main(argv) == 2
  assert message in capsys.readouterr().err


def test_tpu_pod_subprocess_dry_run():
  r = subprocess.run([sys.executable, 'launch/tpu_pod.py', *POD, '--repo=https://x/y.git', '--ref=abc',
                      '--dry_run'], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  assert r.stdout.count('gcloud compute tpus tpu-vm ssh grip-v4-32') == 3


# --- launch/local_processes.py ------------------------------------------------------------------

def test_local_processes_dry_run(capsys, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_foo=1 --xla_force_host_platform_device_count=2')
  local = load_script('local_processes')
  lines = dry_run_lines(capsys, local, ['--num_processes=3', '--devices_per_process=4', '--port=12345',
                                        '--', '--config=configs/gripbench_tiny.py', '--mode=train_agent',
                                        '--workdir=/tmp/w'])
  assert len(lines) == 3
  for i, line in enumerate(lines):
    cmd = shlex.split(line)
    env = dict(a.split('=', 1) for a in cmd[1:6])
    assert cmd[0] == 'env' and env == {
        'GRIPJAX_COORDINATOR': 'localhost:12345', 'GRIPJAX_NUM_PROCESSES': '3',
        'GRIPJAX_PROCESS_ID': str(i), 'JAX_PLATFORMS': 'cpu',
        'XLA_FLAGS': '--xla_cpu_foo=1 --xla_force_host_platform_device_count=4'}
    assert cmd[6:] == [sys.executable, '-m', 'gripjax.main', '--config=configs/gripbench_tiny.py',
                       '--mode=train_agent', '--workdir=/tmp/w']


@pytest.mark.parametrize('flag, message', [
    ('--num_processes=0', '--num_processes=0 is invalid: expected a positive integer'),
    ('--devices_per_process=-1', '--devices_per_process=-1 is invalid'),
    ('--port=70000', '--port=70000 is invalid'),
    ('--module=gripjax/main.py', "--module='gripjax/main.py' is invalid"),
])
def test_local_processes_bad_flags(capsys, flag, message):
  assert load_script('local_processes').main([flag, '--dry_run']) == 2
  assert message in capsys.readouterr().err


def test_local_processes_stops_the_rest_when_one_fails(tmp_path):
  t0 = time.monotonic()
  r = subprocess.run([sys.executable, 'launch/local_processes.py', '--num_processes=2',
                      '--devices_per_process=1', '--module=tests.test_launch', f'--log_dir={tmp_path}',
                      '--', 'fail_one'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 3, r.stderr
  assert 'process 1 exited with status 3' in r.stderr
  assert time.monotonic() - t0 < 60  # process 0 (sleeping 300 s) was stopped


def test_two_processes_form_one_eight_device_cluster(tmp_path):
  """2 processes x 4 CPU devices: jax.distributed on localhost, a global array, one collective."""
  r = subprocess.run([sys.executable, 'launch/local_processes.py', '--num_processes=2',
                      '--devices_per_process=4', '--module=tests.test_launch', '--timeout_s=150',
                      f'--log_dir={tmp_path / "logs"}', '--', str(tmp_path)],
                     cwd=ROOT, capture_output=True, text=True, timeout=200)
  logs = ''.join(open(tmp_path / 'logs' / f'process_{i}.log').read()[-2000:] for i in range(2)
                 if (tmp_path / 'logs' / f'process_{i}.log').exists())
  assert r.returncode == 0, r.stderr + logs
  results = [json.load(open(tmp_path / f'process_{i}.json')) for i in range(2)]
  for i, res in enumerate(results):
    assert res == dict(process=i, processes=2, devices=8, local_devices=4, total=28.0,
                       primary=(i == 0), first_call=True, second_call=False)


# --- gripjax.train.distributed ------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
  for name in ENV_VARS:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


@pytest.fixture
def fake_init(clean_env):
  """Records jax.distributed.initialize's arguments instead of starting a cluster."""
  import jax  # pylint: disable=g-import-not-at-top
  from gripjax.train import distributed  # pylint: disable=g-import-not-at-top
  calls = []
  clean_env.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  clean_env.setattr(distributed, 'is_initialized', lambda: False)
  return calls


def test_nothing_set_is_a_noop_and_twice_is_safe(clean_env):
  from gripjax.train import distributed  # pylint: disable=g-import-not-at-top
  assert not distributed.is_initialized()
  assert distributed.maybe_initialize_distributed(tpu=False) is False
  assert distributed.maybe_initialize_distributed(tpu=False) is False
  if not distributed.on_cloud_tpu():  # Detection: not a TPU VM, so one process.
    assert distributed.maybe_initialize_distributed() is False
  assert not distributed.is_initialized()
  clean_env.setenv('GRIPJAX_DISTRIBUTED', 'off')
  assert distributed.maybe_initialize_distributed(tpu=True) is False


def test_settings_from_env_reach_initialize(fake_init, clean_env):
  from gripjax.train import distributed  # pylint: disable=g-import-not-at-top
  clean_env.setenv('GRIPJAX_COORDINATOR', '10.0.0.2:8476')
  clean_env.setenv('GRIPJAX_NUM_PROCESSES', '4')
  clean_env.setenv('GRIPJAX_PROCESS_ID', '3')
  clean_env.setenv('GRIPJAX_INIT_TIMEOUT_S', '1200')
  assert distributed.maybe_initialize_distributed() is True
  assert fake_init == [dict(coordinator_address='10.0.0.2:8476', num_processes=4, process_id=3,
                            initialization_timeout=1200)]
  # Arguments win over the environment.
  distributed.maybe_initialize_distributed('localhost:1234', 2, 0, local_device_ids='0,1')
  assert fake_init[-1] == dict(coordinator_address='localhost:1234', num_processes=2, process_id=0,
                               initialization_timeout=1200, local_device_ids=[0, 1])


def test_tpu_and_cluster_modes_let_jax_detect(fake_init, clean_env):
  from gripjax.train import distributed  # pylint: disable=g-import-not-at-top
  assert distributed.maybe_initialize_distributed(tpu=True) is True
  assert fake_init == [dict(initialization_timeout=distributed.DEFAULT_TIMEOUT_S)]
  clean_env.setenv('GRIPJAX_DISTRIBUTED', 'cluster')
  assert distributed.maybe_initialize_distributed(tpu=False, timeout_s=60) is True
  assert fake_init[-1] == dict(initialization_timeout=60)


@pytest.mark.parametrize('env, message', [
    (dict(GRIPJAX_NUM_PROCESSES='two'), "GRIPJAX_NUM_PROCESSES='two' is invalid: expected a positive "
     'integer'),
    (dict(GRIPJAX_COORDINATOR='h:1', GRIPJAX_NUM_PROCESSES='2', GRIPJAX_PROCESS_ID='2'),
     'GRIPJAX_PROCESS_ID=2 is invalid: expected an integer in [0, 2) (GRIPJAX_NUM_PROCESSES=2)'),
    (dict(GRIPJAX_PROCESS_ID='-1'), 'GRIPJAX_PROCESS_ID=-1 is invalid'),
    (dict(GRIPJAX_NUM_PROCESSES='0'), 'GRIPJAX_NUM_PROCESSES=0 is invalid'),
    (dict(GRIPJAX_COORDINATOR='localhost', GRIPJAX_NUM_PROCESSES='2', GRIPJAX_PROCESS_ID='0'),
     "GRIPJAX_COORDINATOR='localhost' is invalid: expected host:port"),
    (dict(GRIPJAX_COORDINATOR='localhost:1234'),
     "['GRIPJAX_NUM_PROCESSES', 'GRIPJAX_PROCESS_ID'] not set"),
    (dict(GRIPJAX_DISTRIBUTED='maybe'), "GRIPJAX_DISTRIBUTED='maybe' is invalid: expected one of"),
    (dict(GRIPJAX_INIT_TIMEOUT_S='-5'), 'GRIPJAX_INIT_TIMEOUT_S=-5 is invalid'),
    (dict(GRIPJAX_LOCAL_DEVICE_IDS='0,a'), "GRIPJAX_LOCAL_DEVICE_IDS='0,a' is invalid"),
])
def test_bad_settings_name_the_variable(fake_init, clean_env, env, message):
  from gripjax.train import distributed  # pylint: disable=g-import-not-at-top
  for k, v in env.items():
    clean_env.setenv(k, v)
  with pytest.raises(ValueError) as e:
    distributed.maybe_initialize_distributed(tpu=False)
  assert message in str(e.value)
  assert not fake_init


def test_bad_argument_names_the_argument(fake_init):
  from gripjax.train import distributed  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'process_id=5 is invalid: expected an integer in \[0, 4\) '
                     r'\(num_processes=4\)'):
    distributed.maybe_initialize_distributed('h:1', 4, 5)


# --- Worker of the local-process tests (`python -m tests.test_launch ...`). -----------------------

def _worker(arg):
  if arg == 'fail_one':  # Process 1 fails at once; process 0 would wait for a long time.
    if os.environ['GRIPJAX_PROCESS_ID'] == '1':
      sys.exit(3)
    time.sleep(300)
    return
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from gripjax.train import distributed  # pylint: disable=g-import-not-at-top
  first = distributed.maybe_initialize_distributed(timeout_s=120)
  second = distributed.maybe_initialize_distributed()
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  local = np.arange(4, dtype=np.float32) + 4 * jax.process_index()  # rows 4i .. 4i + 3
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec('data')), local)
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
  result = dict(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
                local_devices=jax.local_device_count(), total=float(total),
                primary=distributed.is_primary(), first_call=first, second_call=second)
  with open(os.path.join(arg, f'process_{jax.process_index()}.json'), 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  _worker(sys.argv[1])


# --- launch/tiny_vlm_recipe.py ------------------------------------------------------------------


def test_tiny_vlm_recipe_stages_chain_and_validate(capsys, tmp_path):
  recipe = load_script('tiny_vlm_recipe')
  lines = dry_run_lines(capsys, recipe, [f'--workdir={tmp_path}', '--', '--config.seed=3'])
  assert len(lines) == len(recipe.STAGES) == 4
  for i, (line, (stage, _)) in enumerate(zip(lines, recipe.STAGES)):
    argv = shlex.split(line)
    assert f'--workdir={tmp_path / stage}' in argv and argv[-1] == '--config.seed=3'
    if i:  # every stage continues from the previous stage's params
      previous = recipe.STAGES[i - 1][0]
      assert f'--config.pretrain.init_from={tmp_path / previous / "vlm"}' in argv
    # Each stage's overrides are valid: the same command line validates the config.
    argv[argv.index('--mode=pretrain_vlm')] = '--mode=validate_config'
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f'pair_ground: {"false" if stage == "base" else "true"}' in r.stdout
    assert f'spatial_weight: {1.0 if stage in ("spatial", "thinned") else 0.0}' in r.stdout
    assert f'background_dropout: {0.5 if stage == "thinned" else 0.0}' in r.stdout
    assert (f'init_from: {tmp_path / previous / "vlm"}' if i else 'init_from: null') in r.stdout
