"""Report and plots made only from `results.json` (never from numbers typed by hand)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from gripjax.data.grip_bench import scenes

REFERENCES = ('full', 'blind', 'shuffled', 'oracle')  # References, not pruners a user can run.
SPEEDUP_COSTS = ('prefill_seconds', 'prefill_flops')  # Row fields an equal-accuracy speed-up can compare.
_PANEL_MODES = ('keep', 'renumber')  # Position modes of the FLOP frontier's panels, left to right.
_AGENT_COLOR = '#d62728'  # tab20's strong red, kept out of the other methods' palette.


def _fmt(x, digits=1):
  """x as a percentage; a difference that rounds to zero prints 0.0, never -0.0."""
  return '-' if x is None else f'{round(100 * x, digits) + 0.0:.{digits}f}'


def _gflops(x):
  return '-' if x is None else f'{x / 1e9:.3f}'


def _ms(seconds):
  return '-' if seconds is None else f'{1e3 * seconds:.3f}'


def table(rows: list[dict[str, Any]]) -> str:
  """A Markdown table: one line per row of results.json.

  `GFLOPs prefill` is the LM prefill plus the method's own selection work, which `GFLOPs selection`
  shows alone; `ms prefill` is the measured time per example of the method and the LM (the vision
  tower, shared by every row, is in none of these columns: see `vision_line`).
  """
  tasks = sorted({t for r in rows for t in r['per_task']})
  head = (['method', 'mode', 'budget', 'kept', 'accuracy %', 'region recall %'] + tasks +
          ['GFLOPs prefill', 'GFLOPs selection', 'ms prefill'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['method'], r['position_mode'], f"{r['budget']:.3g}", str(r['kept_tokens']),
             _fmt(r['accuracy']), _fmt(r['region_recall'])]
    cells += [_fmt(r['per_task'].get(t)) for t in tasks]
    cells += [_gflops(r['prefill_flops']), _gflops(r.get('selection_flops')), _ms(r.get('prefill_seconds'))]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def vision_line(rows: list[dict[str, Any]]) -> str | None:
  """One line on the vision tower (+ projector), run once per batch and shared by every row; None
  when the rows do not carry it."""
  row = next((r for r in rows if r.get('vision_flops') is not None), None)
  if row is None:
    return None
  return (f"Vision tower + projector, shared by every row and in none of the prefill columns: "
          f"{_gflops(row['vision_flops'])} GFLOPs, {_ms(row.get('vision_seconds'))} ms per example.")


def _pyplot():
  """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top  # Optional: plots are skipped without it.
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return plt


def _curves(rows, mode=None):
  """{(method, mode): rows sorted by kept tokens}, optionally for one position mode."""
  groups = {}
  for r in rows:
    if mode is None or r['position_mode'] == mode:
      groups.setdefault((r['method'], r['position_mode']), []).append(r)
  return {key: sorted(rs, key=lambda r: r['kept_tokens']) for key, rs in sorted(groups.items())}


def _draw_curves(ax, curves, value):
  import matplotlib  # pylint: disable=g-import-not-at-top  # Optional, as in _pyplot.
  methods = sorted({m for m, _ in curves})
  palette = matplotlib.colormaps['tab20'].colors
  color = {m: palette[(2 * i) % 20 + (2 * i) // 20] for i, m in enumerate(methods)}
  ticks = set()
  for (method, mode), rs in curves.items():
    xs = [max(r['kept_tokens'], 0.5) for r in rs]
    ys = [value(r) for r in rs]
    if len(rs) == 1:
      ax.axhline(ys[0], ls=':', lw=1, label=f'{method} ({mode})',
                 color='k' if method == 'full' else 'gray')
    else:
      ticks.update(xs)
      ax.plot(xs, ys, marker='o', ms=3, ls='-' if mode == 'keep' else '--', color=color[method],
              label=f'{method} ({mode})')
  ax.set_xscale('log')
  if ticks:
    ax.set_xticks(sorted(ticks), [f'{t:g}' for t in sorted(ticks)])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel('kept visual tokens')


def plot_frontier(rows, path: str) -> str | None:
  """Accuracy against kept visual tokens, one line per (method, position mode)."""
  plt = _pyplot()
  if plt is None:
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  _draw_curves(ax, _curves(rows), lambda r: 100 * r['accuracy'])
  ax.set_ylabel('accuracy (%)')
  ax.set_title('GRIP-Bench test: accuracy vs kept tokens')
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _frontier_panels(rows) -> list[str]:
  """The position modes `plot_flops_frontier` draws, left to right: 'keep', then 'renumber', each
  only when some row of that mode carries `prefill_flops`."""
  return [m for m in _PANEL_MODES
          if any(r['position_mode'] == m and r.get('prefill_flops') for r in rows)]


def _log_ticks(lo: float, hi: float) -> list[float]:
  """Tick values for a log axis over [lo, hi]: 1, 2, 5 per decade; 1, 2, 3, 5, 7 when fewer than four
  of those fall in the range; the two ends added when even those give fewer than two."""
  if not 0 < lo <= hi:
    raise ValueError(f'log axis range ({lo!r}, {hi!r}): expected 0 < lo <= hi')
  decades = range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 1)
  ticks = []
  for mantissas, enough in (((1, 2, 5), 4), ((1, 2, 3, 5, 7), 2)):
    ticks = [float(f'{m * 10.0 ** e:.3g}') for e in decades for m in mantissas]
    ticks = [t for t in ticks if lo <= t <= hi]
    if len(ticks) >= enough:
      return ticks
  return sorted(set(ticks) | {lo, hi})


def plot_flops_frontier(rows, path: str, method: str = 'grip') -> str | None:
  """Accuracy (%) against prefill GFLOPs per example on a log axis, one panel per position mode.

  The x value is a row's `prefill_flops`: the LM prefill on the kept tokens plus what the method runs
  to choose them (`selection_flops`; for the agent, its scorer). Panels: `_frontier_panels(rows)`
  (keep, renumber). One line per method, ordered by FLOPs; `method` (the agent) is drawn on top,
  thick, red, with large markers, as '<method> (agent)'. `full` is a dotted line at its accuracy with
  a marker at its FLOPs; `oracle` a thin dashed grey reference; `blind` and `shuffled` grey points.
  Returns `path`, or None when matplotlib is missing or no row has `prefill_flops`.
  """
  plt = _pyplot()
  panels = _frontier_panels(rows)
  if plt is None or not panels:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top  # Optional, as in _pyplot.
  costed = [r for r in rows if r.get('prefill_flops') and r['position_mode'] in panels]
  gflops = [r['prefill_flops'] / 1e9 for r in costed]
  lo, hi = min(gflops) / 1.25, max(gflops) * 1.25  # Room for the markers at both ends.
  ticks = _log_ticks(lo, hi)
  pruners = sorted({r['method'] for r in costed} - set(REFERENCES) - {method})
  palette = [c for i, c in enumerate(matplotlib.colormaps['tab20'].colors)
             if i not in (6, 7, 14, 15)]  # Reds: the agent's; greys: the references'.
  color = {m: palette[i % len(palette)] for i, m in enumerate(pruners)}
  legend_in = 1.8  # Inches on the right for the legend, shared by the panels.
  width = 5.2 * len(panels) + legend_in
  fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.6), sharey=True, squeeze=False)
  handles = {}
  for ax, mode in zip(axes[0], panels):
    for (name, _), rs in _curves([r for r in costed if r['position_mode'] == mode]).items():
      rs = sorted(rs, key=lambda r: r['prefill_flops'])
      xs = [r['prefill_flops'] / 1e9 for r in rs]
      ys = [100 * r['accuracy'] for r in rs]
      if name == method:
        label = f'{name} (agent)'
        handles[label] = ax.plot(xs, ys, marker='o', ms=7, lw=2.8, color=_AGENT_COLOR, zorder=10,
                                 label=label)[0]
      elif name == 'full':
        label = 'full (all tokens)'
        handles[label] = ax.axhline(ys[-1], ls=':', lw=1.2, color='k', zorder=1, label=label)
        ax.plot(xs[-1:], ys[-1:], marker='D', ms=5, ls='none', color='k', zorder=3)
      elif name == 'oracle':
        label = 'oracle (reference)'
        handles[label] = ax.plot(xs, ys, marker='.', ms=3, ls='--', lw=0.8, color='0.55', zorder=1,
                                 label=label)[0]
      elif name in REFERENCES:
        label = f'{name} (reference)'
        handles[label] = ax.plot(xs, ys, marker='x' if name == 'blind' else '+', ms=6, ls='none',
                                 color='0.4', zorder=1, label=label)[0]
      else:
        handles[name] = ax.plot(xs, ys, marker='o', ms=3.5, lw=1.2, color=color[name], zorder=2,
                                label=name)[0]
    ax.set_xscale('log')
    ax.set_xlim(lo, hi)
    ax.set_xticks(ticks, [f'{t:.3g}' for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which='major', alpha=0.3)
    ax.set_xlabel('prefill GFLOPs per example (LM + selection)')
    ax.set_title(f'{mode} positions')
  axes[0][0].set_ylabel('accuracy (%)')
  order = ([f'{method} (agent)'] + pruners + ['full (all tokens)', 'oracle (reference)'] +
           [f'{m} (reference)' for m in REFERENCES if m not in ('full', 'oracle')])
  labels = [label for label in order if label in handles]
  fig.legend([handles[label] for label in labels], labels, fontsize=7, loc='center left',
             bbox_to_anchor=(1 - legend_in / width, 0.5))
  fig.suptitle('GRIP-Bench test: accuracy vs prefill FLOPs (selection included)')
  fig.tight_layout(rect=(0, 0, 1 - legend_in / width, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_time_frontier(rows, path: str, mode: str = 'keep') -> str | None:
  """Accuracy against measured prefill seconds per example (pruner + LM), position mode `mode`."""
  plt = _pyplot()
  timed = [r for r in rows if r.get('prefill_seconds') and r['position_mode'] == mode]
  if plt is None or not timed:
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for (method, _), rs in _curves(timed).items():
    rs = sorted(rs, key=lambda r: r['prefill_seconds'])
    ax.plot([1e3 * r['prefill_seconds'] for r in rs], [100 * r['accuracy'] for r in rs],
            marker='o', ms=3, ls='-' if len(rs) > 1 else 'none', label=method)
  ax.set_xscale('log')
  ax.set_xlabel('measured prefill ms per example (pruner + LM, this machine)')
  ax.set_ylabel('accuracy (%)')
  ax.set_title(f'GRIP-Bench test: accuracy vs measured prefill time ({mode} positions)')
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def equal_accuracy_speedups(rows, method: str = 'grip', mode: str = 'keep',
                            cost: str = 'prefill_seconds') -> list[dict[str, Any]]:
  """For each budget of `method`: the cheapest other pruner at least as accurate, and the speed-up.

  `cost` is the row field compared: 'prefill_seconds' (measured time of the pruner and the LM) or
  'prefill_flops' (LM prefill plus the pruner's selection work; the agent's scorer included).
  Speed-up = that pruner's cost / `method`'s; references (full, blind, shuffled, oracle) are left
  out. Rows without the cost are skipped; `baseline` is None where no pruner is as accurate.
  """
  if cost not in SPEEDUP_COSTS:
    raise ValueError(f'equal_accuracy_speedups cost={cost!r}: expected one of {SPEEDUP_COSTS}')
  mine = [r for r in rows if r['method'] == method and r['position_mode'] == mode and r.get(cost)]
  others = [r for r in rows if r['method'] not in REFERENCES + (method,) and r['position_mode'] == mode
            and r.get(cost)]
  out = []
  for r in sorted(mine, key=lambda r: r['kept_tokens']):
    as_good = [o for o in others if o['accuracy'] >= r['accuracy']]
    best = min(as_good, key=lambda o: o[cost]) if as_good else None
    out.append({'budget': r['budget'], 'kept_tokens': r['kept_tokens'], 'accuracy': r['accuracy'],
                'baseline': None if best is None else f"{best['method']} ({best['kept_tokens']} kept)",
                'baseline_accuracy': None if best is None else best['accuracy'],
                'speedup': None if best is None else best[cost] / r[cost]})
  return out


def speedup_table(entries: list[dict[str, Any]], baseline_head: str, method: str = 'grip') -> str:
  """Markdown table of `equal_accuracy_speedups` entries; `baseline_head` names the baseline column."""
  lines = [f'| {method} budget | kept | accuracy % | {baseline_head} | its accuracy % | speed-up |',
           '|---|---|---|---|---|---|']
  for e in entries:
    lines.append(f"| {e['budget']:.3g} | {e['kept_tokens']} | {_fmt(e['accuracy'])} | "
                 f"{e['baseline'] or 'none'} | {_fmt(e['baseline_accuracy'])} | "
                 + ('-' if e['speedup'] is None else f"{e['speedup']:.2f}x") + ' |')
  return '\n'.join(lines)


def plot_per_task(rows, path: str, mode: str = 'keep') -> str | None:
  """One panel per task family: accuracy against kept tokens in position mode `mode`."""
  plt = _pyplot()
  tasks = sorted({t for r in rows for t in r['per_task']})
  curves = _curves(rows, mode)
  if plt is None or not tasks or not curves:
    return None
  fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.6), sharey=True)
  axes = [axes] if len(tasks) == 1 else list(axes)
  for ax, task in zip(axes, tasks):
    _draw_curves(ax, curves, lambda r, t=task: 100 * r['per_task'].get(t, float('nan')))
    ax.set_title(task)
  axes[0].set_ylabel('accuracy (%)')
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=7, ncol=min(len(labels), 7), loc='lower center')
  fig.tight_layout(rect=(0, 0.12, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_kept_patches(rows, path: str, mode: str = 'keep') -> str | None:
  """The kept patches of each method at its smallest budget over the first test examples.

  Dropped patches are darkened; the answer region is outlined in cyan. The images are redrawn from
  the data config stored in the rows (GRIP-Bench examples are a pure function of it).
  """
  plt = _pyplot()
  picked = {}
  for r in rows:
    if r['position_mode'] != mode or not r.get('examples') or r['method'] in ('full', 'shuffled'):
      continue
    best = picked.get(r['method'])
    if best is None or r['kept_tokens'] < best['kept_tokens']:
      picked[r['method']] = r
  if plt is None or not picked:
    return None
  methods = sorted(picked, key=lambda m: (m != 'blind', m))
  ex = picked[methods[0]]['examples']
  count = min(len(picked[m]['examples']['kept']) for m in methods)
  renders = [scenes.render_example(ex['seed'], ex['split'], i, ex['image_size'], ex['patch_size'])
             for i in ex['index'][:count]]
  p = ex['patch_size']
  grid = ex['image_size'] // p
  fig, axes = plt.subplots(len(methods), count, figsize=(1.9 * count, 1.9 * len(methods)),
                           squeeze=False)
  for row, method in enumerate(methods):
    r = picked[method]
    for col, example in enumerate(renders):
      keep = set(r['examples']['kept'][col])
      image = example['image'].astype('float32') / 255.0
      for patch in range(grid * grid):
        if patch not in keep:
          y, x = divmod(patch, grid)
          image[y * p:(y + 1) * p, x * p:(x + 1) * p] *= 0.2
      ax = axes[row][col]
      ax.imshow(image, interpolation='nearest')
      for patch in example['region']:
        y, x = divmod(int(patch), grid)
        ax.add_patch(plt.Rectangle((x * p - 0.5, y * p - 0.5), p, p, fill=False, ec='cyan', lw=1))
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(f"{example['question']}\n-> {example['answer']}", fontsize=6)
      if col == 0:
        ax.set_ylabel(f"{method}\n{r['kept_tokens']} kept", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def awareness_table(rows: list[dict[str, Any]]) -> str | None:
  """Markdown table of the agent's awareness columns (gripjax/eval/awareness.py); None without them."""
  aware = [r for r in rows if r.get('question_swap_accuracy') is not None]
  if not aware:
    return None
  head = ['budget', 'kept', 'mode', 'accuracy %', 'with another question %', 'cost of the swap (points)',
          'budget nesting', 'told another budget %', 'cost (points)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in sorted(aware, key=lambda r: (r['position_mode'], -r['budget'])):
    swap = r['question_swap_accuracy']
    told = r.get('budget_swap_accuracy')  # Absent from rows written before the column existed.
    told_cells = ('- | -' if told is None else
                  f"{_fmt(told)} (told {r['budget_swap_rho']:.3g}) | {_fmt(r['accuracy'] - told)}")
    lines.append(f"| {r['budget']:.3g} | {r['kept_tokens']} | {r['position_mode']} | "
                 f"{_fmt(r['accuracy'])} | {_fmt(swap)} | "
                 f"{_fmt(r['accuracy'] - swap)} | {r['budget_nesting']:.3f} | {told_cells} |")
  return '\n'.join(lines)


def read_validation_curve(metrics_path: str) -> list[dict[str, Any]]:
  """The rows of a trainer's metrics.jsonl that carry the validation curve (`val/reward`)."""
  if not metrics_path or not os.path.exists(metrics_path):
    return []
  with open(metrics_path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if 'val/reward' in r]


def plot_validation_curve(curve: list[dict[str, Any]], path: str) -> str | None:
  """Greedy validation reward and accuracy per training step, the warm-up shaded; None if empty."""
  plt = _pyplot()
  if plt is None or not curve:
    return None
  steps = [r['step'] for r in curve]
  fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
  budgets = sorted({k.split('@', 1)[1] for r in curve for k in r if k.startswith('val/reward@')})
  for ax, key, label in ((ax_r, 'val/reward', 'validation reward (greedy keep-sets)'),
                         (ax_a, 'val/accuracy', 'validation accuracy (greedy keep-sets)')):
    ax.plot(steps, [r[key] for r in curve], color='black', lw=2, label='mean')
    for b in budgets:
      ax.plot(steps, [r.get(f'{key}@{b}') for r in curve], lw=1, label=f'rho={b}')
    warm = [r['step'] for r in curve if r.get('phase') == 0]
    if warm:
      ax.axvspan(0, max(warm), color='0.9', label='warm-up')
    ax.set_xlabel('training step')
    ax.set_title(label, fontsize=10)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_report(results_path: str, out_dir: str, metrics_path: str | None = None) -> str:
  """Writes `out_dir/report.md` (and plots) from results.json; returns the report's path.

  With `metrics_path` (the agent's training log, metrics.jsonl) the report also shows its
  validation curve.
  """
  with open(results_path) as f:
    rows = json.load(f)
  lines = ['# GRIP-Bench evaluation', '',
           f'Made from `{os.path.basename(results_path)}` ({len(rows)} rows).', '',
           table(rows), '']
  if vision_line(rows):
    lines += [vision_line(rows), '']
  plots = (
      (plot_flops_frontier, 'flops_frontier.png', 'accuracy vs prefill FLOPs (keep and renumber positions)',
       'Accuracy against the prefill FLOPs of one example, counting the LM on the kept tokens and all '
       'a method runs to choose them (the agent\'s scorer included), in one panel per position mode, '
       'with the agent `grip` in thick red, `full` dotted and the `oracle` reference dashed grey.'),
      (plot_frontier, 'frontier.png', 'accuracy vs kept tokens', None),
      (plot_time_frontier, 'time_frontier.png', 'accuracy vs measured prefill time (keep mode)', None),
      (plot_per_task, 'per_task.png', 'accuracy per task family vs kept tokens (keep mode)', None),
      (plot_kept_patches, 'kept_patches.png',
       'kept patches at the smallest budget (dropped patches darkened, answer region in cyan)', None),
  )
  for plot, name, caption, note in plots:
    if plot(rows, os.path.join(out_dir, name)):
      lines += [f'## {caption[0].upper() + caption[1:]}', ''] + ([note, ''] if note else [])
      lines += [f'![{caption}]({name})', '']
  aware = awareness_table(rows)
  if aware:
    lines += ['## Does the agent use its question and its budget?', '',
              'Same examples as the table above. *With another question*: the keep-set is chosen with '
              'the next example\'s question and answered with the right one. *Budget nesting*: Jaccard of '
              'the top-k at rho and the top-k the agent ranks at 2 rho (1.0: the budget input changes '
              'nothing in the first k). *Told another budget*: the keep-set is the top-k of the agent '
              'told another budget (in brackets) instead of the row\'s, still k tokens (its cost is what '
              'the budget input is worth).', '', aware, '']
  curve = read_validation_curve(metrics_path)
  if plot_validation_curve(curve, os.path.join(out_dir, 'validation_curve.png')):
    first_rl = next((r for r in curve if r.get('phase') == 1), None)
    warm_end = [r for r in curve if r.get('phase') == 0]
    lines += ['## Validation curve of the agent\'s training', '',
              f'From `{metrics_path}`: greedy keep-sets on fixed validation examples at each log step.']
    if warm_end and first_rl:
      lines += ['', f"End of the warm-up (step {warm_end[-1]['step']}): reward {warm_end[-1]['val/reward']:.3f}, "
                f"accuracy {_fmt(warm_end[-1]['val/accuracy'])}%; last step ({curve[-1]['step']}): "
                f"reward {curve[-1]['val/reward']:.3f}, accuracy {_fmt(curve[-1]['val/accuracy'])}%."]
    lines += ['', '![validation curve](validation_curve.png)', '']
  speedups = equal_accuracy_speedups(rows)
  if speedups:
    lines += ['## Equal-accuracy speed-up of the agent', '',
              'For each budget of `grip`: the fastest other pruner (any budget, keep mode) that is at '
              'least as accurate, and its measured prefill time over the agent\'s.', '',
              speedup_table(speedups, 'fastest pruner as accurate'), '']
  flop_speedups = equal_accuracy_speedups(rows, cost='prefill_flops')
  if flop_speedups:
    lines += ['## Equal-accuracy FLOP speed-up of the agent', '',
              'For each budget of `grip`: the other pruner (any budget, keep mode) with the fewest prefill '
              'FLOPs that is at least as accurate, and its prefill FLOPs over the agent\'s (LM + selection '
              'on both sides, the agent\'s scorer included).', '',
              speedup_table(flop_speedups, 'cheapest pruner as accurate (FLOPs)'), '']
  path = os.path.join(out_dir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path
