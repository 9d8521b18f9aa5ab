"""`sd3jax dedup embed`: a copy-detection descriptor for every example of a source.

Work is cut into parts of `part_size` consecutive examples; part p belongs to process
p % process_count (precompute's rule), which alone writes it. A process reads its parts'
images (host threads decode and resize), and runs the descriptor over its local devices,
`per_device_batch` images per device. Each part is one .npy file that appears under its
final name only when complete, so a rerun skips finished parts and redoes the rest. Every
image's descriptor is computed by the same per-device program whatever the process and
device counts, so 2 x 4 devices write the bytes 1 x 8 writes (tests/dedup_test.py).

  OUT/descriptors-<fingerprint[:12]>/
    plan.json          source identity, descriptor, part size, dtype (written first)
    part-00000.npy     [n, dims] in the storage dtype (bfloat16 stored as its uint16 bits)
    background.npy     the descriptor's score-normalisation background, when it has one
    descriptors.json   written last, by whichever process finishes the last part
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from sd3jax.dedup.descriptors import Descriptor, prepare
from sd3jax.dedup import DedupError

FORMAT = "sd3jax-descriptors"
PLAN = "plan.json"
MANIFEST = "descriptors.json"
STORAGE_DTYPES = ("float16", "bfloat16", "float32")


def descriptor_dir(out_dir: str, descriptor: Descriptor) -> str:
  return os.path.join(out_dir, f"descriptors-{descriptor.fingerprint[:12]}")


def _part_path(path: str, part: int) -> str:
  return os.path.join(path, f"part-{part:05d}.npy")


def _atomic_json(path: str, obj: Any) -> None:
  from sd3jax.data.records import atomic_write_text
  atomic_write_text(path, json.dumps(obj, indent=2))


def _check_or_write_plan(path: str, plan: dict[str, Any]) -> None:
  fname = os.path.join(path, PLAN)
  if not os.path.exists(fname):
    os.makedirs(path, exist_ok=True)
    _atomic_json(fname, plan)
  with open(fname) as f:
    found = json.load(f)

  def identity(p):  # thresholds, score and verification settings do not change its vectors
    return {**p, "descriptor": {k: v for k, v in p["descriptor"].items()
                                if k not in ("threshold", "score_norm", "verify")}}
  plan_id, found_id = identity(plan), identity(found)
  diff = sorted(k for k in set(plan_id) | set(found_id) if plan_id.get(k) != found_id.get(k))
  if diff:
    raise DedupError(f"{path} holds descriptors made with other settings ({diff[0]}: "
                     f"{found.get(diff[0])!r}, now {plan.get(diff[0])!r}); use another --out, "
                     "or the same source and settings to resume.")


def _store(x: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    return np.asarray(jnp.asarray(x, jnp.bfloat16)).view(np.uint16)
  return x.astype(dtype)


def load_descriptors(path: str) -> tuple[np.ndarray, dict[str, Any]]:
  """(float32 [N, dims], manifest) of a finished descriptors folder."""
  fname = os.path.join(path, MANIFEST)
  if not os.path.exists(fname):
    raise FileNotFoundError(f"{path} has no {MANIFEST}: the embedding is not finished (rerun "
                            "`sd3jax dedup embed` with the same arguments to complete it).")
  with open(fname) as f:
    manifest = json.load(f)
  parts = [np.load(_part_path(path, p)) for p in range(manifest["num_parts"])]
  x = np.concatenate(parts) if parts else np.zeros((0, manifest["descriptor"]["dims"]))
  if manifest["storage_dtype"] == "bfloat16":
    x = np.asarray(jnp.asarray(x.view(jnp.bfloat16), jnp.float32))
  return x.astype(np.float32), manifest


def _read(source, indices: Sequence[int], size: int) -> np.ndarray:
  if hasattr(source, "__getitems__"):
    exs = source.__getitems__([int(i) for i in indices])
  else:
    exs = [source[int(i)] for i in indices]
  return np.stack([prepare(ex["image"], size) for ex in exs])


def _batches(source, start: int, stop: int, batch: int, size: int,
             pool: concurrent.futures.Executor) -> Iterator[tuple[int, np.ndarray]]:
  """(n valid, uint8 [batch, size, size, 3]) for [start, stop), read one batch ahead."""
  starts = list(range(start, stop, batch))
  futures = [pool.submit(_read, source, range(s, min(s + batch, stop)), size)
             for s in starts[:2]]
  for i, s in enumerate(starts):
    images = futures[i].result()
    if i + 2 < len(starts):
      futures.append(pool.submit(_read, source, range(starts[i + 2],
                                                      min(starts[i + 2] + batch, stop)), size))
    n = len(images)
    if n < batch:  # padding repeats the last image; its rows are dropped
      images = np.concatenate([images, np.repeat(images[-1:], batch - n, 0)])
    yield n, images


def embed(source, out_dir: str, descriptor: Descriptor, *, part_size: int = 8192,
          per_device_batch: int = 32, storage_dtype: str = "float16",
          process_index: int | None = None, process_count: int | None = None,
          devices: Sequence[Any] | None = None, threads: int = 4,
          progress: bool = True) -> dict[str, Any]:
  """Writes this process's parts of `source`'s descriptors; returns a summary.

  The summary's "complete" says whether every part exists (then descriptors.json was
  written and "path" can be clustered). `devices`: this process's devices (default: its
  local devices).
  """
  from sd3jax.data import pipeline as pipeline_lib
  from sd3jax.data.producer import source_identity
  if storage_dtype not in STORAGE_DTYPES:
    raise DedupError(f"storage_dtype={storage_dtype!r}; choose one of {STORAGE_DTYPES}.")
  if part_size < 1 or per_device_batch < 1 or part_size % per_device_batch:
    raise DedupError(f"part_size={part_size} must be a positive multiple of "
                     f"per_device_batch={per_device_batch}.")
  pi, pc = pipeline_lib._process_layout(process_index, process_count)
  path = descriptor_dir(out_dir, descriptor)
  n = len(source)
  num_parts = -(-n // part_size)
  plan = {"format": FORMAT, "source": source_identity(source), "num_examples": n,
          "descriptor": descriptor.info(), "part_size": part_size,
          "per_device_batch": per_device_batch, "storage_dtype": storage_dtype,
          "num_parts": num_parts}
  _check_or_write_plan(path, plan)
  devices = list(devices if devices is not None else jax.local_devices())
  batch = per_device_batch * len(devices)
  if descriptor.jittable:
    mesh = Mesh(np.asarray(devices), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    fn = jax.jit(lambda x: descriptor.fn(x.astype(jnp.float32) / 255.0),
                 in_shardings=sharding, out_shardings=sharding)
  else:
    fn = lambda x: descriptor.fn(x.astype(np.float32) / 255.0)  # noqa: E731
  mine = list(range(pi, num_parts, pc))
  todo = [p for p in mine if not os.path.exists(_part_path(path, p))]
  start_time, written = time.perf_counter(), 0
  bar = tqdm(total=sum(min(part_size, n - p * part_size) for p in todo), unit="img",
             desc=f"dedup embed ({descriptor.name}, process {pi}/{pc})", disable=not progress)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for p in todo:
      lo, hi = p * part_size, min(n, (p + 1) * part_size)
      rows = []
      for valid, images in _batches(source, lo, hi, batch, descriptor.size, pool):
        if descriptor.jittable:  # onto this process's devices (other processes are not in it)
          images = jax.device_put(images, sharding)
        out = np.asarray(fn(images), np.float32)[:valid]
        rows.append(out)
        bar.update(valid)
      x = np.concatenate(rows)
      if x.shape != (hi - lo, descriptor.dims):
        raise DedupError(f"descriptor {descriptor.name} returned {x.shape[1:]} per image, "
                         f"expected ({descriptor.dims},).")
      tmp = os.path.join(path, f".part-{p:05d}.tmp-{os.getpid()}.npy")
      np.save(tmp, _store(x, storage_dtype))
      os.replace(tmp, _part_path(path, p))
      written += hi - lo
  bar.close()
  seconds = time.perf_counter() - start_time
  complete = all(os.path.exists(_part_path(path, p)) for p in range(num_parts))
  if complete:
    if descriptor.background is not None:  # its threshold needs it: dedup cluster reads it here
      from sd3jax.dedup import score_norm
      score_norm.save_background(path, descriptor.background)
    _atomic_json(os.path.join(path, MANIFEST), plan)
  return {"path": path, "complete": complete, "parts_written": len(todo),
          "parts_skipped": len(mine) - len(todo), "examples_embedded": written,
          "seconds": round(seconds, 3),
          "images_per_second": round(written / seconds, 1) if written else None}
