"""Checkpoints: Orbax CheckpointManager around the train state, the data iterator and the config.

One folder per step under <workdir>/checkpoints/, holding three items:
  state   the train state (step, params, optimizer state, EMA params, rng, counters)
  data    the data iterator's JSON state, so a resume continues with the next batch
  config  the effective config of the run that wrote the step

Each step also holds `checksums`: two 32-bit sums of every state array's bits (plain and
position-weighted), computed on device when the step is saved and checked after every
restore. Storage does not check content: a flipped bit in a month-long run's optimizer
state would otherwise resume silently (issue 17 measured EMA weights of 1.6e38 that way).

Saves are asynchronous (the step loop continues while files are written). Restores go
straight into the target shardings, so a run may resume on a different mesh. A step that
cannot be restored (files cut short by a kill, missing, or failing its checksums) is
skipped with a warning for the next older one, newest first; once one restores, the bad
ones are moved aside (checkpoints/unreadable_STEP). When none restores, CheckpointError
lists every step with its reason and nothing is moved: a silent fresh start is not
acceptable.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

ITEMS = ("state", "data", "config", "checksums")


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored; the run must not start fresh."""


class ChecksumMismatch(CheckpointError):
  """A restored step's arrays differ from what was saved (bit rot, a damaged copy)."""


# ---------------------------------------------------------------------------
# Content checksums
# ---------------------------------------------------------------------------

def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (narrower types widened, 8-byte types split in two)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_sums(x: jax.Array) -> jax.Array:
  """[sum of words, sum of words x (2 index + 1)] mod 2^32. Integer sums are exact in any
  order, so the result does not depend on the sharding; the weighted sum catches swaps."""
  words = _as_uint32(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, dim) * jnp.uint32(
        stride % (1 << 32))
    stride *= words.shape[dim]
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                    jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)])


_tree_sums = jax.jit(lambda arrays: [_leaf_sums(a) for a in arrays])


def _host_leaf_sums(x: Any) -> list[int]:
  """`_leaf_sums` in NumPy on the host copy: the same words in the same row-major order."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = np.ascontiguousarray(jax.device_get(x)).reshape(-1)
  if x.dtype == np.bool_:
    words = x.astype(np.uint32)
  else:
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
    words = x.view(unsigned).astype(np.uint32)
  index = np.arange(words.size, dtype=np.uint32)
  return [int(np.sum(words, dtype=np.uint32)),
          int(np.sum(words * (index * np.uint32(2) + np.uint32(1)), dtype=np.uint32))]


# Below this many bytes in one process, checksums are summed on the host: the jitted sums
# of a state of hundreds of arrays take 6-8 s to compile on a CPU, per process and state
# layout; NumPy sums a small state in milliseconds. Larger or multi-process states are
# summed on their devices, where no array has to be gathered.
HOST_CHECKSUM_MAX_BYTES = 256 << 20


def state_checksums(state: Any, host_max_bytes: int | None = None) -> dict[str, list[int]]:
  """{leaf path: [sum, weighted sum]} of every array in `state`: on the host for a small
  single-process state (`host_max_bytes`, default HOST_CHECKSUM_MAX_BYTES), else on its
  devices. Both give the same numbers."""
  leaves = [(jax.tree_util.keystr(path), leaf) for path, leaf in
            jax.tree_util.tree_leaves_with_path(state)
            if isinstance(leaf, (jax.Array, np.ndarray))]
  limit = HOST_CHECKSUM_MAX_BYTES if host_max_bytes is None else host_max_bytes
  total = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for _, leaf in leaves)
  if jax.process_count() == 1 and total <= limit:
    return {path: _host_leaf_sums(leaf) for path, leaf in leaves}
  sums = jax.device_get(_tree_sums([leaf for _, leaf in leaves]))
  return {path: [int(v) for v in np.asarray(s)] for (path, _), s in zip(leaves, sums)}


def verify_checksums(state: Any, saved: dict[str, list[int]]) -> None:
  """Raises ChecksumMismatch naming the arrays whose bits differ from `saved`."""
  now = state_checksums(state)
  bad = [path for path, sums in saved.items() if path in now and now[path] != list(sums)]
  if bad:
    raise ChecksumMismatch(f"content checksum mismatch in {len(bad)} of {len(saved)} arrays "
                           f"(first: {bad[0]})")


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data_state: dict | None
  config: dict | None


# Replica-parallel saving splits every replicated array across its replicas and compiles a
# slice per array: a win for large arrays, seconds of compiles for the many small ones.
_MIN_REPLICA_PARALLEL_BYTES = 4 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The default PyTree handler with a raised replica-parallel threshold for jax.Arrays."""
  try:
    from orbax.checkpoint._src.metadata import array_metadata_store
    store = array_metadata_store.Store()
  except ImportError:  # private module moved: save without per-array metadata
    store = None
  arrays = ocp.type_handlers.ArrayHandler(
      array_metadata_store=store, min_slice_bytes_for_replica_parallel=_MIN_REPLICA_PARALLEL_BYTES)
  registry = ocp.type_handlers.create_type_handler_registry(
      (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (np.ndarray, ocp.type_handlers.NumpyHandler()), (jax.Array, arrays),
      (str, ocp.type_handlers.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
  """Saves and restores train state + data iterator state + config, one folder per step."""

  def __init__(self, directory: str, *, keep_last: int = 3, keep_every: int = 0,
               async_save: bool = True, read_only: bool = False):
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    keep = [policies.LatestN(max(int(keep_last), 1))]
    if keep_every and keep_every > 0:
      keep.append(policies.EveryNSteps(int(keep_every)))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=policies.AnyPreservationPolicy(keep),
        create=not read_only, read_only=read_only)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": _state_handler(), "data": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler(),
                       "checksums": ocp.JsonCheckpointHandler()})

  # -- saving ------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, data_state: dict | None, config: dict,
           *, wait: bool = False) -> None:
    """Starts writing `step`; returns once device buffers are copied (the state may be donated)."""
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
        config=ocp.args.JsonSave(config),
        checksums=ocp.args.JsonSave(state_checksums(state)))
    self._mngr.save(int(step), args=args, force=True)
    if wait:
      self._mngr.wait_until_finished()

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  # -- restoring ---------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore_step(self, step: int, abstract_state: Any) -> Restored:
    """Restores `step` into the shardings carried by `abstract_state` (ShapeDtypeStructs),
    and checks its content checksums (steps saved before they existed are not checked)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    items = dict(state=ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args),
                 data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
    checked = (epath.Path(self.directory) / str(int(step)) / "checksums").exists()
    if checked:
      items["checksums"] = ocp.args.JsonRestore()
    out = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
    if checked:
      verify_checksums(out["state"], out["checksums"])
    data = out["data"] or None
    return Restored(int(step), out["state"], data, out["config"])

  def restore_latest(self, abstract_state: Any) -> Restored | None:
    """The newest step that restores and passes its checksums, or None when there is no
    checkpoint at all. Steps that fail are moved aside once an older one restores; when
    none does, CheckpointError lists each step and why (nothing is moved)."""
    steps = self.all_steps()
    if not steps:
      return None
    failures: list[tuple[int, str]] = []
    for step in reversed(steps):
      try:
        restored = self.restore_step(step, abstract_state)
      except Exception as e:  # noqa: BLE001 -- every failure is reported below
        failures.append((step, _reason(e)))
        logging.warning("Checkpoint step %d in %s cannot be restored: %s.", step,
                        self.directory, failures[-1][1])
        continue
      for bad, _ in failures:
        self._quarantine(bad)
      if failures:
        logging.warning("Resuming from step %d, the newest readable one; steps %s were moved "
                        "aside as unreadable_STEP.", step, [s for s, _ in failures])
      return restored
    raise CheckpointError(
        f"No checkpoint in {self.directory} can be restored:\n"
        + "".join(f"  step {s}: {why}\n" for s, why in failures)
        + "Nothing was moved or deleted. If the model or optimizer settings changed since "
        "these steps were written, rerun with the settings they were written with (each "
        "step's config/ holds them), or start a new --workdir with config.init_from set to "
        "this run to keep its weights. If the files are damaged, restore them from a copy, "
        "or move the checkpoints folder away to start over.")

  def _quarantine(self, step: int) -> None:
    """Moves an unreadable step aside so the next save of that step does not collide."""
    if jax.process_index() == 0:
      src = epath.Path(self.directory) / str(step)
      dst, n = epath.Path(self.directory) / f"unreadable_{step}", 1
      while dst.exists():
        dst, n = epath.Path(self.directory) / f"unreadable_{step}.{n}", n + 1
      if src.is_dir():
        src.rename(dst)
        logging.warning("Moved the unreadable step folder to %s.", dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"sd3jax_quarantine_{step}")
    self._mngr.reload()


def _reason(error: Exception) -> str:
  """One line for why a step did not restore (TensorStore errors run to kilobytes)."""
  if isinstance(error, ChecksumMismatch):
    return str(error)
  text = " ".join(str(error).split())
  if "shape" in text.lower() and ("mismatch" in text.lower() or "expected" in text.lower()):
    kind = "array shapes differ from this run's (did the model config change?)"
  elif isinstance(error, FileNotFoundError) or "not found" in text.lower():
    kind = "files are missing"
  elif "OUT_OF_RANGE" in text or "truncated" in text.lower():
    kind = "files are cut short"
  else:
    kind = "unreadable"
  return f"{kind}: {type(error).__name__}: {text[:160]}" + ("..." if len(text) > 160 else "")


# ---------------------------------------------------------------------------
# The data iterators' positions (one per process)
# ---------------------------------------------------------------------------

def gather_data_state(data_state: dict | None) -> dict | None:
  """{"processes": [state of process 0, 1, ...]} on every process; as is with one process.

  Orbax writes JSON items from process 0 only, and each process's iterator has its own state
  (records pipelines: its shard's fingerprint), so every process's state goes in the checkpoint.
  """
  if data_state is None or jax.process_count() == 1:
    return data_state
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  size = int(np.max(multihost_utils.process_allgather(np.int32(raw.size))))
  padded = np.zeros(size, np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded)
  return {"processes": [json.loads(bytes(r).rstrip(b"\0")) for r in np.asarray(rows)]}


def data_state_of_this_process(data_state: dict) -> dict:
  """This process's entry of a gathered state (process 0's when the job had fewer processes;
  an iterator whose shard changed rejects it in set_state)."""
  states = data_state.get("processes")
  if states is None:
    return data_state
  return states[jax.process_index()] if jax.process_index() < len(states) else states[0]


# ---------------------------------------------------------------------------
# Weights only (config.init_from)
# ---------------------------------------------------------------------------

# Extra loaders for other formats (e.g. a diffusers folder), added by sd3jax.interop:
#   fn(path, abstract_params, config) -> params, or None when `path` is not its format.
WEIGHT_LOADERS: list[Callable[[str, Any, Any], Any]] = []


def register_weight_loader(fn: Callable[[str, Any, Any], Any]) -> Callable[[str, Any, Any], Any]:
  """Adds `fn` to the loaders `load_weights` tries first (usable as a decorator)."""
  WEIGHT_LOADERS.append(fn)
  return fn


def _step_folder(path: str) -> str | None:
  """Resolves a workdir, a checkpoints folder or a step folder to a step folder."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")):
    return path
  root = os.path.join(path, "checkpoints")
  root = root if os.path.isdir(root) else path
  steps = [int(n) for n in os.listdir(root) if n.isdigit()] if os.path.isdir(root) else []
  return os.path.join(root, str(max(steps))) if steps else None


def load_weights(path: str, abstract_params: Any, config: Any = None, *,
                 use_ema: bool = True) -> Any:
  """Parameters only from an sd3jax checkpoint (EMA if asked and present) or a registered format.

  `abstract_params` carries the target shardings; nothing else of the source run is used.
  """
  for loader in WEIGHT_LOADERS:
    params = loader(path, abstract_params, config)
    if params is not None:
      return params
  folder = _step_folder(path)
  if folder is None:
    raise CheckpointError(f"config.init_from={path!r} is neither an sd3jax checkpoint (workdir, "
                          f"checkpoints folder or step folder) nor a format a registered loader "
                          f"reads.")
  keys = ("ema_params", "params") if use_ema else ("params",)
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  errors = []
  for key in keys:
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        abstract_params)
    try:
      out = ckptr.restore(os.path.join(folder, "state"), args=ocp.args.PyTreeRestore(
          item={key: abstract_params}, restore_args={key: restore_args}, partial_restore=True))
      logging.info("Initialised %s from %s (%s).", "weights", folder, key)
      return out[key]
    except Exception as e:  # noqa: BLE001 -- try the next key, then raise with all errors
      errors.append(f"{key}: {e!r}")
  raise CheckpointError(f"Cannot load weights from {folder}: " + "; ".join(errors))


# ---------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------

class StopRequest:
  """Turns SIGTERM / SIGINT into a flag the step loop polls; it then saves and exits cleanly.

  A second SIGINT raises KeyboardInterrupt, for a user who really wants out now.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signum: int | None = None
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be installed from the main thread
    for s in signals:
      self._previous[s] = signal.signal(s, self._handle)

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning("Received %s: saving a checkpoint at the end of this step, then exiting.",
                    signal.Signals(signum).name)

  def requested(self) -> bool:
    """True on every process as soon as any process got a signal."""
    flag = self.signum is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      flag = bool(multihost_utils.process_allgather(np.int32(flag)).any())
    return flag

  def restore(self) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}
