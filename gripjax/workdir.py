"""The workdir: checked writable, and held by one run at a time.

  from gripjax import workdir
  lock = workdir.claim('/tmp/grip', mode='train_agent')  # what `main` does at start-up
  ...
  lock.release()  # also done at exit, and by the kernel when the process dies

`claim` runs before anything is loaded, so a bad workdir fails in well under a second with one
`WorkdirError` naming it:

1. Writable: the directory is created, then a probe file of PROBE_BYTES is written, fsynced and
   removed. A read-only directory or a full disk fails here, not as a raw OSError after the models
   have loaded.
2. Exclusive: an `fcntl.flock(LOCK_EX | LOCK_NB)` on WORKDIR/.gripjax.lock, with this process's pid,
   host, mode and start time written in the file. A second run in the same workdir is refused
   naming the first (two runs would resume from each other's checkpoints, clean each other's
   temporary checkpoints and rewrite each other's metrics.jsonl). The kernel drops a flock when its
   process dies, so the lock file a killed run leaves behind is free: it is taken over, and the
   takeover logged with the killed run's pid and host.

Release removes the lock file while still holding the lock; a process that opened the old file in
that instant notices (its inode is no longer the path's) and opens the new one, so two processes
never both believe they hold the workdir.

Processes of one multi-process run share the workdir: process i > 0 locks `.gripjax.lock.<i>`, so a
second multi-process run is refused on every process. A bucket workdir (gs://...) has no flock and
is neither probed nor locked (a warning says so).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from typing import Any, Optional

from absl import logging

LOCK_NAME = '.gripjax.lock'
PROBE_NAME = '.gripjax-write-probe'
PROBE_BYTES = 1 << 20  # A disk that cannot take 1 MiB cannot take a checkpoint either.

_held: dict[str, 'WorkdirLock'] = {}  # Lock path -> lock: keeps the open file (and its flock) alive.


class WorkdirError(RuntimeError):
  """The workdir cannot be used: not writable, full, or held by another run."""


def lock_path(workdir: str, process_index: int = 0) -> str:
  name = LOCK_NAME if process_index == 0 else f'{LOCK_NAME}.{process_index}'
  return os.path.join(workdir, name)


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and writes, fsyncs and removes a probe file of PROBE_BYTES in it.

  Raises:
    WorkdirError: naming the directory and the OS's reason (read-only, permission, no space).
  """
  probe = os.path.join(workdir, f'{PROBE_NAME}-{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
      view = memoryview(bytes(PROBE_BYTES))
      while view:
        view = view[os.write(fd, view):]
      os.fsync(fd)
    finally:
      os.close(fd)
      if os.path.exists(probe):
        os.remove(probe)
  except OSError as e:
    detail = f'{type(e).__name__}: {e.strerror or e}'
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      try:
        free = shutil.disk_usage(workdir).free
        detail += f' ({free / 2**20:.1f} MiB free)'
      except OSError:
        pass
    raise WorkdirError(
        f'--workdir={workdir} is not writable ({detail}): expected a directory where this run can '
        f'write checkpoints and results (a {PROBE_BYTES // 2**20} MiB test file failed). Free space, '
        'fix its permissions, or pick another --workdir.') from None


def _describe(info: dict[str, Any]) -> str:
  """'pid 123 on host h (mode=train_agent, started 2026-01-01 10:00:00 UTC)' from a lock's JSON."""
  what = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
  extra = []
  if info.get('mode'):
    extra.append(f"mode={info['mode']}")
  if isinstance(info.get('started'), (int, float)):
    extra.append('started ' + time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(info['started'])))
  return what + (f' ({", ".join(extra)})' if extra else '')


def _read_info(fd: int) -> Optional[dict[str, Any]]:
  """The holder's JSON in an open lock file; {} for unreadable text; None for an empty file."""
  os.lseek(fd, 0, os.SEEK_SET)
  data = b''
  while chunk := os.read(fd, 4096):
    data += chunk
  if not data.strip():
    return None
  try:
    info = json.loads(data)
  except ValueError:
    return {}
  return info if isinstance(info, dict) else {}


def _pid_alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """An exclusive lock on a workdir (see the module docstring); `release()` is idempotent."""

  def __init__(self, workdir: str, path: str, fd: int, info: dict[str, Any]):
    self.workdir = workdir
    self.path = path
    self.info = info
    self._fd: Optional[int] = fd

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    """Removes the lock file, then drops the lock (in that order: see the module docstring)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    _held.pop(self.path, None)
    try:
      if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
        os.remove(self.path)
    except OSError as e:  # Released anyway: the kernel drops the flock when the fd closes.
      logging.warning('could not remove the lock file %s (%s)', self.path, e)
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()

  def __repr__(self):
    return f'WorkdirLock({self.path!r}, held={self.held})'


def acquire(workdir: str, mode: str = '', process_index: int = 0) -> WorkdirLock:
  """Takes the exclusive lock of `workdir` (which must exist) for this process.

  Raises:
    WorkdirError: another live process holds it (the message names it), or the lock file cannot
      be created.
  """
  path = lock_path(workdir, process_index)
  if path in _held:
    raise WorkdirError(f'{workdir} is already locked by this process ({_describe(_held[path].info)}).')
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f'cannot create the lock file {path} ({type(e).__name__}: {e.strerror}): '
                         'expected a writable --workdir.') from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_info(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        who = _describe(holder) if holder else 'another process (its lock file is still empty)'
        raise WorkdirError(
            f'--workdir={workdir} is in use by another gripjax run: {who} holds {path}. Two runs '
            'in one workdir overwrite each other\'s checkpoints and metrics; wait for it to finish '
            '(or stop it), or pick another --workdir.') from None
      raise WorkdirError(f'cannot lock {path} ({type(e).__name__}: {e.strerror}); the file system '
                         'of --workdir may not support locks: pick a local --workdir.') from None
    try:  # The holder may have removed the file between our open and our flock: lock the new one.
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  previous = _read_info(fd)
  info = {'pid': os.getpid(), 'host': socket.gethostname(), 'mode': mode, 'started': time.time()}
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, (json.dumps(info) + '\n').encode())
  os.fsync(fd)
  if previous is not None:
    state = ''
    if previous.get('host') == info['host']:  # A pid means something on its own host only.
      alive = _pid_alive(previous.get('pid'))
      state = ', still running but no longer holding it' if alive else ', no longer running'
    logging.warning('took over the stale lock %s left by %s%s (a killed or crashed run; its '
                    'checkpoints are resumed as usual)', path, _describe(previous) if previous
                    else 'an unknown process', state)
  lock = WorkdirLock(workdir, path, fd, info)
  _held[path] = lock
  return lock


def claim(workdir: str, mode: str = '', process_index: Optional[int] = None
          ) -> Optional[WorkdirLock]:
  """Start-up check of a run's workdir: creates it, checks it writable, locks it (released at exit).

  Args:
    workdir: the run's --workdir (a local path, or a bucket URL, which is neither probed nor locked).
    mode: the run's mode, written in the lock file so a refused run can name it.
    process_index: this process's index in a multi-process run (default: `jax.process_index()`).

  Returns:
    The held `WorkdirLock`, or None for a bucket workdir.

  Raises:
    WorkdirError: naming the directory and the problem.
  """
  if '://' in str(workdir):
    logging.warning('--workdir=%s is a bucket: not locked; do not start two runs in it.', workdir)
    return None
  workdir = os.path.abspath(workdir)
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top  # Only here: the lock itself needs no jax.
    process_index = jax.process_index()
  check_writable(workdir)
  lock = acquire(workdir, mode, process_index)
  atexit.register(lock.release)
  return lock
