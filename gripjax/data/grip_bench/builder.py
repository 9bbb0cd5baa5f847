"""tfds builder for GRIP-Bench, written as array_record and read back without tensorflow.

  from gripjax.data.grip_bench import builder
  source = builder.load_split('train', config.data, image_size=96, patch_size=8,
                              data_dir='/tmp/tfds')
  len(source); source[0]['image']  # uint8 (96, 96, 3)

Nothing is downloaded: the examples are rendered by `scenes.render_example` (family 'standard') or
`dense.render_example` (family 'dense', `config.data.family`), so a dataset is fixed by (family,
seed, split sizes, image_size, patch_size), all of which are in the BuilderConfig name, e.g.
`s0_tr24000_va1000_te2000_i96_p8` (standard) or `dense_s0_tr24000_va1000_te2000_i96_p8`; different
settings, and the two families, live in different directories.

tfds prepares into `<data_dir>/grip_bench/<config>/<version>` by writing a randomly named
`incomplete.XXXXXX_*` directory and renaming it when done, so a killed prepare leaves no half
dataset behind (only a stale temp dir). Two processes preparing at once would both generate, and the
second rename fails; `load_split` serializes prepares on one host with a file lock and re-checks.
"""

import dataclasses
import fcntl
import hashlib
import multiprocessing
import os
import tempfile
import time
import zlib

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from gripjax.data import pipeline
from gripjax.data.grip_bench import dense
from gripjax.data.grip_bench import scenes

_SPLIT_SIZE_FIELDS = {'train': 'num_train', 'validation': 'num_validation', 'test': 'num_test'}
# Picklable (seed, split, index, image_size, patch_size) -> (index, features) of each family.
_RENDER = {'standard': scenes.render_features, 'dense': dense.render_features}


@dataclasses.dataclass(eq=False)
class GripBenchConfig(tfds.core.BuilderConfig):
  """What fixes a GRIP-Bench dataset: family, seed, split sizes, geometry."""
  family: str = 'standard'  # pipeline.FAMILIES: which generator renders the examples.
  seed: int = 0
  num_train: int = 24000
  num_validation: int = 1000
  num_test: int = 2000
  image_size: int = 96
  patch_size: int = 8
  num_workers: int = 0  # Render processes while preparing; 0: one per CPU (max 8), 1: in-process.


def make_config(seed, num_train, num_validation, num_test, image_size=96, patch_size=8,
                num_workers=0, family='standard'):
  """Builds a GripBenchConfig whose name encodes every setting, after validating them.

  The standard family keeps its historical names (`s0_tr..._p8`), so datasets prepared before the
  dense family existed stay valid; every other family prefixes its name (`dense_s0_tr..._p8`).
  """
  if family not in pipeline.FAMILIES:
    raise ValueError(f'data.family must be one of {pipeline.FAMILIES}, got {family!r}.')
  scenes.grid_size(image_size, patch_size)
  if family == 'dense' and patch_size < 4:
    raise ValueError(f'the dense family draws shapes inside a patch: patch_size must be >= 4, got '
                     f'{patch_size}.')
  for name, n in (('num_train', num_train), ('num_validation', num_validation),
                  ('num_test', num_test)):
    if int(n) < 1:
      raise ValueError(f'data.{name} must be >= 1, got {n}.')
  name = (f's{seed}_tr{num_train}_va{num_validation}_te{num_test}_i{image_size}_p{patch_size}')
  if family != 'standard':
    name = f'{family}_{name}'
  return GripBenchConfig(
      name=name, description='GRIP-Bench ' + name, family=family, seed=int(seed), num_train=int(num_train),
      num_validation=int(num_validation), num_test=int(num_test), image_size=int(image_size),
      patch_size=int(patch_size), num_workers=int(num_workers))


class ImageTensor(tfds.features.Tensor):
  """uint8 (H, W, 3) tensor stored zlib-compressed at level 1.

  tfds' ZLIB encoding compresses at level 6, which costs ~1.6 ms per 96x96 image here and made
  encoding the bottleneck of `prepare`; level 1 is ~3x faster for ~20% more bytes. Decoding is the
  stock `Encoding.ZLIB` path (zlib streams do not depend on the level).
  """

  def __init__(self, *, shape, dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB, **kwargs):
    if encoding != tfds.features.Encoding.ZLIB and encoding != 'zlib':
      raise ValueError(f'ImageTensor is always zlib-encoded, got encoding={encoding!r}.')
    super().__init__(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.ZLIB, **kwargs)

  def encode_example(self, example_data):
    x = np.asarray(example_data)
    if x.dtype != np.uint8 or x.shape != tuple(self.shape):
      raise ValueError(f'image must be uint8 {tuple(self.shape)}, got {x.dtype} {x.shape}.')
    return zlib.compress(np.ascontiguousarray(x).tobytes(), 1)


class GripBench(tfds.core.GeneratorBasedBuilder):
  """GRIP-Bench: visual questions about coloured handwritten digits over photos.

  The dense family also stores `patch_object` and `patch_object_color` (N,): what object (none,
  digit, or which distractor shape) and which colour is on each patch.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  # No registered configs: every (seed, sizes, geometry) is a custom config made by `make_config`
  # (tfds refuses a custom config named like a registered one).
  BUILDER_CONFIGS = []

  # tfds' default `code_path` needs the `importlib_resources` backport for builders that live in a
  # package; this file's path is all it is used for (locating checksums, of which there are none).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def __init__(self, *, file_format='array_record', **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self):
    c = self.builder_config
    s, n = c.image_size, scenes.grid_size(c.image_size, c.patch_size) ** 2
    def per_patch():  # int32 (N,), one value per patch.
      return tfds.features.Tensor(shape=(n,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES)

    extra = {}
    if c.family == 'dense':
      extra = {'patch_object': per_patch(), 'patch_object_color': per_patch()}
    features = tfds.features.FeaturesDict({
        **extra,
        'image': ImageTensor(shape=(s, s, 3)),
        'question': tfds.features.Text(),
        'answer': tfds.features.Text(),
        'task': tfds.features.Text(),
        'region': tfds.features.Tensor(shape=(None,), dtype=np.int32),
        'patch_digit': per_patch(),
        'patch_color': per_patch(),
        'example_id': tfds.features.Scalar(dtype=np.int64),
    })
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features,
                                 supervised_keys=None, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    return {split: self._generate_examples(split, getattr(c, field))
            for split, field in _SPLIT_SIZE_FIELDS.items()}

  def _generate_examples(self, split, num_examples):
    c = self.builder_config
    jobs = ((c.seed, split, i, c.image_size, c.patch_size) for i in range(num_examples))
    render = _RENDER[c.family]
    pool = self._worker_pool()
    if pool is None or num_examples < 256:
      yield from map(render, jobs)
    else:
      # Rendering runs in worker processes while tfds encodes and writes in this one.
      yield from pool.imap(render, jobs, chunksize=64)

  def _worker_pool(self):
    """A process pool shared by the three splits (None: render in this process)."""
    c = self.builder_config
    workers = c.num_workers or min(os.cpu_count() or 1, 8)
    if workers <= 1:
      return None
    if getattr(self, '_pool', None) is None:
      # 'spawn': the caller may already run JAX threads, which do not survive a fork.
      self._pool = multiprocessing.get_context('spawn').Pool(workers)
    return self._pool

  def _download_and_prepare(self, *args, **kwargs):
    try:
      return super()._download_and_prepare(*args, **kwargs)
    finally:
      if getattr(self, '_pool', None) is not None:
        self._pool.terminate()
        self._pool = None


def _config_value(config_data, name):
  """Reads `name` from a ConfigDict, a dict or an object with that attribute."""
  if isinstance(config_data, dict):
    return config_data[name]
  return getattr(config_data, name)


def builder_for(config_data, image_size, patch_size, data_dir, num_workers=0):
  """The GripBench builder for the config's `data` section and the model geometry."""
  config = make_config(
      _config_value(config_data, 'seed'), _config_value(config_data, 'num_train'),
      _config_value(config_data, 'num_validation'), _config_value(config_data, 'num_test'),
      image_size=image_size, patch_size=patch_size, num_workers=num_workers,
      family=pipeline.family(config_data))
  return GripBench(config=config, data_dir=data_dir)


def prepare(config_data, image_size, patch_size, data_dir, num_workers=0):
  """Prepares the dataset if it is absent (file lock per host) and returns the builder."""
  builder = builder_for(config_data, image_size, patch_size, data_dir, num_workers)
  if builder.is_prepared():
    return builder
  lock_name = f'.grip_bench_{builder.builder_config.name}.lock'
  if '://' in str(data_dir):
    # A bucket: tfds writes there itself; the lock that serializes this host's processes is local.
    lock_dir = os.path.join(tempfile.gettempdir(),
                            'gripjax_' + hashlib.sha1(str(data_dir).encode()).hexdigest()[:12])
  else:
    lock_dir = data_dir
  os.makedirs(lock_dir, exist_ok=True)
  lock_path = os.path.join(lock_dir, lock_name)
  with open(lock_path, 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Another process preparing the same config: wait for it.
    try:
      builder = builder_for(config_data, image_size, patch_size, data_dir, num_workers)
      if not builder.is_prepared():
        t0 = time.time()
        logging.info('Preparing GRIP-Bench %s in %s ...', builder.builder_config.name, data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        logging.info('Prepared GRIP-Bench %s in %.1f s.', builder.builder_config.name,
                     time.time() - t0)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder_for(config_data, image_size, patch_size, data_dir, num_workers)


def load_split(split, config_data, image_size, patch_size, data_dir, num_workers=0):
  """Random-access data source of one split, preparing the dataset first if needed.

  Args:
    split: 'train', 'validation' or 'test'.
    config_data: the config's `data` section (seed, num_train, num_validation, num_test, and
      optionally family: 'standard' when absent).
    image_size, patch_size: model geometry (image_size // patch_size >= 6).
    data_dir: tfds data directory.
    num_workers: render processes while preparing (0: one per CPU).

  Returns:
    A tfds data source: `len(source)`, `source[i]` -> dict of numpy arrays; text features come
    back as bytes (the pipeline decodes them to str).
  """
  if split not in _SPLIT_SIZE_FIELDS:
    raise ValueError(f'split must be one of {tuple(_SPLIT_SIZE_FIELDS)}, got {split!r}.')
  if not data_dir:
    raise ValueError(f'data_dir must be a directory path, got {data_dir!r}.')
  builder = prepare(config_data, image_size, patch_size, data_dir, num_workers)
  return builder.as_data_source(split=split)
