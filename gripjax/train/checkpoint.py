"""Orbax checkpoints: atomic parameter files and a resumable training-state manager.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run killed
mid-write leaves the previous checkpoint intact, and the manager lists complete steps only.

The agent trainer's checkpoints hold two items per step:

  WORKDIR/checkpoints/<step>/state/   the TrainState (params, optimizer state, reference params,
                                      step, PRNG key), restored into a sharded abstract tree, so a
                                      run saved on 8 devices restores on 4 (or 1)
  WORKDIR/checkpoints/<step>/meta/    JSON: the data iterator's position and order (next step, seed,
                                      batch size, examples), the mesh, and a fingerprint of every
                                      state leaf

  manager = make_train_manager(directory, max_to_keep=config.train.checkpoint_keep)
  save_train_state(manager, step, state_tree, meta)            # async; returns once copied to host
  restored = restore_train_state(manager, abstract_state_tree)  # None, or (step, state, meta)

A checkpoint whose files are truncated or corrupted either fails to read or fails its fingerprint;
`restore_train_state` logs which and why, falls back to the next older one, and moves the bad ones
to `<directory>.unusable/` so the resumed run can write those steps again.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gripjax.train import sharding

STATE_ITEM = 'state'
META_ITEM = 'meta'


def _abspath(path: str) -> str:
  """Absolute local paths; bucket URLs (gs://...) as they are."""
  return str(path) if '://' in str(path) else os.path.abspath(path)


def save_params(path: str, params: Any) -> None:
  """Writes a parameter pytree to `path` atomically (replacing an older checkpoint there)."""
  path = _abspath(path)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params, force=True)
  checkpointer.wait_until_finished()


def load_params(path: str, abstract: Any | None = None) -> Any:
  """Reads a parameter pytree from `path`.

  Args:
    path: an Orbax checkpoint directory written by `save_params`.
    abstract: optional pytree of `jax.ShapeDtypeStruct` (with shardings) to restore into; shapes and
      dtypes are checked against the checkpoint. None: every array whole on this process's first
      device, whatever mesh (and processes) wrote the checkpoint.

  Returns:
    The parameter pytree, as jax arrays.
  """
  path = _abspath(path)
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(
        f'checkpoint {path!r} does not exist: expected an Orbax checkpoint directory '
        '(ship one, or train it with --mode=pretrain_vlm)')
  checkpointer = ocp.StandardCheckpointer()
  if abstract is None:
    # Orbax's own default restores into the saved shardings, which fails (topology mismatch) when
    # the checkpoint was written from more devices than this process sees.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = checkpointer.metadata(path).item_metadata
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            getattr(meta, 'tree', meta))
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
  return ocp.CheckpointManager(_abspath(directory), options=options)


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


# --- The agent trainer's checkpoints: state + JSON metadata, fingerprinted. ----------------------

class CheckpointError(RuntimeError):
  """No checkpoint in a directory that has some could be restored."""


def make_train_manager(directory: str, max_to_keep: int = 2, async_save: bool = True
                       ) -> ocp.CheckpointManager:
  """A CheckpointManager of (state, meta) items keeping the last `max_to_keep` complete steps.

  Saves are asynchronous unless `async_save` is False: `save_train_state` returns once the arrays
  are copied to host memory (so the state may be donated right after) and the files are written in
  the background; call `manager.wait_until_finished()` before exiting. Leftover temporary
  directories of a killed run are removed.
  """
  if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
    raise ValueError(f'max_to_keep={max_to_keep!r} is invalid: expected an integer >= 1.')
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(_abspath(directory), options=options,
                               item_names=(STATE_ITEM, META_ITEM))


def _leaf_fingerprint(x):
  """(2,) uint32: sum of the leaf's bit patterns, plain and position-weighted, modulo 2**32.

  Integer sums are exact in any order, so the fingerprint of a leaf does not depend on how it is
  sharded (a checkpoint saved on 8 devices checks out on 4).
  """
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif x.dtype.itemsize == 1:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  else:  # 8-byte types (with jax_enable_x64): both halves.
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  bits = bits.reshape(-1)
  weight = jnp.arange(bits.shape[0], dtype=jnp.uint32) % jnp.uint32(65521) + jnp.uint32(1)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


_fingerprints = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprint(tree: Any) -> dict[str, list[int]]:
  """{leaf path: [sum, weighted sum] of its bits mod 2**32} for every leaf of `tree` (see above)."""
  values = jax.device_get(_fingerprints(tree))
  leaves = jax.tree_util.tree_leaves_with_path(values)
  return {sharding.path_str(path) or '.': [int(v) for v in np.asarray(x)] for path, x in leaves}


def save_train_state(manager: ocp.CheckpointManager, step: int, state: Any,
                     meta: dict[str, Any] | None = None) -> bool:
  """Saves `state` (a pytree of arrays) and `meta` (JSON-able) as checkpoint `step`.

  The state's fingerprint is added to the metadata as 'fingerprint'. Returns whether a save
  started (False when the manager's save policy skips `step`).
  """
  meta = dict(meta or {}, step=int(step), fingerprint=fingerprint(state))
  return manager.save(int(step), args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}))


def _check_fingerprint(state, meta) -> None:
  saved = meta.get('fingerprint') if isinstance(meta, dict) else None
  if not isinstance(saved, dict):
    raise ValueError('its metadata has no fingerprint')
  found = fingerprint(state)
  if set(found) != set(saved):
    raise ValueError(f'its leaves {sorted(set(found) ^ set(saved))[:5]} are missing from the state '
                     'or from the fingerprint')
  bad = [k for k in found if list(found[k]) != list(saved[k])]
  if bad:
    raise ValueError(f'{len(bad)} of {len(found)} arrays do not match the fingerprint saved with '
                     f'them (first: {bad[0]!r})')


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves unusable checkpoints to `<directory>.unusable/<step>`, so the resumed run can write
  those steps again (kept, not deleted: a read error may have been transient)."""
  if jax.process_index() == 0:
    directory = epath.Path(manager.directory)
    aside = directory.parent / f'{directory.name}.unusable'
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
      dest = aside / str(step)
      if dest.exists():
        dest.rmtree()
      (directory / str(step)).rename(dest)
      logging.warning('moved the unusable checkpoint at step %d to %s', step, dest)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('gripjax_checkpoint_set_aside')
  manager.reload()


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{leaf path: (shape, dtype name)} of a pytree of arrays, abstract arrays or Orbax metadata."""
  return {sharding.path_str(path) or '.': (tuple(x.shape), np.dtype(x.dtype).name)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _flat_config(config: Any, prefix: str = '') -> dict[str, Any]:
  """{'agent.width': 64, ...} of a config's JSON dict."""
  out = {}
  for key, value in (config or {}).items():
    if isinstance(value, dict):
      out.update(_flat_config(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def geometry_mismatch(step_dir: str, abstract_state: Any, config: Any = None) -> str | None:
  """Why checkpoint `step_dir`'s train state cannot restore into `abstract_state`; None if it can.

  Reads only the checkpoint's metadata (leaf paths, shapes, dtypes), so a changed model field (e.g.
  `agent.width`) is named in one message before Orbax fails on it. With `config` (the current
  run's ConfigDict) and a config saved in the checkpoint's meta, the fields that differ are named
  too. Unreadable metadata is not a mismatch (None): the restore reports it as a damaged checkpoint.
  """
  step_dir = epath.Path(step_dir)
  try:
    saved_tree = ocp.StandardCheckpointHandler().metadata(step_dir / STATE_ITEM)
  except Exception:  # pylint: disable=broad-except  # Damaged: left to the restore's fallback.
    return None
  saved = _leaf_specs(getattr(saved_tree, 'tree', saved_tree))
  want = _leaf_specs(abstract_state)
  lines = []
  for path in sorted(set(saved) | set(want), key=lambda p: (not p.startswith('params/'), p)):
    s, w = saved.get(path), want.get(path)
    if s == w:
      continue
    show = lambda spec: 'absent' if spec is None else f'shape {spec[0]} {spec[1]}'
    lines.append(f'{path}: {show(s)} in the checkpoint, {show(w)} for this config')
  if not lines:
    return None
  shown = lines[:6] + ([f'... and {len(lines) - 6} more leaves'] if len(lines) > 6 else [])
  message = (f'the checkpoint {step_dir} holds a train state of another geometry than this '
             f'config builds ({len(lines)} of {len(want)} leaves differ):\n  ' + '\n  '.join(shown))
  saved_config = None
  try:
    saved_meta = ocp.JsonCheckpointHandler().restore(step_dir / META_ITEM)
    saved_config = saved_meta.get('config') if isinstance(saved_meta, dict) else None
  except Exception:  # pylint: disable=broad-except  # Older checkpoints have no saved config.
    pass
  if config is not None and isinstance(saved_config, dict):
    now = _flat_config(json.loads(config.to_json()) if hasattr(config, 'to_json') else config)
    before = _flat_config(saved_config)
    changed = [f'{k}: {before.get(k, "absent")!r} then, {now.get(k, "absent")!r} now'
               for k in sorted(set(now) | set(before)) if before.get(k) != now.get(k)]
    if changed:
      message += ('\nconfig fields that differ from the run that wrote it:\n  ' +
                  '\n  '.join(changed[:12] + ([f'... and {len(changed) - 12} more'] if
                                              len(changed) > 12 else [])))
  return message + ('\nResume with the fields the checkpoint was written with, or start this '
                    'config in a new --workdir.')


def restore_train_state(manager: ocp.CheckpointManager, abstract_state: Any, set_aside: bool = True,
                        config: Any = None) -> tuple[int, Any, dict[str, Any]] | None:
  """Restores the newest good checkpoint into `abstract_state`; None when there is none.

  Args:
    manager: from `make_train_manager`.
    abstract_state: pytree of jax.ShapeDtypeStruct with the shardings to restore into (the current
      mesh's, whatever mesh the checkpoint was saved from).
    set_aside: after falling back, move the unusable newer checkpoints to
      `<directory>.unusable/` (the resumed run saves those steps again).
    config: the current run's config; with it a geometry error also names the config fields that
      changed since the checkpoint was written (trainer saves the config in each checkpoint's meta).

  Returns:
    (step, state, meta), or None when the directory has no complete checkpoint.

  Raises:
    CheckpointError: the newest readable checkpoint's leaves or shapes differ from
      `abstract_state`'s (a changed model field: one message naming the leaves, both shapes and the
      changed fields, raised before Orbax reads any array); or there are checkpoints but none
      restores: starting over would silently discard them, so the run stops and says so.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  errors = []
  for i, step in enumerate(steps):
    mismatch = geometry_mismatch(str(epath.Path(manager.directory) / str(step)), abstract_state,
                                 config)
    if mismatch:  # Every older checkpoint has the same geometry: no fallback.
      raise CheckpointError(mismatch)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(abstract_state), META_ITEM: ocp.args.JsonRestore()}))
      state, meta = restored[STATE_ITEM], restored[META_ITEM]
      _check_fingerprint(state, meta)
    except Exception as e:  # pylint: disable=broad-except
      reason = ' '.join(f'{type(e).__name__}: {e}'.split())
      reason = reason if len(reason) <= 400 else reason[:400] + '...'
      errors.append((step, reason))
      older = f'falling back to step {steps[i + 1]}' if i + 1 < len(steps) else 'no older one left'
      logging.error('checkpoint at step %d in %s cannot be restored: truncated, corrupted or of '
                    'another train state (%s); %s', step, manager.directory, reason, older)
      continue
    if errors:
      logging.warning('resuming from step %d: the newer checkpoint(s) %s could not be used', step,
                      [s for s, _ in errors])
      if set_aside:
        _set_aside(manager, [s for s, _ in errors])
    logging.info('restored checkpoint at step %d from %s', step, manager.directory)
    return step, state, meta
  if errors:
    raise CheckpointError(
        f'none of the {len(steps)} checkpoints in {manager.directory} (steps {steps}) could be '
        f'restored; the newest failed with {errors[0][1]}. If the config changed the train state '
        '(e.g. the agent geometry), use a new --workdir; otherwise delete the bad checkpoints.')
  return None
