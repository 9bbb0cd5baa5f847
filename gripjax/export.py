"""Inference bundle: the frozen VLM, the trained agent, the config and the tokenizer, in one place.

  # Write WORKDIR/bundle from a trained agent (WORKDIR/agent, or --config.agent.checkpoint=PATH):
  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=export --workdir=/tmp/agent

  import gripjax
  bundle = gripjax.load_bundle('/tmp/agent/bundle')
  answers = bundle.generate(images, ['how many digits are there?', ...], budget=0.25)

`generate` runs the agent as the pruner (the greedy top-k of its scores at each request's keep
ratio, as `pruning.grip` does), gathers the k kept visual tokens and decodes greedily with the KV
cache on that shorter sequence (`inference.PrunedGenerator`: one compiled function per kept-token
count and padded batch size). Any budget in (0, 1] works; a list gives each request its own.

Layout (everything a fresh process needs; nothing points back at the training workdir):

  BUNDLE/bundle.json   manifest, written last: format and version, file names, geometry, sources
  BUNDLE/config.json   the full config (`ConfigDict.to_json`; `read_config` restores the tuples)
  BUNDLE/vocab.txt     the tokenizer's vocabulary, one token per line (line number = id)
  BUNDLE/vlm/          Orbax checkpoint of the VLM params (the inner 'params' tree)
  BUNDLE/agent/        Orbax checkpoint of the agent (scorer) params

A local bundle is written to a temporary sibling and renamed into place, so a reader never sees half
of one. A TensorFlow SavedModel export (orbax-export) is not provided.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from typing import Any, Optional, Sequence

from absl import logging
import jax
import ml_collections

from gripjax import config_lib

FORMAT = 'gripjax-bundle'
VERSION = 1
MANIFEST = 'bundle.json'
CONFIG_FILE = 'config.json'
VOCAB_FILE = 'vocab.txt'
VLM_DIR = 'vlm'
AGENT_DIR = 'agent'


# --- Config round trip. --------------------------------------------------------------------------

def _tuples(x):
  """JSON lists back to the tuples configs use (ml_collections cannot override lists)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json(indent=2, sort_keys=True)


def read_config(text: str) -> ml_collections.ConfigDict:
  """The ConfigDict of `config_to_json` output, validated."""
  return config_lib.validate(ml_collections.ConfigDict(_tuples(json.loads(text))))


# --- Writing. ------------------------------------------------------------------------------------

def _abstract_params(config, vlm):
  """(VLM, agent) abstract param trees of `config`'s geometry (nothing allocated)."""
  from gripjax import runtime  # pylint: disable=g-import-not-at-top
  from gripjax.models import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
  rng = jax.random.PRNGKey(0)
  vlm_abstract = jax.eval_shape(functools.partial(runtime.init_params, vlm), rng)
  scorer = scorer_lib.make_scorer(config)
  agent_abstract = jax.eval_shape(lambda r: scorer_lib.init_scorer(
      scorer, r, runtime.num_visual_tokens_of(vlm), config.model.llm.width,
      config.data.max_question_len), rng)
  return vlm_abstract, agent_abstract


def _check_tree(name: str, tree, abstract) -> None:
  """Raises unless `tree` has the structure, shapes and dtypes of `abstract`."""
  got = jax.tree_util.tree_structure(tree)
  want = jax.tree_util.tree_structure(abstract)
  if got != want:
    raise ValueError(f"{name} do not match the config's geometry: expected the tree {want}, "
                     f'got {got}.')
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(abstract)):
    if tuple(x.shape) != tuple(y.shape) or jax.numpy.dtype(x.dtype) != y.dtype:
      raise ValueError(f'{name} leaf {jax.tree_util.keystr(path)} has shape {tuple(x.shape)} '
                       f'{x.dtype}; the config expects {tuple(y.shape)} {y.dtype}.')


def export_bundle(path: str, config: ml_collections.ConfigDict, vlm_params, agent_params,
                  tokenizer, source: Optional[dict[str, Any]] = None) -> str:
  """Writes an inference bundle to `path` (replacing one there); returns the path.

  Args:
    path: the bundle directory (local, or a bucket URL such as gs://...).
    config: the full config the params belong to.
    vlm_params: the VLM's params (inner 'params' tree).
    agent_params: the scorer's params (inner 'params' tree).
    tokenizer: the `Tokenizer` the VLM was trained with.
    source: where the params came from, recorded in the manifest.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  from gripjax import runtime  # pylint: disable=g-import-not-at-top
  from gripjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(config)
  config.model.llm.vocab_size = runtime.vocab_size(config, tokenizer)  # Self-contained geometry.
  config.vlm_checkpoint = None  # `load_bundle` points these at the bundle's own checkpoints.
  config.agent.checkpoint = None
  config_lib.validate(config)
  vlm = runtime.make_model(config, tokenizer)
  vlm_abstract, agent_abstract = _abstract_params(config, vlm)
  _check_tree('vlm_params', vlm_params, vlm_abstract)
  _check_tree('agent_params', agent_params, agent_abstract)

  local = '://' not in str(path)
  final = epath.Path(os.path.abspath(path) if local else path)
  # Locally: write a temporary sibling, then swap it in. Buckets have no atomic rename: the manifest
  # is written last there, and `load_bundle` refuses a directory without one.
  work = final.parent / f'{final.name}.tmp-{os.getpid()}' if local else final
  if work.exists():
    work.rmtree()
  work.mkdir(parents=True)
  checkpoint.save_params(str(work / VLM_DIR), vlm_params)
  checkpoint.save_params(str(work / AGENT_DIR), agent_params)
  (work / CONFIG_FILE).write_text(config_to_json(config))
  (work / VOCAB_FILE).write_text('\n'.join(tokenizer.tokens) + '\n')
  manifest = {
      'format': FORMAT, 'version': VERSION, 'config': CONFIG_FILE, 'vocab': VOCAB_FILE,
      'vlm': VLM_DIR, 'agent': AGENT_DIR, 'num_visual_tokens': runtime.num_visual_tokens_of(vlm),
      'vocab_size': tokenizer.vocab_size, 'max_question_len': int(config.data.max_question_len),
      'position_mode': config.model.position_mode, 'source': source or {},
  }
  from gripjax import __version__  # pylint: disable=g-import-not-at-top
  manifest['gripjax_version'] = __version__
  (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
  if local:
    old = final.parent / f'{final.name}.old-{os.getpid()}'
    if final.exists():
      final.rename(old)
    work.rename(final)
    if old.exists():
      old.rmtree()
  logging.info('export: wrote the inference bundle to %s', final)
  return str(final)


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`--mode=export`: bundles config.vlm_checkpoint and the trained agent; returns the bundle path.

  The agent is `config.agent.checkpoint`, or WORKDIR/agent (what --mode=train_agent writes there).
  The bundle goes to `config.export.dir`, or WORKDIR/bundle.
  """
  from gripjax import runtime  # pylint: disable=g-import-not-at-top
  from gripjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  agent_path = config_lib.resolve_path(config.agent.checkpoint)
  if agent_path is None:
    agent_path = os.path.join(workdir, 'agent')
    if not epath.Path(agent_path).exists():
      raise ValueError(f'config.agent.checkpoint=None and {agent_path} does not exist: expected '
                       'the trained agent, from --mode=train_agent in this --workdir or given as '
                       '--config.agent.checkpoint=PATH.')
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  vlm_params = runtime.load_vlm_params(config, vlm)
  _, agent_abstract = _abstract_params(config, vlm)
  agent_params = checkpoint.load_params(agent_path, agent_abstract)
  export_dir = config.export.dir if 'export' in config else None
  out = export_dir or os.path.join(workdir, 'bundle')
  return export_bundle(out, config, vlm_params, agent_params, tok,
                       source={'vlm_checkpoint': config_lib.resolve_path(config.vlm_checkpoint),
                               'agent_checkpoint': agent_path})


# --- Reading. ------------------------------------------------------------------------------------

class Bundle:
  """A loaded inference bundle: the models, their params and `generate`.

  Attributes:
    path: the bundle directory.
    manifest: its bundle.json.
    config: the ConfigDict (vlm_checkpoint and agent.checkpoint point into the bundle).
    tokenizer, vlm, vlm_params, scorer, agent_params: what `generate` runs.
    generator: the `inference.PrunedGenerator` behind `generate` (its compiled buckets persist).
  """

  def __init__(self, path, manifest, config, tokenizer, vlm, vlm_params, agent_params,
               batch_sizes: Optional[Sequence[int]] = None):
    from gripjax import inference  # pylint: disable=g-import-not-at-top
    from gripjax.models import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
    self.path = path
    self.manifest = manifest
    self.config = config
    self.tokenizer = tokenizer
    self.vlm = vlm
    self.vlm_params = vlm_params
    self.scorer = scorer_lib.make_scorer(config)
    self.agent_params = agent_params
    kwargs = {} if batch_sizes is None else {'batch_sizes': batch_sizes}
    self.generator = inference.PrunedGenerator(config, vlm, vlm_params, tokenizer, 'grip',
                                               agent_params, **kwargs)

  def generate(self, images, questions: Sequence[str], budget=1.0, max_new_tokens: int = 1, *,
               return_tokens: bool = False):
    """Answers each (image, question), keeping ceil(budget * N) visual tokens chosen by the agent.

    Args:
      images: (B, H, W, 3) uint8 pixels in [0, 255] or floats in [0, 1], H = W = the model's size.
      questions: B question strings.
      budget: a keep ratio in (0, 1] for every request, or B of them.
      max_new_tokens: greedy tokens decoded per request.
      return_tokens: also return the (B, max_new_tokens) generated ids.

    Returns:
      B answer strings (and the ids with return_tokens).
    """
    return self.generator.generate(images, questions, budget, max_new_tokens,
                                   return_tokens=return_tokens)

  def __repr__(self):
    return (f'Bundle({str(self.path)!r}, N={self.manifest.get("num_visual_tokens")}, '
            f'vocab={self.tokenizer.vocab_size})')


def load_bundle(path: str, batch_sizes: Optional[Sequence[int]] = None) -> Bundle:
  """Loads an inference bundle written by `export_bundle` / `--mode=export`.

  Args:
    path: the bundle directory.
    batch_sizes: padded batch sizes `generate` compiles for (default: PrunedGenerator's).

  Returns:
    A `Bundle`; `bundle.generate(images, questions, budget)` answers with the agent's pruning.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  from gripjax import runtime  # pylint: disable=g-import-not-at-top
  from gripjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from gripjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  root = epath.Path(os.path.abspath(path) if '://' not in str(path) else path)
  manifest_path = root / MANIFEST
  if not manifest_path.exists():
    raise FileNotFoundError(f'{root} is not an inference bundle: it has no {MANIFEST} (write one '
                            'with --mode=export; an interrupted export leaves none).')
  manifest = json.loads(manifest_path.read_text())
  if manifest.get('format') != FORMAT or manifest.get('version') != VERSION:
    raise ValueError(f'{manifest_path} has format {manifest.get("format")!r} version '
                     f'{manifest.get("version")!r}: expected {FORMAT!r} version {VERSION}.')
  config = read_config((root / manifest['config']).read_text())
  tokens = [t for t in (root / manifest['vocab']).read_text().split('\n') if t.strip()]
  tok = tokenizer_lib.Tokenizer(tokens)
  config.vlm_checkpoint = str(root / manifest['vlm'])
  config.agent.checkpoint = str(root / manifest['agent'])
  vlm = runtime.make_model(config, tok)
  vlm_abstract, agent_abstract = _abstract_params(config, vlm)
  vlm_params = checkpoint.load_params(config.vlm_checkpoint, vlm_abstract)
  agent_params = checkpoint.load_params(config.agent.checkpoint, agent_abstract)
  return Bundle(str(root), manifest, config, tok, vlm, vlm_params, agent_params, batch_sizes)
