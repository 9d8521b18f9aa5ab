"""What a person at the terminal sees: quiet logs by default, one line per event that matters.

The libraries under sd3jax (Orbax, TFDS, JAX, transformers) log at INFO for their own
developers: about 600 lines for the main job. `quiet()` keeps warnings from sd3jax and
errors from everything else; `sd3jax ... -v` (or `--verbosity=0`) shows it all again.
"""
from __future__ import annotations

import logging as py_logging
import os
import sys

# Packages whose warnings (logged through absl's handler) are noise for a user of sd3jax.
_THIRD_PARTY = ("tensorflow_datasets", "orbax", "jax/_src", "transformers", "grain")


class _ThirdPartyWarnings(py_logging.Filter):
  """Drops warnings that third-party packages emit through absl's logger (TFDS' "OpenCV is
  not installed", "Using custom data configuration") unless they are errors."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.ERROR:
      return True
    path = record.pathname.replace(os.sep, "/")
    return not any(f"/{name}/" in path for name in _THIRD_PARTY)


_FILTER = _ThirdPartyWarnings()


def quiet(verbose: bool = False) -> None:
  """Quiet defaults for the command line; with `verbose`, every library's INFO lines."""
  from absl import logging
  handlers = {*py_logging.getLogger().handlers, logging.get_absl_handler()}
  if verbose:
    logging.set_verbosity(logging.INFO)
    for handler in handlers:
      handler.removeFilter(_FILTER)
    return
  sys.unraisablehook = _drop_closed_loop_callbacks
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # "PyTorch was not found", ...
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.WARNING)
  py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.ERROR)  # "no TPU backend"
  # Orbax's reads of a damaged checkpoint fail together; after the first, asyncio reports
  # each sibling as "Task exception was never retrieved" (the step is already reported).
  py_logging.getLogger("asyncio").setLevel(py_logging.CRITICAL)
  for handler in handlers:
    handler.addFilter(_FILTER)
  try:  # TFDS' own progress bars and its "Downloading and preparing dataset" lines.
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
  except ImportError:
    pass


def _drop_closed_loop_callbacks(unraisable) -> None:
  """sys.unraisablehook: drops "Event loop is closed" from TensorStore reads that finish
  after Orbax gave up on a damaged checkpoint (hundreds of identical tracebacks, after the
  real error was already handled); everything else goes to the default hook."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return
  sys.__unraisablehook__(unraisable)


def say(message: str, every_process: bool = False) -> None:
  """A line for the person running the command, flushed at once; from process 0 only
  unless `every_process` (each host's own state, e.g. the step it resumed from)."""
  if not every_process:
    import jax
    if jax.process_index() != 0:
      return
  print(message, flush=True, file=sys.stdout)
