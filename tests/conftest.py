"""Session set-up shared by every test file."""

import os

import pytest

from tests import helpers


@pytest.fixture(scope='session', autouse=True)
def subprocess_compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this pytest process's subprocesses (`helpers.subprocess_env`).

  One per pytest process (each xdist worker has its own, so the workers never share entries); the
  tests of one file, which run on one worker, reuse each other's compiled programs. Only the
  subprocesses read it: the variable it sets is not one JAX reads, and `subprocess_env` passes it on
  as JAX_COMPILATION_CACHE_DIR.
  """
  os.environ[helpers.CACHE_ENV] = str(tmp_path_factory.mktemp('jax_cache'))
  yield
  os.environ.pop(helpers.CACHE_ENV, None)
