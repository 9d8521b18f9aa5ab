"""Multi-process start-up in one place: TPU pods, SLURM GPU clusters, local CPU processes.

Every host runs the same `sd3jax` command; `initialize()` joins them into one JAX runtime
before anything touches a JAX backend (after that, jax.devices() spans all hosts). It must run
first because jax.devices(), jax.process_index() and the first jit all start the backend, and a
started backend can no longer join a cluster.

  explicit  --coordinator_address HOST:PORT --num_processes N --process_id I
            (or SD3JAX_COORDINATOR / SD3JAX_NUM_PROCESSES / SD3JAX_PROCESS_ID /
            SD3JAX_LOCAL_DEVICE_IDS): local CPU processes, any cluster without a scheduler.
  SLURM     srun with SLURM_NTASKS > 1: coordinator = first node of SLURM_STEP_NODELIST.
  TPU       a TPU VM (chips under /dev/accel* or /dev/vfio), a GKE TPU pod
            (TPU_WORKER_HOSTNAMES) or a multi-slice job (MEGASCALE_*):
            jax.distributed.initialize() reads everything from the VM metadata / environment
            (on a single-host VM it finds one process).
  otherwise one process, nothing to do.

On CPU, cross-process collectives use gloo (jax_cpu_collectives_implementation).
"""
from __future__ import annotations

import glob
import os
from typing import Mapping, Sequence

from absl import logging

ENV_COORDINATOR = "SD3JAX_COORDINATOR"
ENV_NUM_PROCESSES = "SD3JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SD3JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "SD3JAX_LOCAL_DEVICE_IDS"


def _int(value) -> int | None:
  return None if value in (None, "") else int(value)


def _ids(value) -> list[int] | None:
  if value in (None, ""):
    return None
  if isinstance(value, str):
    return [int(v) for v in value.split(",") if v.strip()]
  return [int(v) for v in value]


def detect(env: Mapping[str, str] | None = None) -> str | None:
  """Which kind of multi-process launch `env` describes: 'slurm', 'tpu' or None.

  Reads only the environment (no JAX backend is started).
  """
  env = os.environ if env is None else env
  if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS",
                                                                           "1")) > 1:
    return "slurm"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env or int(
      env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
    return "tpu"
  if env is os.environ and _on_tpu_vm():
    return "tpu"  # a TPU VM may not export its worker list: JAX asks the VM metadata
  return None


def _on_tpu_vm() -> bool:
  """libtpu installed and TPU chips attached (v4 / v5p: /dev/accel*, v5e / v6e: /dev/vfio/N)."""
  import importlib.util
  chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def _slurm_local_devices(env: Mapping[str, str]) -> list[int] | None:
  """With one task per node, all of the node's GPUs (JAX would otherwise give it only one)."""
  per_node = env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", ""))
  gpus = env.get("SLURM_GPUS_ON_NODE", "")
  if per_node.split("(")[0] == "1" and gpus.isdigit():
    return list(range(int(gpus)))
  return None  # one task per GPU: JAX uses [SLURM_LOCALID]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | str | None = None,
               *, env: Mapping[str, str] | None = None) -> bool:
  """Joins this process to a multi-process JAX runtime when the launch asks for one.

  Arguments left None fall back to SD3JAX_* variables, then to SLURM / TPU detection.
  Returns True when running distributed. Safe to call twice; a single-process run (no
  arguments, no cluster environment) starts nothing.
  """
  import jax  # importing jax does not start a backend
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  num_processes = _int(num_processes if num_processes is not None
                       else env.get(ENV_NUM_PROCESSES))
  process_id = _int(process_id if process_id is not None else env.get(ENV_PROCESS_ID))
  local_device_ids = _ids(local_device_ids if local_device_ids is not None
                          else env.get(ENV_LOCAL_DEVICE_IDS))

  if coordinator_address or (num_processes or 1) > 1:
    if num_processes == 1:
      return False
    missing = [n for n, v in (("coordinator_address", coordinator_address),
                              ("num_processes", num_processes), ("process_id", process_id))
               if v is None]
    if missing and detect(env) is None:  # on SLURM / TPU, JAX fills in the missing ones
      raise ValueError(f"Multi-process start needs --coordinator_address, --num_processes and "
                       f"--process_id together (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                       f"{ENV_PROCESS_ID}); missing: {', '.join(missing)}.")
    kind = "explicit"
  else:
    kind = detect(env)
    if kind is None:
      return False
    if kind == "slurm" and local_device_ids is None:
      local_device_ids = _slurm_local_devices(env)

  platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
  if platforms and set(platforms.split(",")) == {"cpu"}:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("Starting the distributed runtime (%s): coordinator=%s, processes=%s, id=%s, "
               "local devices=%s.", kind, coordinator_address or "auto",
               num_processes or "auto", process_id if process_id is not None else "auto",
               local_device_ids or "all")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_coordinator() -> bool:
  """True on the one process that writes logs, metrics, samples and config files."""
  import jax
  return jax.process_index() == 0
