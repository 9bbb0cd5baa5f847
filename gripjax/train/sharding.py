"""Device mesh and shardings of the agent's training step (data parallel for now).

  mesh = make_mesh(config)                    # config.train.mesh = (('data', -1),)
  batch = shard_batch(numpy_batch, mesh)      # rows split over 'data', one global jax.Array per key

The same code runs on 1 CPU, 8 fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`),
one GPU and a TPU pod: a batch's rows and the B x G rollouts are split over the 'data' axis; the
agent's and the frozen VLM's params are replicated. Mesh axes are `Auto` so the compiler propagates
shardings from the inputs and the few explicit constraints in the step.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def mesh_shape(spec: Sequence, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves a `config.train.mesh` spec ((name, size), ...) against `num_devices`.

  At most one size may be -1: it takes num_devices / (product of the others).
  """
  try:
    pairs = [(str(name), int(size)) for name, size in spec]
  except (TypeError, ValueError):
    raise ValueError(f'config.train.mesh={spec!r} is invalid: expected a tuple of (axis_name, size) '
                     "pairs, e.g. (('data', -1),).") from None
  if not pairs:
    raise ValueError(f'config.train.mesh={spec!r} is invalid: expected at least one axis.')
  names = tuple(n for n, _ in pairs)
  if len(set(names)) != len(names):
    raise ValueError(f'config.train.mesh={spec!r} is invalid: axis names must be unique.')
  sizes = [s for _, s in pairs]
  if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.train.mesh={spec!r} is invalid: sizes must be positive, with at most '
                     'one -1 (the remaining devices).')
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f'config.train.mesh={spec!r} is invalid: the fixed axis sizes multiply to {known}, '
                     f'which does not divide the {num_devices} devices.')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.train.mesh={spec!r} is invalid: the axis sizes multiply to '
                     f'{math.prod(sizes)}, expected the {num_devices} devices (use -1 for one axis).')
  return names, tuple(sizes)


def make_mesh(config, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """The mesh of `config.train.mesh` over `devices` (default: all devices); needs a 'data' axis."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(config.train.mesh, len(devices))
  if DATA_AXIS not in names:
    raise ValueError(f'config.train.mesh={config.train.mesh!r} is invalid: expected a {DATA_AXIS!r} axis.')
  return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def data_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'; other axes replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_size(mesh) -> int:
  return int(mesh.shape[DATA_AXIS])


def check_batch_size(batch_size: int, mesh, what: str = 'config.train.batch_size') -> None:
  """Raises unless the global batch splits evenly over the data axis and the processes."""
  n = data_size(mesh)
  if batch_size % n:
    raise ValueError(f'{what}={batch_size} is invalid: expected a multiple of the mesh\'s '
                     f'{DATA_AXIS!r} axis size {n} (every device takes the same number of rows).')
  if batch_size % jax.process_count():
    raise ValueError(f'{what}={batch_size} is invalid: expected a multiple of the '
                     f'{jax.process_count()} processes.')


def shard_batch(batch: dict[str, Any], mesh) -> dict[str, jax.Array]:
  """This process's numpy rows -> global arrays with rows split over 'data'.

  Each process passes its own rows (batch_size / process_count of them); the global batch is their
  concatenation in process order.
  """
  sharding = data_sharding(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f'batch[{key!r}] is a scalar; expected a leading batch axis.')
    check_batch_size(value.shape[0] * jax.process_count(), mesh, f'batch[{key!r}].shape[0] (global)')
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
