"""Device mesh and shardings: data-parallel batches, rule-based parameter shardings.

  mesh = make_mesh(config)                    # config.train.mesh = (('data', -1), ('fsdp', 2))
  batch = shard_batch(numpy_batch, mesh)      # rows split over 'data', one global jax.Array per key
  rules = rules_from_config(config, 'vlm_params')            # config.train.sharding.vlm_params
  shardings = param_shardings(jax.eval_shape(init, rng), mesh, rules)   # NamedSharding per leaf
  params = jax.device_put(params, shardings)

The same code runs on 1 CPU, 8 fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`),
one GPU and a TPU pod. A batch's rows and the B x G rollouts are split over the 'data' axis. Mesh
axes are `Auto` so the compiler propagates shardings from the inputs and the few explicit
constraints in the step.

Parameters are sharded by rules that are data (`default_sharding_config()`), one strategy per tree:

  replicate     every device holds every parameter.
  fsdp          leaves with at least `fsdp_min_size` scalars are split over the 'fsdp' axis along
                their largest dimension that the axis size divides (ZeRO-3 / FSDP).
  tensor        Megatron-style: `param_axes` names each dimension of the big matrices with a
                logical axis (q/k/v/gate/up/fc1 columns and o/down/fc2 rows are 'heads' / 'mlp',
                embedding and LM head 'vocab'), `logical_axis_rules` maps those to 'tensor'.
  fsdp_tensor   tensor first, then fsdp on the largest remaining dimension.

A dimension is split over a mesh axis only when the axis size divides it; otherwise that dimension
stays replicated (never an error), so one rule set fits every geometry. Norms, biases and other
leaves no rule names stay replicated under tensor; under fsdp, only when small.

The bytes-per-device report of a geometry under each strategy is `train/sharding_report.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gripjax import config_lib

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
TENSOR_AXIS = 'tensor'


def mesh_shape(spec: Sequence, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves a `config.train.mesh` spec ((name, size), ...) against `num_devices`.

  At most one size may be -1: it takes num_devices / (product of the others).
  """
  try:
    pairs = [(str(name), int(size)) for name, size in spec]
  except (TypeError, ValueError):
    raise ValueError(f'config.train.mesh={spec!r} is invalid: expected a tuple of (axis_name, size) '
                     "pairs, e.g. (('data', -1),).") from None
  if not pairs:
    raise ValueError(f'config.train.mesh={spec!r} is invalid: expected at least one axis.')
  names = tuple(n for n, _ in pairs)
  if len(set(names)) != len(names):
    raise ValueError(f'config.train.mesh={spec!r} is invalid: axis names must be unique.')
  sizes = [s for _, s in pairs]
  if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.train.mesh={spec!r} is invalid: sizes must be positive, with at most '
                     'one -1 (the remaining devices).')
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f'config.train.mesh={spec!r} is invalid: the fixed axis sizes multiply to {known}, '
                     f'which does not divide the {num_devices} devices.')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.train.mesh={spec!r} is invalid: the axis sizes multiply to '
                     f'{math.prod(sizes)}, expected the {num_devices} devices (use -1 for one axis).')
  return names, tuple(sizes)


def make_mesh(config, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """The mesh of `config.train.mesh` over `devices` (default: all devices); needs a 'data' axis."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(config.train.mesh, len(devices))
  if DATA_AXIS not in names:
    raise ValueError(f'config.train.mesh={config.train.mesh!r} is invalid: expected a {DATA_AXIS!r} axis.')
  return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def data_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'; other axes replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_size(mesh) -> int:
  return int(mesh.shape[DATA_AXIS])


def check_batch_size(batch_size: int, mesh, what: str = 'config.train.batch_size') -> None:
  """Raises unless the global batch splits evenly over the data axis and the processes."""
  n = data_size(mesh)
  if batch_size % n:
    raise ValueError(f'{what}={batch_size} is invalid: expected a multiple of the mesh\'s '
                     f'{DATA_AXIS!r} axis size {n} (every device takes the same number of rows).')
  if batch_size % jax.process_count():
    raise ValueError(f'{what}={batch_size} is invalid: expected a multiple of the '
                     f'{jax.process_count()} processes.')


def shard_batch(batch: dict[str, Any], mesh) -> dict[str, jax.Array]:
  """This process's numpy rows -> global arrays with rows split over 'data'.

  Each process passes its own rows (batch_size / process_count of them); the global batch is their
  concatenation in process order.
  """
  sharding = data_sharding(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f'batch[{key!r}] is a scalar; expected a leading batch axis.')
    check_batch_size(value.shape[0] * jax.process_count(), mesh, f'batch[{key!r}].shape[0] (global)')
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


# --- Parameter sharding rules (data, from the config). --------------------------------------------

STRATEGIES = ('replicate', 'fsdp', 'tensor', 'fsdp_tensor')

# (path regex, logical axis of each dimension). A leaf's path is its keys joined by '/', e.g.
# 'llm/layers_3/self_attn/q_proj/kernel' or, inside an optimizer state, '.../mu/token_in/kernel';
# the first rule whose regex `re.search`es the path names its dimensions. Flax Dense kernels are
# (in, out): column-parallel layers split 'out', row-parallel ones 'in' (Megatron).
DEFAULT_PARAM_AXES = (
    # Llama decoder and CLIP tower (HF LLaVA names, see gripjax/models/llm.py and vit.py).
    (r'(^|/)self_attn/(q_proj|k_proj|v_proj)/kernel$', ('embed', 'heads')),
    (r'(^|/)self_attn/(o_proj|out_proj)/kernel$', ('heads', 'embed')),
    (r'(^|/)mlp/(gate_proj|up_proj|fc1)/kernel$', ('embed', 'mlp')),
    (r'(^|/)mlp/(down_proj|fc2)/kernel$', ('mlp', 'embed')),
    (r'(^|/)embed_tokens/embedding$', ('vocab', 'embed')),
    (r'(^|/)lm_head/kernel$', ('embed', 'vocab')),
    # LLaVA projector (mlp2x_gelu): linear_1 column-parallel, linear_2 row-parallel.
    (r'(^|/)projector/linear_1/kernel$', ('embed', 'mlp')),
    (r'(^|/)projector/linear_2/kernel$', ('mlp', 'embed')),
    # The agent (gripjax/models/scorer.py): DenseGeneral attention (d, H, Dh) -> (H, Dh, d), MLP.
    (r'(^|/)(query|key|value)/kernel$', ('embed', 'heads', None)),
    (r'(^|/)(attn|cross_attn)/out/kernel$', ('heads', None, 'embed')),
    (r'(^|/)mlp_in/kernel$', ('embed', 'mlp')),
    (r'(^|/)mlp_out/kernel$', ('mlp', 'embed')),
)

# (logical axis, mesh axis or tuple of mesh axes) used by the tensor strategies; logical axes not
# listed ('embed', None) stay replicated by them.
DEFAULT_LOGICAL_AXIS_RULES = (('heads', TENSOR_AXIS), ('mlp', TENSOR_AXIS), ('vocab', TENSOR_AXIS))

DEFAULT_FSDP_MIN_SIZE = 2 ** 16


def default_sharding_config() -> ml_collections.ConfigDict:
  """The `config.train.sharding` section: which strategy shards which tree, and the rules."""
  c = ml_collections.ConfigDict()
  # Frozen VLM params: 'replicate' | 'fsdp' | 'tensor' | 'fsdp_tensor' (the mesh needs the axes).
  c.vlm_params = 'replicate'
  # Agent params, their reference copy and the optimizer state: same choices.
  c.agent_params = 'replicate'
  # Under fsdp, leaves with fewer scalars than this (norms, biases, small tables) stay replicated.
  c.fsdp_min_size = DEFAULT_FSDP_MIN_SIZE
  # ((path regex, logical axis per dimension), ...): the first regex that re.search-es a path wins.
  c.param_axes = DEFAULT_PARAM_AXES
  # ((logical axis, mesh axis), ...) applied by 'tensor' and 'fsdp_tensor'.
  c.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES
  return c


def sharding_config(config) -> ml_collections.ConfigDict:
  """`config.train.sharding`, or the defaults when the config has no such section."""
  train = config.get('train') if hasattr(config, 'get') else None
  if train is not None and 'sharding' in train:
    return train.sharding
  return default_sharding_config()


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """How one pytree is sharded: a strategy and the rules it reads (see the module docstring)."""
  strategy: str = 'replicate'
  param_axes: tuple = DEFAULT_PARAM_AXES
  logical_axis_rules: tuple = DEFAULT_LOGICAL_AXIS_RULES
  fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE
  what: str = 'strategy'  # The setting's name in errors, e.g. 'config.train.sharding.vlm_params'.

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f'{self.what}={self.strategy!r} is invalid: expected one of {STRATEGIES}.')
    size = self.fsdp_min_size
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 0:
      raise ValueError(f'fsdp_min_size={size!r} is invalid: expected a non-negative integer.')
    _compiled_param_axes(_freeze(self.param_axes))  # Raises on a malformed rule.
    _logical_map(_freeze(self.logical_axis_rules))

  def mesh_axes_needed(self) -> tuple[str, ...]:
    """Mesh axes this strategy splits over (each must exist in the mesh, size 1 allowed)."""
    axes = []
    if self.strategy in ('tensor', 'fsdp_tensor'):
      for mesh_axes in _logical_map(_freeze(self.logical_axis_rules)).values():
        axes.extend(a for a in mesh_axes if a not in axes)
    if self.strategy in ('fsdp', 'fsdp_tensor') and FSDP_AXIS not in axes:
      axes.append(FSDP_AXIS)
    return tuple(axes)


def rules_from_config(config, which: str) -> ShardingRules:
  """The rules of `config.train.sharding.<which>` ('vlm_params' or 'agent_params')."""
  if which not in ('vlm_params', 'agent_params'):
    raise ValueError(f"which={which!r} is invalid: expected 'vlm_params' or 'agent_params'.")
  c = sharding_config(config)
  return ShardingRules(strategy=c[which], param_axes=c.param_axes,
                       logical_axis_rules=c.logical_axis_rules, fsdp_min_size=c.fsdp_min_size,
                       what=f'config.train.sharding.{which}')


def check(config, num_devices: int | None = None) -> None:
  """Start-up check of `config.train.mesh` and `config.train.sharding`.

  The mesh spec must be well formed, have a 'data' axis and resolve over `num_devices` (default:
  `jax.device_count()`, every device of the job) with `train.batch_size` a multiple of its data
  axis; the sharding strategies may only use axes the mesh has.

  Raises:
    config_lib.ConfigError naming the field, its value and what was expected.
  """
  if 'train' not in config:
    return
  mesh_spec = config.train.mesh
  ok = isinstance(mesh_spec, tuple) and mesh_spec and all(
      isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and config_lib.is_int(p[1])
      and (p[1] >= 1 or p[1] == -1) for p in mesh_spec)
  if not ok:
    config_lib.fail('train.mesh', mesh_spec, "a non-empty tuple of (axis_name, size) pairs with size "
                    ">= 1 or -1, e.g. (('data', -1),)")
  mesh_names = [name for name, _ in mesh_spec]
  if DATA_AXIS not in mesh_names:
    config_lib.fail('train.mesh', mesh_spec, f'a {DATA_AXIS!r} axis')
  num_devices = jax.device_count() if num_devices is None else num_devices
  try:
    names, sizes = mesh_shape(mesh_spec, num_devices)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  data = sizes[names.index(DATA_AXIS)]
  if config.train.batch_size % data:
    config_lib.fail('train.batch_size', config.train.batch_size,
                    f"a multiple of the mesh's {DATA_AXIS!r} axis size {data} over {num_devices} devices")
  c = sharding_config(config)
  for which in ('vlm_params', 'agent_params'):
    try:
      rules = rules_from_config(config, which)
    except ValueError as e:
      if str(e).startswith('config.'):
        raise config_lib.ConfigError(str(e)) from None
      raise config_lib.ConfigError(f'config.train.sharding.{e}') from None  # e starts with the field.
    missing = [a for a in rules.mesh_axes_needed() if a not in mesh_names]
    if missing:
      raise config_lib.ConfigError(
          f'config.train.sharding.{which}={c[which]!r} is invalid with '
          f'config.train.mesh={mesh_spec!r}: expected the mesh to have the axes '
          f'{missing} (add e.g. ({missing[0]!r}, 2), or use a strategy without them).')


def _freeze(x):
  """Nested lists and tuples -> nested tuples (hashable, for the rule caches)."""
  return tuple(_freeze(v) for v in x) if isinstance(x, (list, tuple)) else x


@functools.lru_cache(maxsize=None)
def _compiled_param_axes(param_axes: tuple) -> tuple[tuple[re.Pattern, tuple], ...]:
  out = []
  for i, rule in enumerate(param_axes):
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str) and \
        isinstance(rule[1], (tuple, list)) and all(a is None or isinstance(a, str) for a in rule[1])
    if not ok:
      raise ValueError(f'param_axes[{i}]={rule!r} is invalid: expected (path_regex, (logical axis '
                       "or None, ...)), e.g. (r'q_proj/kernel$', ('embed', 'heads')).")
    try:
      pattern = re.compile(rule[0])
    except re.error as e:
      raise ValueError(f'param_axes[{i}] regex {rule[0]!r} is invalid: {e}.') from None
    out.append((pattern, tuple(rule[1])))
  return tuple(out)


@functools.lru_cache(maxsize=None)
def _logical_map(logical_axis_rules: tuple) -> dict[str, tuple[str, ...]]:
  out = {}
  for i, rule in enumerate(logical_axis_rules):
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    mesh_axes = ()
    if ok:
      mesh_axes = (rule[1],) if isinstance(rule[1], str) else rule[1]
      ok = isinstance(mesh_axes, (tuple, list)) and mesh_axes and all(
          isinstance(a, str) for a in mesh_axes)
    if not ok:
      raise ValueError(f'logical_axis_rules[{i}]={rule!r} is invalid: expected (logical_axis, '
                       "mesh_axis or (mesh_axis, ...)), e.g. ('heads', 'tensor').")
    out.setdefault(rule[0], tuple(mesh_axes))  # The first rule for a logical axis wins.
  return out


def path_str(path) -> str:
  """'llm/layers_0/mlp/up_proj/kernel' for a `jax.tree_util` key path (dict keys, attrs, indices)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def logical_axes(path: str, ndim: int, rules: ShardingRules) -> tuple:
  """The logical axis of each dimension of the leaf at `path` (None where no rule names it)."""
  for pattern, axes in _compiled_param_axes(_freeze(rules.param_axes)):
    if pattern.search(path):
      if len(axes) != ndim:
        raise ValueError(f'param_axes rule {pattern.pattern!r} -> {axes} names {len(axes)} '
                         f'dimensions, but {path!r} has {ndim}: fix the regex or the axes.')
      return axes
  return (None,) * ndim


def partition_spec(path: str, shape: Sequence[int], mesh, rules: ShardingRules) -> P:
  """The PartitionSpec of one leaf (see the module docstring for the strategies).

  Args:
    path: the leaf's '/'-joined key path (`path_str`).
    shape: the leaf's shape.
    mesh: a `jax.sharding.Mesh` or `AbstractMesh` (only its axis names and sizes are read).
    rules: the strategy and rules.

  Returns:
    A PartitionSpec with one entry per dimension: None, a mesh axis name, or a tuple of them.
  """
  shape = tuple(int(d) for d in shape)
  sizes = dict(mesh.shape)
  missing = [a for a in rules.mesh_axes_needed() if a not in sizes]
  if missing:
    raise ValueError(f'{rules.what}={rules.strategy!r} needs the mesh axes {missing}; the mesh has '
                     f'{tuple(sizes)}.')
  entries: list[Any] = [None] * len(shape)
  if rules.strategy == 'replicate' or not shape:
    return P(*entries)
  used = set()
  if rules.strategy in ('tensor', 'fsdp_tensor'):
    logical = logical_axes(path, len(shape), rules)
    mapping = _logical_map(_freeze(rules.logical_axis_rules))
    for dim, name in enumerate(logical):
      mesh_axes = tuple(a for a in mapping.get(name, ()) if a not in used and sizes[a] > 1)
      if not mesh_axes or shape[dim] % math.prod(sizes[a] for a in mesh_axes):
        continue  # Not named, or not divisible: this dimension stays replicated.
      entries[dim] = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
      used.update(mesh_axes)
  n = sizes.get(FSDP_AXIS, 1)
  if (rules.strategy in ('fsdp', 'fsdp_tensor') and n > 1 and FSDP_AXIS not in used
      and math.prod(shape) >= rules.fsdp_min_size):
    free = [d for d in range(len(shape)) if entries[d] is None and shape[d] % n == 0]
    if free:
      entries[max(free, key=lambda d: (shape[d], -d))] = FSDP_AXIS  # Largest; first on ties.
  return P(*entries)


def param_specs(tree, mesh, rules: ShardingRules | str):
  """A PartitionSpec for every leaf of `tree` (abstract or concrete arrays; any pytree).

  Works on a params tree and on a whole train state: optimizer moments sit under paths that end in
  the param's path, so the same regexes name them; scalars and small leaves stay replicated.
  """
  if isinstance(rules, str):
    rules = ShardingRules(strategy=rules)

  def spec(path, leaf):
    if not hasattr(leaf, 'shape'):
      raise ValueError(f'leaf {path_str(path)!r} of type {type(leaf).__name__} has no shape: '
                       'expected arrays or jax.ShapeDtypeStruct.')
    return partition_spec(path_str(path), leaf.shape, mesh, rules)

  return jax.tree_util.tree_map_with_path(spec, tree)


def param_shardings(tree, mesh, rules: ShardingRules | str):
  """A NamedSharding for every leaf of `tree`, e.g. `jax.eval_shape(init, rng)`.

  Args:
    tree: pytree of arrays or jax.ShapeDtypeStruct (params, or a train state with optimizer state).
    mesh: a `jax.sharding.Mesh` (to place arrays) or `AbstractMesh` (to plan without devices).
    rules: a ShardingRules, or a strategy name with the default rules.

  Returns:
    The same tree structure with a NamedSharding(mesh, spec) at every leaf.
  """
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def bytes_per_device(tree, shardings, dtype=None) -> int:
  """Bytes the largest-loaded device holds for `tree` placed with `shardings`.

  Args:
    tree: pytree of arrays or jax.ShapeDtypeStruct.
    shardings: the matching tree of jax.sharding.Sharding (e.g. from `param_shardings`).
    dtype: count floating-point leaves at this dtype (e.g. 'bfloat16') instead of their own.

  Returns:
    max over devices of the sum of that device's shard sizes, in bytes. On an AbstractMesh every
    device holds one shard of `sharding.shard_shape(shape)` per leaf.
  """
  leaves, treedef = jax.tree.flatten(tree)
  sharding_leaves = treedef.flatten_up_to(shardings)
  per_device: dict[Any, int] = collections.defaultdict(int)
  uniform = 0  # Bytes on every device (abstract meshes).
  for leaf, sharding in zip(leaves, sharding_leaves):
    leaf_dtype = np.dtype(leaf.dtype)
    if dtype is not None and jnp.issubdtype(leaf_dtype, jnp.floating):
      leaf_dtype = np.dtype(dtype)
    shape = tuple(leaf.shape)
    mesh = getattr(sharding, 'mesh', None)
    if isinstance(mesh, jax.sharding.AbstractMesh):
      uniform += math.prod(sharding.shard_shape(shape)) * leaf_dtype.itemsize
      continue
    for device, index in sharding.devices_indices_map(shape).items():
      n = math.prod(len(range(*s.indices(d))) for s, d in zip(index, shape))
      per_device[device] += n * leaf_dtype.itemsize
  return uniform + max(per_device.values(), default=0)


# --- Meshes without devices. -----------------------------------------------------------------------

def abstract_mesh(spec: Sequence, num_devices: int) -> jax.sharding.AbstractMesh:
  """An AbstractMesh of `spec` ((name, size), ...) over `num_devices` that need not exist."""
  names, sizes = mesh_shape(spec, num_devices)
  return jax.sharding.AbstractMesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def check_all_sharded(tree, shardings, mesh) -> int:
  """Asserts every leaf has a NamedSharding on `mesh` whose split dimensions divide evenly.

  Returns:
    The number of leaves split over at least one mesh axis.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  sharding_leaves = treedef.flatten_up_to(shardings)
  sizes = dict(mesh.shape)
  split = 0
  for (path, leaf), s in zip(leaves, sharding_leaves):
    name = path_str(path)
    if not isinstance(s, NamedSharding) or s.mesh != mesh:
      raise AssertionError(f'{name!r} has no NamedSharding on the mesh: {s!r}')
    for dim, entry in zip(leaf.shape, tuple(s.spec) + (None,) * (len(leaf.shape) - len(s.spec))):
      axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
      if dim % math.prod(sizes[a] for a in axes):
        raise AssertionError(f'{name!r} {tuple(leaf.shape)} has spec {s.spec}: {dim} does not split '
                             f'over {axes}.')
    split += any(e is not None for e in s.spec)
  return split
