"""Synthetic batches of the configured shapes: the trainer and benchmarks without real data.

Example i of global batch n is a pure function of (seed, n, i), so a run is reproducible, a
resumed iterator continues with exactly the batch it would have produced, and P processes
(process p drawing examples p * B / P ... (p + 1) * B / P - 1) assemble the same global batch
as one process does: multi-host runs train on the same numbers as single-host ones. The iterator
follows the grain convention: `get_state()` / `set_state(state)` with a JSON-serialisable
state, which the trainer stores in every checkpoint.

A batch is a dict of float32 numpy arrays, the per-encoder layout the trainer expects
from precomputed records (local batch = global batch / process count):
  latents        (B, h, w, C)   normalised VAE latents
  clip_l         (B, Lc, Dl)    clip_l_pooled (B, Dl)
  clip_g         (B, Lc, Dg)    clip_g_pooled (B, Dg)
  t5             (B, Lt, Dt)
"""
from __future__ import annotations

import functools
from typing import Any, Iterator

import numpy as np
from ml_collections import ConfigDict


def batch_shapes(config: ConfigDict, batch_size: int) -> dict[str, tuple[int, ...]]:
  """Shapes of one batch of `batch_size` examples (the first bucket of config.data.buckets,
  else the square config.data.image_size)."""
  from sd3jax import buckets
  h, w = buckets.latent_buckets(config)[0]
  c = config.conditioning
  return {
      "latents": (batch_size, h, w, config.model.in_channels),
      "clip_l": (batch_size, c.clip_tokens, c.clip_l_dim),
      "clip_l_pooled": (batch_size, c.clip_l_dim),
      "clip_g": (batch_size, c.clip_tokens, c.clip_g_dim),
      "clip_g_pooled": (batch_size, c.clip_g_dim),
      "t5": (batch_size, c.t5_tokens, c.t5_dim),
  }


class SyntheticIterator(Iterator[dict[str, np.ndarray]]):
  """Endless batches; example i of batch n comes from default_rng((seed, n mod period, i))."""

  def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int, period: int = 0,
               process_index: int = 0):
    self._shapes = dict(shapes)
    self._seed = int(seed)
    self._period = int(period)
    self._process = int(process_index)
    self._next = 0

  def __iter__(self) -> "SyntheticIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch(self._next)
    self._next += 1
    return batch

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """Batch `index` without moving the iterator."""
    key = index % self._period if self._period > 0 else index
    return self._make(key)

  def _make(self, key: int) -> dict[str, np.ndarray]:
    if self._period > 0:
      return _cached_batch(self._seed, key, self._process, _freeze(self._shapes))
    return _draw(self._seed, key, self._process, self._shapes)

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._next, "seed": self._seed, "period": self._period}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state.get("seed", self._seed)) != self._seed:
      raise ValueError(f"Synthetic iterator state has seed {state['seed']}, this run uses "
                       f"{self._seed}; restoring it would change the data stream.")
    self._next = int(state["next_index"])


def _draw(seed: int, key: int, process: int, shapes: dict[str, tuple[int, ...]]):
  """This process's rows of global batch `key`: one generator per global example index."""
  local = next(iter(shapes.values()))[0]
  out = {name: np.empty(shape, np.float32) for name, shape in shapes.items()}
  for row in range(local):
    rng = np.random.default_rng((seed, key, process * local + row))
    for name, shape in shapes.items():
      out[name][row] = rng.standard_normal(shape[1:], dtype=np.float32)
  return out


def _freeze(shapes: dict[str, tuple[int, ...]]) -> tuple:
  return tuple(sorted(shapes.items()))


@functools.lru_cache(maxsize=64)
def _cached_batch(seed: int, key: int, process: int, shapes: tuple):
  batch = _draw(seed, key, process, dict(shapes))
  for v in batch.values():
    v.setflags(write=False)
  return batch


def make_iterator(config: ConfigDict, *, seed: int | None = None, process_index: int = 0,
                  process_count: int = 1) -> SyntheticIterator:
  """This process's synthetic iterator for `config` (local batch = batch_size / processes)."""
  local = config.batch_size // process_count
  seed = config.seed if seed is None else seed
  return SyntheticIterator(batch_shapes(config, local), seed, config.data.synthetic_period,
                           process_index)
