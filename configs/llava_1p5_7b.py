"""Real LLaVA-1.5-7B geometry (CLIP ViT-L/14-336 + Vicuna-7B v1.5), other sections as the tiny config.

Run it:

  python -m gripjax.main --config=configs/llava_1p5_7b.py --mode=eval --workdir=/tmp/llava7b

No 7B weights ship with gripjax (`vlm_checkpoint` is None): the module and parameter names mirror
HF LLaVA-1.5 (see gripjax/models/*.py) so converted weights load one-to-one. Every non-model field
comes from configs/gripbench_tiny.py and is overridden the same way, e.g. `--config.eval.batch_size=8`.
"""

import os

from gripjax import config_lib


def _tiny_config():
  return config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gripbench_tiny.py'))


def get_config(arg=None):
  """Returns the LLaVA-1.5-7B config. `arg` is unused (kept for the get_config(arg) convention)."""
  del arg
  c = _tiny_config()

  # --- Vision tower: CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336). -----------------
  c.model.vit.image_size = 336  # Input resolution in pixels (square).
  c.model.vit.patch_size = 14  # Patch side in pixels: 336 / 14 = 24 x 24 = 576 visual tokens.
  c.model.vit.width = 1024  # Hidden size of the vision tower.
  c.model.vit.depth = 24  # Number of encoder layers.
  c.model.vit.num_heads = 16  # Attention heads.
  c.model.vit.mlp_dim = 4096  # MLP hidden size (quick-GELU).
  c.model.vit.feature_layer = -2  # LLaVA-1.5 takes the penultimate hidden state (mm_vision_select_layer).
  c.model.vit.layer_norm_eps = 1e-5  # LayerNorm epsilon (CLIP).
  c.model.projector_hidden = 4096  # mlp2x_gelu: Linear(1024, 4096) -> GELU -> Linear(4096, 4096).

  # --- Decoder: Vicuna-7B v1.5 (a Llama-2-7B fine-tune). ------------------------------------------
  c.model.llm.vocab_size = 32000  # Llama-2 SentencePiece vocabulary (llava-hf pads it to 32064).
  c.model.llm.width = 4096  # Hidden size of the decoder.
  c.model.llm.depth = 32  # Number of decoder layers.
  c.model.llm.num_heads = 32  # Query heads.
  c.model.llm.num_kv_heads = 32  # Key/value heads: Llama-2-7B has no grouped-query attention.
  c.model.llm.mlp_dim = 11008  # SwiGLU hidden size.
  c.model.llm.rope_theta = 10000.0  # RoPE base.
  # Vicuna v1.5 / Llama-2 (and LLaVA-1.5's checkpoint) use 1e-5; Llama-1 and Vicuna v1.1 used 1e-6.
  c.model.llm.rms_norm_eps = 1e-5  # RMSNorm epsilon.
  c.model.llm.max_len = 4096  # Llama-2 context length.
  c.model.llm.bos_id = 1  # <s> in the Llama tokenizer.
  c.model.position_mode = 'keep'  # 'keep': kept visual tokens keep their positions; 'renumber'.
  c.model.dtype = 'bfloat16'  # Activation dtype; params stay float32.

  # No shipped 7B checkpoint: convert HF weights and point --config.vlm_checkpoint at them.
  c.vlm_checkpoint = None
  return c
