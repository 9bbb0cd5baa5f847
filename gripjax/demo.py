"""The main job on the embedded default (`--mode=demo`, `make demo`).

  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=demo --workdir=workdir/demo

Three stages on the shipped tiny VLM and GRIP-Bench, each with a progress bar:

1. train the GRIP agent with a short schedule (`config.demo.train_steps`, of which
   `config.demo.warmup_steps` are the supervised warm-up, the rest GRPO) into `WORKDIR/agent`;
2. evaluate it as the pruner `grip` next to every baseline of `config.eval.methods`, at every budget
   and position mode, on the first `config.demo.eval_examples` test examples;
3. write `WORKDIR/eval/results.json`, `report.md` and the plots.

The full-length recipes are `--mode=train_agent` (config.train) and `--mode=eval` (whole test split).
An interrupted demo resumes its agent training from `WORKDIR/checkpoints`.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import ml_collections

from gripjax import config_lib
from gripjax.eval import evaluate
from gripjax.train import trainer


def demo_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of `config` with the demo's schedule, example count and the agent it trains."""
  c = ml_collections.ConfigDict(config.to_dict())
  d = config.demo
  c.train.steps = d.train_steps
  c.train.warmup_steps = min(d.warmup_steps, d.train_steps)
  c.train.checkpoint_every = max(1, min(c.train.checkpoint_every, d.train_steps))
  c.eval.num_examples = d.eval_examples
  if d.get('num_train') is not None:  # A smaller training split: the demo reads only steps x batch.
    c.data.num_train = d.num_train
  methods = tuple(c.eval.methods)
  if 'grip' not in methods:
    c.eval.methods = methods + ('grip',)
  c.agent.checkpoint = os.path.join(workdir, 'agent')
  return c


def check(c) -> None:
  """Start-up check of `config.demo`; raises config_lib.ConfigError."""
  if 'demo' not in c:
    return
  for f in ('train_steps', 'eval_examples'):
    config_lib.integer(c, f'demo.{f}')
  config_lib.integer(c, 'demo.warmup_steps', minimum=0)
  if c.demo.get('num_train') is not None:
    config_lib.integer(c, 'demo.num_train')


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  c = demo_config(config, workdir)
  evaluate.check_methods(c.eval.methods)  # fail before training, not after
  logging.info('demo: 1/2 training the agent for %d steps (%d warm-up)', c.train.steps,
               c.train.warmup_steps)
  trainer.run(c, workdir)
  logging.info('demo: 2/2 evaluating %d methods on %s test examples', len(c.eval.methods),
               c.eval.num_examples)
  return evaluate.run(c, workdir)
