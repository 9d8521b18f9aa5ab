"""Test setup: 8 fake CPU devices, so sharding is tested on a real (simulated) mesh, and
XLA's quick code generation (tests/subprocess_env.py says why)."""
import os

import subprocess_env

# Each flag unless already set (by the user, or by the pytest-xdist controller's conftest).
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in subprocess_env.xla_flags(devices=8).split():
  if _flag.partition("=")[0] not in _flags:
    _flags += " " + _flag
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA cache for the session, inherited by the subprocess tests: the CLI and
# job tests compile the same small programs again in each process (a resumed run, a rerun).
# Fresh per session, so no test depends on an earlier session's entries.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sd3jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")

# torchvision (test-only: the SSCD parity reference) must be imported through the detour in
# torchvision_ref before transformers or diffusers probe it, or their torch models fail to
# import next to a CPU-only torch (tests/torchvision_ref.py says why).
import torchvision_ref  # noqa: E402

torchvision_ref.import_torchvision()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: a full-size acceptance run (about 15 minutes); skipped unless "
      "SD3JAX_SLOW=1, and reported as skipped, never as passed")
