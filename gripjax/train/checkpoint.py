"""Orbax checkpoints: atomic parameter files and a resumable training-state manager.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run killed
mid-write leaves the previous checkpoint intact; `latest_complete_step` skips anything unfinished.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


def save_params(path: str, params: Any) -> None:
  """Writes a parameter pytree to `path` atomically (replacing an older checkpoint there)."""
  path = os.path.abspath(path)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params, force=True)
  checkpointer.wait_until_finished()


def load_params(path: str, abstract: Any | None = None) -> Any:
  """Reads a parameter pytree from `path`.

  Args:
    path: an Orbax checkpoint directory written by `save_params`.
    abstract: optional pytree of `jax.ShapeDtypeStruct` (with shardings) to restore into; shapes and
      dtypes are checked against the checkpoint.

  Returns:
    The parameter pytree, as jax arrays.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'checkpoint {path!r} does not exist: expected an Orbax checkpoint directory '
        '(ship one, or train it with --mode=pretrain_vlm)')
  checkpointer = ocp.StandardCheckpointer()
  if abstract is None:
    return checkpointer.restore(path)
  return checkpointer.restore(path, abstract)


def abstract_like(tree: Any) -> Any:
  """Abstract (shape, dtype, sharding) version of a pytree of arrays, for restoring into."""
  def leaf(x):
    sharding = getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


def make_manager(directory: str, max_to_keep: int = 2, save_interval_steps: int = 1
                 ) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` that keeps the last `max_to_keep` complete checkpoints."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[int, Any] | None:
  """Restores the newest complete checkpoint into `abstract_state`; None when there is none.

  A checkpoint that fails to read (truncated or corrupted files) is reported and the next older
  one is tried, so one bad write never loses the run.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      logging.error('checkpoint at step %d in %s is unreadable (%s: %s); trying an older one',
                    step, manager.directory, type(e).__name__, e)
      continue
    logging.info('restored checkpoint at step %d from %s', step, manager.directory)
    return step, state
  return None
