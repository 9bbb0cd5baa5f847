"""configs/llava_hf.py on the tiny HF fixture: fields from the checkpoint, start-up checks, validate_config."""

import importlib.util
import os
import subprocess
import sys

import pytest

from gripjax import checks
from gripjax import config_lib
from gripjax.data import hf_tokenizer
from gripjax.eval import benchmarks
from gripjax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = 'tests/fixtures/hf_llava_tiny'  # Relative: resolved from the repo root.


def get_config(arg=FIXTURE):
  spec = importlib.util.spec_from_file_location('llava_hf', os.path.join(REPO, 'configs', 'llava_hf.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def check_hf(c):
  """The checks of the hf section, then the composed start-up check of the rest."""
  benchmarks.check(c)
  hf_tokenizer.check(c)
  checks.check_config(c)


def test_fields_from_the_checkpoint():
  c = get_config()
  # Values tools/make_hf_fixtures.py wrote: config.json, processor_config.json.
  assert (c.model.vit.image_size, c.model.vit.patch_size, c.model.llm.width, c.model.llm.max_len) == (32, 8, 48, 128)
  assert c.model.llm.vocab_size == 201 and c.model.image_token_id == 200 and c.model.llm.rope_theta == 500.0
  assert tuple(c.model.vit.image_mean) == vit.CLIP_MEAN and tuple(c.model.vit.image_std) == vit.CLIP_STD
  assert c.hf.image.do_pad and c.hf.image.crop_hw == (32, 32) and c.hf.image.shortest_edge == 32
  assert c.hf.image.resample == 3 and c.hf.template == 'USER: <image>\n{question} ASSISTANT:'
  assert c.vlm_checkpoint is None and c.agent.checkpoint is None and 'grip' not in c.eval.methods
  check_hf(c)


@pytest.mark.parametrize('field,value,message', [
    ('hf.template', 'USER: {question} ASSISTANT:', r"holds '<image>' 0 times"),
    # 128 slots - 4 prefix tokens (<s> USER: and a space) - 16 image tokens = 108 text slots at most.
    ('hf.text_len', 109, r'config\.hf\.text_len=109 is invalid: expected at most model\.llm\.max_len=128 - 4 '
                         r'prefix tokens - 16 image tokens'),
    ('hf.benchmark', 'vqav2', r"config\.hf\.benchmark='vqav2' is invalid: expected None or one of"),
    ('hf.image.crop_hw', (30, 30), r'config\.hf\.image\.crop_hw=\(30, 30\) is invalid: expected the tower'),
    ('hf.image.resample', 9, r'config\.hf\.image is invalid: resample=9'),
    ('model.vit.image_mean', (0.5, 0.5, 0.5), r'config\.model\.vit\.image_mean=.*is invalid: expected the image '
                                              r"processor's \(mean, std\)"),
    ('model.image_token_id', 199, r"config\.model\.image_token_id=199 is invalid: expected the tokenizer's image "
                                  r"token id \('<image>': 200\)"),
    ('hf.checkpoint', '/nonexistent', r"config\.hf\.checkpoint='/nonexistent' is invalid"),
    ('hf.data_format', 'csv', r"config\.hf\.data_format='csv' is invalid: expected one of"),
])
def test_bad_fields_are_refused(field, value, message):
  c = get_config()
  *parents, leaf = field.split('.')
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    check_hf(c)


def test_benchmark_needs_the_benchmark_format():
  c = get_config()
  c.hf.benchmark = 'textvqa_ocr'
  check_hf(c)
  c.hf.data_format = 'jsonl'
  with pytest.raises(config_lib.ConfigError, match=r"config\.hf\.data_format='jsonl' is invalid: expected "
                                                   r"'benchmark' when hf\.benchmark='textvqa_ocr' is set"):
    check_hf(c)


def test_none_from_the_command_line_clears_a_field():
  c = get_config()
  c.hf.benchmark, c.hf.tokenizer = 'None', ''
  check_hf(c)
  assert c.hf.benchmark is None and c.hf.tokenizer is None


def test_missing_or_bad_argument():
  with pytest.raises(ValueError, match=r'needs the checkpoint directory'):
    get_config(None)
  with pytest.raises(ValueError, match=r'/nonexistent is not a directory'):
    get_config('/nonexistent')


def test_validate_config_passes_on_the_fixture():
  proc = subprocess.run([sys.executable, '-m', 'gripjax.main', f'--config=configs/llava_hf.py:{FIXTURE}',
                         '--mode=validate_config', '--config.hf.benchmark=textvqa'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'benchmark: textvqa' in proc.stdout and 'image_token_id: 200' in proc.stdout
