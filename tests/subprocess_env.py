"""XLA settings for the tests, and the environment of tests that start sd3jax in a subprocess.

The tests compile hundreds of small programs and run few of them for long, so LLVM's
optimisation passes cost more than they save: at level 0 a CPU compile of a random
initialiser takes a third of the time, and the VAE trainer tests run in about 60% of it. Numerics are
unchanged up to rounding, and every comparison in the tests is between programs compiled
the same way (or within a stated tolerance of a PyTorch reference).
"""
import os

CODEGEN_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for `devices` simulated CPU devices (1: a plain process, as a user runs it)."""
  if devices == 1:
    return CODEGEN_FLAGS
  return f"{CODEGEN_FLAGS} --xla_force_host_platform_device_count={devices}"


def env(devices: int = 1, **extra: str) -> dict[str, str]:
  """This process's environment for an sd3jax subprocess on the CPU with `devices` devices."""
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", **extra)
