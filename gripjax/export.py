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

  BUNDLE/bundle.json   manifest, written last: format and version, file names, geometry, sources,
                       the vocabulary size and the sha256 of every other file of the bundle
  BUNDLE/config.json   the full config (`ConfigDict.to_json`; `read_config` restores the tuples)
  BUNDLE/vocab.txt     the tokenizer's vocabulary, one token per line (line number = id)
  BUNDLE/tokenizer/    instead of vocab.txt for an HF checkpoint (a config with an `hf` section):
                       its tokenizer files, config.json and processor config (hf_data.TOKENIZER_FILES),
                       read back with the config's chat template (hf_data.PromptTokenizer)
  BUNDLE/vlm/          Orbax checkpoint of the VLM params (the inner 'params' tree)
  BUNDLE/agent/        Orbax checkpoint of the agent (scorer) params

A local bundle is written to a temporary sibling and renamed into place, so a reader never sees half
of one. A TensorFlow SavedModel export (orbax-export) is not provided.

`load_bundle` verifies before it loads: bundle.json and config.json must parse, vocab.txt must hold
the recorded number of tokens, and every file must have the sha256 the export recorded, so a bundle
whose vocab.txt lost lines or had two words swapped, or whose checkpoint files were truncated, is
refused with a `BundleError` naming the damaged file, instead of loading and answering wrongly.
(Bundles of format version 1 carry no checksums: they load with a warning.)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from typing import Any, Optional, Sequence

from absl import logging
from etils import epath
import jax
import ml_collections

import gripjax
from gripjax import checks
from gripjax import config_lib
from gripjax import inference
from gripjax import runtime
from gripjax.data import hf_data
from gripjax.data import tokenizer as tokenizer_lib
from gripjax.models import scorer as scorer_lib
from gripjax.train import checkpoint

FORMAT = 'gripjax-bundle'
VERSION = 2  # 2: the manifest records the sha256 of every file ('files').
READABLE_VERSIONS = (1, 2)
MANIFEST = 'bundle.json'
CONFIG_FILE = 'config.json'
VOCAB_FILE = 'vocab.txt'
TOKENIZER_DIR = 'tokenizer'  # An HF checkpoint's tokenizer files (instead of VOCAB_FILE).
VLM_DIR = 'vlm'
AGENT_DIR = 'agent'


class BundleError(ValueError):
  """A bundle that cannot be trusted: a file missing, damaged or changed since the export."""


def _sha256(path) -> str:
  h = hashlib.sha256()
  with path.open('rb') as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def bundle_files(root) -> dict[str, str]:
  """{path relative to `root` ('vlm/_METADATA', ...): sha256} of every file but the manifest."""
  files = {}
  for directory, _, names in root.walk():
    for name in names:
      rel = str((directory / name).relative_to(root))
      if rel != MANIFEST:
        files[rel] = _sha256(directory / name)
  return dict(sorted(files.items()))


def _read_json(path, what: str):
  """Parsed JSON of bundle file `path`; BundleError naming it when it is not valid JSON."""
  text = path.read_text()
  try:
    return json.loads(text)
  except ValueError as e:
    raise BundleError(f'{path} is damaged: {what} is not valid JSON ({e}; {len(text)} characters '
                      'read). Export the bundle again (--mode=export).') from None


def _check_vocab_size(root, manifest: dict[str, Any]) -> None:
  """BundleError unless vocab.txt holds the manifest's `vocab_size` tokens."""
  if manifest.get('vocab') is None:  # An HF tokenizer: its files are covered by the checksums.
    return
  vocab_path = root / manifest['vocab']
  want = manifest.get('vocab_size')
  if vocab_path.exists() and isinstance(want, int):
    got = len(_vocab_tokens(vocab_path.read_text()))
    if got != want:
      raise BundleError(f'{vocab_path} is damaged: it holds {got} tokens, the bundle was exported '
                        f'with {want}. Export the bundle again (--mode=export).')


def verify_bundle(root, manifest: dict[str, Any]) -> None:
  """Checks the vocabulary size and every file's sha256 against `manifest`.

  Raises:
    BundleError: naming the damaged, missing or unexpected file.
  """
  _check_vocab_size(root, manifest)
  files = manifest.get('files')
  if files is None:
    logging.warning('%s has no checksums (bundle format version %s): its files cannot be verified; '
                    'export it again for a verified bundle.', root / MANIFEST, manifest.get('version'))
    return
  if not isinstance(files, dict):
    raise BundleError(f"{root / MANIFEST} is damaged: 'files' is {type(files).__name__}, expected "
                      'a mapping of file names to sha256 checksums.')
  for rel, want in files.items():
    path = root / rel
    if not path.exists():
      raise BundleError(f'{path} is missing from the bundle (the export recorded it). Export the '
                        'bundle again (--mode=export).')
    got = _sha256(path)
    if got != want:
      raise BundleError(f'{path} is damaged: its sha256 is {got}, the export recorded {want} (the '
                        'file was changed, truncated or replaced since). Export the bundle again '
                        '(--mode=export).')
  extra = sorted(set(bundle_files(root)) - set(files))
  if extra:
    raise BundleError(f'{root} holds files the export did not write: {extra[:5]}; a checkpoint '
                      'directory with foreign files may not read back as exported. Remove them or '
                      'export the bundle again.')


def _vocab_tokens(text: str) -> list[str]:
  """vocab.txt's tokens: one per non-blank line."""
  return [t for t in text.split('\n') if t.strip()]


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
  return checks.check_config(ml_collections.ConfigDict(_tuples(json.loads(text))))


# --- Writing. ------------------------------------------------------------------------------------

def _abstract_params(config, vlm):
  """(VLM, agent) abstract param trees of `config`'s geometry (nothing allocated)."""
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
  config = copy.deepcopy(config)
  config.model.llm.vocab_size = runtime.vocab_size(config, tokenizer)  # Self-contained geometry.
  config.vlm_checkpoint = None  # `load_bundle` points these at the bundle's own checkpoints.
  config.agent.checkpoint = None
  checks.check_config(config)
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
  hf = 'hf' in config
  if hf:  # The checkpoint's tokenizer files; load_bundle pairs them with config.hf.template.
    (work / TOKENIZER_DIR).mkdir()
    for name, data in hf_data.tokenizer_files(config).items():
      (work / TOKENIZER_DIR / name).write_bytes(data)
  else:
    (work / VOCAB_FILE).write_text('\n'.join(tokenizer.tokens) + '\n')
  files = bundle_files(work)  # sha256 of every file, verified by `load_bundle`.
  manifest = {
      'format': FORMAT, 'version': VERSION, 'config': CONFIG_FILE, 'vocab': None if hf else VOCAB_FILE,
      'tokenizer': TOKENIZER_DIR if hf else None,
      'vlm': VLM_DIR, 'agent': AGENT_DIR, 'num_visual_tokens': runtime.num_visual_tokens_of(vlm),
      'vocab_size': tokenizer.vocab_size, 'max_question_len': int(config.data.max_question_len),
      'position_mode': config.model.position_mode, 'source': source or {}, 'files': files,
  }
  manifest['gripjax_version'] = gripjax.__version__
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
  agent_path = config_lib.resolve_path(config.agent.checkpoint)
  if agent_path is None:
    agent_path = os.path.join(workdir, 'agent')
    if not epath.Path(agent_path).exists():
      raise ValueError(f'config.agent.checkpoint=None and {agent_path} does not exist: expected '
                       'the trained agent, from --mode=train_agent in this --workdir or given as '
                       '--config.agent.checkpoint=PATH.')
  tok = runtime.tokenizer_for(config)
  vlm = runtime.make_model(config, tok)
  vlm_params = runtime.load_vlm_params(config, vlm)
  _, agent_abstract = _abstract_params(config, vlm)
  agent_params = checkpoint.load_params(agent_path, agent_abstract)
  export_dir = config.export.dir if 'export' in config else None
  out = export_dir or os.path.join(workdir, 'bundle')
  source = {'vlm_checkpoint': config_lib.resolve_path(config.vlm_checkpoint), 'agent_checkpoint': agent_path}
  if 'hf' in config:  # The VLM's weights are the HF checkpoint's.
    source['hf_checkpoint'] = config_lib.resolve_path(config.hf.checkpoint)
  return export_bundle(out, config, vlm_params, agent_params, tok, source=source)


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
    self.path = path
    self.manifest = manifest
    self.config = config
    self.tokenizer = tokenizer
    self.vlm = vlm
    self.vlm_params = vlm_params
    self.scorer = scorer_lib.make_scorer(config)
    self.agent_params = agent_params
    kwargs = {} if batch_sizes is None else {'batch_sizes': batch_sizes}
    # An HF tokenizer's chat template may put text before the image (hf_data.PromptTokenizer).
    kwargs['prefix_ids'] = getattr(tokenizer, 'layout_prefix', None)
    self.generator = inference.PrunedGenerator(config, vlm, vlm_params, tokenizer, 'grip',
                                               agent_params, **kwargs)

  def generate(self, images, questions: Sequence[str], budget=1.0, max_new_tokens: int = 1, *,
               return_tokens: bool = False):
    """Answers each (image, question), keeping ceil(budget * N) visual tokens chosen by the agent.

    Args:
      images: (B, H, W, 3) uint8 pixels in [0, 255] or floats in [0, 1], H = W = the model's size;
        floats outside [0, 1] (e.g. 0-255) or NaN/inf pixels raise ValueError naming the image.
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


def load_bundle(path: str, batch_sizes: Optional[Sequence[int]] = None, verify: bool = True
                ) -> Bundle:
  """Loads an inference bundle written by `export_bundle` / `--mode=export`.

  Args:
    path: the bundle directory.
    batch_sizes: padded batch sizes `generate` compiles for (default: PrunedGenerator's).
    verify: check every file's sha256 and the vocabulary size against bundle.json first (reads
      the whole bundle once; False skips the checksums, not the JSON and vocabulary checks).

  Returns:
    A `Bundle`; `bundle.generate(images, questions, budget)` answers with the agent's pruning.

  Raises:
    FileNotFoundError: no bundle.json.
    BundleError: a file missing, damaged or changed since the export, named.
  """
  root = epath.Path(os.path.abspath(path) if '://' not in str(path) else path)
  manifest_path = root / MANIFEST
  if not manifest_path.exists():
    raise FileNotFoundError(f'{root} is not an inference bundle: it has no {MANIFEST} (write one '
                            'with --mode=export; an interrupted export leaves none).')
  manifest = _read_json(manifest_path, 'the manifest')
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT or \
      manifest.get('version') not in READABLE_VERSIONS:
    got = manifest if not isinstance(manifest, dict) else (
        f'format {manifest.get("format")!r} version {manifest.get("version")!r}')
    raise BundleError(f'{manifest_path} has {got}: expected {FORMAT!r} version '
                      f'{" or ".join(map(str, READABLE_VERSIONS))}.')
  tokenizer_key = 'tokenizer' if manifest.get('tokenizer') else 'vocab'  # HF tokenizer files, or vocab.txt.
  missing = [k for k in ('config', tokenizer_key, 'vlm', 'agent') if not isinstance(manifest.get(k), str)]
  if missing:
    raise BundleError(f'{manifest_path} is damaged: it lacks the entries {missing}. Export the '
                      'bundle again (--mode=export).')
  if verify:
    verify_bundle(root, manifest)
  else:
    _check_vocab_size(root, manifest)
  config_json = _read_json(root / manifest['config'], 'the config')
  if tokenizer_key == 'tokenizer':  # The tokenizer (and the start-up check) read the bundle's copy.
    config_json['hf'].update(checkpoint=str(root / manifest['tokenizer']), tokenizer=None)
  config = read_config(json.dumps(config_json))
  if tokenizer_key == 'tokenizer':
    tok = hf_data.PromptTokenizer.from_config(config)
    if tok.vocab_size != manifest.get('vocab_size'):
      raise BundleError(f'{root / manifest["tokenizer"]} is damaged: its tokenizer has {tok.vocab_size} tokens, '
                        f'the bundle was exported with {manifest.get("vocab_size")}.')
  else:
    tok = tokenizer_lib.Tokenizer(_vocab_tokens((root / manifest['vocab']).read_text()))
  config.vlm_checkpoint = str(root / manifest['vlm'])
  config.agent.checkpoint = str(root / manifest['agent'])
  vlm = runtime.make_model(config, tok)
  vlm_abstract, agent_abstract = _abstract_params(config, vlm)
  vlm_params = checkpoint.load_params(config.vlm_checkpoint, vlm_abstract)
  agent_params = checkpoint.load_params(config.agent.checkpoint, agent_abstract)
  return Bundle(str(root), manifest, config, tok, vlm, vlm_params, agent_params, batch_sizes)
