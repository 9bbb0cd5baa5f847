"""Standard benchmarks read from their hubs' parquet files and scored as lmms-eval scores them.

  ds = benchmarks.load('pope', 'POPE/data/', process_index=0, process_count=1)
  preds = [generate(ex.load_image(), benchmarks.prompt('pope', ex)) for ex in ds]
  metrics = benchmarks.score('pope', ds, preds)
"""

from gripjax import config_lib
from gripjax.data import user_data
from gripjax.eval.benchmarks import ai2d
from gripjax.eval.benchmarks import mme
from gripjax.eval.benchmarks import ocrbench
from gripjax.eval.benchmarks import pope
from gripjax.eval.benchmarks import scienceqa_img
from gripjax.eval.benchmarks import textvqa

BENCHMARKS = {
    'pope': pope,
    'mme': mme,
    'scienceqa_img': scienceqa_img,
    'ai2d': ai2d,
    'ocrbench': ocrbench,
    'textvqa': textvqa,
    'textvqa_ocr': textvqa.WITH_OCR,  # The prompt with the OCR token hint (LLaVA-1.5's TextVQA eval).
}


def check(config) -> None:
  """Start-up check of `config.hf.benchmark` (configs/llava_hf.py): None or a name of BENCHMARKS."""
  name = config.hf.benchmark if 'hf' in config else None
  if name not in (None, 'None', 'none', '') and name not in BENCHMARKS:
    config_lib.fail('hf.benchmark', name, f'None or one of {sorted(BENCHMARKS)}')


def _module(name):
  if name not in BENCHMARKS:
    raise ValueError(f'unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}')
  return BENCHMARKS[name]


def load(name, path, **kwargs) -> user_data.Dataset:
  """The benchmark's parquet file(s) at `path` as Examples (kwargs: user_data.read_parquet's)."""
  mod = _module(name)
  return user_data.read_parquet(path, mod.REQUIRED, mod.to_example, **kwargs)


def prompt(name, row) -> str:
  """The text the model is asked, as lmms-eval formats it for this benchmark."""
  return _module(name).prompt(row)


def score(name, rows, predictions, strip=True) -> dict:
  """The benchmark's metrics; predictions are whitespace-stripped first (as lmms-eval's LLaVA
  wrapper strips generations) unless strip=False."""
  if strip:
    predictions = [p.strip() if isinstance(p, str) else p for p in predictions]
  return _module(name).score(rows, predictions)
