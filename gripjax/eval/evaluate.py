"""One harness: every method at every budget on the same GRIP-Bench examples (`--mode=eval`).

  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=eval --workdir=/tmp/grip

Writes `WORKDIR/eval/results.json` (one row per method x budget x position mode) and a Markdown
report made from that JSON alone. Reference rows: `full` (every token), `blind` (no visual token:
the question-only floor) and `shuffled` (every token of another example's image). `oracle` is a
reference too, not a baseline: it prunes at every budget but reads the answer region (a label).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gripjax import config_lib
from gripjax import pruning
from gripjax import runtime
from gripjax.data import pipeline
from gripjax.data.grip_bench import scenes
from gripjax.eval import awareness
from gripjax.eval import report as report_lib
from gripjax.models import costs
from gripjax.models import scorer as scorer_lib
from gripjax.models import vlm as vlm_lib
from gripjax.models.vlm import DEFAULT_PREFIX_LEN
from gripjax.pruning import base
from gripjax.pruning import inlm
from gripjax.pruning import grip
from gripjax.pruning import oracle
from gripjax.pruning import selection_costs
from gripjax.train import checkpoint

POSITION_MODES = ('keep', 'renumber')

# Rows that do not prune: they bracket the pruners from above (full) and below (blind, shuffled).
REFERENCE_METHODS = ('full', 'blind', 'shuffled')
# References that prune at every budget but read the answer region (a label): not baselines.
ORACLE_METHODS = tuple(pruning.REFERENCE_PRUNERS)
# The trained agent; needs `config.agent.checkpoint`.
AGENT_METHODS = ('grip',)


def known_methods() -> tuple[str, ...]:
  return REFERENCE_METHODS + ORACLE_METHODS + tuple(pruning.METHODS) + AGENT_METHODS


def check_methods(methods: Iterable[str], field: str = 'config.eval.methods') -> tuple[str, ...]:
  """`methods` as a tuple; ConfigError naming `field` and the known methods for an unknown one."""
  known = known_methods()
  if not isinstance(methods, tuple) or not methods:
    raise config_lib.ConfigError(f'{field}={methods!r} is invalid: expected a non-empty tuple of method '
                                 f'names from {known}.')
  for m in methods:
    if m not in known:
      raise config_lib.ConfigError(f'{field} contains unknown method {m!r}: known methods are {known}')
  return tuple(methods)


# Splits the harness evaluates: choices (schedules, checkpoints, budgets) are made on validation,
# and the test split is evaluated once.
SPLITS = ('validation', 'test')


def check(c) -> None:
  """Start-up check of `config.eval`; raises config_lib.ConfigError."""
  if 'eval' not in c:
    return
  cl = config_lib
  cl.integer(c, 'eval.batch_size')
  cl.integer(c, 'eval.picture_examples', minimum=0)
  if c.eval.num_examples is not None:
    cl.integer(c, 'eval.num_examples')
  if 'split' in c.eval:
    cl.choice(c, 'eval.split', SPLITS)
  for i, rho in enumerate(cl.nonempty_tuple(c, 'eval.budgets', 'keep ratios in (0, 1]')):
    cl.keep_ratio(rho, f'eval.budgets[{i}]')
  for i, mode in enumerate(cl.nonempty_tuple(c, 'eval.position_modes', f'modes from {POSITION_MODES}')):
    if mode not in POSITION_MODES:
      cl.fail(f'eval.position_modes[{i}]', mode, f'one of {POSITION_MODES}')
  check_methods(c.eval.methods)


def make_encode(vlm):
  """A jitted function (params, batch) -> the image and question encodings every method starts from.

  Run once per batch and shared by every (method, budget, mode) job, so the vision tower's cost
  is paid once, as it would be by a server that prunes after encoding.
  """
  def encode(params, batch):
    out = vlm.apply({'params': params}, batch['pixels'], method='vision_features')
    visual = vlm.apply({'params': params}, out['features'], method='project')  # (B, N, D)
    question = vlm.apply({'params': params}, batch['question_ids'], method='embed_text')  # (B, T, D)
    return {'features': out['features'], 'cls_attn': out['cls_attn'], 'visual': visual,
            'question': question}
  return jax.jit(encode)


def make_eval_step(vlm, method: str, k: int, agent=None, rho: float | None = None):
  """A jitted (params, encoded, batch, rng, position_mode) -> (correct (B,), region_recall (B,),
  index (B, k)).

  `position_mode` is a bool scalar array that picks the mode at run time (True: 'renumber'),
  so both modes share one compiled function. `agent` is (scorer, scorer_params) for method 'grip',
  which is fed the budget `rho` that was asked for (k = budget_to_k(rho, N)).
  """
  n = runtime.num_visual_tokens_of(vlm)
  grid = (int(math.isqrt(n)),) * 2

  def step(params, enc, batch, rng, position_mode):
    visual = enc['visual']  # (B, N, D)
    b = visual.shape[0]
    text = (batch['question_ids'], batch['question_valid'])
    # Text before the image (a chat template's head) when the batch carries it; else <bos> alone.
    prefix = vlm_lib.prefix_of(batch)
    if method in ('full', 'shuffled'):
      if method == 'shuffled':  # every question sees the next example's image
        visual = jnp.roll(visual, 1, axis=0)
      index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
      tokens, valid = visual, jnp.ones((b, n), bool)
    elif method == 'blind':
      index = jnp.zeros((b, 1), jnp.int32)
      tokens, valid = visual[:, :1], jnp.zeros((b, 1), bool)
    elif pruning.is_in_lm(method):
      # Dropped inside the LM: the method runs the LM itself and returns the answer logits.
      lm = inlm.LmHandle(params=params, model=vlm)
      logits, index = inlm.run(method, lm, visual, *text, k, position_mode, **prefix)
      return _score(logits, index, jnp.ones(index.shape, bool), batch)
    else:
      fields = dict(tokens=visual, features=enc['features'], cls_attn=enc['cls_attn'],
                    question=enc['question'], question_mask=batch['question_valid'], rng=rng,
                    grid=grid)
      if method in ORACLE_METHODS:  # The oracle reads the answer region (B, N).
        ctx = oracle.RegionContext(**fields, region_mask=batch['region_mask'])
      else:
        ctx = base.PruneContext(**fields)
      if method == 'grip':
        prune = grip.make_grip_prune(*agent, rho)
      else:
        prune = pruning.get(method)
      kept = prune(ctx, k)
      tokens, index = kept.tokens, kept.index
      valid = jnp.ones(index.shape, bool)
    logits = vlm.apply({'params': params}, tokens, index, valid, *text, position_mode,
                       method='answer_logits', **prefix)  # (B, vocab)
    return _score(logits, index, valid, batch)

  return jax.jit(step)


def _score(logits, index, valid, batch):
  """-> (correct (B,), region_recall (B,) NaN where the answer has no region, index)."""
  correct = logits.argmax(-1) == batch['answer_id']  # (B,)
  region = batch['region_mask']  # (B, N)
  kept_region = jnp.take_along_axis(region, index, axis=1) & valid  # (B, k)
  total = region.sum(-1)
  recall = jnp.where(total > 0, kept_region.sum(-1) / jnp.maximum(total, 1), jnp.nan)
  return correct, recall, index


def _prefill_seconds(timed, batch_size):
  """Median seconds per example over `timed`, the batch times after (each host's) first batch, which
  compiles; None if there are none."""
  return float(np.median(timed)) / batch_size if len(timed) else None


def _rows_of(parts, dtype):
  """One array of a job's per-batch arrays, in batch order; empty (of `dtype`) with no batches."""
  return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def _kept_lists(method, index, n, count):
  """Kept patch indices (sorted, unique) of the first `count` examples of a batch."""
  if method == 'blind':
    return [[] for _ in range(count)]
  if method in ('full', 'shuffled'):
    return [list(range(n)) for _ in range(count)]
  return [sorted(set(int(j) for j in index[e])) for e in range(count)]


def _jobs(methods, budgets, position_modes):
  jobs = []
  for mode in position_modes:
    for method in methods:
      if method in REFERENCE_METHODS:
        if mode != position_modes[0] and method != 'full':
          continue  # blind and shuffled do not depend on the position mode.
        jobs.append((method, 0.0 if method == 'blind' else 1.0, mode))
      else:
        jobs.extend((method, float(rho), mode) for rho in budgets if rho < 1.0)
  return jobs


def load_agent(config, vlm):
  """(scorer, params) from `config.agent.checkpoint`."""
  path = config_lib.resolve_path(config.agent.checkpoint)
  if path is None:
    raise ValueError("config.eval.methods contains 'grip' but config.agent.checkpoint is None: expected "
                     'the path of a trained agent (WORKDIR/agent from --mode=train_agent)')
  scorer = scorer_lib.make_scorer(config)
  n = runtime.num_visual_tokens_of(vlm)
  abstract = jax.eval_shape(lambda r: scorer_lib.init_scorer(
      scorer, r, n, config.model.llm.width, config.data.max_question_len), jax.random.PRNGKey(0))
  return scorer, checkpoint.load_params(path, abstract)


def evaluate(config, vlm, params, source, tokenizer, methods, budgets, position_modes,
             num_examples=None, progress=True, agent=None, split: str = 'test', *, batches=None,
             task_names=None, gather=None) -> list[dict[str, Any]]:
  """Runs every (method, budget, position mode) on the same examples of `source` (the examples of
  `split`, recorded in each row); returns result rows.

  `batches` replaces the GRIP-Bench batches of `source` (`pipeline.eval_batches`) with any iterator
  of batches in that format covering its first `num_examples` rows (e.g. `hf_data.eval_batches`);
  `task_names` then names its `task_id`s (default: GRIP-Bench's task families).
  `gather` (several hosts, each evaluating its own rows): a function from this host's per-row
  outcomes (dicts of arrays, rows first; zero rows allowed) to every host's, joined in host order
  (gripjax/eval/hf_eval.py); the rows' accuracies, per-task columns and times then cover every host's
  rows, and every host returns the same rows.
  """
  n = runtime.num_visual_tokens_of(vlm)
  jobs = _jobs(methods, budgets, position_modes)
  kept = {job: n if job[0] in ('full', 'shuffled') else
          (0 if job[0] == 'blind' else base.budget_to_k(job[1], n)) for job in jobs}
  if 'grip' in methods and agent is None:
    agent = load_agent(config, vlm)
  # One compiled function per (method, kept count): the position mode is a run-time flag. The
  # agent's also depends on its budget input, the rho asked for.
  step_of = {job: (job[0], max(kept[job], 1), job[1] if job[0] == 'grip' else None) for job in jobs}
  steps = {key: make_eval_step(vlm, key[0], key[1], agent, key[2]) for key in set(step_of.values())}
  # The agent's awareness columns (question swap, budget nesting): untimed, after its timed step.
  aware = {key: awareness.make_awareness_step(vlm, *agent, key[2], key[1])
           for key in set(step_of.values()) if key[0] == 'grip'}
  encode = make_encode(vlm)
  results = {job: {'correct': [], 'recall': [], 'seconds': 0.0, 'batch_seconds': []} for job in jobs}
  tasks = []
  if batches is None:
    batches = pipeline.eval_batches(source, tokenizer, config.eval.batch_size,
                                    config.data.max_question_len, num_examples)
  total = len(source) if num_examples is None else min(num_examples, len(source))
  bar = tqdm(total=len(jobs) * -(-total // config.eval.batch_size), desc='eval',
             disable=not progress, mininterval=2.0)
  pictures = config.eval.picture_examples
  # Every clock covers one piece of work only: its inputs are ready before it starts (JAX dispatches
  # asynchronously, so otherwise the first job of a batch would also wait for the vision tower) and
  # its outputs are ready before it stops.
  flags = jax.block_until_ready({mode: jnp.asarray(mode == 'renumber') for mode in POSITION_MODES})
  jax.block_until_ready(params)
  vision_seconds = []
  prefix_len = DEFAULT_PREFIX_LEN  # Slots before the image: <bos> alone, or the batches' prefix.
  for i, batch in enumerate(batches):
    valid = batch['valid']
    if 'prefix_ids' in batch:
      prefix_len = int(np.shape(batch['prefix_ids'])[1])
    arrays = jax.block_until_ready({key: jnp.asarray(v) for key, v in batch.items() if key != 'valid'})
    t0 = time.perf_counter()
    enc = jax.block_until_ready(encode(params, arrays))  # The vision tower, timed once per batch.
    vision_seconds.append(time.perf_counter() - t0)
    tasks.append(batch['task_id'][valid])
    rng = jax.block_until_ready(jax.random.PRNGKey(config.seed * 100003 + i))
    perm = jnp.asarray(awareness.swap_permutation(valid))
    for job in jobs:
      renumber = flags[job[2]]
      t0 = time.perf_counter()
      c, r, index = jax.block_until_ready(steps[step_of[job]](params, enc, arrays, rng, renumber))
      seconds = time.perf_counter() - t0
      c = np.asarray(c)
      results[job]['seconds'] += seconds
      results[job]['batch_seconds'].append(seconds)
      if i == 0 and pictures:  # Kept patches of the first examples, for the report's pictures.
        results[job]['example_kept'] = _kept_lists(job[0], np.asarray(index), n,
                                                   min(pictures, int(valid.sum())))
      results[job]['correct'].append(c[valid])
      results[job]['recall'].append(np.asarray(r)[valid])
      if step_of[job] in aware:
        out = aware[step_of[job]](params, enc, arrays, perm, renumber)
        results[job].setdefault('swap', []).append(np.asarray(out['swap_correct'])[valid])
        results[job].setdefault('nesting', []).append(np.asarray(out['nesting'])[valid])
        results[job].setdefault('budget_swap', []).append(np.asarray(out['budget_swap_correct'])[valid])
      bar.update(1)
  bar.close()
  # Per-row outcomes (and the timed batches: each host's first compiles), joined over hosts by `gather`.
  outcomes = {'task': _rows_of(tasks, np.int32), 'vision_seconds': np.asarray(vision_seconds[1:], np.float64),
              'prefix_len': np.asarray([prefix_len]), 'jobs': {}}
  for job in jobs:
    res = results[job]
    out = {'correct': _rows_of(res['correct'], bool), 'recall': _rows_of(res['recall'], np.float32),
           'timed': np.asarray(res['batch_seconds'][1:], np.float64), 'seconds': np.asarray([res['seconds']])}
    if step_of[job] in aware:  # The same jobs on every host, whether or not it has rows.
      out['swap'] = _rows_of(res.get('swap', []), bool)
      out['nesting'] = _rows_of(res.get('nesting', []), np.float32)
      out['budget_swap'] = _rows_of(res.get('budget_swap', []), bool)
    outcomes['jobs'][job] = out
  if gather is not None:
    outcomes = gather(outcomes)
  tasks = outcomes['task']
  prefix_len = int(np.max(outcomes['prefix_len']))  # A host without rows saw no batch's prefix.
  question_len = config.data.max_question_len
  vlm_vocab = runtime.vocab_size(config, tokenizer)
  # The vision tower and projector (`encode`), shared by every row and in none of its prefill columns.
  vision = {'vision_flops': costs.vision_flops(config, costs.vision_feature_layers(config)),
            'vision_seconds': _prefill_seconds(outcomes['vision_seconds'], config.eval.batch_size)}
  rows = []
  for job in jobs:
    method, rho, mode = job
    out = outcomes['jobs'][job]
    k = kept[job]
    flops = selection_costs.row_flops(config, method, k, question_len, vlm_vocab, prefix_len)
    correct, recall = out['correct'], out['recall']
    per_task = {name: float(correct[tasks == t].mean()) for t, name in enumerate(task_names or scenes.TASKS)
                if np.any(tasks == t)}
    rows.append({
        'method': method, 'budget': rho, 'position_mode': mode, 'kept_tokens': k, 'split': split,
        'accuracy': float(correct.mean()), 'n': int(correct.size), 'per_task': per_task,
        'region_recall': float(np.nanmean(recall)) if np.any(np.isfinite(recall)) else None,
        # LM prefill on what is kept (in-LM methods: every layer at its length) + selection_flops,
        # what the method itself runs to choose its tokens (scorer, DPP, clustering, attention reads).
        'prefill_flops': flops['prefill_flops'], 'selection_flops': flops['selection_flops'],
        'kv_cache_bytes': (inlm.inlm_kv_cache_bytes(config, method, k, question_len, prefix_len=prefix_len)
                           if pruning.is_in_lm(method) else
                           costs.kv_cache_bytes(config, k, question_len, prefix_len=prefix_len)),
        # Time of the pruner plus the LM on this machine, with the compile where this job paid it (the
        # first position mode of a method and budget: the modes share one compiled function).
        'seconds': round(float(np.sum(out['seconds'])), 3),
        # Per example: median batch time (pruner + LM prefill, inputs ready before the clock starts)
        # after the first, compiling, batch.
        'prefill_seconds': _prefill_seconds(out['timed'], config.eval.batch_size),
        **vision,
    })
    if 'swap' in out:  # See gripjax/eval/awareness.py.
      rows[-1]['question_swap_accuracy'] = float(out['swap'].mean())
      rows[-1]['budget_nesting'] = float(out['nesting'].mean())
      rows[-1]['budget_swap_accuracy'] = float(out['budget_swap'].mean())
      rows[-1]['budget_swap_rho'] = awareness.BUDGET_SWAP_RHO
    if 'example_kept' in results[job]:
      # Examples 0, 1, ... of a split are a pure function of the data config: enough to redraw them.
      rows[-1]['examples'] = {
          'split': split, 'seed': config.data.seed, 'image_size': config.model.vit.image_size,
          'patch_size': config.model.vit.patch_size,
          'index': list(range(len(results[job]['example_kept']))),
          'kept': results[job]['example_kept']}
    logging.info('eval %s', json.dumps(rows[-1]))
  return rows


def vlm_summary(config, workdir: str, params_path: str | None = None) -> dict[str, Any]:
  """Test accuracy of a VLM with all tokens, shuffled images and no image, per task family."""
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  params = runtime.load_vlm_params(config, vlm, params_path)
  source = runtime.split_source(config, workdir, 'test')
  rows = evaluate(config, vlm, params, source, tok, REFERENCE_METHODS, (1.0,), ('keep',),
                  config.eval.num_examples)
  by = {r['method']: r for r in rows}
  return {
      'split': 'test', 'n': by['full']['n'],
      'accuracy': by['full']['accuracy'], 'per_task': by['full']['per_task'],
      'accuracy_shuffled_images': by['shuffled']['accuracy'],
      'per_task_shuffled_images': by['shuffled']['per_task'],
      'accuracy_no_image': by['blind']['accuracy'], 'per_task_no_image': by['blind']['per_task'],
      'question_only_prior': runtime.question_only_prior(config, workdir),
      'visual_tokens': runtime.num_visual_tokens(config),
      'position_mode': config.model.position_mode,
  }


def run(config, workdir: str) -> list[dict[str, Any]]:
  """`--mode=eval` (and the evaluation part of `--mode=demo`)."""
  methods = tuple(config.eval.methods)  # Checked at start-up (`check`).
  split = config.eval.get('split', 'test')
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  params = runtime.load_vlm_params(config, vlm)
  source = runtime.split_source(config, workdir, split)
  rows = evaluate(config, vlm, params, source, tok, methods, config.eval.budgets,
                  config.eval.position_modes, config.eval.num_examples, split=split)
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  results_path = os.path.join(out_dir, 'results.json')
  tmp = results_path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(rows, f, indent=1)
  os.replace(tmp, results_path)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')  # The agent trained in this workdir (demo).
  report_path = report_lib.write_report(results_path, out_dir,
                                        metrics_path if os.path.exists(metrics_path) else None)
  print(report_lib.table(rows))
  print(report_lib.vision_line(rows) or '')
  print(f'\nresults: {results_path}\nreport:  {report_path}')
  return rows
