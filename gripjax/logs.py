"""What a run prints: the project's own progress and results; library detail only when asked.

Orbax logs every step of every checkpoint write at INFO (about 30 lines per save: thousands per
run), and JAX and tfds add their own. `quiet_libraries()` (called by `main`) keeps, at the default
`--verbosity=0`:

  - every record at WARNING or above, whoever logs it;
  - INFO records logged from gripjax's own modules (progress, metrics, paths written).

With `--verbosity=1` (or higher) everything passes again, Orbax's detail included. The filter sits
on absl's handler and reads the verbosity when a record arrives, so the flag's value counts, whenever
it is parsed.
"""

from __future__ import annotations

import logging
import os

from absl import logging as absl_logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def is_project_record(record: logging.LogRecord) -> bool:
  """Whether `record` was logged from a module of the gripjax package."""
  return os.path.abspath(record.pathname).startswith(PACKAGE_DIR)


class QuietLibraries(logging.Filter):
  """Drops other packages' records below WARNING unless absl's verbosity is >= 1."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING or absl_logging.get_verbosity() >= 1:
      return True
    return is_project_record(record)


def quiet_libraries() -> QuietLibraries:
  """Installs `QuietLibraries` on absl's log handler (once); returns it."""
  handler = absl_logging.get_absl_handler()
  for f in handler.filters:
    if isinstance(f, QuietLibraries):
      return f
  f = QuietLibraries()
  handler.addFilter(f)
  return f
