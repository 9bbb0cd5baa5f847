"""HF LLaVA import: parity with transformers' own outputs (committed fixtures, no torch), errors, 7B map.

The fixtures come from tools/make_hf_fixtures.py (transformers 5.24, float32): a tiny random
LlavaForConditionalGeneration with GQA and head_dim != width / heads. The prompt is
`<image>\\n{question}`, whose image stands right after <bos>, as our [bos][visual][text] layout.
"""

import functools
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gripjax.models import hf_llava
from gripjax.models import vlm as vlm_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'hf_llava_tiny')
EXAMPLES = 3
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def outputs():
  return dict(np.load(os.path.join(FIXTURE, 'outputs.npz')))


@functools.lru_cache(maxsize=None)
def imported(sub):
  path = os.path.join(FIXTURE, sub)
  cfg = hf_llava.model_config(path)
  return cfg, vlm_lib.make_vlm(cfg), {'params': hf_llava.load_params(path, cfg)}


def unit_pixels(cfg, pixel_values):
  """transformers' normalized (3, H, W) pixels -> our (1, H, W, 3) in [0, 1] (the tower normalizes)."""
  x = pixel_values.transpose(1, 2, 0)
  return jnp.asarray(x * np.asarray(cfg.vit.image_std) + np.asarray(cfg.vit.image_mean), jnp.float32)[None]


def test_config_mapping():
  cfg = vlm_lib.ModelConfig.from_config(hf_llava.model_config(FIXTURE))
  # Values written by tools/make_hf_fixtures.py.
  assert (cfg.vit.image_size, cfg.vit.patch_size, cfg.vit.width, cfg.vit.depth, cfg.vit.num_heads) == (32, 8, 32, 3, 4)
  assert cfg.vit.feature_layer == -2 and cfg.vit.feature_select_strategy == 'default'
  assert (cfg.llm.width, cfg.llm.num_heads, cfg.llm.num_kv_heads, cfg.llm.head_dim) == (48, 4, 2, 16)
  assert cfg.llm.rope_theta == 500.0 and cfg.llm.rms_norm_eps == 1e-6 and cfg.llm.vocab_size == 201
  assert not cfg.llm.tie_word_embeddings and cfg.projector_act == 'gelu' and cfg.projector_bias
  assert hf_llava.model_config(FIXTURE).image_token_id == 200
  assert cfg.num_visual_tokens == 16


@pytest.mark.parametrize('sub', ['', 'sharded'])
def test_logits_match_transformers(sub):
  cfg, model, params = imported(sub)
  out = outputs()
  n = hf_llava.num_image_tokens(cfg)
  with jax.default_matmul_precision('highest'):
    for e in range(EXAMPLES):
      ids = out[f'ex{e}_input_ids']
      assert ids[0] == 1 and (ids[1:1 + n] == 200).all() and (ids[1 + n:] != 200).all()
      visual, _ = model.apply(params, unit_pixels(cfg, out[f'ex{e}_pixel_values']), method='encode_image')
      text = jnp.asarray(ids[1 + n:])[None]
      tv = jnp.ones_like(text, bool)
      index = jnp.arange(n)[None]
      full = model.apply(params, visual, index, jnp.ones((1, n), bool), text, tv, 'keep', method='forward')
      np.testing.assert_allclose(full[0], out[f'ex{e}_logits'], atol=TOL, rtol=0)
      keep = out[f'ex{e}_keep']
      k = jnp.asarray(keep)[None]
      dropped = model.apply(params, visual[:, keep], k, jnp.ones_like(k, bool), text, tv, 'renumber',
                            method='forward')
      np.testing.assert_allclose(dropped[0], out[f'ex{e}_logits_dropped'], atol=TOL, rtol=0)


def test_greedy_tokens_match_transformers():
  cfg, model, params = imported('')
  out = outputs()
  n = hf_llava.num_image_tokens(cfg)
  with jax.default_matmul_precision('highest'):
    for e in range(EXAMPLES):
      ids = out[f'ex{e}_input_ids']
      visual, _ = model.apply(params, unit_pixels(cfg, out[f'ex{e}_pixel_values']), method='encode_image')
      text = jnp.asarray(ids[1 + n:])[None]
      want = out[f'ex{e}_greedy']
      got = vlm_lib.generate(model, params, visual, jnp.arange(n)[None], jnp.ones((1, n), bool), text,
                             jnp.ones_like(text, bool), max_new_tokens=len(want), eos_id=2)
      np.testing.assert_array_equal(np.asarray(got[0])[:len(want)], want)


def chat_split(ids, image_token):
  """transformers' prompt ids -> (prefix, text): the ids before and after the run of image tokens."""
  image = np.flatnonzero(ids == image_token)
  assert len(image) and (np.diff(image) == 1).all(), ids
  return ids[:image[0]], ids[image[-1] + 1:]


def test_chat_template_matches_transformers():
  """LLaVA-1.5's chat prompt `USER: <image>\\n{question} ASSISTANT:`, text on both sides of the image:
  the prefix (the ids before the image tokens) and the text after them, as the general layout
  [prefix][visual][text], against transformers' logits, dropped-token logits and greedy tokens."""
  cfg, model, params = imported('')
  out = outputs()
  n = hf_llava.num_image_tokens(cfg)
  with open(os.path.join(FIXTURE, 'config.json')) as f:
    image_token = json.load(f)['image_token_index']
  fwd = jax.jit(lambda v, i, pre, text, mode: model.apply(
      params, v, i, jnp.ones(i.shape, bool), text, jnp.ones(text.shape, bool), mode, prefix_ids=pre,
      method='forward'), static_argnums=4)
  with jax.default_matmul_precision('highest'):
    for e in range(EXAMPLES):
      ids = out[f'ex{e}_chat_input_ids']
      prefix, text = chat_split(ids, image_token)
      assert ids[0] == 1 and len(prefix) > 1 and len(text) > 1 and len(prefix) + n + len(text) == len(ids)
      pre, text = jnp.asarray(prefix, jnp.int32)[None], jnp.asarray(text, jnp.int32)[None]
      visual, _ = model.apply(params, unit_pixels(cfg, out[f'ex{e}_pixel_values']), method='encode_image')
      full = fwd(visual, jnp.arange(n)[None], pre, text, 'keep')
      np.testing.assert_allclose(full[0], out[f'ex{e}_chat_logits'], atol=TOL, rtol=0, err_msg=f'ex{e}')
      keep = out[f'ex{e}_chat_keep']
      dropped = fwd(visual[:, keep], jnp.asarray(keep)[None], pre, text, 'renumber')
      np.testing.assert_allclose(dropped[0], out[f'ex{e}_chat_logits_dropped'], atol=TOL, rtol=0,
                                 err_msg=f'ex{e}')
      want = out[f'ex{e}_chat_greedy']
      got = vlm_lib.generate(model, params, visual, jnp.arange(n)[None], jnp.ones((1, n), bool), text,
                             jnp.ones_like(text, bool), max_new_tokens=len(want), eos_id=2, prefix_ids=pre)
      np.testing.assert_array_equal(np.asarray(got[0])[:len(want)], want, err_msg=f'ex{e}')


def copy_fixture(tmp_path):
  dst = tmp_path / 'ckpt'
  shutil.copytree(FIXTURE, dst, ignore=shutil.ignore_patterns('sharded', 'outputs.npz'))
  return dst


def test_wrong_model_type(tmp_path):
  dst = copy_fixture(tmp_path)
  cfg = json.loads((dst / 'config.json').read_text())
  cfg['model_type'] = 'qwen2_vl'
  (dst / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(hf_llava.CheckpointError, match=r"model_type='qwen2_vl'.*\('llava',\)"):
    hf_llava.model_config(str(dst))


def test_missing_and_unexpected_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file
  dst = copy_fixture(tmp_path)
  tensors = load_file(str(dst / 'model.safetensors'))
  del tensors['language_model.model.layers.1.mlp.up_proj.weight']
  tensors['language_model.model.layers.1.mlp.extra.weight'] = np.zeros((2, 2), np.float32)
  save_file(tensors, str(dst / 'model.safetensors'))
  cfg = hf_llava.model_config(str(dst))
  with pytest.raises(hf_llava.CheckpointError,
                     match=r'missing tensors for 1 params: llm/layers_1/mlp/up_proj/kernel.*'
                           r'1 unexpected tensors: language_model\.model\.layers\.1\.mlp\.extra\.weight'):
    hf_llava.load_params(str(dst), cfg)


def test_shape_mismatch(tmp_path):
  from safetensors.numpy import load_file, save_file
  dst = copy_fixture(tmp_path)
  tensors = load_file(str(dst / 'model.safetensors'))
  name = 'multi_modal_projector.linear_1.weight'
  tensors[name] = np.zeros((48, 31), np.float32)
  save_file(tensors, str(dst / 'model.safetensors'))
  cfg = hf_llava.model_config(str(dst))
  with pytest.raises(hf_llava.CheckpointError,
                     match=r'multi_modal_projector\.linear_1\.weight: checkpoint \(48, 31\), expected \(48, 32\)'):
    hf_llava.load_params(str(dst), cfg)


def llava_7b_hf_names(vision_layers=24, text_layers=32):
  """Tensor names of llava-hf/llava-1.5-7b-hf (transformers 4.x LlavaForConditionalGeneration layout)."""
  names = ['vision_tower.vision_model.embeddings.class_embedding',
           'vision_tower.vision_model.embeddings.patch_embedding.weight',
           'vision_tower.vision_model.embeddings.position_embedding.weight',
           'vision_tower.vision_model.pre_layrnorm.weight', 'vision_tower.vision_model.pre_layrnorm.bias',
           'vision_tower.vision_model.post_layernorm.weight', 'vision_tower.vision_model.post_layernorm.bias',
           'multi_modal_projector.linear_1.weight', 'multi_modal_projector.linear_1.bias',
           'multi_modal_projector.linear_2.weight', 'multi_modal_projector.linear_2.bias',
           'language_model.model.embed_tokens.weight', 'language_model.model.norm.weight',
           'language_model.lm_head.weight']
  for i in range(vision_layers):
    p = f'vision_tower.vision_model.encoder.layers.{i}.'
    for m in ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.out_proj',
              'layer_norm1', 'layer_norm2', 'mlp.fc1', 'mlp.fc2'):
      names += [p + m + '.weight', p + m + '.bias']
  for i in range(text_layers):
    p = f'language_model.model.layers.{i}.'
    names += [p + m + '.weight' for m in ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj',
                                           'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj',
                                           'mlp.down_proj', 'input_layernorm', 'post_attention_layernorm')]
  return names


def test_name_map_covers_llava_7b_exactly():
  spec = importlib.util.spec_from_file_location('llava_1p5_7b', os.path.join(REPO, 'configs', 'llava_1p5_7b.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  model = vlm_lib.make_vlm(module.get_config().model)
  abstract = jax.eval_shape(functools.partial(vlm_lib.init_params, model), jax.random.PRNGKey(0))['params']
  files = {name: 'model.safetensors' for name in llava_7b_hf_names()}
  plan = hf_llava.plan(files, abstract)  # Raises on any missing or unexpected tensor.
  assert len(plan) == len(files) == len(jax.tree.leaves(abstract)) == 14 + 24 * 16 + 32 * 9
  # Hand-checked stored shapes of a few tensors, against our leaves through the transform.
  leaves = {'/'.join(str(k.key) for k in p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  for path, stored in (('vision/embeddings/patch_embedding/kernel', (1024, 3, 14, 14)),
                       ('llm/layers_0/mlp/gate_proj/kernel', (11008, 4096)),
                       ('projector/linear_1/kernel', (4096, 1024))):
    _, transform = plan[path]
    assert hf_llava.STORED_SHAPE[transform](leaves[path]) == stored
