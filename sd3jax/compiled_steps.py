"""The trainer's compiled steps: one executable per batch shape, that is per aspect-ratio
bucket, all built before step 1 so that no step waits on XLA.

`compile_buckets` lowers and compiles the train step for every bucket from one real batch
(its other arrays keep their shapes; the spatial array takes each bucket's), or loads it from
the persistent compilation cache when config.compilation_cache_dir is set. `compile_step`
also keeps the last few executables of this process by (program, devices), so a second
`train()` of the same setup in one process (a resume, `sd3jax run`, tests) skips XLA.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
from jax.sharding import Mesh

from sd3jax import buckets as buckets_lib
from sd3jax import console

_COMPILED: dict[tuple, Any] = {}


def compile_step(step_fn, state: Any, batch: Mapping[str, Any], mesh: Mesh):
  """Ahead-of-time compiles `step_fn` for these arguments (or reuses an identical program)."""
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch)
  key = (hashlib.sha256(lowered.as_text().encode()).hexdigest(),
         tuple(d.id for d in mesh.devices.flat))
  if key in _COMPILED:
    _COMPILED[key] = _COMPILED.pop(key)  # most recently used last
  else:
    while len(_COMPILED) >= 8:
      _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = lowered.compile()
    logging.info("Compiled the train step in %.1f s.", time.perf_counter() - t0)
  return _COMPILED[key]


def bucket_specs(batch: Mapping[str, jax.Array], buckets: Sequence[tuple[int, int]],
                 spatial_key: str) -> list[dict[str, Any]]:
  """Abstract global batches, one per bucket: `batch` (one global batch, any bucket) with
  batch[spatial_key]'s dims 1-2 set to the bucket's; [batch's own] without buckets."""
  spec = lambda v, shape: jax.ShapeDtypeStruct(shape, v.dtype, sharding=v.sharding)
  own = {k: spec(v, v.shape) for k, v in batch.items()}
  if not buckets or spatial_key not in batch:
    return [own]
  x = batch[spatial_key]
  return [{**own, spatial_key: spec(x, (x.shape[0], h, w, *x.shape[3:]))} for h, w in buckets]


def shapes_key(batch: Mapping[str, Any]) -> tuple:
  return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))


def bucket_name(batch: Mapping[str, Any], buckets: Sequence[tuple[int, int]],
                names: Sequence[str], spatial_key: str) -> str:
  """The log name of a batch's bucket ("" for a run with one shape)."""
  if len(buckets) < 2 or spatial_key not in batch:
    return ""
  hw = tuple(batch[spatial_key].shape[1:3])
  return dict(zip(map(tuple, buckets), names or ())).get(hw, buckets_lib.name(*hw))


def compile_buckets(step_fn, state: Any, batch: Mapping[str, jax.Array], mesh: Mesh, step: int,
                    buckets: Sequence[tuple[int, int]], names: Sequence[str],
                    spatial_key: str) -> tuple[dict[tuple, Any], list[dict[str, Any]]]:
  """Compiles the step for every bucket before training starts. Returns (batch shapes ->
  executable, a record per compile: bucket, seconds, step)."""
  compiled, log = {}, []
  specs = bucket_specs(batch, buckets, spatial_key)
  names = list(names) if len(specs) == len(names) else [""] * len(specs)
  for name, spec in zip(names, specs):
    t0 = time.perf_counter()
    compiled[shapes_key(spec)] = compile_step(step_fn, state, spec, mesh)
    log.append({"bucket": name or "all", "seconds": round(time.perf_counter() - t0, 2),
                "step": step})
    if len(specs) > 1:
      console.say(f"Step for bucket {name} ({len(log)}/{len(specs)}) ready in "
                  f"{log[-1]['seconds']:.1f} s.")
  return compiled, log
