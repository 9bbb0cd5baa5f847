"""Trains the GRIP agent against the frozen VLM (`--mode=train_agent`): warm-up, then GRPO.

  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=train_agent --workdir=/tmp/grip

Reads top to bottom: mesh, frozen VLM params (replicated), `jax.eval_shape` of the agent's init,
resume from `WORKDIR/checkpoints` or `jax.jit(init, out_shardings=...)`, the step compiled ahead of
time (memory logged), then the loop. Writes

  WORKDIR/checkpoints/   Orbax CheckpointManager of the TrainState (every train.checkpoint_every steps)
  WORKDIR/metrics.jsonl  one JSON line per logged step: step, phase, loss and every step metric
  WORKDIR/agent          the final scorer params (`checkpoint.save_params`; load with `load_params`)

A killed run restarted with the same command resumes at its last checkpoint with the same data order
(`batch_iterator(start_step=step)`) and the same samples (the PRNG key lives in the state).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from gripjax.models import scorer as scorer_lib
from gripjax.train import checkpoint as ckpt_lib
from gripjax.train import sharding
from gripjax.train import step as step_lib

# Batch keys the step reads; the others stay on the host.
BATCH_KEYS = ('pixels', 'question_ids', 'question_valid', 'answer_id')


def _to_tree(state: step_lib.TrainState) -> dict[str, Any]:
  """The state as a plain dict (what Orbax stores)."""
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
          'ref_params': state.ref_params, 'rng': state.rng}


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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs agent training; returns {'params_path', 'history' (logged rows), 'seconds'}."""
  from gripjax import runtime  # pylint: disable=g-import-not-at-top
  from gripjax.data import pipeline  # pylint: disable=g-import-not-at-top

  step_lib.validate_config(config)
  t = config.train
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(t.batch_size, mesh)
  rep = sharding.replicated(mesh)
  is_main = jax.process_index() == 0

  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  vlm_params = jax.device_put(runtime.load_vlm_params(config, vlm), rep)
  train_src = runtime.split_source(config, workdir, 'train')

  n = runtime.num_visual_tokens(config)
  text_len = config.data.max_question_len
  scorer = scorer_lib.make_scorer(config)
  cost = scorer_lib.cost_report(config, text_len)
  logging.info('train_agent: scorer %d params, %.3g FLOPs per example (%.3g%% of the VLM prefill + '
               'vision)', cost['scorer_params'], cost['scorer_flops'], 100 * cost['flops_ratio'])
  tx = step_lib.make_optimizer(config)
  init = step_lib.make_init(scorer, tx, config, n, config.model.llm.width, text_len)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)

  manager = ckpt_lib.make_manager(os.path.join(workdir, 'checkpoints'), max_to_keep=2)
  restored = ckpt_lib.restore_latest(manager, _to_tree(abstract))
  if restored is None:
    state = jax.jit(init, out_shardings=rep)(rng)
  else:
    state = step_lib.TrainState(**restored[1])
  start = int(jax.device_get(state.step))
  logging.info('train_agent: %s at step %d of %d (warm-up until %d)',
               'resuming' if restored else 'starting', start, t.steps, t.warmup_steps)

  train_step = step_lib.make_train_step(vlm, scorer, tx, config, mesh)
  batches = pipeline.prefetch(pipeline.batch_iterator(
      train_src, tok, t.batch_size, text_len, shuffle=True, seed=config.seed, start_step=start,
      process_index=jax.process_index(), process_count=jax.process_count()))

  def next_batch():
    return sharding.shard_batch({k: v for k, v in next(batches).items() if k in BATCH_KEYS}, mesh)

  history = []
  t0 = time.time()
  if start < t.steps:
    batch = next_batch()
    compiled = train_step.lower(state, batch, vlm_params).compile()
    logging.info('train_agent: compiled the step in %.1f s', time.time() - t0)
    _log_memory(compiled)
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
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
        row['seconds'] = round(time.time() - t0, 2)
        history.append(row)
        bar.set_postfix(phase=row['phase'], loss=f"{row['loss']:.4g}",
                        reward=f"{row['reward/mean']:.3g}")
        if is_main:
          with open(metrics_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
      if done % t.checkpoint_every == 0 or last:
        manager.save(done, args=ckpt_lib.ocp.args.StandardSave(_to_tree(state)))
    manager.wait_until_finished()
  out = os.path.join(workdir, 'agent')
  ckpt_lib.save_params(out, state.params)
  logging.info('train_agent: wrote agent params to %s (%.1f s this run)', out, time.time() - t0)
  return {'params_path': out, 'history': history, 'seconds': time.time() - t0}
