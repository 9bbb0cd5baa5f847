"""Generated tokens per second: a batch of mixed budgets vs every request at full budget.

  python benchmarks/throughput.py                                  # tiny config, shipped VLM
  python benchmarks/throughput.py --random_weights --json=/tmp/throughput.json
  python benchmarks/throughput.py --pruner=fastervlm --new_tokens=16
  python benchmarks/throughput.py --config=configs/gripbench_tiny.py:smoke --batch=2   # seconds

Runs `gripjax.inference.PrunedGenerator` end to end (vision tower, pruner, prefill on the gathered
1 + k + T slots, greedy decoding against the KV cache of kept tokens) on one batch of B requests:

  full        every request at rho = 1, no pruner
  rho = r     every request at budget r (one bucket)
  mixed       the budgets cycled over the batch (one bucket per k, run one after another)

Every workload is compiled and run once before timing (warm-up excluded), then all are timed
interleaved over repeats, so the ratios compare like with like on this machine. Bucket sizes are
allowed up to B exactly, so no workload is padded. The agent ('grip') uses random scorer params unless
--agent points at a trained one: its cost does not depend on the values. FLOP ratios come from
`gripjax.models.costs.request_flops` (vision feature layers + scorer + prefill + decode).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from gripjax import budget
from gripjax import checks
from gripjax import config_lib
from gripjax import runtime
from gripjax.models import costs
from gripjax.inference import DEFAULT_BATCH_SIZES
from gripjax.inference import PrunedGenerator
from gripjax.models import scorer as scorer_lib
from gripjax.models import vlm as vlm_lib
from gripjax.rl import policy
from tests import helpers

QUESTIONS = ('how many digits are there?', 'what color is the 3?', 'is there a 7 left of the 2?',
             'which digit is the largest?')


def device_description() -> str:
  d = jax.devices()[0]
  return (f'{d.device_kind} ({jax.default_backend()}, {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} CPU cores visible)')


def random_tree(abstract, seed: int, dtype=None):
  """normal(0, 0.02) per leaf, without running init (timing does not depend on the values)."""
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [(0.02 * jax.random.normal(k, x.shape)).astype(dtype or x.dtype)
                                      for k, x in zip(keys, leaves)])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/gripbench_tiny.py', help='configs/NAME.py[:ARG]')
  parser.add_argument('--batch', type=int, default=48, help='requests per batch (B)')
  parser.add_argument('--budgets', default='0.5,0.25,0.111111', help='budgets cycled over the mixed batch')
  parser.add_argument('--new_tokens', type=int, default=8, help='tokens generated per request')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--pruner', default='grip', help="'grip' (the agent) or a method of gripjax.pruning")
  parser.add_argument('--agent', default=None, help='trained agent checkpoint (default: random scorer params)')
  parser.add_argument('--random_weights', action='store_true', help='random VLM weights, not config.vlm_checkpoint')
  parser.add_argument('--json', default=None, help='write the figures here')
  args = parser.parse_args()

  path, _, config_arg = args.config.partition(':')  # configs/NAME.py[:ARG], as --config of main.py
  name = os.path.splitext(os.path.basename(path))[0]
  config = checks.check_config(helpers.load_config(name, config_arg or None))
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  mc = vlm_lib.ModelConfig.from_config(vlm.config)
  n, s, t, m, b = mc.num_visual_tokens, mc.vit.image_size, config.data.max_question_len, args.new_tokens, args.batch
  vocab = runtime.vocab_size(config, tok)
  abstract = jax.eval_shape(functools.partial(vlm_lib.init_params, vlm), jax.random.PRNGKey(0))['params']
  if args.random_weights or config.vlm_checkpoint is None:
    params, weights = random_tree(abstract, 0, mc.activation_dtype), 'random'
  else:
    params, weights = runtime.load_vlm_params(config, vlm), str(config.vlm_checkpoint)

  budgets = [budget.check_rho(float(x), '--budgets') for x in args.budgets.split(',')]
  mixed = [budgets[i % len(budgets)] for i in range(b)]
  agent_params, agent_note = None, ''
  scorer = scorer_lib.make_scorer(config)
  if args.pruner == 'grip':
    abstract_agent = jax.eval_shape(lambda r: scorer_lib.init_scorer(scorer, r, n, mc.llm.width, t),
                                    jax.random.PRNGKey(0))
    if args.agent:
      from gripjax.train import checkpoint  # pylint: disable=g-import-not-at-top
      agent_params, agent_note = checkpoint.load_params(config_lib.resolve_path(args.agent), abstract_agent), args.agent
    else:
      agent_params, agent_note = random_tree(abstract_agent, 1), 'random scorer params (timing only)'
  counts = {budget: mixed.count(budget) for budget in budgets}
  sizes = sorted(set(DEFAULT_BATCH_SIZES) | {b} | set(counts.values()))
  full_gen = PrunedGenerator(config, vlm, params, tok, None, batch_sizes=sizes)
  gen = PrunedGenerator(config, vlm, params, tok, args.pruner, agent_params, batch_sizes=sizes)

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
  questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(b)]
  workloads = {'full': (full_gen, [1.0] * b)}
  workloads.update({f'rho={r:.3f}': (gen, [r] * b) for r in budgets})
  workloads['mixed'] = (gen, mixed)

  # The agent alone (score + top-k + gather) on one uniform batch per budget, for its time share.
  def agent_only(visual, question, mask, rho, k):
    logits = scorer.apply({'params': agent_params}, visual, question, mask, rho)  # (B, N)
    index = policy.greedy(logits, k)
    return jnp.take_along_axis(visual, jnp.sort(index, axis=-1)[..., None], axis=1)
  agent_inputs = (jax.random.normal(jax.random.PRNGKey(2), (b, n, mc.llm.width), mc.activation_dtype),
                  jax.random.normal(jax.random.PRNGKey(3), (b, t, mc.llm.width), mc.activation_dtype),
                  jnp.ones((b, t), bool))
  agent_fns = {}
  if args.pruner == 'grip':
    for r in budgets:
      k = gen.kept_tokens(r)[0]
      agent_fns[f'rho={r:.3f}'] = functools.partial(jax.jit(agent_only, static_argnums=4), *agent_inputs,
                                                    jnp.full((b,), r, jnp.float32), k)

  t0 = time.perf_counter()
  answers = {}
  for key, (g, rho) in workloads.items():  # warm-up: compiles every bucket (excluded from timing)
    answers[key] = g.generate(images, questions, rho, m)
  for fn in agent_fns.values():
    fn().block_until_ready()
  compile_s = time.perf_counter() - t0
  compiled = full_gen.num_compiled() + gen.num_compiled()
  times = {key: [] for key in workloads}
  agent_times = {key: [] for key in agent_fns}
  for _ in range(args.repeats):
    for key, (g, rho) in workloads.items():  # interleaved so drift hits every workload alike
      t1 = time.perf_counter()
      g.generate(images, questions, rho, m)  # returns host strings: everything has finished
      times[key].append(time.perf_counter() - t1)
    for key, fn in agent_fns.items():
      t1 = time.perf_counter()
      fn().block_until_ready()
      agent_times[key].append(time.perf_counter() - t1)
  assert full_gen.num_compiled() + gen.num_compiled() == compiled, 'recompiled while timing'

  def flops(rhos, pruned):
    return sum(costs.request_flops(config, gen.kept_tokens(r)[0], t, m, vocab,
                                        scorer=pruned and args.pruner == 'grip')['total'] for r in rhos)

  full_s = float(np.median(times['full']))
  full_flops = flops(workloads['full'][1], False)
  device = device_description()
  print(f'config={name} device={device}')
  print(f'weights={weights} pruner={args.pruner}{" (" + agent_note + ")" if agent_note else ""} '
        f'batch={b} text_len={t} new_tokens={m} N={n} dtype={mc.dtype} repeats={args.repeats} '
        f'warm-up/compile {compile_s:.1f}s excluded')
  print(f'{"workload":>11} {"kept":>9} {"ms":>9} {"tok/s":>9} {"measured x":>11} {"FLOP x":>7} '
        f'{"ratio":>6} {"agent %":>8} {"KV bytes/req":>13}')
  rows = []
  for key, (_, rhos) in workloads.items():
    med = float(np.median(times[key]))
    ks = gen.kept_tokens(rhos, b) if key != 'full' else [n] * b
    kept = str(ks[0]) if len(set(ks)) == 1 else '/'.join(str(k) for k in sorted(set(ks), reverse=True))
    measured = full_s / med
    flop = full_flops / flops(rhos, key != 'full')
    agent_share = float(np.median(agent_times[key])) / med if key in agent_times else None
    kv = int(np.mean([costs.kv_cache_bytes(config, k, t, m) for k in ks]))
    rows.append({'workload': key, 'budgets': sorted(set(rhos)), 'kept_tokens': sorted(set(ks)), 'seconds': med,
                 'tokens_per_second': b * m / med, 'measured_speedup': measured, 'flop_speedup': flop,
                 'measured_over_flop': measured / flop, 'agent_share': agent_share, 'kv_cache_bytes': kv})
    share = '-' if agent_share is None else f'{100 * agent_share:7.2f}%'
    print(f'{key:>11} {kept:>9} {1e3 * med:9.1f} {b * m / med:9.1f} {measured:11.2f} {flop:7.2f} '
          f'{measured / flop:6.2f} {share:>8} {kv:13d}')
  split = costs.request_flops(config, n, t, m, vocab)
  print(f'FLOPs per full request: vision {split["vision"]:.3g}, prefill {split["prefill"]:.3g}, '
        f'decode {split["decode"]:.3g} (vision is not pruned, so it bounds the end-to-end speed-up)')
  print(f'sample answers (full | mixed): {answers["full"][:3]} | {answers["mixed"][:3]}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'benchmark': 'throughput', 'config': name, 'device': device, 'weights': weights,
                 'pruner': args.pruner, 'agent': agent_note or None, 'batch': b, 'text_len': t,
                 'new_tokens': m, 'repeats': args.repeats, 'command': ' '.join(sys.argv),
                 'flops_per_full_request': split, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
