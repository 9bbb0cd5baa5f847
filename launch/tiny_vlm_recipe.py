"""The full recipe of the shipped tiny VLM (`gripjax/assets/tiny_vlm`), one stage after another.

  python launch/tiny_vlm_recipe.py --workdir=workdir/recipe
  python launch/tiny_vlm_recipe.py --workdir=workdir/recipe --dry_run   # print the commands only

Each stage is one `python -m gripjax.main --mode=pretrain_vlm` run in WORKDIR/<stage>, continuing
from the previous stage's `vlm` params (`--config.pretrain.init_from`):

  base    stage 1 (vision tower, 800 steps) and stage 2 (projector + LM, 2500 steps, token
          curriculum, word and answer-region grounding);
  pair    1200 more stage-2 steps in which a question naming two digits grounds the answer slot's
          head 0 on the first digit and head 1 on the second (`pretrain.pair_ground`);
  spatial 1200 more with the position auxiliaries as well (`pretrain.spatial_weight`);
  thinned 1500 more in which half the examples have their background patches randomly thinned
          (`pretrain.background_dropout`), so answers, counts above all, survive pruning.

A stage whose `vlm_metrics.json` exists is skipped, and a stage interrupted part-way resumes from its own
Orbax checkpoint, so rerunning the command after a kill continues where it stopped. Arguments after
`--` are passed to every stage (for example `-- --config.data.data_dir=/data/tfds`). The last
stage's `vlm_metrics.json` has the test accuracy per task family.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

CONFIG = 'configs/gripbench_tiny.py'
# (stage, overrides); every stage after the first continues from the previous stage's params.
STAGES = (
    ('base', ('--config.pretrain.pair_ground=False', '--config.pretrain.spatial_weight=0.0')),
    ('pair', ('--config.pretrain.vision_steps=0', '--config.pretrain.lm_steps=1200',
              '--config.pretrain.token_curriculum=0.0', '--config.pretrain.lr=3e-4',
              '--config.pretrain.pair_ground=True', '--config.pretrain.spatial_weight=0.0')),
    ('spatial', ('--config.pretrain.vision_steps=0', '--config.pretrain.lm_steps=1200',
                 '--config.pretrain.token_curriculum=0.0', '--config.pretrain.lr=3e-4',
                 '--config.pretrain.pair_ground=True', '--config.pretrain.spatial_weight=1.0')),
    ('thinned', ('--config.pretrain.vision_steps=0', '--config.pretrain.lm_steps=1500',
                 '--config.pretrain.token_curriculum=0.0', '--config.pretrain.lr=3e-4',
                 '--config.pretrain.pair_ground=True', '--config.pretrain.spatial_weight=1.0',
                 '--config.pretrain.background_dropout=0.5')),
)


def commands(workdir: str, python: str, passthrough=()) -> list[tuple[str, list[str]]]:
  """[(stage workdir, argv)] of every stage, in order."""
  out, previous = [], None
  for stage, overrides in STAGES:
    stage_dir = os.path.join(workdir, stage)
    argv = [python, '-m', 'gripjax.main', f'--config={CONFIG}', '--mode=pretrain_vlm',
            f'--workdir={stage_dir}', *overrides]
    if previous is not None:
      argv.append(f'--config.pretrain.init_from={os.path.join(previous, "vlm")}')
    out.append((stage_dir, argv + list(passthrough)))
    previous = stage_dir
  return out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  passthrough = []
  if '--' in argv:
    split = argv.index('--')
    argv, passthrough = argv[:split], argv[split + 1:]
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='Each stage writes WORKDIR/<stage>.')
  parser.add_argument('--python', default=sys.executable, help='Python interpreter.')
  parser.add_argument('--dry_run', action='store_true', help='Print the commands; run nothing.')
  args = parser.parse_args(argv)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for stage_dir, cmd in commands(os.path.abspath(args.workdir), args.python, passthrough):
    line = ' '.join(shlex.quote(a) for a in cmd)
    if args.dry_run:
      print(line)
      continue
    if os.path.exists(os.path.join(stage_dir, 'vlm_metrics.json')):
      print(f'skip (done): {stage_dir}', flush=True)
      continue
    print(f'run: {line}', flush=True)
    status = subprocess.call(cmd, cwd=root)
    if status:
      print(f'stage {stage_dir} failed with exit status {status}', file=sys.stderr)
      return status
  return 0


if __name__ == '__main__':
  sys.exit(main())
