"""Report and plots made only from `results.json` (never from numbers typed by hand)."""

from __future__ import annotations

import json
import os
from typing import Any


def _fmt(x, digits=1):
  return '-' if x is None else f'{100 * x:.{digits}f}'


def table(rows: list[dict[str, Any]]) -> str:
  """A Markdown table: one line per row of results.json."""
  tasks = sorted({t for r in rows for t in r['per_task']})
  head = ['method', 'mode', 'budget', 'kept', 'accuracy %', 'region recall %'] + tasks + ['GFLOPs prefill']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['method'], r['position_mode'], f"{r['budget']:.3g}", str(r['kept_tokens']),
             _fmt(r['accuracy']), _fmt(r['region_recall'])]
    cells += [_fmt(r['per_task'].get(t)) for t in tasks]
    cells.append(f"{r['prefill_flops'] / 1e9:.3f}")
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot_frontier(rows, path: str) -> str | None:
  """Accuracy against kept visual tokens, one line per (method, position mode)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  groups = {}
  for r in rows:
    groups.setdefault((r['method'], r['position_mode']), []).append(r)
  for (method, mode), rs in sorted(groups.items()):
    rs = sorted(rs, key=lambda r: r['kept_tokens'])
    xs = [max(r['kept_tokens'], 0.5) for r in rs]
    ys = [100 * r['accuracy'] for r in rs]
    if len(rs) == 1:
      ax.axhline(ys[0], ls=':', lw=1, label=f'{method} ({mode})', color='gray' if method != 'full' else 'k')
    else:
      ax.plot(xs, ys, marker='o', ls='-' if mode == 'keep' else '--', label=f'{method} ({mode})')
  ax.set_xscale('log')
  ax.set_xlabel('kept visual tokens')
  ax.set_ylabel('accuracy (%)')
  ax.set_title('GRIP-Bench test: accuracy vs kept tokens')
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_report(results_path: str, out_dir: str) -> str:
  """Writes `out_dir/report.md` (and plots) from results.json; returns the report's path."""
  with open(results_path) as f:
    rows = json.load(f)
  plot = plot_frontier(rows, os.path.join(out_dir, 'frontier.png'))
  lines = ['# GRIP-Bench evaluation', '',
           f'Made from `{os.path.basename(results_path)}` ({len(rows)} rows).', '',
           table(rows), '']
  if plot:
    lines += ['![accuracy vs kept tokens](frontier.png)', '']
  path = os.path.join(out_dir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path
