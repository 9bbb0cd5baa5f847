"""The report's derived figures, on hand-made rows."""

import json
import os
import struct

import pytest

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
  rows = [_row('full', 144, 0.90, 4.0), _row('grip', 16, 0.80, 1.0), _row('dart', 36, 0.82, 2.0),
          _row('dart', 16, 0.70, 1.0)]
  path = tmp_path / 'results.json'
  path.write_text(json.dumps(rows))
  text = open(report.write_report(str(path), str(tmp_path))).read()
  assert '](time_frontier.png)' in text and (tmp_path / 'time_frontier.png').exists()
  assert '| 0.111 | 16 | 80.0 | dart (36 kept) | 82.0 | 2.00x |' in text


def test_ablation_summary_mean_std_and_standard_error_over_seeds():
  from gripjax.eval import ablations
  rows = [dict(_row('grip:relaxation', 16, acc, 1.0), seed=s) for s, acc in ((0, 0.5), (1, 0.7))]
  rows.append(dict(_row('grip:per_budget', 8, 0.6, 1.0), seed=0))
  summary = {s['method']: s for s in ablations.summarize(rows)}
  relax = summary['grip:relaxation']
  assert relax['seeds'] == [0, 1] and abs(relax['accuracy_mean'] - 0.6) < 1e-9
  assert abs(relax['accuracy_std'] - 0.1414213562) < 1e-6  # sample std of (0.5, 0.7)
  assert abs(relax['accuracy_se'] - 0.1) < 1e-6  # std / sqrt(2)
  assert summary['grip:per_budget']['accuracy_std'] is None
  assert summary['grip:per_budget']['accuracy_se'] is None
  text = ablations.summary_markdown(list(summary.values()))
  assert '60.0 ± 10.0 (n=2)' in text and '60.0 (n=1)' in text


def test_awareness_table_and_validation_curve(tmp_path):
  grip = dict(_row('grip', 8, 0.80, 1.0), question_swap_accuracy=0.65, budget_nesting=0.5)
  rows = [_row('full', 144, 0.90, 4.0), grip, _row('dart', 8, 0.7, 1.0)]
  table = report.awareness_table(rows)
  # A row written before the budget-swap column existed shows dashes there.
  assert table.splitlines()[2] == '| 0.0556 | 8 | keep | 80.0 | 65.0 | 15.0 | 0.500 | - | - |'
  assert len(table.splitlines()) == 3  # only the grip row
  told = dict(grip, budget_swap_accuracy=0.7, budget_swap_rho=0.5)
  assert (report.awareness_table([told]).splitlines()[2] ==
          '| 0.0556 | 8 | keep | 80.0 | 65.0 | 15.0 | 0.500 | 70.0 (told 0.5) | 10.0 |')
  told = dict(grip, budget_swap_accuracy=0.8000001, budget_swap_rho=0.5)  # a cost of -1e-7
  assert report.awareness_table([told]).splitlines()[2].endswith('| 80.0 (told 0.5) | 0.0 |')
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


def _frow(method, kept, acc, flops, mode='keep', seconds=None):
  return dict(_row(method, kept, acc, seconds, mode), prefill_flops=flops)


def _frontier_rows():
  """grip and dart at 8 and 16 kept, full and oracle, in both modes (renumber 5 points lower)."""
  rows = []
  for mode, drop in (('keep', 0.0), ('renumber', 0.05)):
    rows += [_frow('full', 144, 0.90, 100e6, mode),
             _frow('oracle', 8, 0.88, 10e6, mode), _frow('oracle', 16, 0.89, 18e6, mode)]
    rows += [_frow('grip', k, acc - drop, f, mode) for k, acc, f in ((8, 0.70, 30e6), (16, 0.80, 40e6))]
    rows += [_frow('dart', k, acc - drop, f, mode) for k, acc, f in ((16, 0.75, 17e6), (8, 0.60, 9e6))]
  return rows


class _KeepFigures:
  """pyplot, except that `close` keeps each figure for the test to read."""

  def __init__(self, plt):
    self._plt = plt
    self.figures = []

  def __getattr__(self, name):
    return getattr(self._plt, name)

  def close(self, fig):
    self.figures.append(fig)


def test_frontier_panels_are_the_modes_with_flops_keep_first():
  rows = _frontier_rows()
  assert report._frontier_panels(rows) == ['keep', 'renumber']
  assert report._frontier_panels(rows[::-1]) == ['keep', 'renumber']
  assert report._frontier_panels([r for r in rows if r['position_mode'] == 'keep']) == ['keep']
  no_keep_flops = [dict(r, prefill_flops=None) if r['position_mode'] == 'keep' else r for r in rows]
  assert report._frontier_panels(no_keep_flops) == ['renumber']
  assert report._frontier_panels([dict(r, prefill_flops=None) for r in rows]) == []


def test_log_ticks_one_two_five_then_finer_then_the_ends():
  assert report._log_ticks(0.003, 0.9) == [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
  assert report._log_ticks(0.016, 0.13) == [0.02, 0.03, 0.05, 0.07, 0.1]  # Only 3 of 1-2-5.
  assert report._log_ticks(0.011, 0.019) == [0.011, 0.019]  # Not even two of 1-2-3-5-7.
  with pytest.raises(ValueError, match=r'\(0.0, 1.0\): expected 0 < lo <= hi'):
    report._log_ticks(0.0, 1.0)


def test_flops_frontier_none_without_matplotlib_or_flops(tmp_path, monkeypatch):
  path = str(tmp_path / 'f.png')
  assert report.plot_flops_frontier([dict(r, prefill_flops=None) for r in _frontier_rows()], path) is None
  monkeypatch.setattr(report, '_pyplot', lambda: None)
  assert report.plot_flops_frontier(_frontier_rows(), path) is None
  assert not os.path.exists(path)


def test_flops_frontier_two_panels_agent_highlighted(tmp_path, monkeypatch):
  pytest.importorskip('matplotlib')
  spy = _KeepFigures(report._pyplot())
  monkeypatch.setattr(report, '_pyplot', lambda: spy)
  path = str(tmp_path / 'flops_frontier.png')
  assert report.plot_flops_frontier(_frontier_rows(), path) == path
  assert os.path.getsize(path) > 0
  (fig,) = spy.figures
  assert [ax.get_title() for ax in fig.axes] == ['keep positions', 'renumber positions']
  keep, renumber = fig.axes
  lines = {line.get_label(): line for line in renumber.get_lines()}
  grip, dart = lines['grip (agent)'], lines['dart']
  assert list(grip.get_xdata()) == pytest.approx([0.03, 0.04])  # GFLOPs
  assert list(grip.get_ydata()) == pytest.approx([65.0, 75.0])  # renumber: 5 points below keep
  assert list(dart.get_xdata()) == pytest.approx([0.009, 0.017])  # rows given 16 first, drawn 8 first
  assert grip.get_linewidth() > 2 * dart.get_linewidth() and grip.get_markersize() > dart.get_markersize()
  assert grip.get_zorder() > max(line.get_zorder() for line in renumber.get_lines() if line is not grip)
  full = lines['full (all tokens)']
  assert full.get_linestyle() == ':' and list(full.get_ydata()) == pytest.approx([90.0, 90.0])
  oracle = lines['oracle (reference)']
  assert oracle.get_linestyle() == '--' and oracle.get_linewidth() < dart.get_linewidth()
  assert keep.get_xscale() == 'log'
  assert keep.get_xlabel() == 'prefill GFLOPs per example (LM + selection)'
  # Data 0.009..0.1 GFLOPs, padded by 1.25 on each side: the 1-2-5 ticks inside.
  assert [t.get_text() for t in keep.get_xticklabels()] == ['0.01', '0.02', '0.05', '0.1']
  legend = [t.get_text() for t in fig.legends[0].get_texts()]
  assert legend == ['grip (agent)', 'dart', 'full (all tokens)', 'oracle (reference)']

  keep_only = [r for r in _frontier_rows() if r['position_mode'] == 'keep']
  assert report.plot_flops_frontier(keep_only, str(tmp_path / 'one.png'), method='dart')
  assert [ax.get_title() for ax in spy.figures[1].axes] == ['keep positions']
  labels = [line.get_label() for line in spy.figures[1].axes[0].get_lines()]
  assert 'dart (agent)' in labels and 'grip' in labels


def test_equal_accuracy_flop_speedup_picks_cheapest_in_flops():
  # fastv 36 is slower than dart 36 in measured time but cheaper in FLOPs.
  rows = [_frow('full', 144, 0.90, 100e6, seconds=4.0),
          _frow('grip', 4, 0.99, 10e6, seconds=0.3), _frow('grip', 8, 0.70, 20e6, seconds=0.5),
          _frow('grip', 16, 0.80, 40e6, seconds=1.0),
          _frow('dart', 16, 0.75, 40e6, seconds=1.1), _frow('dart', 36, 0.82, 90e6, seconds=2.0),
          _frow('fastv', 36, 0.85, 60e6, seconds=3.0), _frow('random', 72, 0.99, None, seconds=9.0),
          _frow('dart', 8, 0.90, 1e6, mode='renumber', seconds=0.1),  # other mode: ignored
          _frow('oracle', 8, 0.95, 1e6, seconds=0.1)]  # reference: never a baseline
  out = report.equal_accuracy_speedups(rows, cost='prefill_flops')
  assert [e['kept_tokens'] for e in out] == [4, 8, 16]
  assert out[0]['baseline'] is None and out[0]['speedup'] is None  # random 72 has no FLOPs
  assert out[1]['baseline'] == 'dart (16 kept)' and out[1]['speedup'] == pytest.approx(2.0)
  assert out[2]['baseline'] == 'fastv (36 kept)' and out[2]['speedup'] == pytest.approx(1.5)
  assert out[2]['baseline_accuracy'] == 0.85
  timed = report.equal_accuracy_speedups(rows)  # the default still compares measured time
  assert timed[0]['baseline'] == 'random (72 kept)' and timed[0]['speedup'] == pytest.approx(30.0)
  assert timed[2]['baseline'] == 'dart (36 kept)' and timed[2]['speedup'] == pytest.approx(2.0)
  with pytest.raises(ValueError, match="cost='kv_cache_bytes': expected one of"):
    report.equal_accuracy_speedups(rows, cost='kv_cache_bytes')


def test_report_has_flops_frontier_before_kept_frontier_and_both_speedup_tables(tmp_path):
  pytest.importorskip('matplotlib')
  rows = [_frow('full', 144, 0.90, 100e6, seconds=4.0), _frow('grip', 16, 0.80, 40e6, seconds=1.0),
          _frow('dart', 36, 0.82, 90e6, seconds=2.0), _frow('fastv', 36, 0.85, 60e6, seconds=3.0),
          _frow('dart', 16, 0.70, 20e6, seconds=1.0),
          _frow('grip', 16, 0.75, 40e6, mode='renumber', seconds=1.0)]
  path = tmp_path / 'results.json'
  path.write_text(json.dumps(rows))
  text = open(report.write_report(str(path), str(tmp_path))).read()
  width = {name: struct.unpack('>I', (tmp_path / name).read_bytes()[16:20])[0]  # PNG IHDR width
           for name in ('flops_frontier.png', 'time_frontier.png')}
  assert width['flops_frontier.png'] > 1.5 * width['time_frontier.png']  # two panels (and a legend)
  assert '## Accuracy vs prefill FLOPs (keep and renumber positions)' in text
  assert 0 <= text.index('](flops_frontier.png)') < text.index('](frontier.png)')
  assert '](time_frontier.png)' in text and '](per_task.png)' in text
  assert '| 0.111 | 16 | 80.0 | dart (36 kept) | 82.0 | 2.00x |' in text  # time
  assert '| 0.111 | 16 | 80.0 | fastv (36 kept) | 85.0 | 1.50x |' in text  # FLOPs
  assert text.index('## Equal-accuracy speed-up of the agent') < text.index('## Equal-accuracy FLOP speed-up')
