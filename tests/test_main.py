"""Smoke runs of every entry-point mode, as subprocesses, on the smoke-sized config."""

import json
import os
import subprocess
import sys

import pytest

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = 'configs/gripbench_tiny.py:smoke'


def _main(workdir, mode, *overrides, data_dir=None, check=True):
  cmd = [sys.executable, '-m', 'gripjax.main', f'--config={SMOKE}', f'--mode={mode}',
         f'--workdir={workdir}', *overrides]
  if data_dir:
    cmd.append(f'--config.data.data_dir={data_dir}')
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=helpers.subprocess_env())
  if check:
    assert r.returncode == 0, f'{mode} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}'
  return r


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, data_dir):
  """A smoke VLM: 2 vision steps, then (in a second run that resumes) 2 LM steps."""
  work = tmp_path_factory.mktemp('vlm')
  _main(work, 'pretrain_vlm', '--config.pretrain.lm_steps=0', data_dir=data_dir)
  second = _main(work, 'pretrain_vlm', data_dir=data_dir)
  return work, second


def test_pretrain_vlm_logs_stages_and_image_dependence(pretrained):
  work, _ = pretrained
  summary = json.loads((work / 'vlm_metrics.json').read_text())
  for key in ('accuracy', 'per_task', 'accuracy_shuffled_images', 'accuracy_no_image',
              'question_only_prior', 'train_seconds'):
    assert key in summary
  log = [json.loads(line) for line in (work / 'pretrain_log.jsonl').read_text().splitlines()]
  assert [row['stage'] for row in log] == ['vision', 'vision', 'lm', 'lm']
  assert 'logit_spread_across_images' in log[-1] and 'visual_var_across_images' in log[-1]


def test_pretrain_vlm_resumes_from_its_checkpoint(pretrained):
  work, second = pretrained
  log = [json.loads(line) for line in (work / 'pretrain_log.jsonl').read_text().splitlines()]
  # The second run continued at step 3 instead of redoing the vision stage.
  assert [row['step'] for row in log] == [1, 2, 3, 4]
  assert 'restored checkpoint at step 2' in second.stderr


def test_eval_writes_results_and_report(tmp_path, pretrained, data_dir):
  work, _ = pretrained
  methods = "('full','blind','shuffled','fastervlm','fastv')"
  _main(tmp_path, 'eval', f'--config.eval.methods={methods}', '--config.eval.budgets=(0.25,)',
        "--config.eval.position_modes=('keep','renumber')", f'--config.vlm_checkpoint={work / "vlm"}',
        data_dir=data_dir)
  rows = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  seen = {(r['method'], r['position_mode']) for r in rows}
  for method in ('fastervlm', 'fastv', 'full'):
    for mode in ('keep', 'renumber'):
      assert (method, mode) in seen
  for r in rows:
    for key in ('method', 'budget', 'kept_tokens', 'accuracy', 'n', 'per_task', 'region_recall',
                'prefill_flops', 'kv_cache_bytes', 'prefill_seconds', 'seconds'):
      assert key in r
    assert r['n'] == 24
  k = {r['method']: r['kept_tokens'] for r in rows if r['budget'] == 0.25}
  assert k['fastervlm'] == 9 and k['fastv'] == 9  # ceil(0.25 * 36)
  flops = {r['method']: r['prefill_flops'] for r in rows if r['position_mode'] == 'keep'}
  assert flops['blind'] < flops['fastervlm'] < flops['fastv'] < flops['full']
  by = {(r['method'], r['position_mode']): r for r in rows}
  fastv = by['fastv', 'keep']['examples']
  assert fastv['index'] == [0, 1, 2, 3] and all(len(kept) == 9 for kept in fastv['kept'])
  assert by['blind', 'keep']['examples']['kept'] == [[]] * 4
  report = (tmp_path / 'eval' / 'report.md').read_text()
  kv = {r['method']: r['kv_cache_bytes'] for r in rows if r['position_mode'] == 'keep'}
  assert kv['fastervlm'] < kv['fastv'] < kv['full']  # FastV caches every token in its early layers
  assert all(r['prefill_seconds'] > 0 for r in rows)  # 3 batches of 8: two timed after compiling
  for name in ('frontier.png', 'time_frontier.png', 'per_task.png', 'kept_patches.png'):
    assert (tmp_path / 'eval' / name).stat().st_size > 1000 and f']({name})' in report


def test_unknown_method_fails_naming_known_ones(tmp_path):
  r = _main(tmp_path, 'eval', "--config.eval.methods=('full','fastvv')", check=False)
  assert r.returncode != 0
  assert "'fastvv'" in r.stderr and 'divprune' in r.stderr


def test_demo_trains_agent_then_compares_it_with_baselines(tmp_path, pretrained, data_dir):
  work, _ = pretrained
  _main(tmp_path, 'demo', "--config.eval.methods=('full','blind','fastervlm')",
        '--config.eval.budgets=(0.25,)', "--config.eval.position_modes=('keep',)",
        f'--config.vlm_checkpoint={work / "vlm"}', data_dir=data_dir)
  log = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [row['step'] for row in log] == [0, 1, 2, 3, 4]  # 0: validation before training
  assert [row['phase'] for row in log] == [0, 0, 0, 1, 1]  # warm-up, then GRPO, in one compiled step
  for key in ('loss', 'reward/mean', 'reward/std', 'frac_reward_zero_std', 'approx_kl', 'clip_ratio',
              'entropy', 'tokens_kept'):
    assert key in log[-1]
  rows = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  assert {r['method'] for r in rows} == {'full', 'blind', 'fastervlm', 'grip'}
  assert {r['method']: r['kept_tokens'] for r in rows}['grip'] == 9  # ceil(0.25 * 36)
  assert all(r['n'] == 24 for r in rows)
  assert (tmp_path / 'agent').is_dir() and (tmp_path / 'eval' / 'report.md').exists()


def test_ablations_train_each_variant_per_seed_and_summarize(tmp_path, pretrained, data_dir):
  work, _ = pretrained
  _main(tmp_path, 'ablations', "--config.ablation.variants=('warmup_only',)",
        "--config.ablation.references=('full','dart')",
        '--config.eval.budgets=(0.25,)', f'--config.vlm_checkpoint={work / "vlm"}',
        data_dir=data_dir)
  rows = json.loads((tmp_path / 'ablations' / 'results.json').read_text())
  assert sorted((r['method'], r['seed']) for r in rows) == [
      ('dart', 0), ('full', 0), ('grip:warmup_only', 0), ('grip:warmup_only', 1)]
  assert all(r['n'] == 16 for r in rows)  # the same examples for the variants and the references
  assert all(r['kept_tokens'] == 9 for r in rows if r['method'] != 'full')
  summary = json.loads((tmp_path / 'ablations' / 'summary.json').read_text())
  assert {s['method']: s['seeds'] for s in summary} == {'grip:warmup_only': [0, 1], 'dart': [0],
                                                        'full': [0]}
  assert '± ' in (tmp_path / 'ablations' / 'summary.md').read_text()
