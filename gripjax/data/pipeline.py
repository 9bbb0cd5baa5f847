"""Numpy batches from a GRIP-Bench data source (tfds `as_data_source`, or any random-access list).

  source = builder.load_split('train', config.data, 96, 8, data_dir)
  tok = tokenizer.Tokenizer.load()
  for batch in batch_iterator(source, tok, 64, 16, shuffle=True, seed=0, start_step=step):
    ...  # batch['pixels'] uint8 (B, H, W, 3), batch['question_ids'] int32 (B, Tq), ...

A batch is a dict of numpy arrays (B = rows of this process):
  pixels          uint8 (B, H, W, 3)
  question_ids    int32 (B, Tq)   question tokens + <sep>, left-padded with <pad>
  question_valid  bool  (B, Tq)
  answer_id       int32 (B,)      token id of the one-word answer
  task_id         int32 (B,)      index into TASKS
  region_mask     bool  (B, N)    patches that hold the answer
  patch_digit     int32 (B, N)    digit under each patch, 10 for none
  patch_color     int32 (B, N)    colour index under each patch, len(COLORS) for none
  index           int32 (B,)      position of the example in the source
  valid           bool  (B,)      only from `eval_batches`: False on padding rows

The order is a pure function of (seed, step): epoch e visits `default_rng([seed, e]).permutation(n)`
in order, so a run resumed at `start_step` sees exactly the batches an uninterrupted run sees.
Turning per-process batches into global jax arrays happens elsewhere; this file is numpy only.
"""

import queue
import threading

import numpy as np

from gripjax import config_lib
from gripjax.data import images
from gripjax.data.grip_bench import dense
from gripjax.data.grip_bench import scenes

TASKS = scenes.TASKS
# GRIP-Bench families (`config.data.family`): 'standard' (scenes.py, 3-6 digits) and 'dense'
# (dense.py, 10-24 digits and 6-12 distractor shapes); both give batches of the format above.
FAMILIES = ('standard', 'dense')


def family(config_data) -> str:
  """`config_data.family` (a ConfigDict, dict or object), 'standard' when it has no such field."""
  if isinstance(config_data, dict) or hasattr(config_data, 'get'):
    value = config_data.get('family', 'standard')
  else:
    value = getattr(config_data, 'family', 'standard')
  if value not in FAMILIES:
    raise ValueError(f'data.family must be one of {FAMILIES}, got {value!r}.')
  return value


def as_text(x):
  """tfds Text features come back as bytes: normalize to str."""
  if isinstance(x, bytes):
    return x.decode('utf-8')
  if isinstance(x, np.ndarray):
    return as_text(x.item())
  return str(x)


def _read(source, indices):
  """Reads examples `indices` (batched when the source supports it)."""
  indices = [int(i) for i in indices]
  if hasattr(source, '__getitems__'):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


class _Encoder:
  """Converts raw examples to batch arrays; caches question encodings (few distinct questions)."""

  def __init__(self, tokenizer, max_question_len):
    self.tokenizer = tokenizer
    self.max_len = max_question_len
    self._questions = {}

  def question(self, text):
    if text not in self._questions:
      self._questions[text] = self.tokenizer.encode_question(text, self.max_len)
    return self._questions[text]

  def __call__(self, examples, indices):
    if not examples:
      raise ValueError('cannot build an empty batch.')
    q_ids, q_valid, answers, tasks, masks = [], [], [], [], []
    num_patches = len(examples[0]['patch_digit'])
    for ex in examples:
      ids, valid = self.question(as_text(ex['question']))
      q_ids.append(ids)
      q_valid.append(valid)
      answers.append(self.tokenizer.word_id(as_text(ex['answer'])))
      task = as_text(ex['task'])
      if task not in TASKS:
        raise ValueError(f'unknown task {task!r}; expected one of {TASKS}.')
      tasks.append(TASKS.index(task))
      region = np.asarray(ex['region'], np.int64).reshape(-1)
      if region.size and (region.min() < 0 or region.max() >= num_patches):
        raise ValueError(f'region {region.tolist()} has patches outside [0, {num_patches}).')
      mask = np.zeros((num_patches,), bool)
      mask[region] = True
      masks.append(mask)
    return dict(
        # (B, H, W, 3); a float image outside [0, 1] or with NaN is refused, not cast to uint8.
        pixels=images.check_pixels(np.stack([np.asarray(ex['image']) for ex in examples]),
                                   labels=[f'source example {int(i)}' for i in indices]),
        question_ids=np.stack(q_ids).astype(np.int32),  # (B, Tq)
        question_valid=np.stack(q_valid),  # (B, Tq)
        answer_id=np.asarray(answers, np.int32),  # (B,)
        task_id=np.asarray(tasks, np.int32),  # (B,)
        region_mask=np.stack(masks),  # (B, N)
        patch_digit=np.stack([np.asarray(ex['patch_digit'], np.int32) for ex in examples]),
        patch_color=np.stack([np.asarray(ex['patch_color'], np.int32) for ex in examples]),
        index=np.asarray(indices, np.int32),  # (B,)
    )


def steps_per_epoch(num_examples, batch_size, drop_remainder=True):
  """Number of global batches in one pass over `num_examples`."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  if drop_remainder:
    if num_examples < batch_size:
      raise ValueError(f'the source has {num_examples} examples, fewer than one batch of '
                       f'{batch_size} (drop_remainder=True).')
    return num_examples // batch_size
  if num_examples < 1:
    raise ValueError('the source is empty.')
  return -(-num_examples // batch_size)


def global_batch_indices(num_examples, batch_size, step, *, shuffle, seed, drop_remainder=True):
  """int64 (B,): the source indices of global batch `step` (a pure function of its arguments)."""
  per_epoch = steps_per_epoch(num_examples, batch_size, drop_remainder)
  epoch, j = divmod(int(step), per_epoch)
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  else:
    order = np.arange(num_examples)
  return order[j * batch_size:(j + 1) * batch_size]


def _check_process(batch_size, process_index, process_count):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, process_count={process_count}), got '
                     f'{process_index}.')
  if batch_size % process_count:
    raise ValueError(f'the global batch_size ({batch_size}) must be divisible by process_count '
                     f'({process_count}).')


def _process_rows(batch_size, process_index, process_count) -> slice:
  """This process's rows of a global batch: its block in process order."""
  per_process = batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def batch_iterator(source, tokenizer, batch_size, max_question_len, *, shuffle, seed, start_step=0,
                   num_steps=None, drop_remainder=True, process_index=0, process_count=1):
  """Yields training batches for global steps start_step, start_step + 1, ... (forever by default).

  Args:
    source: random-access examples (`len`, `[i]`), e.g. a tfds data source.
    tokenizer: a `Tokenizer`.
    batch_size: GLOBAL batch size; each process gets batch_size // process_count rows.
    max_question_len: question slots Tq.
    shuffle: reshuffle every epoch (by `default_rng([seed, epoch])`); False: source order.
    seed: data-order seed.
    start_step: first global step to yield (resumption).
    num_steps: stop after this many batches; None: never stop.
    drop_remainder: drop the incomplete last batch of every epoch (keeps shapes static).
    process_index, process_count: this process takes the process_index-th of process_count equal
      contiguous blocks of every global batch, so the processes' rows concatenated in process order
      (`sharding.shard_batch`) are the global batch in its single-process order.

  Yields:
    Batch dicts (see the module docstring).
  """
  _check_process(batch_size, process_index, process_count)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  n = len(source)
  steps_per_epoch(n, batch_size, drop_remainder)  # validates
  encode = _Encoder(tokenizer, max_question_len)
  step = start_step
  while num_steps is None or step < start_step + num_steps:
    idx = global_batch_indices(n, batch_size, step, shuffle=shuffle, seed=seed,
                               drop_remainder=drop_remainder)
    local = idx[_process_rows(batch_size, process_index, process_count)]
    yield encode(_read(source, local), local)
    step += 1


def eval_batches(source, tokenizer, batch_size, max_question_len, num_examples=None, *,
                 process_index=0, process_count=1):
  """Yields the first `num_examples` examples (default: all) in order, in fixed-size batches.

  The last global batch is padded by repeating its last example; `valid` (B,) is False on padding,
  so every example is counted exactly once when metrics are weighted by `valid`. With several
  processes each takes its contiguous block of every global batch (as `batch_iterator`).
  """
  _check_process(batch_size, process_index, process_count)
  n = len(source) if num_examples is None else int(num_examples)
  if not 0 < n <= len(source):
    raise ValueError(f'num_examples must be in [1, {len(source)}] (the source size), got '
                     f'{num_examples}.')
  encode = _Encoder(tokenizer, max_question_len)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    valid = np.ones((batch_size,), bool)
    valid[len(idx):] = False
    idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])  # (B,)
    rows = _process_rows(batch_size, process_index, process_count)
    batch = encode(_read(source, idx[rows]), idx[rows])
    batch['valid'] = valid[rows]
    yield batch


def prefetch(iterator, size=2):
  """Runs `iterator` in a background thread, keeping up to `size` items ready."""
  q = queue.Queue(maxsize=size)
  done = object()

  def work():
    try:
      for item in iterator:
        q.put(item)
    except Exception as e:  # pylint: disable=broad-except
      q.put(e)
    q.put(done)

  threading.Thread(target=work, daemon=True).start()
  while True:
    item = q.get()
    if item is done:
      return
    if isinstance(item, Exception):
      raise item
    yield item


def check(c) -> None:
  """Start-up check of `config.data`; raises config_lib.ConfigError."""
  if 'data' not in c:
    return
  for f in ('num_train', 'num_validation', 'num_test', 'max_question_len'):
    config_lib.integer(c, f'data.{f}')
  config_lib.integer(c, 'data.seed', minimum=0)
  value = c.data.get('family', 'standard')
  if value not in FAMILIES:
    config_lib.fail('data.family', value, f"one of {FAMILIES} ('standard': 3-6 digits per image; "
                    "'dense': 10-24 digits and 6-12 distractor shapes, where the token budget binds)")
  if value == 'dense' and 'pretrain' in c and 'model' in c and c.pretrain.vision_steps > 0:
    # Stage 1's image-level count head has classes 0..scenes.MAX_DIGITS (runtime.max_objects).
    vit = c.model.vit
    most = dense.object_counts(vit.image_size // vit.patch_size)[1]
    if most > scenes.MAX_DIGITS:
      config_lib.fail('pretrain.vision_steps', c.pretrain.vision_steps,
                      f'0 with data.family=dense at {vit.image_size // vit.patch_size}x'
                      f'{vit.image_size // vit.patch_size} patches: its scenes hold up to {most} '
                      f'digits, more than the {scenes.MAX_DIGITS} the stage-1 count head has '
                      'classes for (fine-tune stage 2 from a trained VLM instead: '
                      'pretrain.init_from)')
