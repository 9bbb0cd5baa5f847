"""Prefill time with all visual tokens vs a pruned sequence, next to the analytic FLOP ratios.

  python benchmarks/prefill.py                                   # tiny config, this machine
  python benchmarks/prefill.py --config=configs/llava_1p5_7b.py --batch=1   # 7B geometry (GPU)
  python benchmarks/prefill.py --json=/tmp/prefill.json

Times the LM prefill (the part pruning shortens) over <bos> + k visual tokens + the question, with
k physically gathered (not masked), for k = N and k = ceil(rho * N); every budget is measured in the
same run, interleaved over repeats, so the ratios compare like with like. Weights are random: timing
does not depend on their values.

For each pruned budget it also times the GRIP agent alone (scorer of `config.agent` with random
params, greedy top-k, gather of the k tokens) and prints its share of agent + pruned prefill, and the
speed-up once the agent's time is added (`x w/ agent`). With --no_agent the agent is skipped.
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
from gripjax.rl import policy
from tests import helpers


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/gripbench_tiny.py')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--text_len', type=int, default=16)
  parser.add_argument('--budgets', default='1,0.5,0.25,0.111111')
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--json', default=None, help='write the figures here')
  parser.add_argument('--no_agent', action='store_true', help='do not time the GRIP agent')
  args = parser.parse_args()

  name = os.path.splitext(os.path.basename(args.config))[0]
  config = checks.check_config(helpers.load_config(name))
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

  @functools.partial(jax.jit, static_argnums=1)
  def agent(rho, k):
    logits = scorer.apply({'params': agent_params}, full_visual, question, text_valid, rho)  # (B, N)
    index = jnp.sort(policy.greedy(logits, k), axis=-1)  # (B, k)
    return jnp.take_along_axis(full_visual, index[..., None], axis=1), index

  budgets = [float(x) for x in args.budgets.split(',')]
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
      jax.block_until_ready(agent(timed_agent[k], k))  # compile
  times = {k: [] for k in ks}
  agent_times = {k: [] for k in timed_agent}
  for _ in range(args.repeats):
    for k in ks:  # interleaved so drift hits every budget alike
      t0 = time.perf_counter()
      prefill(params, *inputs[k]).block_until_ready()
      times[k].append(time.perf_counter() - t0)
      if k in timed_agent:
        t0 = time.perf_counter()
        jax.block_until_ready(agent(timed_agent[k], k))
        agent_times[k].append(time.perf_counter() - t0)
  full = np.median(times[n])
  full_flops = costs.prefill_flops(config, n, t, vocab)
  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()}, {platform.processor() or platform.machine()})'
  rows = []
  print(f'config={name} device={device} batch={b} text_len={t} N={n} dtype={mc.dtype}')
  if timed_agent:
    print(f'agent: scorer of config.agent (width {config.agent.width}, depth {config.agent.depth}) with '
          'random params (timing only; cost does not depend on the values)')
  print(f'{"budget":>8} {"kept":>5} {"ms":>9} {"measured x":>11} {"FLOP x":>8} {"ratio":>6} '
        f'{"agent ms":>9} {"agent %":>8} {"x w/ agent":>11}')
  for rho, k in zip(budgets, ks):
    med = float(np.median(times[k]))
    measured = full / med
    flop = full_flops / costs.prefill_flops(config, k, t, vocab)
    agent_s = float(np.median(agent_times[k])) if k in agent_times else None
    share = None if agent_s is None else agent_s / (agent_s + med)
    with_agent = None if agent_s is None else full / (agent_s + med)
    rows.append({'budget': rho, 'kept_tokens': k, 'prefill_ms': 1e3 * med, 'measured_speedup': measured,
                 'flop_speedup': flop, 'measured_over_flop': measured / flop,
                 'agent_ms': None if agent_s is None else 1e3 * agent_s, 'agent_share': share,
                 'measured_speedup_with_agent': with_agent})
    extra = (f'{"-":>9} {"-":>8} {"-":>11}' if agent_s is None else
             f'{1e3 * agent_s:9.3f} {100 * share:7.2f}% {with_agent:11.2f}')
    print(f'{rho:8.3f} {k:5d} {1e3 * med:9.3f} {measured:11.2f} {flop:8.2f} {measured / flop:6.2f} {extra}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'benchmark': 'prefill', 'config': name, 'device': device, 'batch': b, 'text_len': t,
                 'dtype': mc.dtype, 'repeats': args.repeats, 'command': ' '.join(sys.argv),
                 'agent': None if args.no_agent else 'random scorer params (timing only)', 'rows': rows},
                f, indent=1)


if __name__ == '__main__':
  main()
