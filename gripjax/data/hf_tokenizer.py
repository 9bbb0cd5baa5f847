"""An HF checkpoint's own tokenizer and the chat prompt around the image, as transformers builds them.

  tok = hf_tokenizer.HFTokenizer.load('/ckpt/llava-1.5-7b-hf')
  p = hf_tokenizer.build_prompt(tok, 'What is in the image?', num_image_tokens=576)
  p.prefix_ids    # int32 (P,): <s> USER:                     text before the image (with <s>)
  p.suffix_ids    # int32 (T,): \\n What is in the image? ASSISTANT:   text after it
  p.input_ids     # int32 (P + 576 + T,): what LlavaProcessor(text=..., images=...) returns

Tokenizer. `tokenizer.json` is read with the `tokenizers` library (BPE with byte fallback as in
Llama / Vicuna, SentencePiece-style Metaspace, Unigram, WordLevel: whatever the file describes),
and set up the way transformers 5 sets it up from a LLaVA checkpoint directory (checked against its
outputs in tests/test_hf_text.py):
  - `tokenizer_config.json` names the special tokens (bos, eos, pad, unk, and the image token as
    `image_token` or under `extra_special_tokens`); `processor_config.json` / `config.json`
    (`image_token_index`) supply the image token when the tokenizer config does not, and must agree
    with it.
  - Special tokens are added by the file's post-processor, unless `tokenizer_config.json` sets
    `add_bos_token` / `add_eos_token`: then the template is `[bos] $A [eos]` with those flags
    (transformers' `update_post_processor`).
  - The rest of the pipeline (normalizer, pre-tokenizer, model, decoder) is the file's. For a
    checkpoint whose config.json has model_type llava, transformers 5 loads it so too
    (TokenizersBackend), whatever `tokenizer_class` says: LLaVA-1.5's legacy Llama normalizer, which
    puts '▁' before the text after the image, is kept. (A standalone LlamaTokenizer, loaded without
    that config.json, rebuilds the pipeline instead; that path is not followed here.)
  - `decode` strips nothing beyond what the file's decoder does; `clean_up_tokenization_spaces`
    applies only to non-BPE models (transformers 5 ignores it for BPE).

Prompt. A template holds the placeholder `<image>` once and `{question}` once; the default is
LLaVA-1.5's `USER: <image>\\n{question} ASSISTANT:`. As LlavaProcessor does, the placeholder is
replaced by the image token repeated `num_image_tokens` times and the whole string is tokenized
with special tokens; the ids are then split at that run into (prefix, image slots, suffix). The
model's sequence is `[prefix][visual][suffix]` (gripjax/models/vlm.py), prefixes and suffixes of a
batch left-padded (`batch_prompts`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np
import tokenizers
from tokenizers import processors

from gripjax import config_lib
from gripjax.data import hf_image
from gripjax.models import hf_llava

TOKENIZER_FILE = 'tokenizer.json'
TOKENIZER_CONFIG = 'tokenizer_config.json'
SPECIAL_TOKENS_MAP = 'special_tokens_map.json'
PROCESSOR_CONFIG = 'processor_config.json'
MODEL_CONFIG = 'config.json'
IMAGE_PLACEHOLDER = '<image>'  # Where the image goes in a template (LLaVA's placeholder).
QUESTION_FIELD = '{question}'
LLAVA_1P5_TEMPLATE = 'USER: <image>\n{question} ASSISTANT:'  # llava-hf's documented prompt.
DEFAULT_TEMPLATE = LLAVA_1P5_TEMPLATE
SPECIAL_NAMES = ('bos_token', 'eos_token', 'pad_token', 'unk_token')


class TokenizerError(ValueError):
  """The tokenizer files, a template or a prompt are not what the tokenizer needs."""


def _read_json(path: str, required: bool = False) -> dict:
  if not os.path.exists(path):
    if required:
      raise TokenizerError(f'{path} does not exist: expected an HF checkpoint directory with '
                           f'{os.path.basename(path)}.')
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _token_str(value) -> Optional[str]:
  """A special token entry of tokenizer_config.json (a string or an AddedToken dict) as a string."""
  if value is None:
    return None
  if isinstance(value, dict):
    return value.get('content')
  return str(value)


class HFTokenizer:
  """A `tokenizers.Tokenizer` with the special tokens of its checkpoint; build it with `load`.

  Attributes:
    bos_id, eos_id, pad_id, unk_id, image_token_id: ids of the special tokens (None when the
      checkpoint has none; `pad_id` falls back to `eos_id`, then 0, since batches need a filler).
    image_token: the image token's string (e.g. '<image>'), or None.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, special: dict, image_token: Optional[str] = None,
               clean_up_spaces: bool = False):
    """Args: the backend tokenizer; special: {'bos_token': str or None, ...}; the image token."""
    self.backend = tokenizer
    self.special = dict(special)
    ids = {}
    for name in SPECIAL_NAMES:
      token = self.special.get(name)
      ids[name] = None if token is None else self._id_of(token, name)
    self.bos_id, self.eos_id, self.unk_id = ids['bos_token'], ids['eos_token'], ids['unk_token']
    pad = ids['pad_token']
    self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
    self.image_token = image_token
    self.image_token_id = None if image_token is None else self._id_of(image_token, 'image_token')
    self._clean_up = bool(clean_up_spaces) and type(tokenizer.model).__name__ != 'BPE'

  def _id_of(self, token: str, what: str) -> int:
    i = self.backend.token_to_id(token)
    if i is None:
      raise TokenizerError(f'{what}={token!r} is not in the tokenizer vocabulary '
                           f'({self.vocab_size} tokens): expected one of its tokens.')
    return i

  @classmethod
  def load(cls, path: str) -> 'HFTokenizer':
    """Reads `tokenizer.json` and the special tokens of an HF checkpoint directory (module docstring).

    Raises:
      TokenizerError: no tokenizer.json; a special token not in the vocabulary; an image token that
        disagrees with config.json's image_token_index.
    """
    file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.exists(file):
      raise TokenizerError(f'{file} does not exist: expected an HF checkpoint directory with {TOKENIZER_FILE} '
                           '(a fast tokenizer; a sentencepiece tokenizer.model alone is not read).')
    config = _read_json(os.path.join(path, SPECIAL_TOKENS_MAP)) | _read_json(os.path.join(path, TOKENIZER_CONFIG))
    tok = tokenizers.Tokenizer.from_file(file)
    special = {name: _token_str(config.get(name)) for name in SPECIAL_NAMES}
    if 'add_bos_token' in config or 'add_eos_token' in config or tok.post_processor is None:
      template, pairs = '$A:0', []
      for name, flag, before in (('bos_token', 'add_bos_token', True), ('eos_token', 'add_eos_token', False)):
        token = special[name]
        if config.get(flag, False) and token is not None and tok.token_to_id(token) is not None:
          template = f'{token}:0 {template}' if before else f'{template} {token}:0'
          pairs.append((token, tok.token_to_id(token)))
      tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=pairs)

    image_token = _token_str(config.get('image_token'))
    extra = config.get('extra_special_tokens') or config.get('model_specific_special_tokens') or {}
    if image_token is None and isinstance(extra, dict):
      image_token = _token_str(extra.get('image_token'))
    if image_token is None:
      image_token = _read_json(os.path.join(path, PROCESSOR_CONFIG)).get('image_token')
    model = _read_json(os.path.join(path, MODEL_CONFIG))
    index = model.get('image_token_index', model.get('image_token_id'))
    if image_token is None and index is not None:
      image_token = tok.id_to_token(int(index))
      if image_token is None:
        raise TokenizerError(f'{path}/{MODEL_CONFIG} has image_token_index={index}, which is not in the '
                             f'tokenizer vocabulary ({tok.get_vocab_size(with_added_tokens=True)} tokens).')
    out = cls(tok, special, image_token, clean_up_spaces=config.get('clean_up_tokenization_spaces', False))
    if index is not None and out.image_token_id is not None and out.image_token_id != int(index):
      raise TokenizerError(f'the image token {image_token!r} has id {out.image_token_id} in the tokenizer but '
                           f'{path}/{MODEL_CONFIG} has image_token_index={index}: expected the same id.')
    return out

  @property
  def vocab_size(self) -> int:
    """Token ids in use: the model vocabulary plus added tokens."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`; without special tokens by default (as gripjax.data.tokenizer's encode)."""
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = True, stop_at_eos: bool = True) -> str:
    """The text of `ids` (any int array); by default it ends before the first <eos> and special
    tokens (pad, bos, image) are dropped, as gripjax.data.tokenizer's decode treats answers.
    `stop_at_eos=False` gives transformers' `tokenizer.decode(ids, skip_special_tokens)`."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if stop_at_eos and self.eos_id is not None and self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return clean_up_tokenization(text) if self._clean_up else text

  def token_to_id(self, token: str) -> Optional[int]:
    return self.backend.token_to_id(token)


def clean_up_tokenization(text: str) -> str:
  """transformers' clean_up_tokenization: no space before . ? ! , and English contractions."""
  for old, new in ((' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','), (" ' ", "'"), (" n't", "n't"),
                   (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
    text = text.replace(old, new)
  return text


# --- Prompt. -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt split at its image.

  Attributes:
    prefix_ids: int32 (P,) the ids before the image, <bos> included.
    num_image_tokens: N, the image slots between prefix and suffix.
    suffix_ids: int32 (T,) the ids after the image (the question and the template's tail).
    input_ids: int32 (P + N + T,) prefix, N image token ids, suffix: what transformers' processor
      returns as input_ids.
  """
  prefix_ids: np.ndarray
  num_image_tokens: int
  suffix_ids: np.ndarray
  input_ids: np.ndarray


def check_template(template: str, what: str = 'template') -> str:
  """`template` if it holds `<image>` exactly once and `{question}` exactly once; TokenizerError."""
  if not isinstance(template, str):
    raise TokenizerError(f'{what}={template!r}: expected a string.')
  for field in (IMAGE_PLACEHOLDER, QUESTION_FIELD):
    if template.count(field) != 1:
      raise TokenizerError(f'{what}={template!r} holds {field!r} {template.count(field)} times: expected '
                           f'exactly once (e.g. {LLAVA_1P5_TEMPLATE!r}).')
  return template


def build_prompt(tokenizer: HFTokenizer, question: str, num_image_tokens: int,
                 template: str = DEFAULT_TEMPLATE) -> Prompt:
  """The template filled with `question`, its image expanded and tokenized as LlavaProcessor does.

  Args:
    tokenizer: the checkpoint's tokenizer (with an image token).
    question: the text put in place of `{question}` (as is: strip it first if it should be).
    num_image_tokens: N, the image's token count (hf_llava.num_image_tokens(config.model)).
    template: a string with `<image>` once and `{question}` once (module docstring).

  Returns:
    A Prompt; prefix_ids and suffix_ids are what the model's `[prefix][visual][suffix]` layout takes.

  Raises:
    TokenizerError: no image token, a template without its fields, a question holding the image
      token, or an image run the tokenizer does not keep as N consecutive image tokens.
  """
  check_template(template)
  if tokenizer.image_token is None:
    raise TokenizerError('the tokenizer has no image token: expected image_token in tokenizer_config.json, '
                         'processor_config.json or image_token_index in config.json.')
  if num_image_tokens < 1:
    raise TokenizerError(f'num_image_tokens={num_image_tokens}: expected >= 1.')
  if tokenizer.image_token in question or IMAGE_PLACEHOLDER in question:
    raise TokenizerError(f'question {question!r} holds the image token {tokenizer.image_token!r}: expected '
                         'text only (the template places the one image).')
  text = template.replace(QUESTION_FIELD, question).replace(IMAGE_PLACEHOLDER,
                                                            tokenizer.image_token * num_image_tokens)
  ids = np.asarray(tokenizer.encode(text, add_special_tokens=True), np.int32)
  where = np.flatnonzero(ids == tokenizer.image_token_id)
  if len(where) != num_image_tokens or (len(where) and where[-1] - where[0] != num_image_tokens - 1):
    raise TokenizerError(f'the prompt {text[:80]!r}... tokenizes to {len(where)} image tokens at positions '
                         f'{where.tolist()[:8]}...: expected {num_image_tokens} consecutive ones.')
  start = int(where[0])
  return Prompt(prefix_ids=ids[:start], num_image_tokens=num_image_tokens,
                suffix_ids=ids[start + num_image_tokens:], input_ids=ids)


def batch_prompts(prompts: Sequence[Prompt], prefix_len: int, suffix_len: int, pad_id: int):
  """Prefixes and suffixes of a batch, each LEFT-padded to a fixed length (the model's layout).

  Args:
    prompts: B prompts.
    prefix_len, suffix_len: P and T, the slots of the batch (>= the longest prefix / suffix).
    pad_id: the filler id (tokenizer.pad_id); padded slots are marked invalid.

  Returns:
    (prefix_ids (B, P) int32, prefix_valid (B, P) bool, suffix_ids (B, T) int32,
     suffix_valid (B, T) bool).

  Raises:
    TokenizerError naming the prompt that does not fit.
  """
  out = []
  for field, length in (('prefix_ids', prefix_len), ('suffix_ids', suffix_len)):
    ids = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for b, p in enumerate(prompts):
      row = getattr(p, field)
      if len(row) > length:
        raise TokenizerError(f'prompt {b} has {len(row)} {field.split("_")[0]} tokens, more than the '
                             f'{length} slots: expected a longer {field.split("_")[0]}_len.')
      if len(row):
        ids[b, length - len(row):] = row
        valid[b, length - len(row):] = True
    out += [ids, valid]
  return tuple(out)


# --- Config (configs/llava_hf.py's `hf` section). ------------------------------------------------

DATA_FORMATS = ('benchmark', 'jsonl', 'llava_json')  # How config.hf.data_path is read.
NULLABLE_FIELDS = ('tokenizer', 'benchmark', 'data_path')  # Fields of config.hf that may be None.


def check(config) -> None:
  """Start-up check of `config.hf` (configs/llava_hf.py); a config without that section passes.

  Checks that the checkpoint's tokenizer loads and has an image token, that the template holds its
  fields and `text_len` fits `model.llm.max_len` beside the template's prefix and the image, that
  the image processor fields build a processor whose rescale and normalization equal the tower's
  (`model.vit.image_mean / image_std`) and whose output is `model.vit.image_size` square, and the
  evaluation data fields. Raises config_lib.ConfigError naming the field.
  """
  if 'hf' not in config:
    return
  cl = config_lib
  hf = config.hf
  for field in NULLABLE_FIELDS:  # The command line's 'None' for a str field.
    if isinstance(hf[field], str) and hf[field].strip() in ('None', 'none', ''):
      hf[field] = None
  path = cl.resolve_path(hf.checkpoint)
  if not path or not os.path.isdir(path):
    cl.fail('hf.checkpoint', hf.checkpoint, 'an HF LLaVA checkpoint directory (config.json, tokenizer.json, '
            'processor or preprocessor config, safetensors)')
  try:
    tok = HFTokenizer.load(cl.resolve_path(hf.tokenizer) if hf.tokenizer else path)
  except (TokenizerError, ValueError) as e:
    cl.fail('hf.tokenizer', hf.tokenizer, f'a directory whose tokenizer loads ({e})')
  if tok.image_token_id is None or tok.image_token_id != config.model.image_token_id:
    cl.fail('model.image_token_id', config.model.image_token_id,
            f'the tokenizer\'s image token id ({tok.image_token!r}: {tok.image_token_id})')
  try:
    check_template(hf.template, 'config.hf.template')
  except TokenizerError as e:
    raise cl.ConfigError(str(e)) from None
  cl.integer(config, 'hf.text_len')
  n = hf_llava.num_image_tokens(config.model)
  prefix = build_prompt(tok, '', n, hf.template).prefix_ids
  if len(prefix) + n + hf.text_len > config.model.llm.max_len:
    cl.fail('hf.text_len', hf.text_len, f'at most model.llm.max_len={config.model.llm.max_len} - '
            f'{len(prefix)} prefix tokens - {n} image tokens')
  try:
    image = hf_image.ImageProcessorConfig.from_section(hf.image)
    stats = hf_image.tower_stats(image)
  except (hf_image.ImageConfigError, TypeError, ValueError) as e:
    raise cl.ConfigError(f'config.hf.image is invalid: {e}') from None
  vit = config.model.vit
  if not np.allclose(stats, (tuple(vit.image_mean), tuple(vit.image_std)), rtol=0, atol=1e-7):
    cl.fail('model.vit.image_mean', (tuple(vit.image_mean), tuple(vit.image_std)),
            f'the image processor\'s (mean, std) as the tower applies them: {stats}')
  size = vit.image_size
  if hf_image.ImageProcessor(image).output_hw != (size, size):
    cl.fail('hf.image.crop_hw', hf.image.crop_hw, f'the tower\'s input ({size}, {size}) with do_center_crop')
  cl.choice(config, 'hf.data_format', DATA_FORMATS)
  if hf.data_format != 'benchmark' and hf.benchmark is not None:
    cl.fail('hf.data_format', hf.data_format, f"'benchmark' when hf.benchmark={hf.benchmark!r} is set")

