"""gripjax: GRIP-VLM (Group-Relative Importance Pruning, arXiv 2605.13375) in JAX/Flax.

A small agent, trained with GRPO after a supervised warm-up, chooses which visual tokens a frozen
LLaVA-style VLM keeps, for any keep ratio.
"""

__version__ = '0.1.0'

__all__ = ['load_bundle']


def __getattr__(name):
  # Lazy, so `import gripjax` (and every submodule import) does not pull in JAX and Orbax.
  if name == 'load_bundle':
    from gripjax.export import load_bundle  # pylint: disable=g-import-not-at-top
    return load_bundle
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
