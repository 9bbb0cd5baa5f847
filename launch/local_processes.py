"""Run N processes on this machine as one JAX cluster, each with M fake CPU devices.

  python launch/local_processes.py --num_processes=2 --devices_per_process=4 -- \\
      --config=configs/gripbench_tiny.py --mode=train_agent --workdir=/tmp/agent_2x4
  python launch/local_processes.py ... --dry_run        # print the commands, run nothing

The multi-host set-up of a pod, simulated on one CPU machine: process i runs
`python -m gripjax.main ARGS...` (the arguments after `--`; another module with --module) with

  GRIPJAX_COORDINATOR=localhost:PORT  GRIPJAX_NUM_PROCESSES=N  GRIPJAX_PROCESS_ID=i
  XLA_FLAGS=--xla_force_host_platform_device_count=M  JAX_PLATFORMS=cpu

so `maybe_initialize_distributed()` joins the processes into one N x M device mesh (collectives
over gloo). It waits for all of them; when one fails, it stops the others and exits with that
process's status (0 when every process succeeds).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
MODULE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')


def parse_args(argv):
  """(args, passthrough): passthrough are the module's arguments, after `--`."""
  if '--' in argv:
    split = argv.index('--')
    argv, passthrough = argv[:split], argv[split + 1:]
  else:
    passthrough = []
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_processes', type=int, default=2, help='Processes to start (N).')
  parser.add_argument('--devices_per_process', type=int, default=4, help='Fake CPU devices each (M).')
  parser.add_argument('--port', type=int, default=0, help='Coordinator port; 0: a free one.')
  parser.add_argument('--module', default='gripjax.main', help='Module each process runs with -m.')
  parser.add_argument('--python', default=sys.executable, help='Python interpreter.')
  parser.add_argument('--log_dir', default=None,
                      help='Write process_<i>.log here instead of sharing this terminal.')
  parser.add_argument('--timeout_s', type=float, default=None,
                      help='Stop every process after this many seconds (exit status 124).')
  parser.add_argument('--dry_run', action='store_true', help='Print the commands; run nothing.')
  return parser.parse_args(argv), passthrough


def validate(args) -> None:
  """Raises ValueError naming the flag, its value and what was expected."""
  if args.num_processes < 1:
    raise ValueError(f'--num_processes={args.num_processes} is invalid: expected a positive integer.')
  if args.devices_per_process < 1:
    raise ValueError(f'--devices_per_process={args.devices_per_process} is invalid: expected a '
                     'positive integer.')
  if not 0 <= args.port < 65536:
    raise ValueError(f'--port={args.port} is invalid: expected 0 (a free port) or a port in [1, 65535].')
  if not MODULE.match(args.module):
    raise ValueError(f'--module={args.module!r} is invalid: expected a dotted module name such as '
                     'gripjax.main.')
  if args.timeout_s is not None and args.timeout_s <= 0:
    raise ValueError(f'--timeout_s={args.timeout_s} is invalid: expected a positive number of seconds.')


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], port: int, num_processes: int, process_id: int,
                devices: int) -> dict[str, str]:
  """The environment of process `process_id`: base, the GRIPJAX_* settings, M CPU devices."""
  xla_flags = [f for f in base.get('XLA_FLAGS', '').split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return dict(base, GRIPJAX_COORDINATOR=f'localhost:{port}', GRIPJAX_NUM_PROCESSES=str(num_processes),
              GRIPJAX_PROCESS_ID=str(process_id), JAX_PLATFORMS='cpu',
              XLA_FLAGS=' '.join(xla_flags + [f'{DEVICE_COUNT_FLAG}={devices}']))


def commands(args, passthrough, port: int) -> list[tuple[dict[str, str], list[str]]]:
  """[(extra environment, argv), ...], one per process."""
  # Only the caller's XLA_FLAGS are repeated (minus any device count); the rest is inherited.
  base = {'XLA_FLAGS': os.environ['XLA_FLAGS']} if os.environ.get('XLA_FLAGS') else {}
  return [(process_env(base, port, args.num_processes, i, args.devices_per_process),
           [args.python, '-m', args.module, *passthrough]) for i in range(args.num_processes)]


def _stop(procs, grace_s: float = 10.0):
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def run(cmds, log_dir: str | None = None, timeout_s: float | None = None) -> int:
  """Starts every process, waits; stops the rest when one fails. Returns the exit status."""
  procs, logs = [], []
  try:
    for i, (env, argv) in enumerate(cmds):
      out = None
      if log_dir:
        out = open(os.path.join(log_dir, f'process_{i}.log'), 'w')
        logs.append(out)
      procs.append(subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, **env), stdout=out,
                                    stderr=subprocess.STDOUT if out else None))
    start = time.monotonic()
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        print(f'error: process {i} exited with status {code}; stopping the others.', file=sys.stderr)
        _stop(procs)
        return code if code > 0 else 1
      if all(c == 0 for c in codes):
        return 0
      if timeout_s is not None and time.monotonic() - start > timeout_s:
        print(f'error: timed out after {timeout_s} s; stopping every process.', file=sys.stderr)
        _stop(procs)
        return 124
      time.sleep(0.2)
  except KeyboardInterrupt:
    _stop(procs)
    return 130
  finally:
    for f in logs:
      f.close()


def main(argv=None) -> int:
  args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    validate(args)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  port = args.port or free_port()
  cmds = commands(args, passthrough, port)
  if args.dry_run:
    for env, argv in cmds:
      print(shlex.join(['env', *(f'{k}={v}' for k, v in env.items()), *argv]))
    return 0
  if args.log_dir:
    os.makedirs(args.log_dir, exist_ok=True)
  return run(cmds, args.log_dir, args.timeout_s)


if __name__ == '__main__':
  sys.exit(main())
