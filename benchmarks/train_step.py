"""Rollouts per second of the agent's GRPO train step for several group sizes G, side by side, and
the same step of the continuous relaxations (--algorithms).

  python benchmarks/train_step.py                                  # tiny config, shipped VLM
  python benchmarks/train_step.py --batch=4 --repeats=5 --json=/tmp/train_step.json
  python benchmarks/train_step.py --config=configs/gripbench_tiny.py:smoke --batch=2   # seconds

Times `gripjax.train.step.make_train_step` (one jitted step, no mesh) in its GRPO phase
(`train.warmup_steps = 0`) on one batch of B examples for every G in --groups: each step samples
B x G keep-sets and runs them as one (B * G)-row forward of the frozen VLM. Every step function is
compiled and run once before timing (compile and warm-up excluded), then all are timed
interleaved over repeats, so the ratios compare like with like on this machine.

Vectorized rollouts should cost close to the FLOPs they add and no per-rollout Python overhead, so
the table prints time(G) / time(1) next to the analytic FLOP ratio of the step (gripjax.eval.
efficiency: B images through the vision tower, the scorer's passes, and B x G LM prefills of
1 + k_max + T slots with the LM head at the answer slot only); `measured/FLOP` near 1 means the
extra rollouts cost what their arithmetic does.

G = 1 has no group baseline (every advantage is 0), so the start-up check (`step.check`) rejects it
for training; it is timed here anyway, as the unit of cost, with the config checked at its own G.

--algorithms=grpo,relaxation,gumbel_sigmoid,perturbed_topk times each second phase at every G, all
interleaved in one loop: a relaxation's step runs its S = G masks through the frozen VLM over all N
visual slots and backpropagates through it, where GRPO's rollouts span the k_max gathered slots and
need no VLM gradient, so `time x` (against the first algorithm's first G) is the ratio of training
time at equal VLM forwards per example. The analytic FLOP columns are GRPO's and stay empty for the
relaxations.

  python benchmarks/train_step.py --config=configs/gripbench_dense.py --groups=8 --batch=4 \
      --algorithms=grpo,relaxation,gumbel_sigmoid,perturbed_topk --repeats=5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from benchmarks.throughput import device_description
from gripjax import budget
from gripjax import checks
from gripjax import runtime
from gripjax.models import costs
from gripjax.models import scorer as scorer_lib
from gripjax.models import vlm as vlm_lib
from gripjax.train import step as step_lib
from tests import helpers

# Scorer passes per GRPO step: the sampling logits, the reference logits, and the loss's forward
# and backward (a backward costs about two forwards).
SCORER_PASSES = 5


def step_config(config, group: int, batch: int, algorithm: str = 'grpo'):
  c = config.copy_and_resolve_references()
  c.train.update(group_size=group, batch_size=batch, warmup_steps=0, steps=max(c.train.steps, 1000),
                 algorithm=algorithm)
  return c


def build_step(vlm, scorer, config):
  """(optimizer, train_step) for `config` (checked at start-up with G = 2: see the module doc)."""
  tx = step_lib.make_optimizer(config)
  return tx, step_lib.make_train_step(vlm, scorer, tx, config)


def step_flops(config, b: int, group: int, k_max: int, t: int, vocab: int) -> dict[str, int]:
  """Analytic FLOPs of one GRPO step, by part."""
  vision = b * costs.vision_flops(config, costs.vision_feature_layers(config))
  scorer = b * SCORER_PASSES * costs.scorer_flops(config, costs.num_patches(config), t)
  rollouts = b * group * costs.prefill_flops(config, k_max, t, vocab)
  return {'vision': vision, 'scorer': scorer, 'rollouts': rollouts,
          'total': vision + scorer + rollouts}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/gripbench_tiny.py', help='configs/NAME.py[:ARG]')
  parser.add_argument('--groups', default='1,4,8,16', help='group sizes G, the first is the unit')
  parser.add_argument('--batch', type=int, default=4, help='examples per step (B)')
  parser.add_argument('--repeats', type=int, default=10, help='timed steps per G (median kept)')
  parser.add_argument('--algorithms', default='grpo',
                      help=f'second phases to time, from {tuple(step_lib.SECOND_PHASES)}; the first is the unit')
  parser.add_argument('--random_weights', action='store_true',
                      help='random VLM weights, not config.vlm_checkpoint')
  parser.add_argument('--json', default=None, help='write the figures here')
  args = parser.parse_args()

  path, _, config_arg = args.config.partition(':')  # configs/NAME.py[:ARG], as --config of main.py
  name = os.path.splitext(os.path.basename(path))[0]
  config = checks.check_config(helpers.load_config(name, config_arg or None))
  groups = [int(g) for g in args.groups.split(',')]
  if not groups or min(groups) < 1:
    raise SystemExit(f'--groups={args.groups!r}: expected positive ints, e.g. 1,4,8,16.')
  algorithms = args.algorithms.split(',')
  unknown = [a for a in algorithms if a not in step_lib.SECOND_PHASES]
  if unknown or not algorithms:
    raise SystemExit(f'--algorithms={args.algorithms!r}: expected names from {tuple(step_lib.SECOND_PHASES)}.')
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  mc = vlm_lib.ModelConfig.from_config(vlm.config)
  n, s, t, b = mc.num_visual_tokens, mc.vit.image_size, config.data.max_question_len, args.batch
  vocab = runtime.vocab_size(config, tok)
  if args.random_weights or config.vlm_checkpoint is None:
    vlm_params, weights = runtime.init_params(vlm, jax.random.PRNGKey(0)), 'random'
  else:
    vlm_params, weights = runtime.load_vlm_params(config, vlm), str(config.vlm_checkpoint)
  k_max = budget.budget_to_k(float(config.train.rho_range[1]), n)

  rng = np.random.default_rng(0)  # Values do not change the cost: random pixels and words.
  batch = {'pixels': rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
           'question_ids': rng.integers(3, vocab, (b, t)).astype(np.int32),
           'question_valid': np.ones((b, t), bool),
           'answer_id': rng.integers(3, vocab, (b,)).astype(np.int32)}
  batch = jax.device_put(batch)
  scorer = scorer_lib.make_scorer(config)

  t0 = time.perf_counter()
  runs = {}
  keys = [(a, g) for a in algorithms for g in groups]
  for a, g in keys:
    c = step_config(config, g, b, a)
    tx, train_step = build_step(vlm, scorer, c)
    init = step_lib.make_init(scorer, tx, c, n, mc.llm.width, t)
    state = jax.jit(init)(jax.random.PRNGKey(1))
    compiled = train_step.lower(state, batch, vlm_params).compile()
    state, metrics = compiled(state, batch, vlm_params)  # warm-up run (excluded)
    jax.block_until_ready((state, metrics))
    assert float(metrics['phase']) == 1.0, f'expected the second phase ({a})'
    runs[a, g] = [compiled, state]
  compile_s = time.perf_counter() - t0

  times = {key: [] for key in keys}
  for _ in range(args.repeats):
    for key in keys:  # interleaved so drift hits every algorithm and G alike
      compiled, state = runs[key]
      t1 = time.perf_counter()
      state, metrics = compiled(state, batch, vlm_params)  # state is donated
      jax.block_until_ready((state, metrics))
      times[key].append(time.perf_counter() - t1)
      runs[key][1] = state

  unit = keys[0]
  base_s = float(np.median(times[unit]))
  base_flops = step_flops(config, b, unit[1], k_max, t, vocab)['total']
  device = device_description()
  print(f'config={name} device={device}')
  print(f'weights={weights} batch={b} N={n} k_max={k_max} text_len={t} dtype={mc.dtype} '
        f'repeats={args.repeats} compile/warm-up {compile_s:.1f}s excluded')
  print(f'{"algorithm":>15} {"G":>3} {"rollouts":>8} {"ms/step":>9} {"min ms":>8} {"rollouts/s":>11} '
        f'{"time x":>7} {"FLOP x":>7} {"measured/FLOP":>13} {"rollout FLOP %":>14} {"GFLOP/s":>8}')
  rows = []
  for a, g in keys:
    med, low = float(np.median(times[a, g])), float(np.min(times[a, g]))
    row = {'algorithm': a, 'group_size': g, 'rollouts_per_step': b * g, 'seconds': med,
           'seconds_min': low, 'seconds_all': times[a, g], 'rollouts_per_second': b * g / med,
           'time_ratio': med / base_s}
    line = (f'{a:>15} {g:3d} {b * g:8d} {1e3 * med:9.1f} {1e3 * low:8.1f} {b * g / med:11.1f} '
            f'{med / base_s:7.2f}')
    if a == 'grpo' and unit[0] == 'grpo':  # The analytic FLOPs are the GRPO step's.
      fl = step_flops(config, b, g, k_max, t, vocab)
      flop_x = fl['total'] / base_flops
      row.update(flop_ratio=flop_x, measured_over_flop=med / base_s / flop_x, flops=fl,
                 gflops_per_second=fl['total'] / med / 1e9)
      line += (f' {flop_x:7.2f} {med / base_s / flop_x:13.2f} {100 * fl["rollouts"] / fl["total"]:13.1f}% '
               f'{fl["total"] / med / 1e9:8.2f}')
    rows.append(row)
    print(line)
  one = step_flops(config, 1, 1, k_max, t, vocab)
  print(f'FLOPs per example: vision {one["vision"]:.3g}, scorer x{SCORER_PASSES} {one["scorer"]:.3g}; '
        f'per rollout (prefill of 1 + {k_max} + {t} slots): {one["rollouts"]:.3g}. time x and FLOP x '
        f'are relative to {unit[0]} at G={unit[1]}.')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'benchmark': 'train_step', 'config': name, 'device': device, 'weights': weights,
                 'batch': b, 'num_tokens': n, 'k_max': k_max, 'text_len': t, 'dtype': mc.dtype,
                 'repeats': args.repeats, 'compile_seconds': compile_s, 'unit_algorithm': unit[0],
                 'unit_group_size': unit[1],
                 'flops_per_example': one, 'command': ' '.join(sys.argv), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
