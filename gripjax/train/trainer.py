"""Trains the GRIP agent against the frozen VLM (`--mode=train_agent`): warm-up, then GRPO.

  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=train_agent --workdir=/tmp/grip

Reads top to bottom: mesh, frozen VLM params placed by `train.sharding.vlm_params`,
`jax.eval_shape` of the agent's init and its shardings by `train.sharding.agent_params`, resume from
`WORKDIR/checkpoints` or `jax.jit(init, out_shardings=...)`, the step compiled ahead of time (memory
logged), then the loop. Writes

  WORKDIR/checkpoints/   Orbax CheckpointManager (async, the last train.checkpoint_keep steps, every
                         train.checkpoint_every steps): the TrainState and, as JSON, the data
                         iterator's position and order (`checkpoint.make_train_manager`)
  WORKDIR/metrics.jsonl  one JSON line per logged step: step, phase, loss and every step metric
  WORKDIR/agent          the final scorer params (`checkpoint.save_params`; load with `load_params`)

A killed run restarted with the same command resumes at its last complete checkpoint with the same
data order (`batch_iterator(start_step=...)` at the saved position) and the same samples (the PRNG
key lives in the state), so its final params equal an uninterrupted run's. A truncated or corrupted
checkpoint is reported and the one before it used. The checkpoint restores into the current mesh's
shardings, whatever mesh wrote it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
from tqdm import tqdm

from gripjax import config_lib
from gripjax import runtime
from gripjax.data import hf_data
from gripjax.data import pipeline
from gripjax.models import costs
from gripjax.models import scorer as scorer_lib
from gripjax.models import vlm as vlm_lib
from gripjax.train import checkpoint as ckpt_lib
from gripjax.train import sharding
from gripjax.train import step as step_lib
from gripjax.train import validation

# Batch keys the step reads (the prefix only when a chat template puts text before the image); the
# others stay on the host.
BATCH_KEYS = ('pixels', 'question_ids', 'question_valid', 'answer_id') + vlm_lib.PREFIX_KEYS


def state_tree(state: step_lib.TrainState) -> dict[str, Any]:
  """The state as a plain dict (what Orbax stores)."""
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
          'ref_params': state.ref_params, 'rng': state.rng}


def _load_vlm_params(config, vlm, mesh):
  """The frozen VLM's params, read (or initialised) straight into their shardings; and those.

  Placed by `config.train.sharding.vlm_params`, so under fsdp or tensor no device ever holds the
  whole model. `config.vlm_checkpoint` None: random weights (smoke runs).
  """
  rng = jax.random.PRNGKey(config.seed)
  init = lambda r: runtime.init_params(vlm, r)
  abstract = jax.eval_shape(init, rng)
  shardings = step_lib.vlm_param_shardings(abstract, mesh, config)
  path = config_lib.resolve_path(config.vlm_checkpoint)
  if path is None and 'hf' in config:  # An HF checkpoint's safetensors, placed tensor by tensor.
    return hf_data.load_params(config, mesh, sharding.rules_from_config(config, 'vlm_params')), shardings
  if path is None:
    logging.warning('config.vlm_checkpoint is None: using randomly initialised VLM weights')
    return jax.jit(init, out_shardings=shardings)(rng), shardings
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  return ckpt_lib.load_params(path, abstract), shardings


def _log_bytes(what: str, tree, shardings, rules) -> None:
  mib = sharding.bytes_per_device(tree, shardings) / 2 ** 20
  logging.info('train_agent: %s %.3f MiB per device (%s)', what, mib, rules.strategy)


def data_position(config, num_examples: int, next_step: int) -> dict[str, Any]:
  """What fixes the data iterator's next batch: saved with every checkpoint.

  `pipeline.batch_iterator` is a pure function of these, so a resumed run that reads the same
  values continues with exactly the batches the interrupted run would have read (the global batch
  does not depend on the number of processes that read it).
  """
  return {'next_step': int(next_step), 'seed': int(config.seed), 'shuffle': True,
          'batch_size': int(config.train.batch_size), 'num_examples': int(num_examples)}


def _check_data_position(saved, current, step: int) -> None:
  """Errors if the saved position disagrees with the state's step; warns if the order changed."""
  if not isinstance(saved, dict) or saved.get('next_step') != step:
    raise ckpt_lib.CheckpointError(
        f'checkpoint at step {step} has data position {saved!r}: expected next_step={step}, the '
        "state's step.")
  changed = {k: (saved.get(k), v) for k, v in current.items()
             if k != 'next_step' and saved.get(k) != v}
  if changed:
    logging.warning("train_agent: the data order differs from the interrupted run's, so the "
                    'resumed run will not reproduce it: %s',
                    ', '.join(f'{k} was {a!r}, now {b!r}' for k, (a, b) in changed.items()))


def _append_metrics(path: str, row: dict[str, Any]) -> None:
  """Appends one JSON line; a bucket path (gs://...), which cannot append, is rewritten whole."""
  line = json.dumps(row) + '\n'
  if '://' not in path:
    with open(path, 'a') as f:
      f.write(line)
    return
  remote = epath.Path(path)
  remote.write_text((remote.read_text() if remote.exists() else '') + line)


def _truncate_metrics(path: str, step: int) -> None:
  """Drops the rows an interrupted run logged after its checkpoint at `step` (they are redone).

  Locally the dropped rows are appended to PATH.dropped (and a warning says how many), so a run that
  starts over never silently erases a log.
  """
  if '://' in path:
    remote = epath.Path(path)
    if remote.exists():
      keep = [l for l in remote.read_text().splitlines(keepends=True) if _row_step(l) <= step]
      remote.write_text(''.join(keep))
    return
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if _row_step(line) <= step]
  if len(keep) != len(lines):
    dropped = [line for line in lines if _row_step(line) > step]
    with open(path + '.dropped', 'a') as f:  # Set aside, not lost: appended for the record.
      f.writelines(line if line.endswith('\n') else line + '\n' for line in dropped)
    logging.warning('train_agent: %d rows of %s were logged after step %d, which this run redoes: '
                    'moved them to %s.dropped', len(dropped), path, max(step, 0), path)
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)


def _row_step(line: str) -> float:
  """The step of a metrics line; infinity for a line cut short by a kill (so it is dropped)."""
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return float('inf')


def _log_memory(compiled) -> None:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    mem = None
  if mem is None:
    logging.info('train_agent: compiled step (no memory analysis on this backend)')
    return
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
            'generated_code_size_in_bytes')
  sizes = {f: getattr(mem, f) for f in fields if hasattr(mem, f)}
  logging.info('train_agent: compiled step memory (MiB): %s',
               {k: round(v / 2**20, 2) for k, v in sizes.items()})


def _validator(config, vlm, scorer, tok, workdir, mesh):
  """`validate(agent_params, vlm_params) -> {metric: float}` on the first `train.val_examples`
  validation examples (`train/validation.py`), replicated over the mesh; None when 0."""
  count = config.train.get('val_examples', 0)
  if count and 'hf' in config:
    logging.warning('train_agent: train.val_examples=%d ignored: the validation curve reads GRIP-Bench, '
                    'not config.hf.data_path', count)
  if not count or 'hf' in config:
    return None
  source = runtime.split_source(config, workdir, 'validation')
  batch = next(pipeline.eval_batches(source, tok, min(count, len(source)),
                                     config.data.max_question_len))
  batch = jax.device_put({k: v for k, v in batch.items() if k in BATCH_KEYS},
                         sharding.replicated(mesh))
  fn = validation.make_validator(vlm, scorer, config, batch)
  return lambda params, vlm_params: {k: float(v) for k, v in jax.device_get(fn(params, vlm_params)).items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs agent training; returns {'params_path', 'history' (logged rows), 'seconds'}."""

  t = config.train  # Checked at start-up (gripjax.checks.check_config).
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(t.batch_size, mesh)
  is_main = jax.process_index() == 0
  logging.info('train_agent: mesh %s over %d devices (%d processes)', dict(mesh.shape),
               jax.device_count(), jax.process_count())

  tok = runtime.tokenizer_for(config)
  vlm = runtime.make_model(config, tok)
  vlm_params, vlm_shardings = _load_vlm_params(config, vlm, mesh)
  _log_bytes('frozen VLM params', vlm_params, vlm_shardings,
             sharding.rules_from_config(config, 'vlm_params'))
  if 'hf' in config:  # A user's dataset (config.hf.data_path): each host reads and visits its own shard.
    train_src = hf_data.load_data(config, tok, jax.process_index(), jax.process_count())
  else:
    train_src = runtime.split_source(config, workdir, 'train')

  n = runtime.num_visual_tokens(config)
  text_len = config.data.max_question_len
  scorer = scorer_lib.make_scorer(config)
  cost = costs.cost_report(config, text_len)
  logging.info('train_agent: scorer %d params, %.3g FLOPs per example (%.3g%% of the VLM prefill + '
               'vision)', cost['scorer_params'], cost['scorer_flops'], 100 * cost['flops_ratio'])
  tx = step_lib.make_optimizer(config)
  init = step_lib.make_init(scorer, tx, config, n, config.model.llm.width, text_len)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  state_shardings = step_lib.state_shardings(abstract, mesh, config)
  _log_bytes('agent train state', abstract, state_shardings,
             sharding.rules_from_config(config, 'agent_params'))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_shardings)

  manager = ckpt_lib.make_train_manager(os.path.join(workdir, 'checkpoints'),
                                        max_to_keep=t.get('checkpoint_keep', 2))
  restored = ckpt_lib.restore_train_state(manager, state_tree(abstract), config=config)
  if restored is None:
    state = jax.jit(init, out_shardings=state_shardings)(rng)
    start = 0
  else:
    state = step_lib.TrainState(**restored[1])
    start = int(jax.device_get(state.step))
    _check_data_position(restored[2].get('data'), data_position(config, len(train_src), start),
                         start)
  logging.info('train_agent: %s at step %d of %d (warm-up until %d)',
               'resuming' if restored else 'starting', start, t.steps, t.warmup_steps)

  # The second phase (GRPO or a relaxation baseline) is picked by train.algorithm.
  train_step = step_lib.make_train_step(vlm, scorer, tx, config, mesh=mesh,
                                        state_sharding=state_shardings, vlm_sharding=vlm_shardings)
  if 'hf' in config:
    batches = pipeline.prefetch(hf_data.batch_iterator(
        train_src, config, t.batch_size // jax.process_count(), seed=config.seed, start_step=start,
        prefix_ids=tok.layout_prefix))
  else:
    batches = pipeline.prefetch(pipeline.batch_iterator(
        train_src, tok, t.batch_size, text_len, shuffle=True, seed=config.seed, start_step=start,
        process_index=jax.process_index(), process_count=jax.process_count()))

  def next_batch():
    return sharding.shard_batch({k: v for k, v in next(batches).items() if k in BATCH_KEYS}, mesh)

  history = []
  t0 = time.time()
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if is_main:
    # A run from step 0 starts a new log; a resumed one drops what followed its checkpoint.
    _truncate_metrics(metrics_path, start if start else -1)
  validate = _validator(config, vlm, scorer, tok, workdir, mesh)
  if validate is not None and start == 0:
    row = {'step': 0, 'phase': 0, **validate(state.params, vlm_params)}
    history.append(row)
    if is_main:
      _append_metrics(metrics_path, row)
  if start < t.steps:
    batch = next_batch()
    compiled = train_step.lower(state, batch, vlm_params).compile()
    logging.info('train_agent: compiled the step in %.1f s', time.time() - t0)
    _log_memory(compiled)
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc='train_agent',
               mininterval=5.0, disable=not is_main)
    for step in bar:
      if step > start:
        batch = next_batch()
      state, metrics = compiled(state, batch, vlm_params)
      done = step + 1
      last = done == t.steps
      if done % t.log_every == 0 or last or done == t.warmup_steps:
        metrics = jax.device_get(metrics)
        row = {'step': done, 'phase': int(metrics['phase']), 'loss': float(metrics['loss'])}
        row.update({k: float(v) for k, v in metrics.items() if k not in row})
        if validate is not None:
          row.update(validate(state.params, vlm_params))
        row['seconds'] = round(time.time() - t0, 2)
        history.append(row)
        bar.set_postfix(phase=row['phase'], loss=f"{row['loss']:.4g}",
                        reward=f"{row['reward/mean']:.3g}", val=f"{row.get('val/reward', float('nan')):.3g}")
        if is_main:
          _append_metrics(metrics_path, row)
      if done % t.checkpoint_every == 0 or last:
        ckpt_lib.save_train_state(manager, done, state_tree(state), {
            'data': data_position(config, len(train_src), done),
            'mesh': {k: int(v) for k, v in mesh.shape.items()},
            'config': json.loads(config.to_json())})  # Names changed fields if a resume mismatches.
    manager.wait_until_finished()
  manager.close()
  out = os.path.join(workdir, 'agent')
  ckpt_lib.save_params(out, state.params)
  logging.info('train_agent: wrote agent params to %s (%.1f s this run)', out, time.time() - t0)
  return {'params_path': out, 'history': history, 'seconds': time.time() - t0}
