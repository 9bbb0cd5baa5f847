"""Bytes per device of a geometry's VLM params under each sharding strategy, and its CLI.

From `jax.eval_shape`, so no weights are allocated; with fewer real devices than asked, on a
`jax.sharding.AbstractMesh`:

  python -m gripjax.train.sharding_report --config=configs/llava_1p5_7b.py                 # 8 devices
  python -m gripjax.train.sharding_report --config=configs/llava_1p5_7b.py --mesh=data=1,fsdp=8
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m gripjax.train.sharding_report \\
      --config=configs/llava_1p5_7b.py                                              # real mesh
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from gripjax import runtime
from gripjax.models import vlm as vlm_lib
from gripjax.train.sharding import (DATA_AXIS, FSDP_AXIS, STRATEGIES, TENSOR_AXIS, ShardingRules,
                                    abstract_mesh, bytes_per_device, check_all_sharded, mesh_shape,
                                    param_shardings, sharding_config)


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  """'data=1,fsdp=8' -> (('data', 1), ('fsdp', 8)), the `config.train.mesh` format."""
  pairs = []
  for item in text.split(','):
    name, sep, size = item.partition('=')
    try:
      if not sep or not name.strip():
        raise ValueError
      pairs.append((name.strip(), int(size)))
    except ValueError:
      raise ValueError(f'mesh {text!r} is invalid: expected comma-separated axis=size pairs, e.g. '
                       "'data=1,fsdp=8' (size -1 takes the remaining devices).") from None
  return tuple(pairs)


def default_report_mesh(strategy: str, num_devices: int) -> tuple[tuple[str, int], ...]:
  """The mesh the report uses for a strategy: all devices on the axes the strategy splits over."""
  if strategy == 'replicate':
    return ((DATA_AXIS, num_devices),)
  if strategy == 'fsdp':
    return ((DATA_AXIS, 1), (FSDP_AXIS, num_devices))
  if strategy == 'tensor':
    return ((DATA_AXIS, 1), (TENSOR_AXIS, num_devices))
  tensor = max(t for t in range(1, num_devices + 1) if num_devices % t == 0 and t * t <= num_devices)
  return ((DATA_AXIS, 1), (FSDP_AXIS, num_devices // tensor), (TENSOR_AXIS, tensor))


def _mesh_text(spec) -> str:
  return ','.join(f'{name}={size}' for name, size in spec)


def report(config, num_devices: int = 8, mesh_spec=None, strategies: Sequence[str] = STRATEGIES,
           devices: Sequence[Any] | None = None, print_fn=print) -> list[dict[str, Any]]:
  """Bytes per device of the config's VLM params under each strategy; weights are never allocated.

  Args:
    config: a full config (its `model` section gives the geometry; `train.sharding` the rules).
    num_devices: devices of the planned mesh.
    mesh_spec: one mesh for every strategy ((name, size), ...); None: `default_report_mesh`.
      Strategies whose axes the mesh lacks are reported as skipped.
    strategies: which strategies to report.
    devices: real devices to build the mesh on (len == num_devices); None: an AbstractMesh.
    print_fn: where the table goes.

  Returns:
    One dict per strategy: strategy, mesh, leaves, split_leaves, bytes_f32, bytes_bf16, ratio
    (bytes over the replicated bytes), or skipped (the reason).
  """
  vocab = config.model.llm.vocab_size or runtime.vocab_size(config)  # 0: the shipped tokenizer's.
  model = vlm_lib.make_vlm(config.model, vocab)
  abstract = jax.eval_shape(functools.partial(vlm_lib.init_params, model), jax.random.PRNGKey(0))
  abstract = abstract['params']
  leaves = jax.tree.leaves(abstract)
  count = sum(math.prod(x.shape) for x in leaves)
  full_f32 = sum(math.prod(x.shape) * 4 for x in leaves)
  c = sharding_config(config)
  unit, scale = ('GiB', 2.0 ** 30) if full_f32 >= 2 ** 30 else ('MiB', 2.0 ** 20)
  print_fn(f'VLM params: {count:,} scalars in {len(leaves)} leaves; {full_f32 / scale:.2f} {unit} f32, '
           f'{full_f32 / 2 / scale:.2f} {unit} bf16 unsharded; {num_devices} devices '
           f'({"real" if devices is not None else "abstract mesh"})')
  print_fn(f'{"strategy":<12} {"mesh":<26} {"split leaves":>12} {f"f32 {unit}/dev":>12} '
           f'{f"bf16 {unit}/dev":>12} {"x replicated":>12}')
  rows = []
  for strategy in strategies:
    spec = mesh_spec if mesh_spec is not None else default_report_mesh(strategy, num_devices)
    rules = ShardingRules(strategy=strategy, param_axes=c.param_axes,
                          logical_axis_rules=c.logical_axis_rules, fsdp_min_size=c.fsdp_min_size)
    names, sizes = mesh_shape(spec, num_devices)
    missing = [a for a in rules.mesh_axes_needed() if a not in names]
    if missing:
      rows.append(dict(strategy=strategy, mesh=_mesh_text(spec), skipped=f'mesh has no {missing} axes'))
      print_fn(f'{strategy:<12} {_mesh_text(spec):<26} skipped: the mesh has no {missing} axes')
      continue
    if devices is None:
      mesh = abstract_mesh(spec, num_devices)
    else:
      mesh = jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                           devices=devices)
    shardings = param_shardings(abstract, mesh, rules)
    split = check_all_sharded(abstract, shardings, mesh)
    b32 = bytes_per_device(abstract, shardings)
    b16 = bytes_per_device(abstract, shardings, dtype='bfloat16')
    row = dict(strategy=strategy, mesh=_mesh_text(zip(names, sizes)), leaves=len(leaves),
               split_leaves=split, bytes_f32=b32, bytes_bf16=b16, ratio=b32 / full_f32)
    rows.append(row)
    print_fn(f'{strategy:<12} {row["mesh"]:<26} {f"{split}/{len(leaves)}":>12} {b32 / scale:>12.3f} '
             f'{b16 / scale:>12.3f} {row["ratio"]:>12.4f}')
  return rows


def _main():
  """`python -m gripjax.train.sharding_report --config=FILE [--mesh=data=1,fsdp=8] [--num_devices=8]`."""
  config_flag = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.',
                                                lock_config=True)
  mesh_flag = flags.DEFINE_string('mesh', None, "One mesh for every strategy, e.g. 'data=1,fsdp=8'; "
                                  'default: per strategy, all devices on the axes it splits over.')
  devices_flag = flags.DEFINE_integer('num_devices', 8, 'Devices of the planned mesh.')
  strategies_flag = flags.DEFINE_list('strategies', list(STRATEGIES), 'Strategies to report.')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {argv[1:]!r}')
    if config_flag.value is None:
      raise app.UsageError('--config is required, e.g. --config=configs/llava_1p5_7b.py')
    for s in strategies_flag.value:
      if s not in STRATEGIES:
        raise app.UsageError(f'--strategies has {s!r}: expected names from {STRATEGIES}')
    n = devices_flag.value
    if n < 1:
      raise app.UsageError(f'--num_devices={n} is invalid: expected a positive integer')
    try:
      mesh_spec = None if mesh_flag.value is None else parse_mesh(mesh_flag.value)
      if mesh_spec is not None:
        mesh_shape(mesh_spec, n)  # Fails early naming the mesh.
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    # A real mesh when this process has exactly the devices asked for (e.g. 8 fake CPU devices).
    devices = jax.devices() if jax.device_count() == n else None
    rows = report(config_flag.value, n, mesh_spec, strategies_flag.value, devices)
    if not any('skipped' not in r for r in rows):
      raise SystemExit('error: every strategy was skipped: the mesh lacks the axes they need.')

  app.run(main)


if __name__ == '__main__':
  _main()
