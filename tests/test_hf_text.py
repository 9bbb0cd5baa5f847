"""An HF checkpoint's tokenizer, chat prompt and image processor against transformers' own outputs.

References are the committed fixtures of tools/make_hf_fixtures.py (transformers 5.24, no torch here):
token ids and decodes (tokenizer_cases.json, llama_tokenizer/cases.json), the processor's input_ids
for three templates and its pixel_values (outputs.npz); the rest is worked by hand.
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image
import tokenizers
from tokenizers import models, pre_tokenizers

from gripjax.data import hf_image
from gripjax.data import hf_tokenizer
from gripjax.models import hf_llava
from gripjax.models import vit
from gripjax.models import vlm as vlm_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'hf_llava_tiny')
LLAMA = os.path.join(FIXTURE, 'llama_tokenizer')
N_IMAGE = 16  # image_seq_length of the fixture (4 x 4 patches, CLS dropped).


@functools.lru_cache(maxsize=None)
def outputs():
  return dict(np.load(os.path.join(FIXTURE, 'outputs.npz')))


@functools.lru_cache(maxsize=None)
def examples():
  with open(os.path.join(FIXTURE, 'examples.json')) as f:
    return json.load(f)


def read_cases(path):
  with open(path) as f:
    return json.load(f)


# --- Tokenizer. ----------------------------------------------------------------------------------

def test_special_tokens_of_the_fixtures():
  tok = hf_tokenizer.HFTokenizer.load(FIXTURE)
  # make_tokenizer: <unk> <s> </s> <pad> first, <image> added after the 200 trained tokens.
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
  assert (tok.image_token, tok.image_token_id, tok.vocab_size) == ('<image>', 200, 201)
  # The Llama-layout one names no image token in tokenizer_config.json: config.json's index gives it.
  llama = hf_tokenizer.HFTokenizer.load(LLAMA)
  assert (llama.image_token, llama.image_token_id, llama.pad_id) == ('<image>', 416, 417)


@pytest.mark.parametrize('path,cases', [(FIXTURE, 'tokenizer_cases.json'), (LLAMA, 'cases.json')])
def test_encode_decode_equal_transformers(path, cases):
  tok = hf_tokenizer.HFTokenizer.load(path)
  for case in read_cases(os.path.join(path, cases)):
    text = case['text']
    assert tok.encode(text, add_special_tokens=True) == case['ids'], text
    assert tok.encode(text) == case['ids_plain'], text
    assert tok.decode(case['ids'], skip_special_tokens=False, stop_at_eos=False) == case['decoded'], text
    assert tok.decode(case['ids'], stop_at_eos=False) == case['decoded_skip'], text


def test_llama_layout_keeps_the_legacy_space_after_the_image():
  # LLaVA-1.5's tokenizer.json prepends '▁' to every piece between special tokens: '\n' after the
  # image is '▁' (296) then the byte token <0x0A> (3 + 10 = 13), as transformers 5 keeps it.
  case = read_cases(os.path.join(LLAMA, 'cases.json'))[9]
  assert case['text'].startswith('USER: <image><image><image><image>\n')
  assert case['ids'][7:10] == [416, 296, 13]


def test_add_bos_token_false_drops_bos(tmp_path):
  dst = tmp_path / 'tok'
  shutil.copytree(LLAMA, dst)
  config = json.loads((dst / 'tokenizer_config.json').read_text())
  config['add_bos_token'] = False
  (dst / 'tokenizer_config.json').write_text(json.dumps(config))
  tok = hf_tokenizer.HFTokenizer.load(str(dst))
  case = read_cases(os.path.join(LLAMA, 'cases.json'))[0]
  assert case['ids'][0] == 1 and tok.encode(case['text'], add_special_tokens=True) == case['ids'][1:]


def test_word_level_tokenizer_and_clean_up(tmp_path):
  vocab = {'[UNK]': 0, '[CLS]': 1, '[SEP]': 2, '[PAD]': 3, '<image>': 4, 'what': 5, 'is': 6, 'it': 7, '?': 8}
  backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.add_special_tokens(['[UNK]', '[CLS]', '[SEP]', '[PAD]', '<image>'])
  backend.save(str(tmp_path / 'tokenizer.json'))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(dict(
      bos_token='[CLS]', eos_token='[SEP]', pad_token='[PAD]', unk_token='[UNK]', image_token='<image>',
      add_bos_token=True, add_eos_token=True, clean_up_tokenization_spaces=True)))
  tok = hf_tokenizer.HFTokenizer.load(str(tmp_path))
  # Whitespace splits '?' off; 'cat' is unknown; add_bos/eos_token frame the ids.
  assert tok.encode('what is it?', add_special_tokens=True) == [1, 5, 6, 7, 8, 2]
  assert tok.encode('what cat') == [5, 0]
  # WordLevel joins tokens with spaces; clean-up removes the one before '?' (not a BPE model).
  assert tok.decode([1, 5, 6, 7, 8, 2, 5]) == 'what is it?'
  assert tok.decode([5, 6, 7, 8, 2, 5], stop_at_eos=False) == 'what is it? what'
  prompt = hf_tokenizer.build_prompt(tok, 'what is it?', 3, template='<image> {question}')
  assert prompt.prefix_ids.tolist() == [1] and prompt.suffix_ids.tolist() == [5, 6, 7, 8, 2]
  assert prompt.input_ids.tolist() == [1, 4, 4, 4, 5, 6, 7, 8, 2]


def test_decode_stops_at_eos_and_skips_specials():
  tok = hf_tokenizer.HFTokenizer.load(FIXTURE)
  ids = tok.encode('What color is the cat?')
  assert tok.decode(np.asarray([3, 3] + ids + [2] + ids)) == 'What color is the cat?'


def test_image_token_disagreeing_with_config_is_refused(tmp_path):
  dst = tmp_path / 'ckpt'
  dst.mkdir()
  for name in ('tokenizer.json', 'tokenizer_config.json', 'config.json'):
    shutil.copy(os.path.join(FIXTURE, name), dst / name)
  config = json.loads((dst / 'config.json').read_text())
  config['image_token_index'] = 199
  (dst / 'config.json').write_text(json.dumps(config))
  with pytest.raises(hf_tokenizer.TokenizerError, match=r"'<image>' has id 200 .* image_token_index=199"):
    hf_tokenizer.HFTokenizer.load(str(dst))
  with pytest.raises(hf_tokenizer.TokenizerError, match=r'tokenizer\.json does not exist'):
    hf_tokenizer.HFTokenizer.load(str(tmp_path))


# --- Prompt. -------------------------------------------------------------------------------------

def test_prompts_equal_transformers_processor():
  tok = hf_tokenizer.HFTokenizer.load(FIXTURE)
  out, ex = outputs(), examples()
  templates = {'input_ids': '<image>\n{question}', 'chat_input_ids': hf_tokenizer.DEFAULT_TEMPLATE}
  templates.update({f'template_{k}_input_ids': v for k, v in ex['templates'].items()})
  assert ex['chat_template'] == hf_tokenizer.LLAVA_1P5_TEMPLATE
  for e, (_, question) in enumerate(ex['examples']):
    for key, template in templates.items():
      want = out[f'ex{e}_{key}']
      p = hf_tokenizer.build_prompt(tok, question, N_IMAGE, template)
      np.testing.assert_array_equal(p.input_ids, want, err_msg=f'{key} of example {e}')
      assert p.input_ids.dtype == np.int32 and p.num_image_tokens == N_IMAGE
      # The split: prefix, N image tokens, suffix, with no image token on either side.
      np.testing.assert_array_equal(np.concatenate([p.prefix_ids, [200] * N_IMAGE, p.suffix_ids]), want)
      assert 200 not in p.prefix_ids and 200 not in p.suffix_ids and p.prefix_ids[0] == 1


def test_chat_prompt_split_by_hand():
  tok = hf_tokenizer.HFTokenizer.load(FIXTURE)
  p = hf_tokenizer.build_prompt(tok, 'What color is the cat?', N_IMAGE)
  # <s> 'USER:' and the space before the image (its own token here); after it '\n' (unknown: <unk>),
  # the question and ' ASSISTANT:'.
  assert tok.decode(p.prefix_ids, skip_special_tokens=False) == '<s> USER: '
  assert p.suffix_ids[0] == tok.unk_id
  assert tok.decode(p.suffix_ids) == 'What color is the cat? ASSISTANT:'
  # <image>\n{question}: the image right after <s>, the layout [bos][visual][text].
  q = hf_tokenizer.build_prompt(tok, 'What color is the cat?', N_IMAGE, '<image>\n{question}')
  assert q.prefix_ids.tolist() == [1]


def test_llama_layout_chat_prompt_equals_transformers():
  tok = hf_tokenizer.HFTokenizer.load(LLAMA)
  cases = read_cases(os.path.join(LLAMA, 'cases.json'))[9:]
  templates = [hf_tokenizer.DEFAULT_TEMPLATE] + list(examples()['templates'].values())
  for case, template in zip(cases, templates):
    p = hf_tokenizer.build_prompt(tok, 'What color is the cat?', 4, template)
    assert p.input_ids.tolist() == case['ids'], template


def test_template_and_question_errors():
  tok = hf_tokenizer.HFTokenizer.load(FIXTURE)
  with pytest.raises(hf_tokenizer.TokenizerError, match=r"holds '<image>' 0 times: expected exactly once"):
    hf_tokenizer.build_prompt(tok, 'q', N_IMAGE, 'USER: {question} ASSISTANT:')
  with pytest.raises(hf_tokenizer.TokenizerError, match=r"holds '\{question\}' 2 times"):
    hf_tokenizer.build_prompt(tok, 'q', N_IMAGE, '<image>{question}{question}')
  with pytest.raises(hf_tokenizer.TokenizerError, match=r"question 'a <image> b' holds the image token"):
    hf_tokenizer.build_prompt(tok, 'a <image> b', N_IMAGE)


def test_batch_prompts_left_pad():
  p = [hf_tokenizer.Prompt(np.array([1, 5], np.int32), 4, np.array([7], np.int32), None),
       hf_tokenizer.Prompt(np.array([1], np.int32), 4, np.array([8, 9, 10], np.int32), None)]
  prefix, prefix_valid, suffix, suffix_valid = hf_tokenizer.batch_prompts(p, 3, 3, pad_id=0)
  np.testing.assert_array_equal(prefix, [[0, 1, 5], [0, 0, 1]])
  np.testing.assert_array_equal(prefix_valid, [[False, True, True], [False, False, True]])
  np.testing.assert_array_equal(suffix, [[0, 0, 7], [8, 9, 10]])
  np.testing.assert_array_equal(suffix_valid, [[False, False, True], [True, True, True]])
  with pytest.raises(hf_tokenizer.TokenizerError, match=r'prompt 1 has 3 suffix tokens, more than the 2 slots'):
    hf_tokenizer.batch_prompts(p, 3, 2, pad_id=0)


# --- Image processor. ----------------------------------------------------------------------------

def test_examples_pixels_equal_transformers():
  proc = hf_image.ImageProcessor.load(FIXTURE)
  cfg, out = proc.config, outputs()
  nopad = dataclasses.replace(cfg, do_pad=False)
  assert cfg.do_pad and cfg.crop_hw == (32, 32) and cfg.shortest_edge == 32 and cfg.resample == 3
  for e, (name, _) in enumerate(examples()['examples']):
    image = getattr(skimage.data, name)()
    pixels = proc(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    np.testing.assert_array_equal(hf_image.pixel_values(pixels, cfg), out[f'ex{e}_pixel_values'])
    np.testing.assert_array_equal(hf_image.pixel_values(hf_image.process(image, nopad), cfg),
                                  out[f'ex{e}_pixel_values_nopad'])
    # What the tower computes from the uint8 pixels with tower_stats equals transformers' values.
    mean, std = hf_image.tower_stats(cfg)
    tower = vit.preprocess(jnp.asarray(pixels)[None], 32, mean, std)[0]
    np.testing.assert_allclose(np.asarray(tower).transpose(2, 0, 1), out[f'ex{e}_pixel_values'], atol=1e-6)
  np.testing.assert_array_equal(hf_image.pixel_values(proc(skimage.data.astronaut()), cfg),
                                out['astronaut_pixel_values'])


def processor_case_input(name, image_name):
  """The inputs examples.json's processor_cases describe (as tools/make_hf_fixtures.py cuts them)."""
  image = getattr(skimage.data, image_name)()
  return {'portrait': lambda: image[:, 100:400], 'portrait_nopad': lambda: image[:, 100:400],
          'gray': lambda: Image.fromarray(image[:200], mode='L'),
          'rgba': lambda: Image.fromarray(np.concatenate([image, image[..., :1]], -1), mode='RGBA'),
          'small': lambda: image[:20, :27], 'bilinear_square': lambda: image}[name]()


def test_processor_cases_equal_transformers():
  base = json.loads(open(os.path.join(FIXTURE, 'processor_config.json')).read())['image_processor']
  cases = examples()['processor_cases']
  assert len(cases) == 6
  for case in cases:
    cfg = hf_image.ImageProcessorConfig.from_dict(base | case['overrides'])
    pixels = hf_image.process(processor_case_input(case['name'], case['image']), cfg)
    np.testing.assert_array_equal(hf_image.pixel_values(pixels, cfg), outputs()[f'proc_{case["name"]}_pixel_values'],
                                  err_msg=case['name'])


def test_steps_by_hand():
  # Pad: a 1 x 3 row centred on 3 x 3 with int(255 * mean) = (122, 116, 104) above and below.
  row = np.arange(9, dtype=np.uint8).reshape(1, 3, 3)
  sq = hf_image.pad_to_square(row, hf_image.CLIP_MEAN)
  np.testing.assert_array_equal(sq[1], row[0])
  np.testing.assert_array_equal(sq[0], [[122, 116, 104]] * 3)
  np.testing.assert_array_equal(sq[2], [[122, 116, 104]] * 3)
  # 2 x 4 -> 4 x 4: offset (4 - 2) // 2 = 1.
  assert (hf_image.pad_to_square(np.zeros((2, 4, 3), np.uint8), (0, 0, 0)) == 0).all()
  # Resize sizes: shorter side 32, longer int(32 * 451 / 300) = 48 (48.1), int(32 * 640 / 427) = 47.
  cfg = hf_image.ImageProcessorConfig(shortest_edge=32)
  assert hf_image.resize_hw(300, 451, cfg) == (32, 48) and hf_image.resize_hw(640, 427, cfg) == (47, 32)
  # Crop 2 x 2 of a 3 x 5 image: top (3 - 2) // 2 = 0, left (5 - 2) // 2 = 1.
  x = np.arange(15, dtype=np.uint8).reshape(3, 5, 1).repeat(3, -1)
  np.testing.assert_array_equal(hf_image.center_crop(x, (2, 2))[..., 0], [[1, 2], [6, 7]])
  # Crop 4 x 1 of a 2 x 3 image: zero rows ceil(2 / 2) = 1 above, column (3 - 1) // 2 = 1.
  y = np.arange(1, 7, dtype=np.uint8).reshape(2, 3, 1).repeat(3, -1)
  np.testing.assert_array_equal(hf_image.center_crop(y, (4, 1))[..., 0], [[0], [2], [5], [0]])
  # RGBA onto white, alpha 128: round(128/255 * c + 127/255 * 255) = (127, 177, 227) for c = (0, 100, 200).
  rgba = np.array([[[0, 100, 200, 128]]], np.uint8)
  np.testing.assert_array_equal(hf_image.to_rgb(rgba), [[[127, 177, 227]]])
  np.testing.assert_array_equal(hf_image.to_rgb(np.array([[7]], np.uint8)), [[[7, 7, 7]]])
  with pytest.raises(hf_image.ImageConfigError, match=r'dtype float32: expected uint8'):
    hf_image.to_rgb(np.zeros((2, 2, 3), np.float32))


def test_llava_hf_preprocessor_config(tmp_path):
  # llava-hf/llava-1.5-7b-hf's preprocessor_config.json (CLIPImageProcessor, no pad-to-square).
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps({
      'crop_size': {'height': 336, 'width': 336}, 'do_center_crop': True, 'do_convert_rgb': True,
      'do_normalize': True, 'do_rescale': True, 'do_resize': True, 'image_mean': list(hf_image.CLIP_MEAN),
      'image_processor_type': 'CLIPImageProcessor', 'image_std': list(hf_image.CLIP_STD), 'resample': 3,
      'rescale_factor': 0.00392156862745098, 'size': {'shortest_edge': 336}}))
  proc = hf_image.ImageProcessor.load(str(tmp_path))
  assert proc.config.crop_hw == (336, 336) and not proc.config.do_pad and proc.output_hw == (336, 336)
  assert proc(np.zeros((10, 20, 3), np.uint8)).shape == (336, 336, 3)
  old = hf_image.ImageProcessorConfig.from_dict({'size': 224, 'crop_size': 224, 'image_aspect_ratio': 'pad'})
  assert old.shortest_edge == 224 and old.crop_hw == (224, 224) and old.do_pad
  assert hf_image.tower_stats(dataclasses.replace(old, do_normalize=False)) == ((0.0,) * 3, (1.0,) * 3)
  with pytest.raises(hf_image.ImageConfigError, match=r'rescale_factor=0.5'):
    hf_image.tower_stats(dataclasses.replace(old, rescale_factor=0.5))
  with pytest.raises(hf_image.ImageConfigError, match=r"size=\{'shortest_edge': 10, 'longest_edge': 20\}"):
    hf_image.ImageProcessorConfig.from_dict({'size': {'shortest_edge': 10, 'longest_edge': 20}})
  with pytest.raises(hf_image.ImageConfigError, match=r'has no image processor config'):
    hf_image.ImageProcessor.load(str(tmp_path / 'absent'))


# --- Together. -----------------------------------------------------------------------------------

def test_raw_image_and_question_reach_transformers_logits():
  # From the skimage image and the question text (not the fixture's ids or pixel_values), through the
  # tokenizer, the `<image>\n{question}` prompt ([bos][visual][text]) and the image processor.
  cfg = hf_llava.model_config(FIXTURE)
  model = vlm_lib.make_vlm(cfg)
  params = {'params': hf_llava.load_params(FIXTURE, cfg)}
  tok = hf_tokenizer.HFTokenizer.load(FIXTURE)
  proc = hf_image.ImageProcessor.load(FIXTURE)
  name, question = examples()['examples'][0]
  p = hf_tokenizer.build_prompt(tok, question, hf_llava.num_image_tokens(cfg), '<image>\n{question}')
  assert p.prefix_ids.tolist() == [tok.bos_id]
  pixels = jnp.asarray(proc(getattr(skimage.data, name)()))[None]  # (1, 32, 32, 3) uint8
  n = p.num_image_tokens
  with jax.default_matmul_precision('highest'):
    visual, _ = model.apply(params, pixels, method='encode_image')
    text = jnp.asarray(p.suffix_ids)[None]
    logits = model.apply(params, visual, jnp.arange(n)[None], jnp.ones((1, n), bool), text,
                         jnp.ones_like(text, bool), 'keep', method='forward')
  np.testing.assert_allclose(logits[0], outputs()['ex0_logits'], atol=1e-4, rtol=0)
