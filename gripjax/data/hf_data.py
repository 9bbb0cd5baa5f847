"""An HF LLaVA checkpoint on a user's dataset or a benchmark file, in the pipeline's batch format.

  python -m gripjax.main --config=configs/llava_hf.py:CKPT --mode=eval --workdir=/tmp/pope \\
      --config.hf.benchmark=pope --config.hf.data_path=/data/pope/test.parquet

  tok = hf_data.PromptTokenizer.from_config(config)   # the checkpoint's tokenizer + config.hf.template
  vlm = runtime.make_model(config, tok)
  params = hf_data.load_params(config)                # hf_llava.load_params (safetensors, no torch)
  data = hf_data.load_data(config, tok)               # this host's rows, prompts encoded, bad rows counted
  for batch in hf_data.eval_batches(data, tok, config, 8):
    ...                                               # batch['pixels'] uint8 (8, S, S, 3), ...

Where the data comes from (configs/llava_hf.py's `hf` section):
  data_format 'benchmark'   `hf.benchmark` (gripjax.eval.benchmarks: pope, mme, ...) read from the
                            parquet file(s) at `hf.data_path`; the text asked is the benchmark's own
                            prompt (`benchmarks.prompt`, as lmms-eval formats it).
  data_format 'jsonl'       gripjax.data.user_data.read_jsonl: {"image", "question", "answer"?}.
  data_format 'llava_json'  LLaVA conversation JSON (user_data.read_llava_json).
Images are read with PIL and go through the checkpoint's image processor (gripjax/data/hf_image.py:
pad-to-square, resize, crop; uint8 out, the tower normalises). The text is `hf.template` with the
prompt in place of `{question}`, tokenized as LlavaProcessor does and split at the image
(hf_tokenizer.build_prompt): the ids after the image, left-padded to `hf.text_len`
(= config.data.max_question_len, one linked field), are the batch's `question_ids`.

A batch (B rows of this process) has the keys of gripjax/data/pipeline.py's GRIP-Bench batches:
  pixels          uint8 (B, S, S, 3)  the processor's output, S = model.vit.image_size
  question_ids    int32 (B, T)        the template's text after the image, left-padded with pad_id
  question_valid  bool  (B, T)
  answer_id       int32 (B,)          first token of the first reference answer; -1 when there is none
  answer_len      int32 (B,)          tokens of that answer (1: a single-token answer; 0: none)
  task_id         int32 (B,)          index into `HFData.task_names` (the rows' `category`, else 'all')
  region_mask     bool  (B, N)        all False: user data and benchmarks carry no answer regions
  index           int32 (B,)          position of the row in `HFData.examples`
  valid           bool  (B,)          only from `eval_batches`: False on padding rows
  prefix_ids      int32 (B, P)        only for a template with text before the image: its ids
  prefix_valid    bool  (B, P)        (the same for every row; the model's [prefix][visual][text])

Answers. `answer_id` is the first token of the answer tokenized on its own (what the model's first
generated token is compared with: `accuracy` in eval, `logprob` / `exact_match` rewards in training).
For a single-token answer (answer_len 1) that is the whole answer; for a longer one it is only its
first token, so the benchmark's own score, from generated text (gripjax/eval/hf_eval.py: pruned
greedy generation, then `benchmarks.score`), is the measure to read. Rows without answers can train
only with the label-free reward (`train.reward='agreement'`); a labelled reward refuses them.

Sequence layout. The model's sequence is `[prefix][visual][text]` (gripjax/models/vlm.py). A template
with text before the image (LLaVA-1.5's `USER: <image>\\n{question} ASSISTANT:`, the default) gives
batches `prefix_ids` / `prefix_valid`, which evaluation, generation and the agent's train step pass
to the model; with `<image>\\n{question}` the prefix is <bos> alone, the model's default, and the
keys are left out. The agent (scorer) itself reads only the text after the image.

Bad input (rows skipped and counted with `hf.skip_bad_rows=True`, else a BadDataError naming the
file, row and field): a missing or unreadable image, a row without a required field, a prompt longer
than `hf.text_len` ('question_too_long'). An empty dataset (or every row bad) is always an error.
An image that passes PIL's verify but fails to decode later raises, naming the row.
Each host reads its own shard (user_data's contiguous rows of `process_index` of `process_count`),
in training and in evaluation (gripjax/eval/hf_eval.py joins the hosts' outcomes).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Iterator, Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image

from gripjax import config_lib
from gripjax.data import hf_image
from gripjax.data import hf_tokenizer
from gripjax.data import pipeline
from gripjax.data import tokenizer as tokenizer_lib
from gripjax.data import user_data
from gripjax.eval import benchmarks
from gripjax.models import hf_llava
from gripjax.rl import rewards as rewards_lib

SKIP_REASONS = user_data.SKIP_REASONS + ('question_too_long',)
NO_ANSWER = -1  # answer_id of a row without a reference answer.
# What bad input raises on this path (each a ValueError naming the file, row or field).
INPUT_ERRORS = (user_data.BadDataError, hf_tokenizer.TokenizerError, hf_llava.CheckpointError,
                hf_image.ImageConfigError, config_lib.ConfigError)
# Files of a checkpoint directory that `PromptTokenizer.load` reads (the export bundle copies them).
TOKENIZER_FILES = (hf_tokenizer.TOKENIZER_FILE, hf_tokenizer.TOKENIZER_CONFIG, hf_tokenizer.SPECIAL_TOKENS_MAP,
                   hf_tokenizer.PROCESSOR_CONFIG, hf_image.PREPROCESSOR_CONFIG, hf_tokenizer.MODEL_CONFIG)


def check(config) -> None:
  """Checks the fields of `config.hf` this module reads; raises config_lib.ConfigError."""
  if 'hf' not in config:
    return
  config_lib.integer(config, 'hf.max_new_tokens')
  if not isinstance(config.hf.skip_bad_rows, bool):
    config_lib.fail('hf.skip_bad_rows', config.hf.skip_bad_rows, 'True or False')
  if config.data.max_question_len != config.hf.text_len:
    config_lib.fail('data.max_question_len', config.data.max_question_len,
                    f'hf.text_len={config.hf.text_len} (the text slots after the image; set hf.text_len)')


# --- Tokenizer. ----------------------------------------------------------------------------------

class PromptTokenizer:
  """The checkpoint's tokenizer with the config's template, in the interface of `data.tokenizer`.

  `encode_question(prompt, T)` gives the ids after the image of `template` filled with `prompt`, so
  the pipeline, the evaluation harness, the trainer and `inference.PrunedGenerator` take it as
  they take the word tokenizer.

  Attributes:
    hf: the `hf_tokenizer.HFTokenizer`.
    template: the chat template ('<image>' once, '{question}' once).
    num_image_tokens: N, the image slots.
    prefix_ids: int32 (P,) the ids before the image, <bos> included.
    layout_prefix: None when the prefix is <bos> alone (the model's default), else `prefix_ids`: what
      `inference.PrunedGenerator(prefix_ids=...)` takes.
    bos_id, eos_id, pad_id, vocab_size: the tokenizer's.
  """

  def __init__(self, hf: hf_tokenizer.HFTokenizer, template: str, num_image_tokens: int):
    self.hf = hf
    self.template = hf_tokenizer.check_template(template, 'config.hf.template')
    self.num_image_tokens = int(num_image_tokens)
    self.prefix_ids = hf_tokenizer.build_prompt(hf, '', self.num_image_tokens, template).prefix_ids
    default = hf.bos_id is not None and self.prefix_ids.tolist() == [hf.bos_id]
    self.layout_prefix = None if default else self.prefix_ids
    self.bos_id, self.eos_id, self.pad_id = hf.bos_id, hf.eos_id, hf.pad_id
    self.vocab_size = hf.vocab_size

  @classmethod
  def from_config(cls, config, path: Optional[str] = None) -> 'PromptTokenizer':
    """From `config.hf` (its tokenizer directory, else the checkpoint's; or `path` when given)."""
    hf = config.hf
    check(config)
    path = path or config_lib.resolve_path(hf.tokenizer or hf.checkpoint)
    return cls(hf_tokenizer.HFTokenizer.load(path), hf.template, hf_llava.num_image_tokens(config.model))

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text)

  def decode(self, ids) -> str:
    """The text of generated ids, up to the first <eos>, special tokens dropped."""
    return self.hf.decode(ids)

  def suffix(self, prompt: str) -> np.ndarray:
    """int32 (T',): the template's ids after the image for `prompt`."""
    return hf_tokenizer.build_prompt(self.hf, prompt, self.num_image_tokens, self.template).suffix_ids

  def encode_question(self, text: str, max_len: int, on_bad_question: str = 'error'):
    """The ids after the image for prompt `text`, left-padded to `max_len`.

    Returns:
      ids int32 (max_len,) (pad_id first), valid bool (max_len,).

    Raises:
      tokenizer.QuestionError: the template's text after the image is longer than `max_len` (never
        truncated: cutting a chat prompt changes the question; `on_bad_question` is not consulted).
    """
    del on_bad_question  # A too-long prompt always raises.
    ids = self.suffix(text)
    if len(ids) > max_len:
      raise tokenizer_lib.QuestionError(
          f'question {text[:60]!r}... is {len(ids)} tokens after the image with the template, more than '
          f'config.hf.text_len={max_len}: expected a shorter question or a larger hf.text_len.')
    out = np.full((max_len,), self.pad_id, np.int32)
    valid = np.zeros((max_len,), bool)
    if len(ids):
      out[max_len - len(ids):] = ids
      valid[max_len - len(ids):] = True
    return out, valid

  def answer_ids(self, answer: str) -> list[int]:
    """The ids of a reference answer tokenized on its own (no special tokens)."""
    return self.hf.encode(answer.strip())


# --- Params. -------------------------------------------------------------------------------------

def load_params(config, mesh=None, rules='replicate'):
  """The VLM params (inner 'params' tree) from `config.hf.checkpoint`'s safetensors."""
  return hf_llava.load_params(config_lib.resolve_path(config.hf.checkpoint), config.model, mesh, rules)


# --- Data. ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class HFData:
  """This host's usable rows, their prompts encoded, and the rows left out.

  Attributes:
    examples: the `user_data.Example`s kept, in file order.
    prompts: the text put in place of `{question}` for each (the benchmark's prompt, or the question).
    question_ids, question_valid: int32 / bool (R, T), the encoded prompts.
    answer_ids: per row, the first reference answer's ids ([] without one).
    task_names: the categories of the rows (their `category` field), or ('all',).
    task_ids: int32 (R,) index into task_names.
    skipped: `user_data.SkippedRow`s, from reading and from encoding.
    source, num_rows: the file(s) and their raw row count (all hosts).
    benchmark: the benchmark name, or None for a user dataset.
  """
  examples: list
  prompts: list
  question_ids: np.ndarray
  question_valid: np.ndarray
  answer_ids: list
  task_names: tuple
  task_ids: np.ndarray
  skipped: list
  source: str
  num_rows: int
  benchmark: Optional[str] = None

  def __len__(self):
    return len(self.examples)

  def skip_counts(self) -> dict:
    """{reason: rows skipped} for every reason in SKIP_REASONS (zeros included)."""
    counts = {r: 0 for r in SKIP_REASONS}
    for s in self.skipped:
      counts[s.reason] += 1
    return counts

  @property
  def has_answers(self) -> bool:
    return all(self.answer_ids)

  def use_task_names(self, names: Sequence[str]) -> None:
    """Renumbers `task_ids` into `names`, which hold every name of `task_names` (e.g. the sorted
    categories of every host's rows, so that a task id means the same category on every host)."""
    names = tuple(names)
    missing = [t for t in self.task_names if t not in names]
    if missing:
      raise ValueError(f'task names {names} lack {missing} of {self.source}: expected every category of its rows.')
    self.task_ids = np.asarray([names.index(self.task_names[t]) for t in self.task_ids], np.int32)  # (R,)
    self.task_names = names


def _read(config, process_index, process_count):
  hf = config.hf
  path = config_lib.resolve_path(hf.data_path)
  if path is None:
    raise user_data.BadDataError('config.hf.data_path is None: expected a benchmark parquet file (with '
                                 '--config.hf.benchmark=NAME) or a user dataset (--config.hf.data_format='
                                 'jsonl or llava_json).')
  kwargs = dict(process_index=process_index, process_count=process_count, skip_bad_rows=hf.skip_bad_rows)
  if hf.data_format == 'benchmark':
    if hf.benchmark is None:
      raise user_data.BadDataError(f"config.hf.data_format='benchmark' but config.hf.benchmark is None: "
                                   f'expected one of {sorted(benchmarks.BENCHMARKS)}, or data_format jsonl / '
                                   'llava_json for a user dataset.')
    ds = benchmarks.load(hf.benchmark, path, **kwargs)
    return ds, [benchmarks.prompt(hf.benchmark, ex) for ex in ds]
  reader = {'jsonl': user_data.read_jsonl, 'llava_json': user_data.read_llava_json}[hf.data_format]
  root = config_lib.resolve_path(hf.image_root) if hf.image_root else os.path.dirname(os.path.abspath(path))
  ds = reader(path, root, **kwargs)
  return ds, [ex.question.strip() for ex in ds]


def load_data(config, tok: PromptTokenizer, process_index: int = 0, process_count: int = 1) -> HFData:
  """This host's shard of `config.hf.data_path`, prompts encoded (module docstring).

  Raises:
    user_data.BadDataError: a bad row (without hf.skip_bad_rows), a missing file, an empty dataset.
  """
  ds, prompts = _read(config, process_index, process_count)
  text_len = config.hf.text_len
  kept, kept_prompts, ids, valid, answers = [], [], [], [], []
  skipped = list(ds.skipped)
  for ex, prompt in zip(ds, prompts):
    where = f'{ex.source} row {ex.row} (id {ex.id!r})'
    try:
      row_ids, row_valid = tok.encode_question(prompt, text_len)
    except (tokenizer_lib.QuestionError, hf_tokenizer.TokenizerError) as e:
      reason = 'question_too_long' if isinstance(e, tokenizer_lib.QuestionError) else 'malformed'
      message = f"{where}: field 'question': {e}"
      if not config.hf.skip_bad_rows:
        raise user_data.BadDataError(message + ' (set config.hf.skip_bad_rows=True to skip and count such '
                                     'rows)') from None
      skipped.append(user_data.SkippedRow(ex.source, ex.row, reason, message))
      continue
    kept.append(ex)
    kept_prompts.append(prompt)
    ids.append(row_ids)
    valid.append(row_valid)
    answers.append(tok.answer_ids(ex.answer) if ex.answer is not None else [])
  if not kept:
    raise user_data.BadDataError(f'empty dataset: all {len(skipped)} rows of {ds.source} were bad; first: '
                                 f'{skipped[0].detail}')
  if skipped:
    logging.warning('hf_data: %d rows of %s skipped: %s', len(skipped), ds.source,
                    {k: v for k, v in _counts(skipped).items() if v})
  categories = [str(ex.meta.get('category', 'all')) for ex in kept]
  names = tuple(sorted(set(categories)))
  return HFData(examples=kept, prompts=kept_prompts, question_ids=np.stack(ids), question_valid=np.stack(valid),
                answer_ids=answers, task_names=names,
                task_ids=np.asarray([names.index(c) for c in categories], np.int32), skipped=skipped,
                source=ds.source, num_rows=ds.num_rows,
                benchmark=config.hf.benchmark if config.hf.data_format == 'benchmark' else None)


def _counts(skipped) -> dict:
  counts = {r: 0 for r in SKIP_REASONS}
  for s in skipped:
    counts[s.reason] += 1
  return counts


def image_processor(config) -> hf_image.ImageProcessor:
  """The processor of `config.hf.image` (checked at start-up to give model.vit.image_size squares)."""
  return hf_image.ImageProcessor(hf_image.ImageProcessorConfig.from_section(config.hf.image))


def process_image(ex: user_data.Example, processor: hf_image.ImageProcessor) -> np.ndarray:
  """uint8 (S, S, 3): the example's image through the checkpoint's processor.

  Files and bytes are opened with PIL and handed to the processor as PIL images, so RGBA and
  palette images are composited as transformers does; BadDataError naming the row if that fails.
  """
  where = f'example {ex.id!r} ({ex.source}, dataset row {ex.row})'
  try:
    if isinstance(ex.image, np.ndarray):
      return processor(ex.image)
    src = io.BytesIO(ex.image) if isinstance(ex.image, bytes) else ex.image
    with Image.open(src) as img:
      img.load()
      return processor(img)
  except Exception as e:  # PIL raises many types for corrupt data.
    what = f'image file {ex.image!r}' if isinstance(ex.image, str) else 'its image'
    raise user_data.BadDataError(f'{where}: cannot decode {what}: {type(e).__name__}: {e}') from e


def encode_rows(data: HFData, rows: Sequence[int], processor, num_tokens: int,
                prefix_ids: Optional[np.ndarray] = None) -> dict:
  """The batch (module docstring) of rows `rows` of `data`; `prefix_ids` (P,): the template's text
  before the image when it is more than <bos> (`PromptTokenizer.layout_prefix`)."""
  rows = np.asarray(rows, np.int64)
  answer_id = np.asarray([data.answer_ids[r][0] if data.answer_ids[r] else NO_ANSWER for r in rows], np.int32)
  prefix = {}
  if prefix_ids is not None:
    prefix = dict(prefix_ids=np.tile(np.asarray(prefix_ids, np.int32), (len(rows), 1)),  # (B, P)
                  prefix_valid=np.ones((len(rows), len(prefix_ids)), bool))  # (B, P)
  return dict(
      pixels=np.stack([process_image(data.examples[r], processor) for r in rows]),  # (B, S, S, 3)
      question_ids=data.question_ids[rows],  # (B, T)
      question_valid=data.question_valid[rows],  # (B, T)
      answer_id=answer_id,  # (B,)
      answer_len=np.asarray([len(data.answer_ids[r]) for r in rows], np.int32),  # (B,)
      task_id=data.task_ids[rows],  # (B,)
      region_mask=np.zeros((len(rows), num_tokens), bool),  # (B, N)
      index=rows.astype(np.int32),  # (B,)
      **prefix,
  )


def eval_batches(data: HFData, config, batch_size: int, num_examples: Optional[int] = None,
                 prefix_ids: Optional[np.ndarray] = None) -> Iterator[dict]:
  """The first `num_examples` rows (default all) in order, in batches of `batch_size`; the last one is
  padded by repeating its last row, `valid` False there (as pipeline.eval_batches). `prefix_ids`:
  as `encode_rows`."""
  n = len(data) if num_examples is None else min(int(num_examples), len(data))
  processor = image_processor(config)
  num_tokens = hf_llava.num_image_tokens(config.model)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    valid = np.arange(batch_size) < len(idx)
    idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    batch = encode_rows(data, idx, processor, num_tokens, prefix_ids)
    batch['valid'] = valid
    yield batch


def batch_iterator(data: HFData, config, batch_size: int, *, seed: int, start_step: int = 0,
                   num_steps: Optional[int] = None,
                   prefix_ids: Optional[np.ndarray] = None) -> Iterator[dict]:
  """Training batches of this host's rows: `batch_size` LOCAL rows per step, for steps start_step, ...

  The order is `pipeline.global_batch_indices` over this host's rows (reshuffled every epoch by
  (seed, epoch)), so a run resumed at `start_step` reads what an uninterrupted one reads.
  `prefix_ids`: as `encode_rows` (`PromptTokenizer.layout_prefix`, the template's text before the
  image): the batches then carry `prefix_ids` / `prefix_valid`, which the train step passes to every
  forward of the frozen VLM.

  Raises:
    user_data.BadDataError: fewer rows than one batch; rows without answers under a labelled reward.
  """
  if config.train.reward not in rewards_lib.LABEL_FREE and not data.has_answers:
    row = next(i for i, a in enumerate(data.answer_ids) if not a)
    ex = data.examples[row]
    raise user_data.BadDataError(
        f"{ex.source} row {ex.row} (id {ex.id!r}) has no field 'answer', which train.reward="
        f"{config.train.reward!r} needs: expected answers on every row, or train.reward='agreement' "
        '(label-free).')
  if len(data) < batch_size:
    raise user_data.BadDataError(f'{data.source}: this host has {len(data)} usable rows, fewer than one '
                                 f'batch of {batch_size} (train.batch_size / processes).')
  processor = image_processor(config)
  num_tokens = hf_llava.num_image_tokens(config.model)
  step = start_step
  while num_steps is None or step < start_step + num_steps:
    idx = pipeline.global_batch_indices(len(data), batch_size, step, shuffle=True, seed=seed)
    yield encode_rows(data, idx, processor, num_tokens, prefix_ids)
    step += 1


def tokenizer_files(config) -> dict[str, bytes]:
  """{file name: contents} of what `PromptTokenizer.from_config` reads (tokenizer.json, its configs,
  config.json for the image token, the processor config): a directory of these loads the same
  tokenizer. Each is taken from config.hf.tokenizer's directory, else from the checkpoint's."""
  dirs = [config_lib.resolve_path(d) for d in (config.hf.tokenizer, config.hf.checkpoint) if d]
  out = {}
  for name in TOKENIZER_FILES:
    for d in dirs:
      path = os.path.join(d, name)
      if os.path.exists(path):
        with open(path, 'rb') as f:
          out[name] = f.read()
        break
  return out
