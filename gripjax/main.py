"""gripjax entry point.

  # The main job on the embedded default (shipped tiny VLM, built-in GRIP-Bench):
  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=demo --workdir=/tmp/grip
  # Train the GRIP agent (warm-up, then GRPO) on the shipped VLM:
  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=train_agent --workdir=/tmp/agent
  # Bundle the VLM and the trained agent (WORKDIR/agent) for inference (gripjax.load_bundle):
  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=export --workdir=/tmp/agent
  # Train the tiny VLM from scratch (the recipe of the shipped checkpoint):
  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=pretrain_vlm --workdir=/tmp/vlm
  # Evaluate a VLM (full tokens, shuffled images, no image; pruners at every budget):
  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=eval --workdir=/tmp/grip \
      --config.eval.num_examples=256
  # An HF LLaVA checkpoint: every pruner on POPE with POPE's own scores (README "Use your own LLaVA"):
  python -m gripjax.main --config=configs/llava_hf.py:CKPT --mode=eval --workdir=/tmp/pope \
      --config.hf.benchmark=pope --config.hf.data_path=POPE.parquet

Any config field can be overridden: `--config.pretrain.lr=3e-4`, `--config.eval.budgets='(0.5,0.25)'`,
`--config.vlm_checkpoint=None` (random weights). A bad value fails at start-up naming the field.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags

from gripjax import checks
from gripjax import config_lib
from gripjax import demo
from gripjax import export
from gripjax import logs
from gripjax import workdir as workdir_lib
from gripjax.data import hf_data
from gripjax.eval import ablations
from gripjax.eval import evaluate
from gripjax.eval import hf_eval
from gripjax.train import distributed
from gripjax.train import pretrain
from gripjax.train import trainer

MODES = ('demo', 'pretrain_vlm', 'train_agent', 'eval', 'ablations', 'export', 'validate_config')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for data, checkpoints, logs and results.')
_MODE = flags.DEFINE_enum('mode', 'demo', MODES, 'What to run.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]!r}: pass settings as --config.FIELD=VALUE')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/gripbench_tiny.py')
  logs.quiet_libraries()  # Library INFO (Orbax: thousands of lines) only at --verbosity>=1.
  mode = _MODE.value
  if mode != 'validate_config':
    # Before any computation: on a pod (or with GRIPJAX_COORDINATOR etc. set) this joins the cluster,
    # so the start-up check sees every device of the job. validate_config checks against the
    # devices of this machine.
    distributed.maybe_initialize_distributed()
  try:
    config = checks.check_config(_CONFIG.value)
  except config_lib.ConfigError as e:
    sys.exit(f'error: {e}')
  if mode == 'validate_config':
    print(config)
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  workdir = _WORKDIR.value
  try:  # Before any loading: writable, and not in use by another run (released at exit).
    workdir_lib.claim(workdir, mode)
  except workdir_lib.WorkdirError as e:
    sys.exit(f'error: {e}')
  if '://' in workdir:  # A bucket (gs://...): Orbax and tfds take it as is.
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  else:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
  logging.info('mode=%s workdir=%s', mode, workdir)

  if mode == 'pretrain_vlm':
    out = pretrain.run(config, workdir)
    summary = evaluate.vlm_summary(config, workdir, params_path=out['params_path'])
    summary['train_seconds'] = round(out['seconds'], 1)
    with open(os.path.join(workdir, 'vlm_metrics.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
  elif mode == 'train_agent':
    try:
      trainer.run(config, workdir)
    except (trainer.ckpt_lib.CheckpointError, *hf_data.INPUT_ERRORS) as e:  # e.g. changed shapes, bad rows
      sys.exit(f'error: {e}')
  elif mode == 'export':
    try:
      path = export.run(config, workdir)
    except ValueError as e:
      sys.exit(f'error: {e}')
    print(path)
  elif mode == 'demo':
    demo.run(config, workdir)
  elif mode == 'ablations':
    ablations.run(config, workdir)
  elif mode == 'eval' and 'hf' in config:  # An HF checkpoint on a benchmark file or a user's dataset.
    try:
      hf_eval.run(config, workdir)
    except hf_data.INPUT_ERRORS as e:
      sys.exit(f'error: {e}')
  elif mode == 'eval':
    evaluate.run(config, workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
