"""The report's derived figures, on hand-made rows."""

from gripjax.eval import report


def _row(method, kept, acc, seconds, mode='keep'):
  return {'method': method, 'budget': kept / 144, 'position_mode': mode, 'kept_tokens': kept,
          'accuracy': acc, 'n': 100, 'per_task': {'read': acc}, 'region_recall': None,
          'prefill_flops': kept * 1e6, 'prefill_seconds': seconds}


def test_equal_accuracy_speedup_picks_fastest_pruner_at_least_as_accurate():
  rows = [_row('full', 144, 0.90, 4.0), _row('grip', 16, 0.80, 1.0), _row('grip', 8, 0.70, 0.5),
          _row('dart', 16, 0.75, 1.1), _row('dart', 36, 0.82, 2.0), _row('fastv', 36, 0.85, 3.0),
          _row('dart', 8, 0.90, 0.1, mode='renumber'),  # other mode: ignored
          _row('oracle', 8, 0.95, 0.1)]  # a reference that reads the answer region: never a baseline
  out = report.equal_accuracy_speedups(rows)
  assert [e['kept_tokens'] for e in out] == [8, 16]
  assert out[0]['baseline'] == 'dart (16 kept)' and abs(out[0]['speedup'] - 2.2) < 1e-9
  assert out[1]['baseline'] == 'dart (36 kept)' and abs(out[1]['speedup'] - 2.0) < 1e-9


def test_equal_accuracy_speedup_none_when_no_pruner_is_as_accurate():
  rows = [_row('grip', 16, 0.95, 1.0), _row('dart', 16, 0.75, 1.1)]
  (e,) = report.equal_accuracy_speedups(rows)
  assert e['baseline'] is None and e['speedup'] is None
  assert report.equal_accuracy_speedups([_row('dart', 16, 0.75, 1.1)]) == []


def test_report_writes_time_plot_and_speedup_table(tmp_path):
  import json
  rows = [_row('full', 144, 0.90, 4.0), _row('grip', 16, 0.80, 1.0), _row('dart', 36, 0.82, 2.0),
          _row('dart', 16, 0.70, 1.0)]
  path = tmp_path / 'results.json'
  path.write_text(json.dumps(rows))
  text = open(report.write_report(str(path), str(tmp_path))).read()
  assert '](time_frontier.png)' in text and (tmp_path / 'time_frontier.png').exists()
  assert '| 0.111 | 16 | 80.0 | dart (36 kept) | 82.0 | 2.00x |' in text


def test_ablation_summary_mean_and_std_over_seeds():
  from gripjax.eval import ablations
  rows = [dict(_row('grip:relaxation', 16, acc, 1.0), seed=s) for s, acc in ((0, 0.5), (1, 0.7))]
  rows.append(dict(_row('grip:per_budget', 8, 0.6, 1.0), seed=0))
  summary = {s['method']: s for s in ablations.summarize(rows)}
  relax = summary['grip:relaxation']
  assert relax['seeds'] == [0, 1] and abs(relax['accuracy_mean'] - 0.6) < 1e-9
  assert abs(relax['accuracy_std'] - 0.1414213562) < 1e-6  # sample std of (0.5, 0.7)
  assert summary['grip:per_budget']['accuracy_std'] is None
  text = ablations.summary_markdown(list(summary.values()))
  assert '60.0 ± 14.1 (n=2)' in text and '60.0 (n=1)' in text


def test_awareness_table_and_validation_curve(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  grip = dict(_row('grip', 8, 0.80, 1.0), question_swap_accuracy=0.65, budget_nesting=0.5)
  rows = [_row('full', 144, 0.90, 4.0), grip, _row('dart', 8, 0.7, 1.0)]
  table = report.awareness_table(rows)
  assert table.splitlines()[2] == '| 0.0556 | 8 | keep | 80.0 | 65.0 | 15.0 | 0.500 |'
  assert len(table.splitlines()) == 3  # only the grip row
  assert report.awareness_table([_row('dart', 8, 0.7, 1.0)]) is None
  metrics = tmp_path / 'metrics.jsonl'
  log = [{'step': 0, 'phase': 0, 'val/reward': -3.0, 'val/accuracy': 0.5},
         {'step': 10, 'phase': 0, 'loss': 1.0, 'val/reward': -1.0, 'val/accuracy': 0.75},
         {'step': 15, 'phase': 1, 'loss': 1.0},  # a row without the curve
         {'step': 20, 'phase': 1, 'val/reward': -0.5, 'val/accuracy': 0.8}]
  metrics.write_text('\n'.join(json.dumps(r) for r in log) + '\n')
  assert [r['step'] for r in report.read_validation_curve(str(metrics))] == [0, 10, 20]
  results = tmp_path / 'results.json'
  results.write_text(json.dumps(rows))
  text = open(report.write_report(str(results), str(tmp_path), str(metrics))).read()
  assert '| 0.0556 | 8 | keep | 80.0 | 65.0 | 15.0 | 0.500 |' in text
  assert 'End of the warm-up (step 10): reward -1.000, accuracy 75.0%; last step (20): reward -0.500' in text
  assert (tmp_path / 'validation_curve.png').exists()
