"""Import a Hugging Face LLaVA checkpoint (CLIP vision tower + Llama decoder) into the Flax VLM.

  model_cfg = hf_llava.model_config('/ckpt/llava-1.5-7b-hf')         # config.json -> config.model
  vlm = vlm_lib.make_vlm(model_cfg)
  params = hf_llava.load_params('/ckpt/llava-1.5-7b-hf', model_cfg, mesh, rules)   # no torch

A checkpoint directory holds `config.json` (`model_type: llava`, a `clip_vision_model` vision config
and a `llama` text config) and either `model.safetensors` or shards listed by
`model.safetensors.index.json`. Fields a saved config leaves out take transformers' defaults
(`HF_DEFAULTS`), e.g. llava-hf's vision_config lists only what differs from CLIPVisionConfig.

Tensors are read with `safe_open(..., framework='numpy')` one at a time and placed straight onto
their NamedSharding with `jax.make_array_from_callback` (each device, or each host of a pod, copies
only its own slice), so a host never holds more than one full tensor beside the placed params.

The HF -> Flax name map is data (`NAME_MAP`): (regex on the HF name, our '/'-joined param path as a
`re.Match.expand` template, transform). Both checkpoint layouts are accepted: transformers 4.x's
(`language_model.model.layers.*`, `vision_tower.*`, `multi_modal_projector.*`,
`language_model.lm_head.weight`; the tower with or without `vision_model.`) and 5.x's (`model.language_model.layers.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `lm_head.weight`). Transforms:

  linear   torch Linear weight (out, in) -> Flax Dense kernel (in, out):    W.T
  conv     torch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)
  none     as stored (biases, norms, embeddings, CLS token)
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import safe_open

from gripjax.models import vit as vit_lib
from gripjax.models import vlm as vlm_lib
from gripjax.train import sharding as sharding_lib

SUPPORTED_MODEL_TYPES = ('llava',)
SUPPORTED_VISION_TYPES = ('clip_vision_model',)
SUPPORTED_TEXT_TYPES = ('llama',)
CONFIG_FILE = 'config.json'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'

# transformers' defaults for the fields we read (LlavaConfig; CLIPVisionConfig as LlavaConfig
# builds it when vision_config is absent, CLIPVisionConfig otherwise; LlamaConfig).
HF_DEFAULTS = {
    'llava': dict(image_token_index=32000, projector_hidden_act='gelu', vision_feature_select_strategy='default',
                  vision_feature_layer=-2, multimodal_projector_bias=True, tie_word_embeddings=False),
    'vision_absent': dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14),
    'vision': dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=32, hidden_act='quick_gelu', layer_norm_eps=1e-5, num_channels=3),
    'text': dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act='silu',
                 max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                 attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1),
}

# (our config.model field, HF section, HF field). Sections: 'llava' (top level), 'vision', 'text'.
CONFIG_MAP = (
    ('vit.image_size', 'vision', 'image_size'),
    ('vit.patch_size', 'vision', 'patch_size'),
    ('vit.width', 'vision', 'hidden_size'),
    ('vit.depth', 'vision', 'num_hidden_layers'),
    ('vit.num_heads', 'vision', 'num_attention_heads'),
    ('vit.mlp_dim', 'vision', 'intermediate_size'),
    ('vit.hidden_act', 'vision', 'hidden_act'),
    ('vit.layer_norm_eps', 'vision', 'layer_norm_eps'),
    ('vit.feature_layer', 'llava', 'vision_feature_layer'),
    ('vit.feature_select_strategy', 'llava', 'vision_feature_select_strategy'),
    ('projector_act', 'llava', 'projector_hidden_act'),
    ('projector_bias', 'llava', 'multimodal_projector_bias'),
    ('projector_hidden', 'text', 'hidden_size'),  # linear_1: Dv -> D, linear_2: D -> D.
    ('image_token_id', 'llava', 'image_token_index'),
    ('llm.vocab_size', 'text', 'vocab_size'),
    ('llm.width', 'text', 'hidden_size'),
    ('llm.depth', 'text', 'num_hidden_layers'),
    ('llm.num_heads', 'text', 'num_attention_heads'),
    ('llm.num_kv_heads', 'text', 'num_key_value_heads'),
    ('llm.head_dim', 'text', 'head_dim'),
    ('llm.mlp_dim', 'text', 'intermediate_size'),
    ('llm.hidden_act', 'text', 'hidden_act'),
    ('llm.rope_theta', 'text', 'rope_theta'),
    ('llm.rms_norm_eps', 'text', 'rms_norm_eps'),
    ('llm.max_len', 'text', 'max_position_embeddings'),
    ('llm.attention_bias', 'text', 'attention_bias'),
    ('llm.mlp_bias', 'text', 'mlp_bias'),
    ('llm.tie_word_embeddings', 'llava', 'tie_word_embeddings'),
    ('llm.bos_id', 'text', 'bos_token_id'),
)

HF_DTYPES = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float16'}

_V = r'^(?:model\.)?vision_tower\.(?:vision_model\.)?'
_P = r'^(?:model\.)?multi_modal_projector\.'
_T = r'^(?:language_model\.model\.|model\.language_model\.)'

# (regex on the HF tensor name, our param path template, transform); path None: a buffer to skip.
NAME_MAP = (
    (_V + r'embeddings\.patch_embedding\.weight$', 'vision/embeddings/patch_embedding/kernel', 'conv'),
    (_V + r'embeddings\.class_embedding$', 'vision/embeddings/class_embedding', 'none'),
    (_V + r'embeddings\.position_embedding\.weight$', 'vision/embeddings/position_embedding/embedding', 'none'),
    (_V + r'(pre_layrnorm|post_layernorm)\.weight$', r'vision/\1/scale', 'none'),
    (_V + r'(pre_layrnorm|post_layernorm)\.bias$', r'vision/\1/bias', 'none'),
    (_V + r'encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight$',
     r'vision/layers_\1/self_attn/\2/kernel', 'linear'),
    (_V + r'encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias$',
     r'vision/layers_\1/self_attn/\2/bias', 'none'),
    (_V + r'encoder\.layers\.(\d+)\.(layer_norm[12])\.weight$', r'vision/layers_\1/\2/scale', 'none'),
    (_V + r'encoder\.layers\.(\d+)\.(layer_norm[12])\.bias$', r'vision/layers_\1/\2/bias', 'none'),
    (_V + r'encoder\.layers\.(\d+)\.mlp\.(fc[12])\.weight$', r'vision/layers_\1/mlp/\2/kernel', 'linear'),
    (_V + r'encoder\.layers\.(\d+)\.mlp\.(fc[12])\.bias$', r'vision/layers_\1/mlp/\2/bias', 'none'),
    (_P + r'(linear_[12])\.weight$', r'projector/\1/kernel', 'linear'),
    (_P + r'(linear_[12])\.bias$', r'projector/\1/bias', 'none'),
    (_T + r'embed_tokens\.weight$', 'llm/embed_tokens/embedding', 'none'),
    (_T + r'layers\.(\d+)\.self_attn\.([qkvo]_proj)\.weight$', r'llm/layers_\1/self_attn/\2/kernel', 'linear'),
    (_T + r'layers\.(\d+)\.self_attn\.([qkvo]_proj)\.bias$', r'llm/layers_\1/self_attn/\2/bias', 'none'),
    (_T + r'layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$', r'llm/layers_\1/mlp/\2/kernel', 'linear'),
    (_T + r'layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias$', r'llm/layers_\1/mlp/\2/bias', 'none'),
    (_T + r'layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$', r'llm/layers_\1/\2/scale', 'none'),
    (_T + r'norm\.weight$', 'llm/norm/scale', 'none'),
    (r'^(?:language_model\.)?lm_head\.weight$', 'llm/lm_head/kernel', 'linear'),
    (r'\.position_ids$', None, 'none'),  # CLIP's persistent buffer in older checkpoints.
    (r'\.rotary_emb\.inv_freq$', None, 'none'),  # RoPE buffer in older Llama checkpoints.
)

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    'none': lambda w: w,
    'linear': lambda w: w.T,  # (out, in) -> (in, out)
    'conv': lambda w: w.transpose(2, 3, 1, 0),  # (O, I, kh, kw) -> (kh, kw, I, O)
}
# Shape of the stored tensor from our param's shape (inverse of the transform, for error messages).
STORED_SHAPE = {
    'none': lambda s: tuple(s),
    'linear': lambda s: tuple(s[::-1]),
    'conv': lambda s: (s[3], s[2], s[0], s[1]),
}


class CheckpointError(ValueError):
  """The checkpoint directory does not hold what a LLaVA import needs."""


@functools.lru_cache(maxsize=None)
def _compiled_name_map():
  return tuple((re.compile(pattern), path, transform) for pattern, path, transform in NAME_MAP)


def map_name(hf_name: str) -> Optional[tuple[Optional[str], str]]:
  """(our param path or None for a skipped buffer, transform) of an HF tensor name; None: no row."""
  for pattern, path, transform in _compiled_name_map():
    m = pattern.search(hf_name)
    if m:
      return (m.expand(path) if path is not None else None), transform
  return None


# --- config.json -> config.model. ----------------------------------------------------------------

def read_hf_config(path: str) -> dict:
  """The parsed `config.json` of a checkpoint directory (or the file itself)."""
  file = os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise CheckpointError(f'{file} does not exist: expected an HF checkpoint directory with {CONFIG_FILE}.')
  with open(file, encoding='utf-8') as f:
    return json.load(f)


def _sections(hf: dict) -> dict[str, dict]:
  """The top-level, vision and text sections with transformers' defaults filled in."""
  model_type = hf.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f'config.json has model_type={model_type!r}: expected one of '
                          f'{SUPPORTED_MODEL_TYPES} (a LLaVA checkpoint; other architectures are not supported).')
  vision, text = hf.get('vision_config'), hf.get('text_config')
  vision_defaults = HF_DEFAULTS['vision'] | (HF_DEFAULTS['vision_absent'] if vision is None else {})
  vision, text = vision or {'model_type': 'clip_vision_model'}, text or {'model_type': 'llama'}
  for what, section, supported in (('vision_config', vision, SUPPORTED_VISION_TYPES),
                                   ('text_config', text, SUPPORTED_TEXT_TYPES)):
    if section.get('model_type') not in supported:
      raise CheckpointError(f'config.json {what}.model_type={section.get("model_type")!r}: expected one of '
                            f'{supported}.')
  llava = HF_DEFAULTS['llava'] | {k: v for k, v in hf.items() if v is not None}
  if 'image_token_id' in hf and 'image_token_index' not in hf:
    llava['image_token_index'] = hf['image_token_id']
  # transformers forwards a text-side tie to the top level (LlavaConfig.__post_init__).
  llava['tie_word_embeddings'] = bool(llava['tie_word_embeddings'] or text.get('tie_word_embeddings', False))
  vision = vision_defaults | {k: v for k, v in vision.items() if v is not None}
  text = HF_DEFAULTS['text'] | {k: v for k, v in text.items() if v is not None}
  # transformers 5 keeps the RoPE base in rope_parameters; 4.x in rope_theta (+ rope_scaling).
  rope = text.get('rope_parameters') or text.get('rope_scaling') or {}
  if rope.get('rope_type', rope.get('type', 'default')) != 'default':
    raise CheckpointError(f'config.json text_config has RoPE scaling {rope!r}: only the default RoPE '
                          '(no scaling) is supported.')
  if 'rope_theta' in rope:
    text['rope_theta'] = rope['rope_theta']
  text['rope_theta'] = float(text['rope_theta'])
  text['num_key_value_heads'] = text['num_key_value_heads'] or text['num_attention_heads']
  text['head_dim'] = text['head_dim'] or 0  # 0: hidden_size // num_attention_heads.
  if not isinstance(llava['vision_feature_layer'], int):
    raise CheckpointError(f'config.json vision_feature_layer={llava["vision_feature_layer"]!r}: expected one '
                          'int (several concatenated layers are not supported).')
  if vision['num_channels'] != 3:
    raise CheckpointError(f'config.json vision_config.num_channels={vision["num_channels"]}: expected 3 (RGB).')
  return dict(llava=llava, vision=vision, text=text)


def model_config(path_or_hf, base: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """`config.model` for a checkpoint: `base` (e.g. gripbench_tiny's model section) with every
  field of `CONFIG_MAP` (and dtype / param_dtype from the checkpoint's torch dtype) replaced.

  Args:
    path_or_hf: a checkpoint directory, its config.json path, or the parsed dict.
    base: the model section to start from (position_mode and any field the checkpoint does not
      decide come from it); None: configs/gripbench_tiny.py's.
  """
  hf = path_or_hf if isinstance(path_or_hf, dict) else read_hf_config(path_or_hf)
  sections = _sections(hf)
  if base is None:
    base = ml_collections.ConfigDict(dict(
        vit=dict(feature_layer=-2, layer_norm_eps=1e-5, feature_select_strategy='default',
                 hidden_act='quick_gelu', image_mean=vit_lib.CLIP_MEAN, image_std=vit_lib.CLIP_STD),
        llm=dict(rope_theta=10000.0, rms_norm_eps=1e-5, max_len=2048, bos_id=1, head_dim=0, hidden_act='silu',
                 attention_bias=False, mlp_bias=False, tie_word_embeddings=False),
        projector_bias=True, projector_act='gelu', image_token_id=-1, param_dtype='float32',
        position_mode='keep', dtype='float32'))
  m = ml_collections.ConfigDict(base.to_dict())
  for field, section, key in CONFIG_MAP:
    *parents, leaf = field.split('.')
    node = m
    for p in parents:
      node = node[p]
    value = sections[section][key]
    node[leaf] = value
  dtype = hf.get('torch_dtype') or hf.get('dtype') or sections['text'].get('torch_dtype') or 'float32'
  if dtype not in HF_DTYPES:
    raise CheckpointError(f'config.json torch_dtype={dtype!r}: expected one of {tuple(HF_DTYPES)}.')
  m.dtype = m.param_dtype = HF_DTYPES[dtype]
  return m


# --- Tensors. ------------------------------------------------------------------------------------

def tensor_files(path: str) -> dict[str, str]:
  """HF tensor name -> the safetensors file holding it (single file or the index's shards)."""
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(index):
    with open(index, encoding='utf-8') as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f'{index} has no weight_map: expected {{"weight_map": {{tensor name: shard file}}}}.')
    files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    absent = sorted({f for f in files.values() if not os.path.exists(f)})
    if absent:
      raise CheckpointError(f'{index} names shards that do not exist: {absent}.')
    return files
  if os.path.exists(single):
    with safe_open(single, framework='numpy') as f:
      return {name: single for name in f.keys()}
  raise CheckpointError(f'{path} has neither {SINGLE_FILE} nor {INDEX_FILE}: expected safetensors weights.')


def _short_list(names, limit=20) -> str:
  names = sorted(names)
  more = f' ... and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def plan(files: dict[str, str], abstract) -> dict[str, tuple[str, str]]:
  """Our param path -> (HF name, transform) for every leaf of `abstract`, after checking names.

  Raises:
    CheckpointError listing the HF tensors no row maps (or mapped onto no param of this config),
    and the params no tensor provides.
  """
  leaves = {sharding_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)}
  out, unexpected = {}, []
  for name in files:
    mapped = map_name(name)
    if mapped is None:
      unexpected.append(name)
      continue
    path, transform = mapped
    if path is None:
      continue
    if path not in leaves:
      # lm_head.weight beside tied embeddings is the embedding table again: HF ignores it too.
      if path == 'llm/lm_head/kernel' and 'llm/embed_tokens/embedding' in leaves:
        continue
      unexpected.append(name)
      continue
    out[path] = (name, transform)
  missing = sorted(leaves - set(out))
  if unexpected or missing:
    parts = []
    if missing:
      parts.append(f'missing tensors for {len(missing)} params: {_short_list(missing)}')
    if unexpected:
      parts.append(f'{len(unexpected)} unexpected tensors: {_short_list(unexpected)}')
    raise CheckpointError('the checkpoint does not match the LLaVA layout of its config: ' + '; '.join(parts) + '.')
  return out


def load_params(path: str, model_cfg, mesh=None, rules='replicate', param_dtype: Optional[str] = None):
  """The VLM's params (the inner 'params' tree) read from an HF checkpoint directory.

  Args:
    path: the checkpoint directory (config.json + safetensors).
    model_cfg: `config.model` (ConfigDict) or a ModelConfig, e.g. from `model_config(path)`.
    mesh: a jax Mesh to place params on; None: the first local device.
    rules: a `sharding.ShardingRules` or strategy name (e.g. `rules_from_config(config, 'vlm_params')`).
    param_dtype: dtype to store params in; None: `model_cfg.param_dtype` if set, else float32.

  Returns:
    A pytree matching `init_params(make_vlm(model_cfg))['params']`, each leaf a jax.Array on its
    sharding.
  """
  if param_dtype is None:
    param_dtype = getattr(model_cfg, 'get', lambda k, d: d)('param_dtype', 'float32')
  dtype = jnp.dtype(param_dtype)
  model = vlm_lib.make_vlm(model_cfg)
  abstract = jax.eval_shape(functools.partial(vlm_lib.init_params, model), jax.random.PRNGKey(0))['params']
  if mesh is None:
    device = jax.local_devices()[0]
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
  else:
    shardings = sharding_lib.param_shardings(abstract, mesh, rules)
  files = tensor_files(path)
  by_path = plan(files, abstract)

  # Shapes first (from the headers), so a mismatch fails before any tensor is read.
  handles: dict[str, Any] = {}
  def handle(file):
    if file not in handles:
      handles[file] = safe_open(file, framework='numpy')
    return handles[file]

  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  shard_leaves = treedef.flatten_up_to(shardings)
  mismatched = []
  for p, leaf in flat:
    name, transform = by_path[sharding_lib.path_str(p)]
    stored = tuple(handle(files[name]).get_slice(name).get_shape())
    want = STORED_SHAPE[transform](leaf.shape)
    if stored != want:
      mismatched.append(f'{name}: checkpoint {stored}, expected {want} (for {sharding_lib.path_str(p)} '
                        f'{tuple(leaf.shape)})')
  if mismatched:
    raise CheckpointError(f'{len(mismatched)} tensors have the wrong shape for the config: '
                          + '; '.join(mismatched[:20]) + ('' if len(mismatched) <= 20 else ' ...'))

  out = []
  for (p, leaf), sharding in zip(flat, shard_leaves):
    name, transform = by_path[sharding_lib.path_str(p)]
    tensor = handle(files[name]).get_tensor(name)  # One full tensor on the host at a time.
    value = TRANSFORMS[transform](tensor)
    out.append(jax.make_array_from_callback(
        leaf.shape, sharding, lambda index, v=value: np.ascontiguousarray(v[index], dtype=dtype)))
    del tensor, value
  handles.clear()
  return jax.tree_util.tree_unflatten(treedef, out)


def num_image_tokens(model_cfg) -> int:
  """Image placeholder tokens one image expands to (patches, plus CLS under 'full')."""
  return vlm_lib.ModelConfig.from_config(model_cfg).num_visual_tokens
