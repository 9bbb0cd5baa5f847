"""Prefill time with all visual tokens vs a pruned sequence, next to the analytic FLOP ratios.

  python benchmarks/prefill.py                                   # tiny config, this machine
  python benchmarks/prefill.py --config=configs/llava_1p5_7b.py --batch=1   # 7B geometry (GPU)
  python benchmarks/prefill.py --json=/tmp/prefill.json
  python benchmarks/prefill.py --config=configs/gripbench_tiny.py:smoke --repeats=3   # seconds-long check

Times the LM prefill (the part pruning shortens) over <bos> + k visual tokens + the question, with
k physically gathered (not masked), for k = N and k = ceil(rho * N); every budget is measured in the
same run, interleaved over repeats, so the ratios compare like with like. Weights are random: timing
does not depend on their values.

For each pruned budget it also times the GRIP agent alone (scorer of `config.agent` with random
params, greedy top-k, gather of the k tokens) and prints its cost as a share of the pruned prefill
and of the full prefill, measured in time and counted in FLOPs (`selection_costs.selection_flops`
of 'grip': the scorer plus the top-k), side by side, and the speed-up over the full prefill once the
agent is added (time and FLOPs). With --no_agent the agent is skipped. Every timed call starts with
its inputs ready and stops when its outputs are.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from gripjax import checks
from gripjax.models import costs
from gripjax.models import scorer as scorer_lib
from gripjax.models import vlm as vlm_lib
from gripjax.pruning import selection_costs
from gripjax.rl import policy
from tests import helpers


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/gripbench_tiny.py',
                      help='a configs/ file, optionally with its argument: configs/gripbench_tiny.py:smoke')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--text_len', type=int, default=16)
  parser.add_argument('--budgets', default='1,0.5,0.25,0.111111')
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--json', default=None, help='write the figures here')
  parser.add_argument('--no_agent', action='store_true', help='do not time the GRIP agent')
  args = parser.parse_args()

  path, _, config_arg = args.config.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  config = checks.check_config(helpers.load_config(name, config_arg or None))
  if config_arg:
    name = f'{name}:{config_arg}'
  vocab = config.model.llm.vocab_size or 64
  model = vlm_lib.make_vlm(config.model, vocab)
  mc = vlm_lib.ModelConfig.from_config(model.config)
  n = mc.num_visual_tokens
  dtype = mc.activation_dtype
  abstract = jax.eval_shape(functools.partial(vlm_lib.init_params, model), jax.random.PRNGKey(0))
  # Random weights without running init (fast for 7B): normal(0, 0.02) per leaf, in the act dtype.
  keys = iter(jax.random.split(jax.random.PRNGKey(0), len(jax.tree.leaves(abstract))))
  params = jax.tree.map(lambda a: (0.02 * jax.random.normal(next(keys), a.shape)).astype(dtype), abstract)
  b, t = args.batch, args.text_len
  text = jnp.ones((b, t), jnp.int32)
  text_valid = jnp.ones((b, t), bool)
  d = mc.llm.width

  @functools.partial(jax.jit, static_argnums=())
  def prefill(params, visual, index, valid):
    logits = model.apply(params, visual, index, valid, text, text_valid, 'keep', method='forward')
    return logits[:, -1]

  # The agent: scores all N tokens from (V, question, rho), keeps the top k, gathers them.
  scorer = scorer_lib.make_scorer(config)
  agent_abstract = jax.eval_shape(lambda r: scorer_lib.init_scorer(scorer, r, n, d, t), jax.random.PRNGKey(0))
  agent_keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(agent_abstract))))
  agent_params = jax.tree.map(lambda a: 0.02 * jax.random.normal(next(agent_keys), a.shape, a.dtype),
                              agent_abstract)
  full_visual = jax.random.normal(jax.random.PRNGKey(n + 1), (b, n, d), dtype)
  question = jax.random.normal(jax.random.PRNGKey(n + 2), (b, t, d), dtype)

  # Everything the agent reads is an argument (a closed-over array would be a compile-time constant).
  @functools.partial(jax.jit, static_argnums=4)
  def agent(agent_params, full_visual, question, rho, k):
    logits = scorer.apply({'params': agent_params}, full_visual, question, text_valid, rho)  # (B, N)
    index = jnp.sort(policy.greedy(logits, k), axis=-1)  # (B, k)
    return jnp.take_along_axis(full_visual, index[..., None], axis=1), index

  budgets = [float(x) for x in args.budgets.split(',')]
  if not all(0 < rho <= 1 for rho in budgets):
    parser.error(f'--budgets={args.budgets}: expected keep ratios in (0, 1].')
  if max(budgets) < 1:
    budgets.insert(0, 1.0)  # The full prefill is the reference of every ratio.
  ks = [n if rho >= 1 else math.ceil(rho * n - 1e-6) for rho in budgets]
  timed_agent = {} if args.no_agent else {k: jnp.full((b,), rho, jnp.float32)
                                          for rho, k in zip(budgets, ks) if k < n}
  inputs = {}
  for k in ks:
    visual = jax.random.normal(jax.random.PRNGKey(k), (b, k, d), dtype)
    index = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32) * (n // k), (b, k))
    inputs[k] = (visual, index, jnp.ones((b, k), bool))
    prefill(params, *inputs[k]).block_until_ready()  # compile
    if k in timed_agent:
      jax.block_until_ready(agent(agent_params, full_visual, question, timed_agent[k], k))  # compile
  times = {k: [] for k in ks}
  agent_times = {k: [] for k in timed_agent}
  for _ in range(args.repeats):
    for k in ks:  # interleaved so drift hits every budget alike
      t0 = time.perf_counter()
      prefill(params, *inputs[k]).block_until_ready()
      times[k].append(time.perf_counter() - t0)
      if k in timed_agent:
        t0 = time.perf_counter()
        jax.block_until_ready(agent(agent_params, full_visual, question, timed_agent[k], k))
        agent_times[k].append(time.perf_counter() - t0)
  full = float(np.median(times[n]))
  full_flops = costs.prefill_flops(config, n, t, vocab)
  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()}, {platform.processor() or platform.machine()})'
  rows = []
  print(f'config={name} device={device} batch={b} text_len={t} N={n} dtype={mc.dtype} repeats={args.repeats}')
  if timed_agent:
    print(f'agent: scorer of config.agent (width {config.agent.width}, depth {config.agent.depth}) with '
          'random params (timing only; cost does not depend on the values), greedy top-k and gather')
    print('agent / pruned, agent / full: the agent\'s cost over the pruned (k tokens) and the full '
          '(N tokens) LM prefill, in measured time and in counted FLOPs; x w/ agent: full prefill over '
          'agent + pruned prefill')
  print(f'{"budget":>8} {"kept":>5} {"ms":>9} {"measured x":>11} {"FLOP x":>8} {"ratio":>6} '
        f'{"agent ms":>9} {"agent MFLOP":>11} | {"agent / pruned":^19} | {"agent / full":^19} | '
        f'{"x w/ agent":^19}')
  print(f'{"":>74} | {"time":>9} {"FLOPs":>9} | {"time":>9} {"FLOPs":>9} | {"time":>9} {"FLOPs":>9}')
  pct = lambda x: '-' if x is None else f'{100 * x:8.2f}%'
  num = lambda x, f: '-' if x is None else format(x, f)
  for rho, k in zip(budgets, ks):
    med = float(np.median(times[k]))
    pruned_flops = costs.prefill_flops(config, k, t, vocab)
    measured, flop = full / med, full_flops / pruned_flops
    agent_s = float(np.median(agent_times[k])) if k in agent_times else None
    agent_flops = selection_costs.selection_flops(config, 'grip', k, t) if k in agent_times else None
    row = {'budget': rho, 'kept_tokens': k, 'prefill_ms': 1e3 * med, 'prefill_flops': pruned_flops,
           'measured_speedup': measured, 'flop_speedup': flop, 'measured_over_flop': measured / flop,
           'agent_ms': None, 'agent_flops': agent_flops, 'agent_over_pruned_time': None,
           'agent_over_pruned_flops': None, 'agent_over_full_time': None, 'agent_over_full_flops': None,
           'measured_speedup_with_agent': None, 'flop_speedup_with_agent': None}
    if agent_s is not None:
      row.update(agent_ms=1e3 * agent_s, agent_over_pruned_time=agent_s / med,
                 agent_over_pruned_flops=agent_flops / pruned_flops, agent_over_full_time=agent_s / full,
                 agent_over_full_flops=agent_flops / full_flops,
                 measured_speedup_with_agent=full / (agent_s + med),
                 flop_speedup_with_agent=full_flops / (agent_flops + pruned_flops))
    rows.append(row)
    print(f'{rho:8.3f} {k:5d} {1e3 * med:9.3f} {measured:11.2f} {flop:8.2f} {measured / flop:6.2f} '
          f'{num(row["agent_ms"], "9.3f"):>9} {num(None if agent_flops is None else agent_flops / 1e6, "11.3f"):>11} | '
          f'{pct(row["agent_over_pruned_time"]):>9} {pct(row["agent_over_pruned_flops"]):>9} | '
          f'{pct(row["agent_over_full_time"]):>9} {pct(row["agent_over_full_flops"]):>9} | '
          f'{num(row["measured_speedup_with_agent"], "9.2f"):>9} {num(row["flop_speedup_with_agent"], "9.2f"):>9}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'benchmark': 'prefill', 'config': name, 'device': device, 'batch': b, 'text_len': t,
                 'dtype': mc.dtype, 'repeats': args.repeats, 'command': ' '.join(sys.argv),
                 'full_prefill_ms': 1e3 * full, 'full_prefill_flops': full_flops,
                 'agent': None if args.no_agent else 'random scorer params (timing only)', 'rows': rows},
                f, indent=1)


if __name__ == '__main__':
  main()
