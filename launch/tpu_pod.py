"""Run a gripjax config on every worker of a Cloud TPU VM pod.

  python launch/tpu_pod.py --tpu=my-v4-32 --zone=us-central2-b --config=configs/llava_1p5_7b.py \\
      --workdir=gs://my-bucket/grip/run1 -- --config.train.steps=2000 \\
      --config.train.sharding.vlm_params=fsdp
  python launch/tpu_pod.py ... --dry_run        # print the exact commands, run nothing

Each step is one `gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...`, so
every worker does the same thing at the same time:

  1. code   --code=git (default): clone --repo on every worker (or fetch, when the clone exists)
            and check out --ref (default: this checkout's HEAD commit, so every worker runs the code
            you have committed and pushed). --code=copy: pack this checkout's HEAD with
            `git archive`, copy it to every worker with `gcloud compute tpus tpu-vm scp
            --worker=all` and unpack it (no push needed; uncommitted edits are not included).
  2. install `pip install -e . 'jax[tpu]'` in the code directory (--skip_install skips it).
  3. run    `python3 -m gripjax.main --config=... --mode=train_agent --workdir=gs://...` plus the
            `--config.*` overrides given after `--`. The processes find each other by themselves
            (`maybe_initialize_distributed` on a Cloud TPU VM calls `jax.distributed.initialize()`).
            --detach runs it under nohup with its output in ~/gripjax_run.log on each worker, so
            the job survives a dropped ssh connection.

The workdir must be a bucket path (gs://...): every host reads and writes the same checkpoints.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_NAME = re.compile(r'^[a-z]([-a-z0-9]*[a-z0-9])?$')
MODE = re.compile(r'^[a-z][a-z0-9_]*$')
ENV_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
ARCHIVE = 'gripjax_code.tar.gz'
RUN_LOG = 'gripjax_run.log'


class LaunchError(ValueError):
  """A flag value the launcher cannot run with."""


def parse_args(argv):
  """(args, overrides): overrides are the `--config.*` flags after `--`."""
  if '--' in argv:
    split = argv.index('--')
    argv, overrides = argv[:split], argv[split + 1:]
  else:
    overrides = []
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--tpu', required=True, help='TPU VM (pod slice) name.')
  parser.add_argument('--zone', required=True, help='Its zone, e.g. us-central2-b.')
  parser.add_argument('--project', default=None, help='GCP project (default: gcloud\'s).')
  parser.add_argument('--config', required=True,
                      help='Config file relative to the repository, optionally FILE:ARG.')
  parser.add_argument('--mode', default='train_agent', help='gripjax.main --mode (default train_agent).')
  parser.add_argument('--workdir', required=True, help='gs://BUCKET/PATH shared by every worker.')
  parser.add_argument('--code', choices=('git', 'copy'), default='git',
                      help='git: clone/fetch --repo at --ref on the workers; copy: ship this HEAD.')
  parser.add_argument('--repo', default=None, help='Git URL for --code=git (default: origin\'s URL).')
  parser.add_argument('--ref', default=None, help='Commit, branch or tag (default: this HEAD commit).')
  parser.add_argument('--remote_dir', default='gripjax', help='Code directory on each worker, '
                      'relative to the home directory.')
  parser.add_argument('--python', default='python3', help='Python on the workers.')
  parser.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                      help='Environment variable for the run (repeatable), e.g. LIBTPU_INIT_ARGS=...')
  parser.add_argument('--skip_install', action='store_true', help='Skip the pip install step.')
  parser.add_argument('--detach', action='store_true', help=f'Run under nohup, output in ~/{RUN_LOG}.')
  parser.add_argument('--allow_local_workdir', action='store_true',
                      help='Accept a workdir that is not gs:// (each worker then writes its own).')
  parser.add_argument('--dry_run', action='store_true', help='Print the commands; run nothing.')
  return parser.parse_args(argv), overrides


def _git(*args) -> str | None:
  try:
    out = subprocess.run(['git', '-C', ROOT, *args], capture_output=True, text=True, check=True)
  except (OSError, subprocess.CalledProcessError):
    return None
  return out.stdout.strip() or None


def validate(args, overrides) -> None:
  """Raises LaunchError naming the flag, its value and what was expected."""
  if not TPU_NAME.match(args.tpu):
    raise LaunchError(f'--tpu={args.tpu!r} is invalid: expected a TPU name (lowercase letters, '
                      'digits and hyphens, starting with a letter).')
  if not re.match(r'^[a-z]+-[a-z]+[0-9]+-[a-z]$', args.zone):
    raise LaunchError(f'--zone={args.zone!r} is invalid: expected a zone such as us-central2-b.')
  config_file = args.config.split(':', 1)[0]  # FILE or FILE:ARG, as ml_collections' config_flags.
  if os.path.isabs(config_file) or not os.path.isfile(os.path.join(ROOT, config_file)):
    raise LaunchError(f'--config={args.config!r} is invalid: expected a config file path relative to '
                      f'the repository root {ROOT}, optionally with :ARG, e.g. configs/llava_1p5_7b.py '
                      'or configs/llava_hf.py:/path/to/checkpoint.')
  if not MODE.match(args.mode):
    raise LaunchError(f'--mode={args.mode!r} is invalid: expected a gripjax.main mode such as '
                      'train_agent.')
  if not args.workdir.startswith('gs://') and not args.allow_local_workdir:
    raise LaunchError(f'--workdir={args.workdir!r} is invalid: expected gs://BUCKET/PATH, which every '
                      'worker shares (or pass --allow_local_workdir).')
  if args.code == 'git' and not args.repo:
    raise LaunchError('--repo is required with --code=git: this checkout has no origin URL to '
                      'default to (or use --code=copy).')
  if not args.ref:
    raise LaunchError('--ref is required: this checkout has no HEAD commit to default to.')
  if (args.remote_dir.startswith(('/', '~', '-')) or '..' in args.remote_dir.split('/')
      or os.path.normpath(args.remote_dir) == '.'):  # --code=copy replaces this directory.
    raise LaunchError(f'--remote_dir={args.remote_dir!r} is invalid: expected a path relative to the '
                      'home directory, e.g. gripjax.')
  for item in args.env:
    name, sep, _ = item.partition('=')
    if not sep or not ENV_NAME.match(name):
      raise LaunchError(f'--env={item!r} is invalid: expected KEY=VALUE.')
  for flag in overrides:
    if not flag.startswith('--config.') or '=' not in flag:
      raise LaunchError(f'{flag!r} after -- is invalid: expected --config.FIELD=VALUE overrides '
                        '(set --config, --mode and --workdir with this script\'s flags).')


def _gcloud(args, verb: str, *rest) -> list[str]:
  cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *rest, f'--zone={args.zone}', '--worker=all']
  if args.project:
    cmd.append(f'--project={args.project}')
  return cmd


def _ssh(args, command: str) -> list[str]:
  return _gcloud(args, 'ssh', args.tpu) + [f'--command={command}']


def build_steps(args, overrides, archive_path: str | None = None) -> list[tuple[str, list[str]]]:
  """[(description, argv), ...]: the commands, in order; the local ones run on this machine."""
  d = shlex.quote(args.remote_dir)
  steps = []
  if args.code == 'git':
    ref, repo = shlex.quote(args.ref), shlex.quote(args.repo)
    fetch = (f'if [ -d {d}/.git ]; then git -C {d} remote set-url origin {repo}; '
             f'else git clone --quiet {repo} {d}; fi && git -C {d} fetch --quiet origin {ref} && '
             f'git -C {d} checkout --quiet --force FETCH_HEAD && git -C {d} log -1 --format=%H')
    steps.append(('code: fetch the repository at the ref on every worker', _ssh(args, fetch)))
  else:
    archive_path = archive_path or os.path.join(tempfile.gettempdir(), ARCHIVE)
    steps.append(('code: pack this checkout\'s HEAD',
                  ['git', '-C', ROOT, 'archive', '--format=tar.gz', '-o', archive_path, args.ref]))
    steps.append(('code: copy it to every worker',
                  _gcloud(args, 'scp', archive_path, f'{args.tpu}:{ARCHIVE}')))
    steps.append(('code: unpack it on every worker',
                  _ssh(args, f'rm -rf {d} && mkdir -p {d} && tar -xzf {ARCHIVE} -C {d}')))
  if not args.skip_install:
    py = shlex.quote(args.python)
    steps.append(('install: gripjax and jax[tpu] on every worker',
                  _ssh(args, f'cd {d} && {py} -m pip install --quiet --upgrade pip && '
                       f'{py} -m pip install --quiet -e . {shlex.quote("jax[tpu]")}')))
  run = [args.python, '-m', 'gripjax.main', f'--config={args.config}', f'--mode={args.mode}',
         f'--workdir={args.workdir}', *overrides]
  if args.env:
    run = ['env', *args.env, *run]
  command = f'cd {d} && {shlex.join(run)}'
  if args.detach:
    command = f'cd {d} && nohup {shlex.join(run)} > ~/{RUN_LOG} 2>&1 < /dev/null &'
  steps.append((f'run: gripjax.main --mode={args.mode} on every worker', _ssh(args, command)))
  return steps


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  args.repo = args.repo or _git('remote', 'get-url', 'origin')
  args.ref = args.ref or _git('rev-parse', 'HEAD')
  try:
    validate(args, overrides)
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  steps = build_steps(args, overrides)
  if args.dry_run:
    for description, cmd in steps:
      print(f'# {description}')
      print(shlex.join(cmd))
    return 0
  if shutil.which('gcloud') is None:
    print('error: gcloud is not on PATH: install the Google Cloud CLI '
          '(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`.', file=sys.stderr)
    return 2
  for description, cmd in steps:
    print(f'# {description}\n{shlex.join(cmd)}', flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if rc:
      print(f'error: step "{description}" failed with exit status {rc}.', file=sys.stderr)
      return rc
  return 0


if __name__ == '__main__':
  sys.exit(main())
