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
kept tokens and the question. The rows' FLOP columns count the prefix's P slots with the text's
(config.hf.text_len slots); the KV-cache column counts one slot before the image (<bos>) whatever P.
The generated answers go to `WORKDIR/eval/predictions.jsonl` (one line per row and job), the
benchmark scores to `WORKDIR/eval/benchmark.md`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
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


def score(data: hf_data.HFData, predictions: list[str]) -> dict[str, Any]:
  """The benchmark's scores of `predictions` (the first len(predictions) rows), or exact match."""
  examples = data.examples[:len(predictions)]
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


def run(config, workdir: str) -> list[dict[str, Any]]:
  """`--mode=eval` for a config with an `hf` section (configs/llava_hf.py)."""
  methods = tuple(config.eval.methods)
  oracle = [m for m in methods if m in evaluate.ORACLE_METHODS]
  if oracle:
    raise ValueError(f'config.eval.methods holds {oracle}, which read answer regions: a benchmark or user '
                     'dataset has none; expected methods without them.')
  tok = runtime.tokenizer_for(config)
  vlm = runtime.make_model(config, tok)
  params = runtime.load_vlm_params(config, vlm)
  data = hf_data.load_data(config, tok)
  if data.benchmark is None and not data.has_answers:
    raise user_data.BadDataError(
        f"{data.source}: rows without an 'answer' field: evaluation needs reference answers on every row.")
  agent = evaluate.load_agent(config, vlm) if 'grip' in methods else None
  n = len(data) if config.eval.num_examples is None else min(config.eval.num_examples, len(data))
  split = f'{data.benchmark or "data"}:{os.path.basename(data.source)}'
  rows = evaluate.evaluate(config, vlm, params, data, tok, methods, config.eval.budgets,
                           config.eval.position_modes, n, agent=agent, split=split,
                           batches=hf_data.eval_batches(data, config, config.eval.batch_size, n, tok.layout_prefix),
                           task_names=data.task_names)
  jobs = generation_jobs(rows)
  predictions = generate_all(config, vlm, params, tok, data, jobs, agent, n)
  skipped = data.skip_counts()
  for row in rows:
    job = (row['method'], row['budget'], row['position_mode'])
    row['generation'] = None if job not in predictions else {
        'benchmark': data.benchmark, 'max_new_tokens': int(config.hf.max_new_tokens), 'n': n,
        'scores': score(data, predictions[job])}
    row['skipped'] = skipped
    row['data'] = {'source': data.source, 'num_rows': data.num_rows, 'used': n}
    logging.info('eval %s', json.dumps({k: row[k] for k in ('method', 'budget', 'position_mode', 'generation')}))
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'predictions.jsonl'), 'w') as f:
    for (method, rho, mode), answers in predictions.items():
      for ex, answer in zip(data.examples, answers):
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
