"""Glue shared by the entry points: tokenizer, model, params and data sources from a config."""

from __future__ import annotations

import functools
import os

from absl import logging
import jax

from gripjax import config_lib
from gripjax.data import hf_data
from gripjax.data import pipeline
from gripjax.data import tokenizer as tokenizer_lib
from gripjax.data.grip_bench import builder
from gripjax.data.grip_bench import scenes
from gripjax.models import vit as vit_lib
from gripjax.models import vlm as vlm_lib
from gripjax.train import checkpoint


@functools.lru_cache(maxsize=None)
def tokenizer():
  """The shipped word-level tokenizer."""
  return tokenizer_lib.Tokenizer.load()


def tokenizer_for(config):
  """`config`'s tokenizer: an HF checkpoint's with its template (a config with an `hf` section,
  `hf_data.PromptTokenizer`), else the shipped word-level one."""
  if 'hf' in config:
    return hf_data.PromptTokenizer.from_config(config)
  return tokenizer()


def vocab_size(config, tok=None) -> int:
  """`config.model.llm.vocab_size`, or the tokenizer's when it is 0."""
  tok = tok or tokenizer()
  configured = config.model.llm.vocab_size
  if configured and configured < tok.vocab_size:
    raise ValueError(f'config.model.llm.vocab_size={configured} is smaller than the tokenizer\'s '
                     f'{tok.vocab_size} words: expected 0 (use the tokenizer\'s) or at least that.')
  return configured or tok.vocab_size


def make_model(config, tok=None):
  """The VLM module for `config.model`."""
  return vlm_lib.make_vlm(config.model, vocab_size(config, tok))


def init_params(vlm, rng):
  """Random VLM params (the inner 'params' collection)."""
  return vlm_lib.init_params(vlm, rng)['params']


def num_visual_tokens(config) -> int:
  return vit_lib.num_visual_tokens(config)


def num_visual_tokens_of(vlm) -> int:
  return vlm_lib.ModelConfig.from_config(vlm.config).num_visual_tokens


def num_colors() -> int:
  return len(scenes.COLORS)


def max_objects() -> int:
  return scenes.MAX_DIGITS


def load_vlm_params(config, vlm, path: str | None = None):
  """The VLM params from `path` (default: config.vlm_checkpoint), or random ones when that is None
  (with an `hf` section: the HF checkpoint's)."""
  path = config_lib.resolve_path(path or config.vlm_checkpoint)
  if path is None and 'hf' in config:  # The HF checkpoint's safetensors (configs/llava_hf.py).
    return hf_data.load_params(config)
  abstract = jax.eval_shape(functools.partial(init_params, vlm), jax.random.PRNGKey(0))
  if path is None:
    logging.warning('config.vlm_checkpoint is None: using randomly initialised VLM weights')
    return init_params(vlm, jax.random.PRNGKey(config.seed))
  return checkpoint.load_params(path, abstract)


def data_dir(config, workdir: str) -> str:
  return config.data.data_dir or os.path.join(workdir, 'tfds')


def split_source(config, workdir: str, split: str):
  """Random-access GRIP-Bench source of `split`, prepared on first use."""
  return builder.load_split(split, config.data, config.model.vit.image_size,
                            config.model.vit.patch_size, data_dir(config, workdir))


def question_only_prior(config, workdir: str) -> dict[str, float]:
  """Accuracy of always answering a task family's most frequent training answer, per family.

  The floor a model that ignores the image can reach by learning answer frequencies.
  """
  train = split_source(config, workdir, 'train')
  test = split_source(config, workdir, 'test')
  counts = {}
  for i in range(min(len(train), 5000)):
    ex = train[i]
    counts.setdefault(pipeline.as_text(ex['task']), {}).setdefault(pipeline.as_text(ex['answer']), 0)
    counts[pipeline.as_text(ex['task'])][pipeline.as_text(ex['answer'])] += 1
  best = {t: max(c, key=c.get) for t, c in counts.items()}
  hits, totals = {}, {}
  n = len(test) if config.eval.num_examples is None else min(len(test), config.eval.num_examples)
  for i in range(n):
    ex = test[i]
    t = pipeline.as_text(ex['task'])
    totals[t] = totals.get(t, 0) + 1
    hits[t] = hits.get(t, 0) + int(best.get(t) == pipeline.as_text(ex['answer']))
  out = {t: hits[t] / totals[t] for t in scenes.TASKS if t in totals}
  out['overall'] = sum(hits.values()) / max(sum(totals.values()), 1)
  return out

