"""Ablations of the GRIP agent on the same examples and budgets (`--mode=ablations`).

  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=ablations --workdir=workdir/abl

Each variant is trained once per seed of `config.ablation.seeds` (same schedule length,
`config.ablation.train_steps`) and evaluated as the pruner `grip` on the first
`config.ablation.eval_examples` examples of `config.ablation.split` (default `validation`: what is
chosen from ablations is chosen there, and the test split stays untouched) at every budget of
`config.eval.budgets`:

  budget_aware   the agent as shipped: warm-up, then GRPO, keep ratio sampled per example;
  warmup_only    the supervised warm-up alone (no GRPO step);
  grpo_only      GRPO from a random scorer (no warm-up);
  relaxation     the same scorer trained by backpropagating the answer loss through the frozen VLM
                 with a straight-through top-k mask (`train.algorithm='relaxation'`);
  gumbel_sigmoid the same, through straight-through Gumbel-sigmoid gates on the scorer's logits with
                 a keep-ratio penalty (DynamicViT, Dynamic-LLaVA; `train.algorithm='gumbel_sigmoid'`);
  perturbed_topk the same, through a top-k differentiated by perturbed optimizers (Berthet et al.
                 2020; `train.algorithm='perturbed_topk'`);
  per_budget     one agent per budget, trained at that keep ratio only and evaluated there.

The learned variants are compared at equal cost: every variant that runs a second phase
(budget_aware, grpo_only, the three relaxations, per_budget) is trained for the same
`ablation.train_steps` steps (`ablation.warmup_steps` of them the same warm-up, except grpo_only)
on the same data and seed, and each of its second-phase steps runs `train.group_size` frozen-VLM
forwards per example: GRPO's G rollouts, a relaxation's S masks (`train.relax_samples`, whose
default None means `train.group_size`; see rl/relaxation.py). A relaxation's forward spans all N
visual slots (dropped ones weighted 0), a GRPO rollout only the k_max gathered ones. warmup_only
stops after its warm-up steps by design. Every variant is evaluated the same way, as the top-
ceil(rho N) ranker of the scorer's logits (`grip`).

Shared warm-up. The variants that begin with the warm-up (budget_aware and the three relaxations)
would each repeat the same `ablation.warmup_steps` steps on the same data, seed and optimizer: the
warm-up phase does not read `train.algorithm`, and the PRNG key and data position live in the
state. So each seed's warm-up is trained once, as the warmup_only variant (which is exactly that
run), and the others start from a copy of its last checkpoint (`start_from_warmup`), resuming at
step warmup_steps. A tested equivalence (tests/test_ablations.py): the copied start gives the same
params as a run from step 0. When the learning-rate ramp would differ (fewer than 100 steps, see
`step.make_optimizer`) or warmup_only is not among the variants, each run trains its own warm-up.

The methods of `config.ablation.references` (`full` and the baselines) are evaluated on the same
examples and budgets, so the summary compares the variants with them directly.

Writes `WORKDIR/ablations/results.json` (one row per variant, seed, budget, in the eval row format
with `method` = 'grip:VARIANT' and a `seed` field; reference rows keep their method name),
`summary.json` (mean and sample std over seeds) and `summary.md`. Finished runs are reused, so an
interrupted ablation resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from gripjax import config_lib
from gripjax import runtime
from gripjax.eval import evaluate
from gripjax.train import step as step_lib
from gripjax.train import trainer

VARIANTS = ('budget_aware', 'warmup_only', 'grpo_only', 'relaxation', 'gumbel_sigmoid',
            'perturbed_topk', 'per_budget')
# Variants trained by a relaxation baseline; each is its own `train.algorithm` (step.SECOND_PHASES).
RELAXATION_VARIANTS = ('relaxation', 'gumbel_sigmoid', 'perturbed_topk')


def check_variants(variants) -> tuple[str, ...]:
  for v in variants:
    if v not in VARIANTS:
      raise config_lib.ConfigError(f'config.ablation.variants contains unknown variant {v!r}: known '
                                   f'variants are {VARIANTS}')
  return tuple(variants)


def check(c) -> None:
  """Start-up check of `config.ablation`; raises config_lib.ConfigError."""
  if 'ablation' not in c:
    return
  check_variants(config_lib.nonempty_tuple(c, 'ablation.variants', f'variants from {VARIANTS}'))
  references = evaluate.check_methods(c.ablation.references, 'config.ablation.references')
  if 'grip' in references:
    config_lib.fail('ablation.references', references,
                    "reference and baseline methods only: the agent's rows are the variants")
  seeds = c.ablation.seeds
  if not isinstance(seeds, tuple) or not seeds or not all(config_lib.is_int(s) and s >= 0 for s in seeds):
    config_lib.fail('ablation.seeds', seeds, 'a non-empty tuple of non-negative ints')
  for f in ('train_steps', 'eval_examples'):
    config_lib.integer(c, f'ablation.{f}')
  config_lib.integer(c, 'ablation.warmup_steps', minimum=0)
  if 'split' in c.ablation:
    config_lib.choice(c, 'ablation.split', evaluate.SPLITS)


def pruned_budgets(config) -> tuple[float, ...]:
  """The budgets of `config.eval.budgets` below 1 (the ones a pruner or an agent is run at)."""
  return tuple(float(r) for r in config.eval.budgets if r < 1.0)


def variant_configs(config, variant: str, seed: int, data_dir: str):
  """[(budgets evaluated, training config)] of one variant and seed (several for per_budget)."""
  a = config.ablation
  base = ml_collections.ConfigDict(config.to_dict())
  base.seed = int(seed)
  base.data.data_dir = data_dir
  base.train.steps = a.train_steps
  base.train.warmup_steps = min(a.warmup_steps, a.train_steps)
  base.train.checkpoint_every = max(1, min(base.train.checkpoint_every, a.train_steps))
  budgets = pruned_budgets(config)
  if variant == 'budget_aware':
    return [(budgets, base)]
  if variant == 'warmup_only':
    base.train.steps = base.train.warmup_steps = max(base.train.warmup_steps, 1)
    return [(budgets, base)]
  if variant == 'grpo_only':
    base.train.warmup_steps = 0
    return [(budgets, base)]
  if variant in RELAXATION_VARIANTS:
    base.train.algorithm = variant
    return [(budgets, base)]
  out = []
  for rho in budgets:  # per_budget
    c = ml_collections.ConfigDict(base.to_dict())
    c.train.rho_range = (rho, rho)
    out.append(((rho,), c))
  return out


# Variants whose runs begin with the shared warm-up (see the module docstring).
SHARES_WARMUP = ('budget_aware',) + RELAXATION_VARIANTS


def shares_warmup(config, variant: str) -> bool:
  """Whether `variant`'s runs start from the seed's warmup_only checkpoint instead of step 0."""
  a = config.ablation
  warm = min(a.warmup_steps, a.train_steps)
  return (variant in SHARES_WARMUP and 'warmup_only' in tuple(a.variants) and 0 < warm < a.train_steps
          and step_lib.lr_ramp(warm) == step_lib.lr_ramp(a.train_steps))


def start_from_warmup(run_dir: str, warmup_dir: str, warmup_steps: int) -> bool:
  """Seeds `run_dir/checkpoints` with the warm-up run's checkpoint at `warmup_steps` (and its log).

  Does nothing when `run_dir` already has checkpoints (an interrupted run resumes from its own).
  The copy is made under a temporary name and renamed, so an interruption never leaves half a
  checkpoint. Returns True when it copied.
  """
  dest = os.path.join(run_dir, 'checkpoints')
  if os.path.isdir(dest) and os.listdir(dest):
    return False
  src = os.path.join(warmup_dir, 'checkpoints', str(warmup_steps))
  if not os.path.isdir(src):
    raise FileNotFoundError(f'the shared warm-up {warmup_dir} has no checkpoint at step '
                            f'{warmup_steps} ({src}): expected the warmup_only run to end there.')
  os.makedirs(dest, exist_ok=True)
  tmp = os.path.join(run_dir, f'.{warmup_steps}.copying')
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp)
  metrics = os.path.join(warmup_dir, 'metrics.jsonl')
  if os.path.exists(metrics):  # The curve then spans warm-up and second phase.
    shutil.copyfile(metrics, os.path.join(run_dir, 'metrics.jsonl'))
  os.replace(tmp, os.path.join(dest, str(warmup_steps)))
  return True


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean, sample std and standard error (std / sqrt(seeds)) of accuracy over seeds, per (method, budget)."""
  groups = {}
  for r in rows:
    groups.setdefault((r['method'], r['budget']), []).append(r)
  out = []
  for (method, budget), rs in sorted(groups.items()):
    acc = np.array([r['accuracy'] for r in rs])
    out.append({'method': method, 'budget': budget, 'kept_tokens': rs[0]['kept_tokens'],
                'seeds': sorted(r['seed'] for r in rs), 'accuracy_mean': float(acc.mean()),
                'accuracy_std': float(acc.std(ddof=1)) if len(rs) > 1 else None,
                'accuracy_se': float(acc.std(ddof=1) / np.sqrt(len(rs))) if len(rs) > 1 else None,
                'n': rs[0]['n']})
  return out


def summary_markdown(summary: list[dict[str, Any]]) -> str:
  budgets = sorted({s['budget'] for s in summary}, reverse=True)
  methods = sorted({s['method'] for s in summary})
  cell = {(s['method'], s['budget']): s for s in summary}
  head = ['variant'] + [f'rho={b:.3g} ({cell_k})' for b, cell_k in
                        ((b, next(s['kept_tokens'] for s in summary if s['budget'] == b))
                         for b in budgets)]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for m in methods:
    cells = [m]
    for b in budgets:
      s = cell.get((m, b))
      if s is None:
        cells.append('-')
      else:
        se = '' if s['accuracy_se'] is None else f" ± {100 * s['accuracy_se']:.1f}"
        cells.append(f"{100 * s['accuracy_mean']:.1f}{se} (n={len(s['seeds'])})")
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def run(config, workdir: str) -> list[dict[str, Any]]:
  variants = check_variants(config.ablation.variants)
  out_dir = os.path.join(workdir, 'ablations')
  os.makedirs(out_dir, exist_ok=True)
  # Seeds of a variant compile the same train step: a persistent cache compiles it once.
  jax.config.update('jax_compilation_cache_dir', os.path.join(out_dir, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  data_dir = runtime.data_dir(config, workdir)
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  params = runtime.load_vlm_params(config, vlm)
  split = config.ablation.get('split', 'validation')
  source = runtime.split_source(config, workdir, split)
  rows = []
  # The warm-up-only runs go first: the variants that share the warm-up start from them.
  variants = tuple(sorted(variants, key=lambda v: v != 'warmup_only'))
  for variant in variants:
    for seed in config.ablation.seeds:
      for i, (budgets, c) in enumerate(variant_configs(config, variant, seed, data_dir)):
        run_dir = os.path.join(out_dir, variant, f'seed{seed}' + (f'_b{i}' if variant == 'per_budget'
                                                                  else ''))
        if not os.path.isdir(os.path.join(run_dir, 'agent')):
          if shares_warmup(config, variant):
            start_from_warmup(run_dir, os.path.join(out_dir, 'warmup_only', f'seed{seed}'),
                              c.train.warmup_steps)
          logging.info('ablations: training %s seed %d (%s)', variant, seed, run_dir)
          trainer.run(c, run_dir)
        c.agent.checkpoint = os.path.join(run_dir, 'agent')
        agent = evaluate.load_agent(c, vlm)
        got = evaluate.evaluate(c, vlm, params, source, tok, ('grip',), budgets, ('keep',),
                                config.ablation.eval_examples, agent=agent)
        for r in got:
          r.pop('examples', None)
          rows.append(dict(r, method=f'grip:{variant}', seed=int(seed)))
  references = tuple(config.ablation.references)  # Checked at start-up (`check`).
  if references:
    got = evaluate.evaluate(config, vlm, params, source, tok, references, pruned_budgets(config),
                            ('keep',),
                            config.ablation.eval_examples)
    for r in got:
      r.pop('examples', None)
      rows.append(dict(r, seed=int(config.seed)))
  summary = summarize(rows)
  for name, obj in (('results.json', rows), ('summary.json', summary)):
    with open(os.path.join(out_dir, name + '.tmp'), 'w') as f:
      json.dump(obj, f, indent=1)
    os.replace(os.path.join(out_dir, name + '.tmp'), os.path.join(out_dir, name))
  text = summary_markdown(summary)
  with open(os.path.join(out_dir, 'summary.md'), 'w') as f:
    f.write(f'# Agent ablations (GRIP-Bench {split} accuracy %, mean ± standard error over seeds)\n\n'
            + text + '\n')
  print(text)
  return rows
