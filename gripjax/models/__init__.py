"""Flax Linen models: the CLIP vision tower, the Llama decoder and the LLaVA-style VLM."""

from gripjax.models.llm import Llama, LlmConfig
from gripjax.models.vit import ClipVisionTower, VitConfig
from gripjax.models.vlm import (POSITION_MODES, VLM, ModelConfig, Projector, count_params, generate,
                                init_params, make_vlm)
