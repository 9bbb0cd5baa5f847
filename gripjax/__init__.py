"""gripjax: GRIP-VLM (Group-Relative Importance Pruning, arXiv 2605.13375) in JAX/Flax.

A small agent, trained with GRPO after a supervised warm-up, chooses which visual tokens a frozen
LLaVA-style VLM keeps, for any keep ratio.
"""

__version__ = '0.1.0'
