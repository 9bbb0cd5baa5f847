"""Every pruner at every budget on an HF LLaVA checkpoint with a benchmark file or a user's dataset.

  python -m gripjax.main --config=configs/llava_hf.py:PATH --mode=eval --workdir=/tmp/pope \\
      --config.hf.template=$'<image>\\n{question}' --config.hf.benchmark=pope \\
      --config.hf.data_path=/data/pope/test.parquet

Each (method, budget, position mode) row of `WORKDIR/eval/results.json` has the fields of a
GRIP-Bench row (gripjax/eval/evaluate.py, on the same rows of `config.hf.data_path`, read by
gripjax/data/hf_data.py), so the same report is made from it, and three more:

  generation  {'benchmark': name or None, 'max_new_tokens': m, 'n': rows, 'scores': {...}}: the
              method's k kept tokens, a prefill of [prefix][kept][text] and m greedy decode steps
              against that KV cache (inference.PrunedGenerator); the answers scored by the
              benchmark's own scorer (`benchmarks.score`, as lmms-eval scores it), or, for a user
              dataset, `exact_match` (lower-cased, stripped answer equal to any reference). None for
              `blind` and `shuffled`, and for in-LM methods (FastV, PyramidDrop, SparseVLM, DART), which
              drop tokens inside the LM and leave no KV cache of kept tokens to decode from.
  skipped     {reason: rows}: data rows left out (config.hf.skip_bad_rows), the same on every row.
  data        {'source', 'num_rows', 'used'}.

`accuracy` is the first generated token against the first token of the reference answer (the
answer tokenized on its own; for a multi-token answer only its first token): a quick, exact measure.
The benchmark's score, from the generated text, is the one to compare with published numbers.
With a chat template the prefix (e.g. `<s> USER: `) stands before the image in every forward, the
agent's (`grip`) included: the agent chooses from the question, the VLM answers on the prefix, the
kept tokens and the question. The rows' FLOP and KV-cache columns count the prefix's P slots with
the text's (config.hf.text_len slots).
The generated answers go to `WORKDIR/eval/predictions.jsonl` (one line per row and job), the
benchmark scores to `WORKDIR/eval/benchmark.md`.

Several hosts (a pod, or launch/local_processes.py). Each process reads only its contiguous shard of
the rows (hf_data.load_data with jax.process_index() of jax.process_count(), as training does) and
evaluates and generates on its own devices; `config.eval.num_examples` still means the first N usable
rows of the whole dataset (host i takes those of its rows that fall among them: with a small N the
later hosts have none and wait). The per-row outcomes (first-token correctness, task, the agent's
awareness columns, batch times; the generated answers with their rows' ids, references and metadata)
are then gathered to every process by a collective (`allgather_objects`: pickled, sent as uint8 through
`multihost_utils.process_allgather`), so every score is computed once over the whole dataset, exactly
as one process computes it, and process 0 alone writes the files. A collective rather than
per-host shard files merged after a barrier: it needs no directory shared by the hosts (pod workers
write to their own disks; this module writes with local file calls) and leaves no shard files of an
earlier run to be merged by mistake. Skipped rows are summed over the hosts. The time columns
pool every host's batches (`seconds` summed, the medians over every host's batches after its first).
Rows that draw random keys per batch (`random`) or pair rows within a batch (`shuffled`, the agent's
`question_swap_accuracy`) measure the same thing on several hosts, but not with one process's draws
and pairs row for row: the hosts' batches differ. Every other column but the times equals a one-process
run's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from gripjax import inference
from gripjax import pruning
from gripjax import runtime
from gripjax.data import hf_data
from gripjax.data import user_data
from gripjax.eval import benchmarks
from gripjax.eval import evaluate
from gripjax.eval import report as report_lib


def generation_jobs(rows) -> list[tuple[str, float, str]]:
  """The (method, budget, position mode) of the rows whose answers can be generated."""
  return [(r['method'], r['budget'], r['position_mode']) for r in rows
          if r['method'] not in ('blind', 'shuffled') and r['method'] not in evaluate.ORACLE_METHODS
          and not pruning.is_in_lm(r['method'])]


def exact_match(examples, predictions) -> dict[str, Any]:
  """Share of predictions equal (lower-cased, stripped) to any of the row's reference answers.

  >>> ex = [type('E', (), {'answers': ('Yes',)})(), type('E', (), {'answers': ('no', 'nope')})()]
  >>> exact_match(ex, [' yes', 'No.'])
  {'exact_match': 0.5, 'num_rows': 2}
  """
  hits = [p.strip().lower() in {a.strip().lower() for a in ex.answers} for ex, p in zip(examples, predictions)]
  return {'exact_match': float(np.mean(hits)), 'num_rows': len(hits)}


def generate_all(config, vlm, params, tok, data: hf_data.HFData, jobs, agent=None,
                 num_examples=None) -> dict[tuple, list[str]]:
  """{job: the generated answer of each of the first `num_examples` rows} for every job."""
  size = config.eval.batch_size
  generators = {}
  for job in jobs:
    method, _, mode = job
    pruner = None if method == 'full' else method
    generators[job] = inference.PrunedGenerator(
        config, vlm, params, tok, pruner, agent[1] if method == 'grip' else None, position_mode=mode,
        batch_sizes=(size,), seed=config.seed, prefix_ids=tok.layout_prefix)
  out = {job: [] for job in jobs}
  for batch in hf_data.eval_batches(data, config, size, num_examples, tok.layout_prefix):
    prompts = [data.prompts[i] for i in batch['index']]
    valid = batch['valid']
    for job in jobs:
      answers = generators[job].generate(batch['pixels'], prompts, budget=job[1],
                                         max_new_tokens=config.hf.max_new_tokens)
      out[job] += [a for a, v in zip(answers, valid) if v]
  return out


def score(data: hf_data.HFData, predictions: list[str], examples=None) -> dict[str, Any]:
  """The benchmark's scores of `predictions` against `examples` (default: the first len(predictions)
  rows of `data`; with several hosts, every host's rows), or exact match."""
  examples = data.examples[:len(predictions)] if examples is None else examples
  if data.benchmark is not None:
    return benchmarks.score(data.benchmark, examples, predictions)
  if not all(ex.answers for ex in examples):
    return {}
  return exact_match(examples, predictions)


def benchmark_table(rows) -> str:
  """Markdown: each row's generation scores (the pooled `all` split where the benchmark has one)."""
  scored = [r for r in rows if r.get('generation')]
  if not scored:
    return ''
  def flat(scores):
    top = scores.get('all', scores)
    return {k: v for k, v in top.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
  keys = sorted({k for r in scored for k in flat(r['generation']['scores'])})
  head = ['method', 'mode', 'budget', 'kept', 'first-token accuracy %'] + keys
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in scored:
    values = flat(r['generation']['scores'])
    lines.append('| ' + ' | '.join(
        [r['method'], r['position_mode'], f"{r['budget']:.3g}", str(r['kept_tokens']), f"{100 * r['accuracy']:.1f}"]
        + [f'{values[k]:.4g}' if k in values else '-' for k in keys]) + ' |')
  name = scored[0]['generation']['benchmark'] or 'user dataset (exact match)'
  return f'## {name}: scores of generated answers\n\n' + '\n'.join(lines) + '\n'


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def allgather_objects(obj) -> list:
  """[process 0's `obj`, process 1's, ...] on every process; `[obj]` itself with one process.

  Any picklable object (numpy arrays, dicts with tuple keys, Examples): pickled, padded to the
  longest host's bytes and gathered as uint8 by `multihost_utils.process_allgather` (two collectives:
  the lengths, then the bytes). Every process must call it, in the same order.
  """
  if jax.process_count() == 1:
    return [obj]
  blob = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray(blob.size, np.int32))  # (hosts,)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:blob.size] = blob
  gathered = multihost_utils.process_allgather(padded)  # (hosts, longest)
  return [pickle.loads(gathered[i, :size].tobytes()) for i, size in enumerate(sizes.tolist())]


def join_hosts(parts: list):
  """One object from the hosts' `parts` (the same nested dicts, each leaf a numpy array or a list
  with rows first): leaves concatenated in host order, dicts joined key by key.

  >>> join_hosts([{'a': np.array([1, 2]), 'b': ['x']}, {'a': np.zeros(0, int), 'b': []},
  ...             {'a': np.array([3]), 'b': ['y', 'z']}])
  {'a': array([1, 2, 3]), 'b': ['x', 'y', 'z']}
  """
  if len(parts) == 1:
    return parts[0]
  first = parts[0]
  if isinstance(first, dict):
    return {key: join_hosts([p[key] for p in parts]) for key in first}
  if isinstance(first, np.ndarray):
    rows = [p for p in parts if p.shape[0]] or parts[:1]  # An empty shard adds nothing (nor its dtype).
    return np.concatenate(rows) if len(rows) > 1 else rows[0]
  if isinstance(first, list):
    return [x for p in parts for x in p]
  raise TypeError(f'join_hosts: a part of type {type(first).__name__}; expected a dict, a numpy array or a list.')


def host_rows(counts, process_index: int, num_examples=None) -> int:
  """How many of its first rows host `process_index` evaluates: its rows among the first
  `num_examples` (None: all) of the whole dataset, the hosts holding `counts` usable rows in order.

  >>> [host_rows((5, 5, 4), i, 7) for i in range(3)], [host_rows((5, 5, 4), i) for i in range(3)]
  ([5, 2, 0], [5, 5, 4])
  """
  total = sum(counts)
  n = total if num_examples is None else min(int(num_examples), total)
  before = sum(counts[:process_index])
  return min(max(n - before, 0), counts[process_index])


def run(config, workdir: str) -> list[dict[str, Any]]:
  """`--mode=eval` for a config with an `hf` section (configs/llava_hf.py), on one host or several
  (module docstring); every process returns the same rows, process 0 writes them."""
  methods = tuple(config.eval.methods)
  oracle = [m for m in methods if m in evaluate.ORACLE_METHODS]
  if oracle:
    raise ValueError(f'config.eval.methods holds {oracle}, which read answer regions: a benchmark or user '
                     'dataset has none; expected methods without them.')
  tok = runtime.tokenizer_for(config)
  vlm = runtime.make_model(config, tok)
  params = runtime.load_vlm_params(config, vlm)
  index = jax.process_index()
  data = hf_data.load_data(config, tok, index, jax.process_count())  # This host's rows.
  # What every host read, so that all of them decide alike: rows, categories, skips, answers.
  hosts = allgather_objects({'rows': len(data), 'task_names': data.task_names, 'skipped': data.skip_counts(),
                             'has_answers': data.has_answers})
  if data.benchmark is None and not all(h['has_answers'] for h in hosts):
    raise user_data.BadDataError(
        f"{data.source}: rows without an 'answer' field: evaluation needs reference answers on every row.")
  data.use_task_names(sorted({name for h in hosts for name in h['task_names']}))
  skipped = {reason: sum(h['skipped'][reason] for h in hosts) for reason in hf_data.SKIP_REASONS}
  counts = [h['rows'] for h in hosts]
  n = sum(host_rows(counts, i, config.eval.num_examples) for i in range(len(counts)))  # All hosts' rows.
  local_n = host_rows(counts, index, config.eval.num_examples)
  logging.info('hf eval: process %d of %d evaluates %d of its %d rows (usable rows per process %s; %d used)',
               index, len(counts), local_n, len(data), counts, n)
  agent = evaluate.load_agent(config, vlm) if 'grip' in methods else None
  split = f'{data.benchmark or "data"}:{os.path.basename(data.source)}'
  rows = evaluate.evaluate(config, vlm, params, data, tok, methods, config.eval.budgets,
                           config.eval.position_modes, local_n, agent=agent, split=split,
                           batches=hf_data.eval_batches(data, config, config.eval.batch_size, local_n,
                                                        tok.layout_prefix),
                           task_names=data.task_names, gather=lambda x: join_hosts(allgather_objects(x)))
  jobs = generation_jobs(rows)
  local = generate_all(config, vlm, params, tok, data, jobs, agent, local_n)
  # Every host's answers, with the rows they answer (their images left behind), in row order.
  gathered = join_hosts(allgather_objects(
      {'examples': [dataclasses.replace(ex, image=None) for ex in data.examples[:local_n]],
       'predictions': local}))
  examples, predictions = gathered['examples'], gathered['predictions']
  for row in rows:
    job = (row['method'], row['budget'], row['position_mode'])
    row['generation'] = None if job not in predictions else {
        'benchmark': data.benchmark, 'max_new_tokens': int(config.hf.max_new_tokens), 'n': n,
        'scores': score(data, predictions[job], examples)}
    row['skipped'] = skipped
    row['data'] = {'source': data.source, 'num_rows': data.num_rows, 'used': n}
    logging.info('eval %s', json.dumps({k: row[k] for k in ('method', 'budget', 'position_mode', 'generation')}))
  if index != 0:  # Process 0 writes the results, the predictions and the report.
    return rows
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'predictions.jsonl'), 'w') as f:
    for (method, rho, mode), answers in predictions.items():
      for ex, answer in zip(examples, answers):
        f.write(json.dumps({'method': method, 'budget': rho, 'position_mode': mode, 'id': ex.id,
                            'prediction': answer, 'answers': list(ex.answers)}) + '\n')
  results_path = os.path.join(out_dir, 'results.json')
  _write_json(results_path, rows)
  report_path = report_lib.write_report(results_path, out_dir)
  scores = benchmark_table(rows)
  with open(os.path.join(out_dir, 'benchmark.md'), 'w') as f:
    f.write(scores)
  print(report_lib.table(rows))
  print('\n' + scores)
  if any(skipped.values()):
    print(f'skipped rows: { {k: v for k, v in skipped.items() if v} }')
  print(f'\nresults: {results_path}\nreport:  {report_path}')
  return rows
