"""Prefill time with all visual tokens vs a pruned sequence, next to the analytic FLOP ratios.

  python benchmarks/prefill.py                                   # tiny config, this machine
  python benchmarks/prefill.py --config=configs/llava_1p5_7b.py --batch=1   # 7B geometry (GPU)
  python benchmarks/prefill.py --json=/tmp/prefill.json

Times the LM prefill (the part pruning shortens) over <bos> + k visual tokens + the question, with
k physically gathered (not masked), for k = N and k = ceil(rho * N); every budget is measured in the
same run, interleaved over repeats, so the ratios compare like with like. Weights are random: timing
does not depend on their values.
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

from gripjax import config_lib
from gripjax.eval import efficiency
from gripjax.models import vlm as vlm_lib
from tests import helpers


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/gripbench_tiny.py')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--text_len', type=int, default=16)
  parser.add_argument('--budgets', default='1,0.5,0.25,0.111111')
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--json', default=None, help='write the figures here')
  args = parser.parse_args()

  name = os.path.splitext(os.path.basename(args.config))[0]
  config = config_lib.validate(helpers.load_config(name))
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

  budgets = [float(x) for x in args.budgets.split(',')]
  ks = [n if rho >= 1 else math.ceil(rho * n - 1e-6) for rho in budgets]
  inputs = {}
  for k in ks:
    visual = jax.random.normal(jax.random.PRNGKey(k), (b, k, d), dtype)
    index = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32) * (n // k), (b, k))
    inputs[k] = (visual, index, jnp.ones((b, k), bool))
    prefill(params, *inputs[k]).block_until_ready()  # compile
  times = {k: [] for k in ks}
  for _ in range(args.repeats):
    for k in ks:  # interleaved so drift hits every budget alike
      t0 = time.perf_counter()
      prefill(params, *inputs[k]).block_until_ready()
      times[k].append(time.perf_counter() - t0)
  full = np.median(times[n])
  full_flops = efficiency.prefill_flops(config, n, t, vocab)
  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()}, {platform.processor() or platform.machine()})'
  rows = []
  print(f'config={name} device={device} batch={b} text_len={t} N={n} dtype={mc.dtype}')
  print(f'{"budget":>8} {"kept":>5} {"ms":>9} {"measured x":>11} {"FLOP x":>8} {"ratio":>6}')
  for rho, k in zip(budgets, ks):
    med = float(np.median(times[k]))
    measured = full / med
    flop = full_flops / efficiency.prefill_flops(config, k, t, vocab)
    rows.append({'budget': rho, 'kept_tokens': k, 'prefill_ms': 1e3 * med, 'measured_speedup': measured,
                 'flop_speedup': flop, 'measured_over_flop': measured / flop})
    print(f'{rho:8.3f} {k:5d} {1e3 * med:9.3f} {measured:11.2f} {flop:8.2f} {measured / flop:6.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'config': name, 'device': device, 'batch': b, 'text_len': t, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
