"""A config built from an HF LLaVA checkpoint directory: its geometry, tokenizer, image processor, prompt.

Run it (PATH: a directory holding config.json, tokenizer.json, tokenizer_config.json, a processor or
preprocessor config and safetensors weights, e.g. a download of llava-hf/llava-1.5-7b-hf):

  python -m gripjax.main --config=configs/llava_hf.py:PATH --mode=validate_config
  python -m gripjax.main --config=configs/llava_hf.py:tests/fixtures/hf_llava_tiny --mode=validate_config \\
      --config.hf.benchmark=textvqa_ocr --config.hf.data_path=/data/textvqa/validation
  # Every pruner at every budget on POPE, plus POPE's own scores from pruned generation:
  python -m gripjax.main --config=configs/llava_hf.py:PATH --mode=eval --workdir=/tmp/pope \\
      --config.hf.template=$'<image>\\n{question}' --config.hf.benchmark=pope --config.hf.data_path=POPE.parquet
  # Train the agent on a JSONL dataset ({"image", "question", "answer"} per line), then bundle it:
  python -m gripjax.main --config=configs/llava_hf.py:PATH --mode=train_agent --workdir=/tmp/agent \\
      --config.hf.template=$'<image>\\n{question}' --config.hf.data_format=jsonl --config.hf.data_path=qa.jsonl
  python -m gripjax.main --config=configs/llava_hf.py:PATH --mode=export --workdir=/tmp/agent \\
      --config.hf.template=$'<image>\\n{question}'
(Any template works in every mode, `grip` in eval included: text before the image, as in the default
LLaVA-1.5 `USER: <image>\\n{question} ASSISTANT:`, is passed to the model as a prefix, in the agent's
train step too (gripjax/data/hf_data.py); `<image>\\n{question}` puts only <bos> before the image.
bash's $'...' turns \\n into a newline.)

What comes from the checkpoint (read once, here):
  model.*            gripjax.models.hf_llava.model_config(PATH): every field config.json decides,
                     over configs/gripbench_tiny.py's model section; model.vit.image_mean / image_std
                     from the image processor, as the tower applies them (hf_image.tower_stats).
  hf.image.*         the image processor (processor_config.json's image_processor or
                     preprocessor_config.json), field by field, so `--config.hf.image.do_pad=True`
                     gives LLaVA-1.5's pad-to-square to a checkpoint whose config lacks it.
Relative paths start at the repository root. Every other field is configs/gripbench_tiny.py's,
overridden the same way. No Orbax VLM checkpoint and no shipped agent apply (the weights are the
checkpoint's safetensors; the tiny agent has another geometry): vlm_checkpoint and agent.checkpoint
are None and 'grip' is left out of eval.methods until an agent is trained for this model.
"""

import os

import ml_collections

from gripjax import config_lib
from gripjax.data import hf_image
from gripjax.data import hf_tokenizer
from gripjax.models import hf_llava


def _tiny_config():
  return config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gripbench_tiny.py'))


def get_config(arg=None):
  """The config of the HF LLaVA checkpoint at `arg` (a directory path; relative to the repo root)."""
  if not arg:
    raise ValueError('configs/llava_hf.py needs the checkpoint directory: --config=configs/llava_hf.py:PATH.')
  checkpoint = arg
  path = config_lib.resolve_path(checkpoint)
  if not os.path.isdir(path):
    raise ValueError(f'configs/llava_hf.py:{arg}: {path} is not a directory; expected an HF LLaVA checkpoint '
                     'directory (config.json, tokenizer.json, processor config, safetensors).')
  c = _tiny_config()
  try:
    c.model = hf_llava.model_config(path, base=c.model)
  except hf_llava.CheckpointError as e:  # e.g. another architecture's config.json
    raise ValueError(f'configs/llava_hf.py:{arg}: {os.path.join(path, hf_llava.CONFIG_FILE)}: {e}') from None
  image = hf_image.ImageProcessorConfig.load(path)
  mean, std = hf_image.tower_stats(image)
  c.model.vit.image_mean = mean  # The tower's (x / 255 - mean) / std equals the processor's.
  c.model.vit.image_std = std

  c.hf = ml_collections.ConfigDict()
  c.hf.checkpoint = checkpoint  # HF LLaVA checkpoint directory (config.json, safetensors, tokenizer).
  # Tokenizer directory (tokenizer.json, tokenizer_config.json); None: the checkpoint's.
  c.hf.tokenizer = ml_collections.FieldReference(None, field_type=str)
  # Chat template: '<image>' once (the image's token slots) and '{question}' once.
  c.hf.template = hf_tokenizer.DEFAULT_TEMPLATE
  c.hf.text_len = 64  # Token slots after the image (question and template tail), left-padded.
  c.data.max_question_len = c.hf.get_ref('text_len')  # One field: the text slots every path reads.
  # Image processor fields (gripjax/data/hf_image.py ImageProcessorConfig): shortest_edge 0 and
  # resize_hw () stand for None; do_pad is LLaVA's pad-to-square with the mean colour.
  c.hf.image = ml_collections.ConfigDict(image.to_section())
  # Evaluation data: a benchmark of gripjax.eval.benchmarks (e.g. 'textvqa', 'textvqa_ocr', 'pope')
  # read from parquet, or a user's dataset (data_format 'jsonl' or 'llava_json'); None: none set.
  c.hf.benchmark = ml_collections.FieldReference(None, field_type=str)
  c.hf.data_path = ml_collections.FieldReference(None, field_type=str)  # File, directory or glob.
  c.hf.data_format = 'benchmark'  # One of hf_tokenizer.DATA_FORMATS: 'benchmark', 'jsonl', 'llava_json'.
  c.hf.image_root = ''  # Directory that a jsonl / LLaVA JSON file's image paths are relative to ('': the file's).
  # Bad data rows (missing or unreadable image, missing field, prompt longer than text_len): False
  # stops with an error naming the file, row and field; True skips them, counted in the results.
  c.hf.skip_bad_rows = False
  c.hf.max_new_tokens = 16  # Greedy tokens generated per row for the benchmark's own score (eval).

  c.vlm_checkpoint = None  # The weights are the checkpoint's safetensors (hf_llava.load_params).
  c.agent.checkpoint = None  # The shipped agent has the tiny model's geometry.
  c.eval.methods = tuple(m for m in c.eval.methods if m != 'grip')
  c.eval.batch_size = 16  # Rows per evaluation batch (each is also one generation batch).
  c.eval.picture_examples = 0  # The report's pictures redraw GRIP-Bench scenes: none for other data.
  c.train.val_examples = 0  # The validation curve reads GRIP-Bench: off for a user's dataset.
  return c
