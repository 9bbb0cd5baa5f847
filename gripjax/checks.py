"""The one start-up check of a whole config: each package's `check`, composed.

  config = check_config(config)        # main (every mode, --mode=validate_config too) and export

Each package checks its own fields with the helpers of `config_lib` (a leaf); this module only
composes them, so nothing low imports something high to validate, and `--mode=validate_config`
rejects exactly what a run would reject at start-up. A check that needs the machine (the mesh
against the device count) uses `num_devices`, default every device of the job.
"""

from __future__ import annotations

from gripjax import config_lib
from gripjax import demo
from gripjax.data import hf_data
from gripjax.data import hf_tokenizer
from gripjax.data import pipeline
from gripjax.data import tokenizer
from gripjax.eval import ablations
from gripjax.eval import benchmarks
from gripjax.eval import evaluate
from gripjax.models import vlm
from gripjax.rl import relaxation
from gripjax.train import pretrain
from gripjax.train import sharding
from gripjax.train import step

# In order: the model first (later checks read its geometry), then data, training, evaluation.
CHECKS = (vlm.check, pipeline.check, tokenizer.check, hf_tokenizer.check, hf_data.check,
          pretrain.check, step.check, relaxation.check, evaluate.check, benchmarks.check,
          ablations.check, demo.check)


def check_config(config, num_devices: int | None = None):
  """Clears nullable fields set to 'None', runs every check; returns `config`.

  Raises:
    config_lib.ConfigError naming the first bad field, its value and what was expected.
  """
  config_lib.normalize_nullable(config)
  for check in CHECKS:
    check(config)
  sharding.check(config, num_devices)
  return config
