"""Writes tests/fixtures/hf_llava_tiny/: a tiny random LLaVA in the HF format and transformers' outputs.

Needs torch and transformers (the `parity` extra), which gripjax itself never imports:

  python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors \\
      tokenizers numpy pillow scikit-image
  /tmp/hfvenv/bin/python tools/make_hf_fixtures.py [--out tests/fixtures/hf_llava_tiny]

What it writes (float32 throughout):
  config.json, model.safetensors            LlavaForConditionalGeneration.save_pretrained (4.x tensor
                                            names, as transformers 5 still writes them): CLIP tower
                                            (3 layers), Llama decoder with GQA (4 query / 2 kv heads)
                                            and head_dim 16 != width 48 / 4 heads, untied lm_head,
                                            rope_theta 500, rms_norm_eps 1e-6.
  tokenizer.json, tokenizer_config.json     a BPE tokenizer trained here (Metaspace, like Llama's),
                                            with <unk> <s> </s> <pad> and the <image> placeholder.
  preprocessor_config.json, processor_config.json
                                            LlavaImageProcessor (resize 32, centre crop 32, CLIP
                                            mean/std, do_pad: LLaVA's pad-to-square) and LlavaProcessor.
  sharded/                                  the same weights under transformers 5.x's module names,
                                            split over two shards + model.safetensors.index.json.
  outputs.npz                               per example: prompt ids (`<image>\\n{question}`),
                                            pixel_values with and without pad-to-square, full logits,
                                            logits with some image tokens removed from inputs_embeds,
                                            greedy tokens; ids of the LLaVA-1.5 chat prompt
                                            (`USER: <image>\\n{question} ASSISTANT:`) and, on it, full
                                            logits (`ex{e}_chat_logits`), greedy tokens
                                            (`ex{e}_chat_greedy`) and logits with only the image tokens
                                            `ex{e}_chat_keep` left in inputs_embeds
                                            (`ex{e}_chat_logits_dropped`); ids of the other TEMPLATES
                                            (`ex{e}_template_{name}_input_ids`); the image processor on
                                            PROCESSOR_CASES (`proc_{case}_pixel_values`).
  llama_tokenizer/                          a tokenizer laid out as llava-hf's Llama one (byte fallback,
                                            legacy normalizer, add_bos_token) and transformers' ids and
                                            decodes for it (cases.json); see make_llama_tokenizer.
  tokenizer_cases.json                      transformers' ids for TOKENIZER_TEXTS (with and without
                                            special tokens) and its decodes (with and without
                                            skip_special_tokens).

Keys present before a new one was added keep their values when the fixtures are regenerated (every
random draw has its own seed), so earlier tests keep passing.
"""

import argparse
import json
import os

import numpy as np
from PIL import Image
import skimage.data
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
import transformers

SENTENCES = [
    'What color is the cat?', 'Is there a cup of coffee on the table?', 'How many people are in the picture?',
    'What is the astronaut holding?', 'Describe the image in one word.', 'Is the rocket on the launch pad?',
    'The cat sits on a wooden chair near the window.', 'A red rocket stands under a clear blue sky.',
    'There are two cups and a saucer on the table.', 'USER: ASSISTANT: yes no one two three four five',
    'The astronaut wears a white suit with a flag on the shoulder.', 'Answer the question using a single word.',
]
EXAMPLES = (  # (skimage image, question)
    ('chelsea', 'What color is the cat?'),
    ('coffee', 'Is there a cup of coffee on the table?'),
    ('rocket', 'Is the rocket on the launch pad?'),
)
CHAT_TEMPLATE = 'USER: <image>\n{question} ASSISTANT:'  # LLaVA-1.5's.
EXTRA_IMAGES = ('astronaut',)  # Square: pad-to-square is a no-op.
# Chat templates besides LLaVA-1.5's (ex{e}_chat_input_ids): text on both sides with newlines.
TEMPLATES = {
    'system': 'SYSTEM: Answer the question using a single word.\nUSER: <image>\n{question}\nASSISTANT:',
    'image_last': 'USER: {question}\n<image> ASSISTANT:',
}
# Image processor cases beyond the examples: (name, skimage image, how it is cut or converted,
# processor overrides). The test rebuilds each input from skimage the same way.
PROCESSOR_CASES = (
    ('portrait', 'astronaut', 'columns 100:400 (512 x 300, taller than wide)', {}),
    ('portrait_nopad', 'astronaut', 'columns 100:400 (512 x 300, taller than wide)', {'do_pad': False}),
    ('gray', 'camera', 'rows 0:200 as a PIL image of mode L (200 x 512)', {}),
    ('rgba', 'chelsea', 'RGBA, alpha = the red channel, as a PIL image', {}),
    ('small', 'chelsea', 'rows 0:20, columns 0:27 (smaller than the crop: upscaled)', {}),
    ('bilinear_square', 'coffee', 'whole image', {'resample': 2, 'size': {'height': 40, 'width': 40},
                                                  'do_pad': False}),
)
TOKENIZER_TEXTS = (
    'What color is the cat?', ' leading space', 'two  spaces and a\nnewline', 'USER: <image>\nHi ASSISTANT:',
    'caf\u00e9 \u00fcber', '', 'x', 'The cat<image><image>sits.', 'ASSISTANT: yes</s>',
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MAX_NEW_TOKENS = 6
# save_pretrained writes the 4.x tensor names (language_model.model.*); the sharded copy uses the
# module names of transformers 5.x (LlavaForConditionalGeneration.state_dict()), so both are tested.
NEW_NAMES = (
    ('language_model.lm_head.', 'lm_head.'),
    ('language_model.model.', 'model.language_model.'),
    ('vision_tower.', 'model.vision_tower.'),
    ('multi_modal_projector.', 'model.multi_modal_projector.'),
)


def make_tokenizer(out):
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='first')
  tok.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme='first')
  trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=['<unk>', '<s>', '</s>', '<pad>'])
  tok.train_from_iterator(SENTENCES, trainer)
  tok.add_special_tokens(['<image>'])
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A $B',
                                                      special_tokens=[('<s>', tok.token_to_id('<s>'))])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
                                              unk_token='<unk>', pad_token='<pad>',
                                              extra_special_tokens={'image_token': '<image>'})
  fast.save_pretrained(out)
  return transformers.AutoTokenizer.from_pretrained(out)


def make_llama_tokenizer(out):
  """A Llama-layout tokenizer (as llava-hf/llava-1.5-7b-hf ships it) and transformers' ids for it.

  tokenizer.json as transformers 4 converted Llama's sentencepiece model: byte-fallback BPE with the
  256 byte tokens after <unk> <s> </s>, the legacy normalizer (prepend '\u2581', spaces to '\u2581'),
  no pre-tokenizer; <image> and <pad> added after the vocabulary. tokenizer_config.json names
  tokenizer_class LlamaTokenizer with legacy false and add_bos_token true, and config.json has
  model_type llava (and only the image_token_index): AutoTokenizer then loads tokenizer.json as it is
  (TokenizersBackend: llava is among transformers 5's MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) and
  rebuilds only the post-processor from add_bos_token. cases.json: ids with and without special
  tokens, decodes with and without skip_special_tokens.
  """
  os.makedirs(out, exist_ok=True)
  tok = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend('\u2581'), normalizers.Replace(' ', '\u2581')])
  trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=['<unk>', '<s>', '</s>'])
  tok.train_from_iterator(SENTENCES, trainer)
  spec = json.loads(tok.to_str())
  pieces = sorted(((i, t) for t, i in spec['model']['vocab'].items() if i >= 3))
  vocab = {'<unk>': 0, '<s>': 1, '</s>': 2}
  vocab.update({f'<0x{b:02X}>': 3 + b for b in range(256)})
  vocab.update({t: 259 + k for k, (_, t) in enumerate(pieces)})
  spec['model']['vocab'] = vocab
  spec['pre_tokenizer'] = None
  spec['decoder'] = json.loads(decoders.Sequence([
      decoders.Replace('\u2581', ' '), decoders.ByteFallback(), decoders.Fuse(),
      decoders.Strip(content=' ', left=1)]).__getstate__())
  tok = Tokenizer.from_str(json.dumps(spec))
  tok.add_special_tokens(['<image>', '<pad>'])
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B',
                                                      special_tokens=[('<s>', 1)])
  tok.save(os.path.join(out, 'tokenizer.json'))
  image_id, pad_id = tok.token_to_id('<image>'), tok.token_to_id('<pad>')
  added = {str(i): {'content': t, 'lstrip': False, 'normalized': False, 'rstrip': False, 'single_word': False,
                    'special': True} for t, i in (('<unk>', 0), ('<s>', 1), ('</s>', 2), ('<image>', image_id),
                                                  ('<pad>', pad_id))}
  with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
    json.dump({'add_bos_token': True, 'add_eos_token': False, 'added_tokens_decoder': added, 'bos_token': '<s>',
               'clean_up_tokenization_spaces': False, 'eos_token': '</s>', 'legacy': False,
               'model_max_length': 4096, 'pad_token': '<pad>', 'padding_side': 'left',
               'tokenizer_class': 'LlamaTokenizer', 'unk_token': '<unk>'}, f, indent=2)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump({'model_type': 'llava', 'image_token_index': image_id}, f, indent=2)
  hf = transformers.AutoTokenizer.from_pretrained(out)
  assert type(hf).__name__ == 'TokenizersBackend', type(hf)
  texts = list(TOKENIZER_TEXTS) + [t.replace('<image>', '<image>' * 4).format(question='What color is the cat?')
                                   for t in [CHAT_TEMPLATE] + list(TEMPLATES.values())]
  cases = []
  for text in texts:
    ids = hf(text)['input_ids']
    cases.append({'text': text, 'ids': ids, 'ids_plain': hf(text, add_special_tokens=False)['input_ids'],
                  'decoded': hf.decode(ids),
                  'decoded_skip': hf.decode(ids, skip_special_tokens=True)})
  with open(os.path.join(out, 'cases.json'), 'w') as f:
    json.dump(cases, f, indent=1)


def processor_input(name, image_name):
  """The input image of PROCESSOR_CASES[name], built from its skimage image."""
  image = getattr(skimage.data, image_name)()
  if name.startswith('portrait'):
    return image[:, 100:400]
  if name == 'gray':
    return Image.fromarray(image[:200], mode='L')
  if name == 'rgba':
    return Image.fromarray(np.concatenate([image, image[..., :1]], -1), mode='RGBA')
  if name == 'small':
    return image[:20, :27]
  return image


def randomize(model, seed=0):
  """Weights of unit-scale activations (HF's std 0.02 init makes every logit ~0, a weak test)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if 'norm' in name or 'layrnorm' in name:
        p.copy_((1.0 + 0.2 * noise) if name.endswith('weight') else 0.2 * noise)
      elif name.endswith('bias'):
        p.copy_(0.1 * noise)
      elif p.ndim >= 2 and 'embed' not in name:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      else:
        p.copy_(0.5 * noise)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     'tests', 'fixtures', 'hf_llava_tiny'))
  out = parser.parse_args().out
  os.makedirs(out, exist_ok=True)
  torch.manual_seed(0)
  tokenizer = make_tokenizer(out)
  image_token = tokenizer.convert_tokens_to_ids('<image>')

  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16)
  text = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=500.0,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                    vision_feature_layer=-2, vision_feature_select_strategy='default',
                                    projector_hidden_act='gelu', image_seq_length=16)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  randomize(model)
  model.generation_config.eos_token_id = 2
  model.generation_config.pad_token_id = 3
  model.save_pretrained(out)

  image_processor = transformers.LlavaImageProcessorPil(
      size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}, do_pad=True, image_mean=CLIP_MEAN,
      image_std=CLIP_STD, resample=3)
  processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                          vision_feature_select_strategy='default', num_additional_image_tokens=1)
  processor.save_pretrained(out)

  # Shards under the 5.x names; transformers must read them back into the same model.
  tensors = load_file(os.path.join(out, 'model.safetensors'))
  assert all(not n.startswith('model.') for n in tensors), sorted(tensors)[:3]
  legacy = {}
  for name, value in tensors.items():
    for old, new in NEW_NAMES:
      if name.startswith(old):
        name = new + name[len(old):]
        break
    legacy[name] = value
  assert set(legacy) == set(model.state_dict()), sorted(set(legacy) ^ set(model.state_dict()))
  names = sorted(legacy)
  sharded = os.path.join(out, 'sharded')
  os.makedirs(sharded, exist_ok=True)
  weight_map = {}
  for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
    file = f'model-{i + 1:05d}-of-00002.safetensors'
    save_file({n: legacy[n] for n in part}, os.path.join(sharded, file), metadata={'format': 'pt'})
    weight_map.update({n: file for n in part})
  total = int(sum(v.nbytes for v in legacy.values()))
  with open(os.path.join(sharded, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2, sort_keys=True)
  with open(os.path.join(out, 'config.json')) as f:
    config_json = f.read()
  with open(os.path.join(sharded, 'config.json'), 'w') as f:
    f.write(config_json)
  reread = transformers.LlavaForConditionalGeneration.from_pretrained(sharded).eval()
  for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reread.state_dict().items()):
    assert n1 == n2 and torch.equal(p1, p2), f'sharded copy differs at {n1} / {n2}'

  arrays = {}
  lm = model.get_input_embeddings()
  for e, (image_name, question) in enumerate(EXAMPLES):
    image = getattr(skimage.data, image_name)()
    prompt = f'<image>\n{question}'
    inputs = processor(images=image, text=prompt, return_tensors='pt')
    ids = inputs['input_ids']  # (1, L)
    arrays[f'ex{e}_input_ids'] = ids[0].numpy().astype(np.int32)
    arrays[f'ex{e}_pixel_values'] = inputs['pixel_values'][0].numpy()  # (3, H, W)
    chat = CHAT_TEMPLATE.format(question=question)
    arrays[f'ex{e}_chat_input_ids'] = processor(images=image, text=chat, return_tensors='pt')['input_ids'][0].numpy()
    with torch.no_grad():
      full = model(**inputs).logits[0]  # (L, V)
      arrays[f'ex{e}_logits'] = full.numpy()
      # Image tokens physically removed from inputs_embeds: positions renumber contiguously.
      feats = model.get_image_features(pixel_values=inputs['pixel_values'], vision_feature_layer=-2,
                                       vision_feature_select_strategy='default')
      feats = getattr(feats, 'pooler_output', feats)
      feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, 48)
      embeds = lm(ids)[0].clone()  # (L, D)
      is_image = ids[0] == image_token
      embeds[is_image] = feats.to(embeds.dtype)
      n = int(is_image.sum())
      keep = np.sort(np.random.default_rng(e).permutation(n)[:n // 2 + e])
      rows = np.concatenate([np.arange(1), 1 + keep, np.arange(1 + n, ids.shape[1])])
      dropped = model(inputs_embeds=embeds[rows][None]).logits[0]
      arrays[f'ex{e}_keep'] = keep.astype(np.int32)
      arrays[f'ex{e}_logits_dropped'] = dropped.numpy()
      generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
      arrays[f'ex{e}_greedy'] = generated[0, ids.shape[1]:].numpy().astype(np.int32)
    arrays[f'ex{e}_pixel_values_nopad'] = processor.image_processor(
        image, do_pad=False, return_tensors='np')['pixel_values'][0]
    for name, template in TEMPLATES.items():
      arrays[f'ex{e}_template_{name}_input_ids'] = processor(
          images=image, text=template.format(question=question), return_tensors='np')['input_ids'][0]
    # The chat prompt: text before and after the image.
    chat_inputs = processor(images=image, text=chat, return_tensors='pt')
    chat_ids = chat_inputs['input_ids']  # (1, L)
    with torch.no_grad():
      arrays[f'ex{e}_chat_logits'] = model(**chat_inputs).logits[0].numpy()
      generated = model.generate(**chat_inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
      arrays[f'ex{e}_chat_greedy'] = generated[0, chat_ids.shape[1]:].numpy().astype(np.int32)
      embeds = lm(chat_ids)[0].clone()  # (L, D)
      is_image = chat_ids[0] == image_token
      embeds[is_image] = feats.to(embeds.dtype)
      first = int(np.flatnonzero(is_image.numpy())[0])
      keep = np.sort(np.random.default_rng(100 + e).permutation(n)[:n // 2 + e])
      rows = np.concatenate([np.arange(first), first + keep, np.arange(first + n, chat_ids.shape[1])])
      arrays[f'ex{e}_chat_keep'] = keep.astype(np.int32)
      arrays[f'ex{e}_chat_logits_dropped'] = model(inputs_embeds=embeds[rows][None]).logits[0].numpy()
  for name in EXTRA_IMAGES:
    image = getattr(skimage.data, name)()
    arrays[f'{name}_pixel_values'] = processor.image_processor(image, return_tensors='np')['pixel_values'][0]
  for name, image_name, _, overrides in PROCESSOR_CASES:
    arrays[f'proc_{name}_pixel_values'] = processor.image_processor(
        processor_input(name, image_name), return_tensors='np', **overrides)['pixel_values'][0]
  np.savez_compressed(os.path.join(out, 'outputs.npz'), **arrays)
  cases = []
  for text in TOKENIZER_TEXTS:
    ids = tokenizer(text)['input_ids']
    plain = tokenizer(text, add_special_tokens=False)['input_ids']
    cases.append({'text': text, 'ids': ids, 'ids_plain': plain, 'decoded': tokenizer.decode(ids),
                  'decoded_skip': tokenizer.decode(ids, skip_special_tokens=True)})
  with open(os.path.join(out, 'tokenizer_cases.json'), 'w') as f:
    json.dump(cases, f, indent=2)
  with open(os.path.join(out, 'examples.json'), 'w') as f:
    json.dump({'examples': [list(x) for x in EXAMPLES], 'extra_images': list(EXTRA_IMAGES),
               'chat_template': CHAT_TEMPLATE, 'templates': TEMPLATES,
               'processor_cases': [{'name': name, 'image': image_name, 'input': how, 'overrides': overrides}
                                   for name, image_name, how, overrides in PROCESSOR_CASES],
               'max_new_tokens': MAX_NEW_TOKENS, 'transformers': transformers.__version__,
               'torch': torch.__version__}, f, indent=2)
  make_llama_tokenizer(os.path.join(out, 'llama_tokenizer'))
  print('wrote', out, sorted(os.listdir(out)))


if __name__ == '__main__':
  main()
