"""Inference bundle: `--mode=export`, then `load_bundle(...).generate` equals the in-memory model.

Run: .venv/bin/python -m pytest -q tests/test_export.py
"""

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import gripjax
from gripjax import checks
from gripjax import export
from gripjax import runtime
from gripjax.models import scorer as scorer_lib
from gripjax.models import vlm as vlm_lib
from gripjax.pruning import base
from gripjax.pruning import grip
from gripjax.train import checkpoint
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GRIP-Bench questions, every word in the vocabulary (digits are words: 'three', not '3').
QUESTIONS = ('how many digits are there ?', 'what color is the three ?',
             'is the seven left of the two ?')
M = 3  # Tokens decoded per request.


def smoke_config():
  return checks.check_config(helpers.load_config('gripbench_tiny', 'smoke'))


def nondegenerate(abstract, seed):
  """Random params with O(1) activations (kernels ~ N(0, 1/fan_in), unit norms, zero biases), so
  greedy answers differ between requests and budgets and the equalities below are not trivial."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = path[-1].key
    if name == 'scale':
      return np.ones(x.shape, x.dtype)
    if name == 'bias':
      return np.zeros(x.shape, x.dtype)
    fan_in = 1 if name == 'embedding' or x.ndim == 1 else int(np.prod(x.shape[:-1]))
    return rng.normal(0.0, fan_in ** -0.5, x.shape).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """(config, tokenizer, vlm, vlm params, agent params, their checkpoints' dir); smoke geometry."""
  config = smoke_config()
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  rng = jax.random.PRNGKey(0)
  vlm_params = nondegenerate(jax.eval_shape(functools.partial(runtime.init_params, vlm), rng), 0)
  scorer = scorer_lib.make_scorer(config)
  agent_params = nondegenerate(jax.eval_shape(lambda r: scorer_lib.init_scorer(
      scorer, r, runtime.num_visual_tokens_of(vlm), config.model.llm.width,
      config.data.max_question_len), rng), 1)
  root = tmp_path_factory.mktemp('params')
  checkpoint.save_params(str(root / 'vlm'), vlm_params)
  checkpoint.save_params(str(root / 'agent'), agent_params)
  return config, tok, vlm, vlm_params, agent_params, root


@pytest.fixture(scope='module')
def bundle_dir(model, tmp_path_factory):
  """`--mode=export` on the saved VLM and agent, as a subprocess."""
  _, _, _, _, _, root = model
  work = tmp_path_factory.mktemp('export')
  cmd = [sys.executable, '-m', 'gripjax.main', '--config=configs/gripbench_tiny.py:smoke',
         '--mode=export', f'--workdir={work}', f'--config.vlm_checkpoint={root / "vlm"}',
         f'--config.agent.checkpoint={root / "agent"}']
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=helpers.subprocess_env())
  assert r.returncode == 0, r.stderr[-4000:]
  assert r.stdout.strip().splitlines()[-1] == str(work / 'bundle')
  # The terminal shows the project's own lines; Orbax's INFO detail only at --verbosity=1.
  assert 'export: wrote the inference bundle' in r.stderr
  assert not library_info_lines(r.stderr), library_info_lines(r.stderr)[:5]
  return work / 'bundle'


def library_info_lines(stderr):
  """absl INFO lines ('I1202 04:18:53.758 140 file.py:188] ...') logged from Orbax's modules."""
  orbax_files = {f for _, _, files in os.walk(os.path.dirname(ocp.__file__)) for f in files
                 if f.endswith('.py')}
  ours = {f for _, _, files in os.walk(os.path.join(ROOT, 'gripjax')) for f in files}
  lines = []
  for line in stderr.splitlines():
    m = re.match(r'I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]', line)
    if m and m.group(1) in orbax_files - ours:
      lines.append(line)
  return lines


def test_orbax_info_logs_at_verbosity_1(model, tmp_path):
  _, _, _, _, _, root = model
  cmd = [sys.executable, '-m', 'gripjax.main', '--config=configs/gripbench_tiny.py:smoke',
         '--mode=export', f'--workdir={tmp_path}', f'--config.vlm_checkpoint={root / "vlm"}',
         f'--config.agent.checkpoint={root / "agent"}', '--verbosity=1']
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=helpers.subprocess_env())
  assert r.returncode == 0, r.stderr[-4000:]
  assert len(library_info_lines(r.stderr)) > 10


def in_memory_generate(model, images, rho):
  """The reference: the agent's greedy top-k (`pruning.grip`) at rho, gathered, `vlm.generate`."""
  config, tok, vlm, vlm_params, agent_params, _ = model
  variables = {'params': vlm_params}
  ids, valid = (np.stack(x) for x in zip(*(tok.encode_question(q, config.data.max_question_len)
                                           for q in QUESTIONS)))
  n = runtime.num_visual_tokens_of(vlm)
  k = base.budget_to_k(rho, n)
  prune = grip.make_grip_prune(scorer_lib.make_scorer(config), agent_params, rho)

  @jax.jit
  def run(pixels, ids, valid):
    feats = vlm.apply(variables, pixels, method='vision_features')
    visual = vlm.apply(variables, feats['features'], method='project')  # (B, N, D)
    question = vlm.apply(variables, ids, method='embed_text')  # (B, T, D)
    grid = (int(np.sqrt(n)),) * 2
    ctx = base.PruneContext(tokens=visual, features=feats['features'], cls_attn=feats['cls_attn'],
                            question=question, question_mask=valid, rng=jax.random.PRNGKey(0),
                            grid=grid)
    kept = prune(ctx, k)
    valid_kept = jnp.ones(kept.index.shape, bool)  # (B, k)
    return vlm_lib.generate(vlm, variables, kept.tokens, kept.index, valid_kept, ids, valid,
                            position_mode=config.model.position_mode, max_new_tokens=M,
                            eos_id=tok.eos_id)

  tokens = np.asarray(run(jnp.asarray(images), jnp.asarray(ids), jnp.asarray(valid)))
  return [tok.decode(row) for row in tokens], tokens


def test_bundle_layout_and_round_trip(model, bundle_dir):
  config, tok, _, vlm_params, agent_params, root = model
  want_files = ['agent', 'bundle.json', 'config.json', 'vlm', 'vocab.txt']
  assert sorted(os.listdir(bundle_dir)) == want_files
  assert not [p for p in os.listdir(bundle_dir.parent) if '.tmp-' in p or '.old-' in p]
  manifest = json.loads((bundle_dir / 'bundle.json').read_text())
  assert manifest['format'] == export.FORMAT and manifest['num_visual_tokens'] == 36
  assert manifest['source'] == {'vlm_checkpoint': str(root / 'vlm'),
                                'agent_checkpoint': str(root / 'agent')}
  bundle = gripjax.load_bundle(str(bundle_dir))
  assert bundle.tokenizer.tokens == tok.tokens
  assert bundle.config.vlm_checkpoint == str(bundle_dir / 'vlm')
  want = config.to_dict()
  got = bundle.config.to_dict()
  for c in (want, got):
    c.pop('vlm_checkpoint')
    c['agent'].pop('checkpoint')
  want['model']['llm']['vocab_size'] = tok.vocab_size  # Resolved from 0 (the tokenizer's).
  assert got == want  # Tuples are tuples again.
  for a, b in ((bundle.vlm_params, vlm_params), (bundle.agent_params, agent_params)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(np.asarray(x), y)


def test_load_bundle_generate_equals_in_memory_model(model, bundle_dir):
  images = np.random.default_rng(3).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
  bundle = gripjax.load_bundle(str(bundle_dir), batch_sizes=(4,))
  rho = 0.25
  got, got_ids = bundle.generate(images, list(QUESTIONS), rho, M, return_tokens=True)
  want, want_ids = in_memory_generate(model, images, rho)
  np.testing.assert_array_equal(got_ids, want_ids)
  assert got == want
  assert len({tuple(row) for row in got_ids}) > 1, got  # Not trivially equal: answers differ.


def test_export_without_agent_fails_naming_the_field(tmp_path):
  config = smoke_config()
  with pytest.raises(ValueError, match=r'config.agent.checkpoint=None and .*agent does not exist'):
    export.run(config, str(tmp_path))


def test_load_bundle_refuses_an_incomplete_directory(tmp_path):
  (tmp_path / 'vlm').mkdir()
  with pytest.raises(FileNotFoundError, match='is not an inference bundle: it has no bundle.json'):
    gripjax.load_bundle(str(tmp_path))


def test_questions_are_in_the_vocabulary():
  tok = runtime.tokenizer()
  for q in QUESTIONS:
    assert not tok.unknown_words(q), q
    tok.encode_question(q, smoke_config().data.max_question_len, on_bad_question='error')


# --- A damaged bundle is refused, naming the file. ------------------------------------------------

def damaged_copy(bundle_dir, tmp_path, damage):
  """A copy of the bundle with `damage(copy)` applied; returns the copy's path."""
  copy = tmp_path / 'bundle'
  shutil.copytree(bundle_dir, copy)
  damage(copy)
  return copy


def test_bundle_records_checksums_of_every_file(bundle_dir):
  manifest = json.loads((bundle_dir / 'bundle.json').read_text())
  files = sorted(os.path.relpath(os.path.join(d, f), bundle_dir)
                 for d, _, names in os.walk(bundle_dir) for f in names if f != 'bundle.json')
  assert sorted(manifest['files']) == files
  with open(bundle_dir / 'vocab.txt', 'rb') as f:
    assert manifest['files']['vocab.txt'] == hashlib.sha256(f.read()).hexdigest()
  assert manifest['vocab_size'] == runtime.tokenizer().vocab_size and manifest['version'] == 2


def test_vocab_that_lost_lines_is_refused(bundle_dir, tmp_path):
  def lose_lines(b):
    lines = (b / 'vocab.txt').read_text().splitlines()
    (b / 'vocab.txt').write_text('\n'.join(lines[:-2]) + '\n')
  n = runtime.tokenizer().vocab_size
  bad = damaged_copy(bundle_dir, tmp_path, lose_lines)
  with pytest.raises(export.BundleError, match=rf'{bad / "vocab.txt"} is damaged: it holds {n - 2} '
                     rf'tokens, the bundle was exported with {n}'):
    gripjax.load_bundle(str(bad))
  with pytest.raises(export.BundleError, match='vocab.txt is damaged'):  # Without the checksums too.
    gripjax.load_bundle(str(bad), verify=False)


def test_vocab_with_two_words_swapped_is_refused(bundle_dir, tmp_path):
  def swap(b):
    lines = (b / 'vocab.txt').read_text().splitlines()
    i, j = lines.index('three'), lines.index('seven')
    lines[i], lines[j] = lines[j], lines[i]
    (b / 'vocab.txt').write_text('\n'.join(lines) + '\n')
  bad = damaged_copy(bundle_dir, tmp_path, swap)
  with pytest.raises(export.BundleError, match=rf'{bad / "vocab.txt"} is damaged: its sha256 is '
                     r'[0-9a-f]{64}, the export recorded [0-9a-f]{64}'):
    gripjax.load_bundle(str(bad))


def _truncate(path):
  text = path.read_text()
  path.write_text(text[:len(text) // 2])


def test_truncated_manifest_and_config_are_named(bundle_dir, tmp_path):
  bad = damaged_copy(bundle_dir, tmp_path, lambda b: _truncate(b / 'bundle.json'))
  with pytest.raises(export.BundleError, match=rf'{bad / "bundle.json"} is damaged: the manifest is '
                     'not valid JSON'):
    gripjax.load_bundle(str(bad))
  shutil.rmtree(bad)
  bad = damaged_copy(bundle_dir, tmp_path, lambda b: _truncate(b / 'config.json'))
  with pytest.raises(export.BundleError, match=rf'{bad / "config.json"} is damaged: its sha256'):
    gripjax.load_bundle(str(bad))
  with pytest.raises(export.BundleError, match=rf'{bad / "config.json"} is damaged: the config is '
                     'not valid JSON'):
    gripjax.load_bundle(str(bad), verify=False)


def test_truncated_checkpoint_file_is_named(bundle_dir, tmp_path):
  def truncate_data(b):
    data = b / 'vlm' / 'd'
    name = sorted(os.listdir(data))[0]
    with open(data / name, 'r+b') as f:
      f.truncate(os.path.getsize(data / name) // 2)
  bad = damaged_copy(bundle_dir, tmp_path, truncate_data)
  name = sorted(os.listdir(bad / 'vlm' / 'd'))[0]
  with pytest.raises(export.BundleError, match=rf'{bad / "vlm" / "d" / name} is damaged'):
    gripjax.load_bundle(str(bad))


def test_bundle_generate_refuses_bad_pixels(bundle_dir):
  bundle = gripjax.load_bundle(str(bundle_dir), batch_sizes=(4,))
  pixels = np.random.default_rng(3).integers(0, 256, (3, 48, 48, 3)).astype(np.float32)  # 0-255
  with pytest.raises(ValueError, match=r'images\[0\] has float pixels in \[0, 255\]: expected floats '
                     r'in \[0, 1\]'):
    bundle.generate(pixels, list(QUESTIONS), 0.25)
  pixels /= 255.0
  pixels[1, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r'images\[1\] has 1 non-finite pixel value'):
    bundle.generate(pixels, list(QUESTIONS), 0.25)
