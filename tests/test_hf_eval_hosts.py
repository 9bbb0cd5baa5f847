"""HF-path evaluation sharded over hosts equals one process; the KV-cache column counts the prefix.

Run: .venv/bin/python -m pytest -q tests/test_hf_eval_hosts.py

The two-process test runs `--mode=eval` on the tiny HF fixture (tests/fixtures/hf_llava_tiny, random
weights, LLaVA-1.5's chat template: P = 4 slots `<s> USER: ` before the image) and a 7-row JSONL file
written here, once as one process and once as two (launch/local_processes.py: jax.distributed on
localhost, one CPU device each); about 55 s on a busy 2-core machine. Host 0 reads rows 0-2
(category 'random'), host 1 rows 3-6 ('popular'), of which row 4 has no image file and is skipped:
the hosts know different categories and skip different rows. `eval.num_examples=5` takes the first 5
usable rows of the file: host 0's 3 and host 1's first 2. Some reference answers are what the
fixture generates, so the accuracies and exact-match scores compared are not all zero. The methods
are deterministic (no random keys, no pairing of rows within a batch), so a row's outcome does not
depend on the batch it lands in and the merged results must equal one process's.
"""

import doctest
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image

from gripjax import config_lib
from gripjax import runtime
from gripjax.data import hf_data
from gripjax.eval import evaluate
from gripjax.eval import hf_eval
from gripjax.models import costs
from gripjax.models import vlm as vlm_lib
from gripjax.pruning import inlm
from tests import helpers

ROOT = helpers.ROOT
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'hf_llava_tiny')
# Deterministic methods: two generate (full, fastervlm), two do not (blind, in-LM fastv).
METHODS = "('full','blind','fastervlm','fastv')"
ARGS = ['--mode=eval', f'--config=configs/llava_hf.py:{FIXTURE}', '--config.hf.text_len=40',
        '--config.hf.max_new_tokens=2', '--config.eval.batch_size=2', '--config.eval.budgets=(0.5,)',
        "--config.eval.position_modes=('keep',)", f'--config.eval.methods={METHODS}',
        '--config.hf.data_format=jsonl', '--config.hf.skip_bad_rows=True', '--config.eval.num_examples=5']
TIME_FIELDS = ('seconds', 'prefill_seconds', 'vision_seconds')


# --- KV-cache bytes with a prefix. ----------------------------------------------------------------

def test_kv_cache_bytes_count_the_prefix_slots():
  # Smoke geometry: 2 LM layers, 1 KV head of 16 values, float32. Per slot: 2 layers * (k, v) * 16 * 4 = 256 B.
  config = helpers.load_config('gripbench_tiny', 'smoke')
  # P = 1 (<bos>): S = 1 + 36 kept + 16 text + 4 new = 57 slots.
  assert costs.kv_cache_bytes(config, 36, 16, 4, prefix_len=1) == 57 * 256 == 14592
  assert costs.kv_cache_bytes(config, 36, 16, 4) == 14592  # The default is <bos> alone.
  # P = 5 (a chat template's head): S = 5 + 36 + 16 + 4 = 61 slots.
  assert costs.kv_cache_bytes(config, 36, 16, 4, prefix_len=5) == 61 * 256 == 15616
  assert costs.kv_cache_bytes(config, 9, 16, 0, prefix_len=5, dtype_bytes=2) == (5 + 9 + 16) * 128 == 3840
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match=rf'prefix_len={bad!r}: expected a positive int'):
      costs.kv_cache_bytes(config, 9, 16, prefix_len=bad)


def test_kv_cache_bytes_equal_the_cache_prefill_allocates_after_a_prefix():
  """The fixture's LM (head_dim 16, not width 48 / 4 heads = 12) with a 5-slot prefix: the bytes of the
  cache pytree `VLM.prefill` returns (abstract: nothing runs) for S = 5 + 8 + 40 + 3 slots."""
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'llava_hf.py'), FIXTURE)
  model = vlm_lib.make_vlm(config.model, 201)
  variables = jax.eval_shape(functools.partial(vlm_lib.init_params, model), jax.random.PRNGKey(0))
  p, k, t, m = 5, 8, 40, 3
  shape = jax.ShapeDtypeStruct
  _, cache = jax.eval_shape(
      lambda *a: model.apply(*a[:6], 'keep', p + k + t + m, method=vlm_lib.VLM.prefill, prefix_ids=a[6],
                             prefix_valid=a[7]),
      variables, shape((1, k, 48), jnp.float32), shape((1, k), jnp.int32), shape((1, k), jnp.bool_),
      shape((1, t), jnp.int32), shape((1, t), jnp.bool_), shape((1, p), jnp.int32), shape((1, p), jnp.bool_))
  nbytes = sum(x.size * x.dtype.itemsize for layer in cache['layers'] for x in layer.values())
  # 2 layers * (k, v) * 56 slots * 2 KV heads * 16 values * 4 bytes (float32).
  assert nbytes == 2 * 2 * 56 * 2 * 16 * 4 == 28672
  assert costs.kv_cache_bytes(config, k, t, m, prefix_len=p) == 28672


def test_prefill_flops_use_the_checkpoints_head_dim():
  """The fixture's LM: width 48, 4 query heads and 2 KV heads of Dh = 16 (not 48 / 4 = 12), MLP 96,
  2 layers, vocabulary 201. Per token and layer: q and o project 48 -> 64 and 64 -> 48, k and v
  48 -> 32 each; the scores and weighted values span the 64 query dims."""
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'llava_hf.py'), FIXTURE)
  assert costs.llm_head_dim(config) == 16
  length = 5 + 8 + 40  # P = 5 prefix slots, k = 8 visual, T = 40 text
  layer = 2 * length * 48 * (64 + 32 + 32 + 64) + 2 * length * 48 * 96 * 3 + 2 * 2 * length * length * 64
  assert costs.prefill_flops(config, 8, 40, prefix_len=5) == 2 * layer + 2 * 48 * 201
  # A ranking-only pass (q and k projections, the score matrix), as PyramidDrop's boundaries count it.
  assert costs.attention_probs_flops(config, length) == 2 * length * 48 * (64 + 32) + 2 * length * length * 64


def test_host_rows_and_join_by_hand():
  assert doctest.testmod(hf_eval).failed == 0
  # Hosts holding 3 and 2 usable rows: the first 4 of the whole dataset are host 0's 3 and host 1's first.
  assert [hf_eval.host_rows((3, 2), i, 4) for i in range(2)] == [3, 1]
  assert [hf_eval.host_rows((3, 2), i, 2) for i in range(2)] == [2, 0]
  assert [hf_eval.host_rows((3, 2), i, 99) for i in range(2)] == [3, 2]
  assert [hf_eval.host_rows((3, 2), i, None) for i in range(2)] == [3, 2]
  # One host: its part itself (no copy, dtypes untouched); an empty host adds nothing.
  part = {'a': np.array([0.5], np.float32)}
  assert hf_eval.join_hosts([part]) is part
  joined = hf_eval.join_hosts([{'x': {'c': np.array([True])}, 'e': ['p']},
                               {'x': {'c': np.zeros((0,), np.float64)}, 'e': []}])
  assert joined['x']['c'].dtype == bool and joined['e'] == ['p']
  with pytest.raises(TypeError, match='a part of type int'):
    hf_eval.join_hosts([1, 2])


def test_use_task_names_renumbers_into_every_hosts_categories():
  data = hf_data.HFData(examples=[], prompts=[], question_ids=np.zeros((3, 1)), question_valid=np.zeros((3, 1)),
                        answer_ids=[], task_names=('popular',), task_ids=np.array([0, 0, 0], np.int32),
                        skipped=[], source='pope.parquet', num_rows=7)
  data.use_task_names(('adversarial', 'popular', 'random'))
  assert data.task_names == ('adversarial', 'popular', 'random')
  np.testing.assert_array_equal(data.task_ids, [1, 1, 1])
  with pytest.raises(ValueError, match=r"lack \['adversarial', 'popular'\] of pope\.parquet"):
    data.use_task_names(('random',))


def test_a_host_without_rows_adds_nothing(tmp_path):
  """evaluate() on no batches (a host past config.eval.num_examples), joined after a host with rows,
  gives that host's rows unchanged: the same jobs, counts and columns, nothing of its own."""
  c = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'llava_hf.py'), FIXTURE)
  c.hf.update(data_format='jsonl', data_path=_write_jsonl(tmp_path, ROWS[:3]), text_len=40)
  c.data.max_question_len = 40
  c.eval.update(batch_size=2, budgets=(0.5,), position_modes=('keep',), methods=('full', 'fastervlm'))
  tok = hf_data.PromptTokenizer.from_config(c)
  vlm = runtime.make_model(c, tok)
  params = runtime.load_vlm_params(c, vlm)
  data = hf_data.load_data(c, tok)
  kwargs = dict(progress=False, task_names=data.task_names)
  outcomes = []
  rows = evaluate.evaluate(c, vlm, params, data, tok, c.eval.methods, c.eval.budgets, c.eval.position_modes, 3,
                           batches=hf_data.eval_batches(data, c, 2, 3), gather=lambda x: outcomes.append(x) or x,
                           **kwargs)
  assert [r['n'] for r in rows] == [3, 3] and outcomes[0]['jobs'][('full', 1.0, 'keep')]['correct'].shape == (3,)
  empty = []
  joined = evaluate.evaluate(c, vlm, params, data, tok, c.eval.methods, c.eval.budgets, c.eval.position_modes, 0,
                             batches=iter(()), gather=lambda x: empty.append(x) or hf_eval.join_hosts([outcomes[0], x]),
                             **kwargs)
  assert empty[0]['task'].shape == (0,) and empty[0]['jobs'][('fastervlm', 0.5, 'keep')]['recall'].shape == (0,)
  assert joined == rows


# --- Two processes against one. -------------------------------------------------------------------

# (image, question, answer): 'A yes' and 'chaiSS' are the fixture's greedy answers to rows 0 and 1;
# row 4's image file does not exist.
ROWS = (('chelsea', 'Is there a cat in the image?', 'A yes'), ('coffee', 'Is there a cup?', 'chaiSS'),
        ('rocket', 'Is there a rocket?', 'no'), ('astronaut', 'Is there a person?', 'chai'),
        ('absent', 'Is there a dog?', 'no'), ('camera', 'Is there a man?', 'no'),
        ('chelsea', 'Is there a bird?', 'A'))


def _write_jsonl(tmp_path, rows=ROWS):
  lines = []
  for i, (name, question, answer) in enumerate(rows):
    if name != 'absent':
      Image.fromarray(getattr(skimage.data, name)()).resize((40, 40)).save(tmp_path / f'{name}.png')
    lines.append(json.dumps({'image': f'{name}.png', 'question': question, 'answer': answer,
                             'category': 'random' if i < 3 else 'popular'}))
  path = tmp_path / 'qa.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def _env():
  return helpers.subprocess_env(devices=1)


def _outputs(workdir):
  work = workdir / 'eval'
  rows = json.loads((work / 'results.json').read_text())
  preds = [json.loads(line) for line in (work / 'predictions.jsonl').read_text().splitlines()]
  return rows, preds, (work / 'benchmark.md').read_text()


def test_two_processes_match_one_process(tmp_path):
  data = _write_jsonl(tmp_path)
  one, two = tmp_path / 'one_process', tmp_path / 'two_processes'
  flags = [*ARGS, f'--config.hf.data_path={data}']
  # The two runs share nothing but the data file: run them side by side.
  single = subprocess.Popen([sys.executable, '-m', 'gripjax.main', *flags, f'--workdir={one}'], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    cmd = [sys.executable, os.path.join('launch', 'local_processes.py'), '--num_processes=2',
           '--devices_per_process=1', '--timeout_s=240', f'--log_dir={tmp_path / "logs"}', '--',
           *flags, f'--workdir={two}']
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    _, single_log = single.communicate(timeout=300)
  finally:
    single.kill()
  assert single.returncode == 0, f'one process failed:\n{single_log[-6000:]}'
  logs = [(tmp_path / 'logs' / f'process_{i}.log').read_text() for i in range(2)]
  assert r.returncode == 0, r.stderr[-2000:] + ''.join(f'\n--- process {i}\n{log[-4000:]}'
                                                       for i, log in enumerate(logs))
  assert 'process 0 of 1 evaluates 5 of its 6 rows' in single_log
  assert 'process 0 of 2 evaluates 3 of its 3 rows (usable rows per process [3, 3]; 5 used)' in logs[0]
  assert 'process 1 of 2 evaluates 2 of its 3 rows (usable rows per process [3, 3]; 5 used)' in logs[1]
  # Process 0 alone writes (and prints where); every process evaluated only its own rows.
  assert 'results: ' in logs[0] and 'results: ' not in logs[1]

  rows1, preds1, table1 = _outputs(one)
  rows2, preds2, table2 = _outputs(two)
  assert [(r['method'], r['budget'], r['position_mode']) for r in rows2] == [
      (r['method'], r['budget'], r['position_mode']) for r in rows1]
  by = {r['method']: r for r in rows1}
  # 5 of 6 usable rows (row 4 skipped: no image), both categories; the chat template's 4 prefix slots
  # in the KV-cache column: fixture LM, 2 layers * (k, v) * 2 KV heads * 16 values * 4 bytes = 512 B a slot.
  for r in rows1:
    assert r['n'] == 5 and set(r['per_task']) == {'random', 'popular'}
    assert r['skipped']['missing_image'] == 1 and sum(r['skipped'].values()) == 1
    assert r['data'] == {'source': data, 'num_rows': 7, 'used': 5}
  assert by['full']['kv_cache_bytes'] == (4 + 16 + 40) * 512 == 30720
  assert by['fastervlm']['kv_cache_bytes'] == (4 + 8 + 40) * 512 == 26624
  # In-LM FastV: every layer holds the 3 more prefix slots (2 layers * 3 * 256 B) than with <bos> alone.
  c = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'llava_hf.py'), FIXTURE)
  assert by['fastv']['kv_cache_bytes'] == inlm.inlm_kv_cache_bytes(c, 'fastv', 8, 40) + 2 * 3 * 256
  assert by['full']['generation']['n'] == 5 and by['fastv']['generation'] is None
  for a, b in zip(rows2, rows1):
    assert set(a) == set(b)
    for key in sorted(set(a) - set(TIME_FIELDS)):
      assert a[key] == b[key], (a['method'], key, a[key], b[key])
  assert preds2 == preds1 and len(preds1) == 2 * 5
  assert [p['id'] for p in preds1[:5]] == [f'qa.jsonl:{i}' for i in (0, 1, 2, 3, 5)]
  assert [p['answers'] for p in preds1[:5]] == [[ROWS[i][2]] for i in (0, 1, 2, 3, 5)]
  # The compared numbers are not all zero (they would be equal for any way of joining the hosts).
  assert by['full']['accuracy'] > 0 and by['full']['generation']['scores']['exact_match'] > 0
  assert table2 == table1
