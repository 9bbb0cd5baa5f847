"""Multi-host start-up: one `maybe_initialize_distributed()` that is safe to call anywhere.

  from gripjax.train import distributed
  distributed.maybe_initialize_distributed()   # first thing in main, before any JAX computation
  ...
  if distributed.is_primary():                 # process 0 writes logs and summaries
    ...

Where the settings come from (arguments first, then the environment):

  GRIPJAX_COORDINATOR       host:port of the coordinator service, which process 0 starts
                            (e.g. 10.0.0.2:8476, or localhost:8476 for processes on one machine).
  GRIPJAX_NUM_PROCESSES     total number of processes (hosts, or processes per host x hosts).
  GRIPJAX_PROCESS_ID        this process's index, in [0, GRIPJAX_NUM_PROCESSES).
  GRIPJAX_LOCAL_DEVICE_IDS  optional: comma-separated local device ids this process uses (GPU).
  GRIPJAX_INIT_TIMEOUT_S    seconds to wait for every process to join (default 900: pod workers
                            finish installing at different times).
  GRIPJAX_DISTRIBUTED       'auto' (default), 'off' (never initialize) or 'cluster' (call
                            jax.distributed.initialize() with no arguments: JAX detects Cloud
                            TPU, Slurm, Open MPI or GKE by itself).

What 'auto' does:
  - coordinator, process count and id all given: `jax.distributed.initialize` with them (CPU or GPU
    processes; for several CPU processes, cross-process collectives use gloo).
  - none given, on a Cloud TPU VM: `jax.distributed.initialize()` with no arguments; JAX reads the
    pod's topology from the TPU metadata.
  - none given elsewhere: a single process; nothing is initialized.
  - only some given: an error naming the missing ones.
"""

from __future__ import annotations

import glob
import os
from typing import Sequence

import jax
from absl import logging

COORDINATOR_ENV = 'GRIPJAX_COORDINATOR'
NUM_PROCESSES_ENV = 'GRIPJAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'GRIPJAX_PROCESS_ID'
LOCAL_DEVICE_IDS_ENV = 'GRIPJAX_LOCAL_DEVICE_IDS'
TIMEOUT_ENV = 'GRIPJAX_INIT_TIMEOUT_S'
MODE_ENV = 'GRIPJAX_DISTRIBUTED'

MODES = ('auto', 'off', 'cluster')
DEFAULT_TIMEOUT_S = 900


def is_initialized() -> bool:
  """Whether `jax.distributed.initialize` has run in this process."""
  fn = getattr(jax.distributed, 'is_initialized', None)
  if fn is not None:
    return bool(fn())
  from jax._src import distributed as _dist  # pylint: disable=g-import-not-at-top  # Private JAX: only on this fallback path.
  return _dist.global_state.client is not None


def is_primary() -> bool:
  """True on process 0: the one that writes logs, summaries and single-writer files."""
  return jax.process_index() == 0


def on_cloud_tpu() -> bool:
  """Whether this machine has TPU chips attached (a Cloud TPU VM), read without starting JAX."""
  try:  # The same PCI probe JAX runs at import; private, so it may move between versions.
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError, OSError):
    return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def _setting(value, env: str, arg: str):
  """(value, label) from the argument, else the environment; label names the source in errors."""
  if value is not None:
    return value, arg
  text = os.environ.get(env)
  if text is None or not text.strip():
    return None, env
  return text.strip(), env


def _int(value, label: str, expected: str) -> int:
  try:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
      raise ValueError
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f'{label}={value!r} is invalid: expected {expected}.') from None


def _coordinator(value: str, label: str) -> str:
  host, sep, port = str(value).rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'{label}={value!r} is invalid: expected host:port of process 0, e.g. '
                     "'10.0.0.2:8476' or 'localhost:8476'.")
  return str(value)


def _device_ids(value, label: str) -> list[int] | None:
  if value is None:
    return None
  items = value.split(',') if isinstance(value, str) else list(value)
  try:
    ids = [int(x) for x in items]
    if not ids or any(i < 0 for i in ids):
      raise ValueError
  except (TypeError, ValueError):
    raise ValueError(f'{label}={value!r} is invalid: expected comma-separated non-negative '
                     "device ids, e.g. '0,1'.") from None
  return ids


def _enable_cpu_collectives():
  """Cross-process collectives between CPU devices (gloo), unless another one was chosen."""
  try:
    current = jax.config.jax_cpu_collectives_implementation
  except AttributeError:  # A JAX without the option: nothing to choose.
    return
  if current in (None, '', 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None, *,
                                 local_device_ids: Sequence[int] | str | None = None,
                                 timeout_s: int | None = None,
                                 mode: str | None = None,
                                 tpu: bool | None = None) -> bool:
  """Starts JAX's distributed system when the settings ask for it; safe to call more than once.

  Call it before any JAX computation (before `jax.devices()` too). See the module docstring for the
  environment variables each argument falls back to.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator (GRIPJAX_COORDINATOR).
    num_processes: total number of processes (GRIPJAX_NUM_PROCESSES).
    process_id: this process's index in [0, num_processes) (GRIPJAX_PROCESS_ID).
    local_device_ids: local devices this process uses (GRIPJAX_LOCAL_DEVICE_IDS); None: all.
    timeout_s: seconds to wait for all processes (GRIPJAX_INIT_TIMEOUT_S; default 900).
    mode: 'auto', 'off' or 'cluster' (GRIPJAX_DISTRIBUTED; default 'auto').
    tpu: whether this is a Cloud TPU VM; None: detect.

  Returns:
    True when this call initialized the distributed system; False when it was already initialized
    or the settings describe a single process.

  Raises:
    ValueError naming the setting and its bad value: a partial or inconsistent set of settings
    (e.g. a process id not below the process count), or settings that disagree with an earlier
    initialization.
    RuntimeError when JAX has already run computations in this process.
  """
  mode, mode_label = _setting(mode, MODE_ENV, 'mode')
  mode = (mode or 'auto').lower()
  if mode not in MODES:
    raise ValueError(f'{mode_label}={mode!r} is invalid: expected one of {MODES}.')
  coordinator, coordinator_label = _setting(coordinator_address, COORDINATOR_ENV, 'coordinator_address')
  count, count_label = _setting(num_processes, NUM_PROCESSES_ENV, 'num_processes')
  index, index_label = _setting(process_id, PROCESS_ID_ENV, 'process_id')
  ids, ids_label = _setting(local_device_ids, LOCAL_DEVICE_IDS_ENV, 'local_device_ids')
  timeout, timeout_label = _setting(timeout_s, TIMEOUT_ENV, 'timeout_s')

  seconds = 'a positive number of seconds'
  timeout = DEFAULT_TIMEOUT_S if timeout is None else _int(timeout, timeout_label, seconds)
  if timeout <= 0:
    raise ValueError(f'{timeout_label}={timeout!r} is invalid: expected a positive number of seconds.')
  if count is not None:
    count = _int(count, count_label, 'a positive integer (the number of processes)')
    if count < 1:
      raise ValueError(f'{count_label}={count!r} is invalid: expected a positive integer (the number '
                       'of processes).')
  if index is not None:
    index = _int(index, index_label, 'a non-negative integer (this process\'s index)')
    if index < 0 or (count is not None and index >= count):
      bound = f'[0, {count}) ({count_label}={count})' if count is not None else 'a non-negative integer'
      raise ValueError(f'{index_label}={index!r} is invalid: expected an integer in {bound}.')
  if coordinator is not None:
    coordinator = _coordinator(coordinator, coordinator_label)
  ids = _device_ids(ids, ids_label)

  given = {coordinator_label: coordinator, count_label: count, index_label: index}
  explicit = any(v is not None for v in given.values())
  if explicit and mode != 'off':
    missing = [label for label, v in given.items() if v is None]
    if missing:
      raise ValueError(f'distributed settings are incomplete: {missing} not set, while '
                       f'{[label for label, v in given.items() if v is not None]} are. Set all of '
                       f'{COORDINATOR_ENV}, {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} (or the '
                       'arguments), or none of them for a single process.')

  if is_initialized():
    if count is not None and jax.process_count() != count:
      raise ValueError(f'{count_label}={count} is invalid: JAX is already initialized with '
                       f'{jax.process_count()} processes.')
    if index is not None and jax.process_index() != index:
      raise ValueError(f'{index_label}={index} is invalid: this process was already initialized '
                       f'as process {jax.process_index()}.')
    logging.info('jax.distributed already initialized: process %d of %d.', jax.process_index(),
                 jax.process_count())
    return False
  if mode == 'off':
    return False

  kwargs = dict(initialization_timeout=timeout)
  if ids is not None:
    kwargs['local_device_ids'] = ids
  if explicit:
    if count > 1:
      _enable_cpu_collectives()  # Only the CPU backend reads it; harmless on GPU.
    kwargs.update(coordinator_address=coordinator, num_processes=count, process_id=index)
    how = f'process {index} of {count}, coordinator {coordinator}'
  elif mode == 'cluster' or (tpu if tpu is not None else on_cloud_tpu()):
    how = 'settings detected by JAX' + (' (Cloud TPU)' if mode != 'cluster' else '')
  else:
    return False  # One process: nothing to start.

  logging.info('jax.distributed.initialize: %s, timeout %d s.', how, timeout)
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    if 'before' in str(e).lower():
      raise RuntimeError(f'{e} Call maybe_initialize_distributed() first in main, before any '
                         'jax.devices() or computation.') from e
    raise
  logging.info('process %d of %d; %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
