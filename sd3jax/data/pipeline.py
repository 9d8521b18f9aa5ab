"""grain input pipelines: sharding, shuffling, buckets, captions, batching.

Design: a *plan* maps (global step, process) -> the source indices of that
process's part of the global batch, as a pure function of (seed, step). The
pipeline is `grain.MapDataset.range(steps).map(batch_of_step)`, read by grain
threads and optionally worker processes (`mp_prefetch`). Consequences:

  * Same seed -> identical batches, whatever the number of workers/threads.
  * The iterator state is {"next_step": s, "fingerprint": ...}: O(1) resume to
    exactly the next batch, JSON-serialisable, independent of worker count.
    `PipelineIterator` is a `grain.DatasetIterator`, so grain's/Orbax's
    checkpoint handlers can save it directly.
  * Buckets: each example goes to the bucket (h, w) nearest its aspect ratio
    (log-ratio distance). An epoch has ceil(C_b / global_batch) steps of
    bucket b (C_b = examples in b), so buckets are drawn in proportion to their
    size; the order of buckets in epoch e is a shuffle seeded by (seed, e).
    Within an epoch every example of bucket b is drawn once, in an order
    seeded by (seed, bucket, epoch); the last batch of a bucket is topped up by
    repeating examples of that epoch. Nothing is dropped; top-ups are reported
    in `bucket_stats`.
  * Layout-invariant global batches (multi-host): the global batch of a step
    depends on (data, buckets, seed, global batch, step) only, and process p of
    P reads slice p of it. Every process draws the same bucket (one compiled
    shape) at every step, 2 processes x 4 devices train on the same batches as
    1 x 8, and a run resumes exactly on another process count. Process
    index/count default to jax.process_index()/count().

Output batches (per process, batch = global_batch / process_count) are dicts
of numpy arrays: "image" float32 [B, h, w, 3] in [-1, 1] (NHWC), "caption"
(str array), "caption_is_synthetic" bool, and metadata: "index" (source
index), "epoch", "step", "bucket", "original_size" (h, w), "crop_top_left".

Caption choice: synthetic with probability `p_synthetic`, decided by a
generator seeded by (seed, index, epoch): deterministic, yet an example shows
both captions over epochs. Examples without a synthetic caption use their
original one (caption_is_synthetic=False).

`make_sequential_pipeline` is the single-pass, in-order variant for the
precompute stage and evaluation: every example exactly once (a "valid" mask
marks padding), both captions, same shape per batch on every process.

Precomputed records (the trainer's input) have their own pipeline on this machinery:
sd3jax.data.latent_pipeline.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np
from PIL import Image

# Aspect ratios (width / height) of the default bucket set.
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (0.5, 0.75, 1.0, 4.0 / 3.0, 2.0)
_STATE_VERSION = 1
# Part of a training pipeline's fingerprint: how global batches are drawn. The process
# layout is not (global batches do not depend on it), so a run resumes on another one.
_SAMPLING = "global_batches"


# ----------------------------------------------------------------------------
# Buckets.
# ----------------------------------------------------------------------------
def make_buckets(resolution: int, aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
                 multiple: int = 16) -> list[tuple[int, int]]:
  """(h, w) per aspect ratio (w/h), ~resolution**2 pixels, sides % multiple == 0.

  `multiple` = patch size x VAE factor (2 x 8) keeps every bucket a whole
  number of latent patches.
  """
  out = []
  for r in aspect_ratios:
    h = max(multiple, int(round(resolution / math.sqrt(r) / multiple)) * multiple)
    w = max(multiple, int(round(resolution * math.sqrt(r) / multiple)) * multiple)
    if (h, w) not in out:
      out.append((h, w))
  return out


def assign_buckets(sizes: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
  """Index of the nearest-aspect-ratio bucket for every (height, width)."""
  sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
  if np.any(sizes <= 0):
    raise ValueError("image sizes must be positive.")
  log_r = np.log(sizes[:, 1] / sizes[:, 0])[:, None]
  log_b = np.log(np.asarray([w / h for h, w in buckets]))[None, :]
  return np.argmin(np.abs(log_r - log_b), axis=1).astype(np.int64)


def _image_sizes(source) -> np.ndarray:
  if hasattr(source, "image_sizes"):
    return np.asarray(source.image_sizes(), np.int64)
  logging.warning("Source has no image_sizes(); decoding all %d examples to bucket them.",
                  len(source))
  return np.asarray([_to_pil(source[i]["image"]).size[::-1] for i in range(len(source))])


# ----------------------------------------------------------------------------
# Plans: (step, process) -> indices. Pure functions of their constructor args.
# ----------------------------------------------------------------------------
def _shard(bucket_ids: np.ndarray, num_buckets: int, process_index: int,
           process_count: int) -> list[np.ndarray]:
  """members[b]: this process's source indices in bucket b (every P-th one)."""
  return [np.flatnonzero(bucket_ids == b)[process_index::process_count]
          for b in range(num_buckets)]


def _shard_sizes(counts: np.ndarray, process_count: int) -> np.ndarray:
  """[P, B] shard sizes: process p holds ceil((C_b - p) / P) of bucket b."""
  p = np.arange(process_count)[:, None]
  return np.maximum(0, -(-(counts[None, :] - p) // process_count))


def _digest(bucket_ids: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(bucket_ids, np.int64).tobytes()).hexdigest()


class TrainPlan:
  """Shuffled, epoch-based, bucketed plan (see module docstring).

  The global batch of every step is a function of (data, buckets, seed, global batch, step)
  only; process p of P takes its slice p of it. So any process layout (1 x 8 devices or
  2 x 4) trains on the same global batches, and a run can resume on another layout.
  """

  def __init__(self, bucket_ids: np.ndarray, buckets: Sequence[tuple[int, int]], *,
               global_batch: int, process_index: int, process_count: int, seed: int,
               shuffle: bool = True):
    bucket_ids = np.asarray(bucket_ids, np.int64)
    self.buckets = [tuple(int(v) for v in b) for b in buckets]
    nb = len(self.buckets)
    if len(bucket_ids) == 0:
      raise ValueError("The plan has no examples.")
    self.global_batch, self.per_process_batch = global_batch, global_batch // process_count
    self.process_index, self.process_count = process_index, process_count
    self.seed, self.shuffle = seed, shuffle
    self.bucket_digest = _digest(bucket_ids)
    self.counts = np.bincount(bucket_ids, minlength=nb)
    self.batches_per_epoch = -(-self.counts // global_batch)  # ceil.
    self.steps_per_epoch = int(self.batches_per_epoch.sum())
    self.members = _shard(bucket_ids, nb, 0, 1)  # every process: all of each bucket
    self._schedule_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

  def schedule(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket of each step, rank of the step among its bucket's steps)."""
    cached = self._schedule_cache.get(epoch)  # Read once: grain threads share it.
    if cached is None:
      seq = np.repeat(np.arange(len(self.buckets)), self.batches_per_epoch)
      if self.shuffle:
        seq = np.random.default_rng([self.seed, 1, epoch]).permutation(seq)
      rank = np.zeros_like(seq)
      seen = np.zeros(len(self.buckets), np.int64)
      for t, b in enumerate(seq):
        rank[t], seen[b] = seen[b], seen[b] + 1
      if len(self._schedule_cache) > 2:
        self._schedule_cache.clear()
      cached = self._schedule_cache[epoch] = (seq, rank)
    return cached

  def _perm(self, bucket: int, epoch: int) -> np.ndarray:
    perm = self._perm_cache.get((bucket, epoch))
    if perm is None:
      c = len(self.members[bucket])
      # The 0 stands where a process index was once: one-process orders stay as they were.
      perm = (np.random.default_rng([self.seed, 2, 0, bucket, epoch]).permutation(c)
              if self.shuffle else np.arange(c))
      if len(self._perm_cache) > 4 * len(self.buckets):
        self._perm_cache.clear()
      self._perm_cache[(bucket, epoch)] = perm
    return perm

  def bucket_of_step(self, step: int) -> int:
    epoch, t = divmod(int(step), self.steps_per_epoch)
    return int(self.schedule(epoch)[0][t])

  def global_examples(self, step: int) -> np.ndarray:
    """Source indices of the whole global batch of `step`, in slot order."""
    epoch, t = divmod(int(step), self.steps_per_epoch)
    seq, rank = self.schedule(epoch)
    b = int(seq[t])
    members = self.members[b]
    # The bucket's last batch of an epoch is topped up from the start of its permutation.
    j = rank[t] * self.global_batch + np.arange(self.global_batch)
    return members[self._perm(b, epoch)[j % len(members)]]

  def examples(self, step: int) -> dict[str, Any]:
    """Source indices of this process's slice of global step `step`."""
    epoch, t = divmod(int(step), self.steps_per_epoch)
    b = int(self.schedule(epoch)[0][t])
    start = self.process_index * self.per_process_batch
    idx = self.global_examples(step)[start:start + self.per_process_batch]
    return {"indices": idx, "valid": np.ones(len(idx), bool), "bucket": b, "epoch": epoch}

  def stats(self) -> dict[str, Any]:
    """Bucket statistics (JSON-friendly); nothing is dropped, repeats counted."""
    drawn = self.batches_per_epoch * self.global_batch
    return {
        "buckets": [list(b) for b in self.buckets],
        "aspect_ratios": [round(w / h, 4) for h, w in self.buckets],
        "num_examples": int(self.counts.sum()),
        "examples_per_bucket": self.counts.tolist(),
        "batches_per_epoch_per_bucket": self.batches_per_epoch.tolist(),
        "steps_per_epoch": self.steps_per_epoch,
        # Slots per epoch beyond each bucket's examples, filled by repeats of that epoch.
        "repeats_per_epoch_per_bucket": (drawn - self.counts).tolist(),
        "dropped": 0,
    }


class SequentialPlan:
  """Every example once, in order, bucket by bucket; padding marked invalid.

  All processes run the same number of steps with the same bucket per step
  (as a sharded jit needs); a process short of examples gets padded batches.
  """

  def __init__(self, bucket_ids: np.ndarray, buckets: Sequence[tuple[int, int]], *,
               global_batch: int, process_index: int, process_count: int):
    self.buckets = [tuple(int(v) for v in b) for b in buckets]
    nb = len(self.buckets)
    bucket_ids = np.asarray(bucket_ids, np.int64)
    if len(bucket_ids) < process_count:
      raise ValueError(f"{len(bucket_ids)} examples cannot be shared by "
                       f"process_count={process_count}.")
    self.bucket_digest = _digest(bucket_ids)
    self.global_batch, self.per_process_batch = global_batch, global_batch // process_count
    self.process_index, self.process_count = process_index, process_count
    self.counts = np.bincount(bucket_ids, minlength=nb)
    self.members = _shard(bucket_ids, nb, process_index, process_count)
    # Process 0 holds the most of every bucket: it sets the step count.
    self.batches_per_bucket = -(-_shard_sizes(self.counts, process_count)[0]
                                // self.per_process_batch)
    self.step_bucket = np.repeat(np.arange(nb), self.batches_per_bucket)
    self.step_rank = np.concatenate(
        [np.arange(n) for n in self.batches_per_bucket] + [np.zeros(0, np.int64)]).astype(np.int64)
    self.steps_per_epoch = self.num_steps = int(self.batches_per_bucket.sum())

  def bucket_of_step(self, step: int) -> int:
    return int(self.step_bucket[step])

  def examples(self, step: int) -> dict[str, Any]:
    b, r = int(self.step_bucket[step]), int(self.step_rank[step])
    members = self.members[b]
    j = r * self.per_process_batch + np.arange(self.per_process_batch)
    valid = j < len(members)
    if len(members):  # Padding repeats the bucket's last example, marked invalid.
      idx = members[np.minimum(j, len(members) - 1)]
    else:  # This process has none of the bucket: pad with any of its examples.
      idx = np.full(len(j), self.shard_indices()[0])
    return {"indices": idx, "valid": valid, "bucket": b, "epoch": 0}

  def shard_indices(self) -> np.ndarray:
    return np.sort(np.concatenate(self.members))

  def stats(self) -> dict[str, Any]:
    sizes = _shard_sizes(self.counts, self.process_count).sum(1)
    return {
        "buckets": [list(b) for b in self.buckets],
        "examples_per_bucket": self.counts.tolist(),
        "batches_per_bucket": self.batches_per_bucket.tolist(),
        "num_steps": self.num_steps,
        "padding_per_process": (self.num_steps * self.per_process_batch - sizes).tolist(),
        "dropped": 0,
    }


# ----------------------------------------------------------------------------
# Per-example transforms.
# ----------------------------------------------------------------------------
def _to_pil(image: Any) -> Image.Image:
  """Encoded bytes (opened lazily), uint8 HWC array or PIL image -> PIL image."""
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(bytes(image)))
  return Image.fromarray(np.asarray(image, np.uint8))


def resize_and_crop(image: Any, height: int, width: int, *, crop: str = "center",
                    rng: np.random.Generator | None = None) -> tuple[np.ndarray, tuple[int, int],
                                                                   tuple[int, int]]:
  """Resizes (bicubic, antialiased) to cover (height, width), then crops.

  Returns (uint8 [height, width, 3], original (h, w), crop top-left in the
  resized image). crop="random" needs `rng`.
  """
  if (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
      and image.shape == (height, width, 3)):
    return image, (height, width), (0, 0)  # Already the bucket's size (shapes).
  im = _to_pil(image)
  w0, h0 = im.size
  scale = max(height / h0, width / w0)
  nh, nw = max(height, int(round(h0 * scale))), max(width, int(round(w0 * scale)))
  if im.format == "JPEG":
    im.draft("RGB", (nw, nh))  # DCT-domain downscale (>= target): faster decode.
  im = im.convert("RGB")
  if im.size != (nw, nh):
    im = im.resize((nw, nh), Image.BICUBIC)
  if crop == "center":
    top, left = (nh - height) // 2, (nw - width) // 2
  elif crop == "random":
    top, left = int(rng.integers(0, nh - height + 1)), int(rng.integers(0, nw - width + 1))
  else:
    raise ValueError(f"crop must be 'center' or 'random', got {crop!r}.")
  arr = np.asarray(im)[top:top + height, left:left + width]
  return arr, (h0, w0), (top, left)


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]."""
  return image.astype(np.float32) * (2.0 / 255.0) - 1.0


class _ImageTextTransform:
  """Decode, resize/crop to the bucket, pick the caption."""

  def __init__(self, buckets, *, seed: int, p_synthetic: float, crop: str, both_captions: bool):
    self.buckets, self.seed, self.p_synthetic = buckets, seed, p_synthetic
    self.crop, self.both_captions = crop, both_captions

  def __call__(self, ex: Mapping[str, Any], index: int, bucket: int, epoch: int) -> dict[str, Any]:
    rng = np.random.default_rng([self.seed, 3, index, epoch])
    h, w = self.buckets[bucket]
    pixels, orig, top_left = resize_and_crop(ex["image"], h, w, crop=self.crop, rng=rng)
    synthetic = ex.get("caption_synthetic") or ""
    use_synthetic = bool(rng.random() < self.p_synthetic) and bool(synthetic)
    out = {
        "image": to_float(pixels),
        "caption": synthetic if use_synthetic else ex["caption_original"],
        "caption_is_synthetic": use_synthetic,
        "index": np.int64(index), "epoch": np.int32(epoch), "bucket": np.int32(bucket),
        "original_size": np.asarray(orig, np.int32),
        "crop_top_left": np.asarray(top_left, np.int32),
    }
    if self.both_captions:
      out["caption_original"] = ex["caption_original"]
      out["caption_synthetic"] = synthetic
      out["key"] = str(ex.get("key", index))
    return out


def _stack(items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  out = {}
  for k in items[0]:
    vals = [it[k] for it in items]
    out[k] = np.asarray(vals) if isinstance(vals[0], str) else np.stack(
        [np.asarray(v) for v in vals])
  return out


class _StepBatcher:
  """grain map fn: global step -> this process's batch (picklable)."""

  def __init__(self, source, plan, transform: Callable, skip_bad_records: bool = False):
    self.source, self.plan, self.transform = source, plan, transform
    self.skip_bad_records = skip_bad_records

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    spec = self.plan.examples(int(step))
    idx = [int(i) for i in spec["indices"]]
    if hasattr(self.source, "read_many"):
      exs = self.source.read_many(idx)
    elif hasattr(self.source, "__getitems__"):
      exs = self.source.__getitems__(idx)
    else:
      exs = [self.source[i] for i in idx]
    bad = np.asarray([isinstance(ex, Exception) for ex in exs])
    if bad.any():
      first = next(ex for ex in exs if isinstance(ex, Exception))
      if not self.skip_bad_records or bad.all():
        raise first
      # Each bad slot takes the next good example of the same batch (same bucket, and the
      # same on a rerun); the trainer counts the slots (batch["bad_records"]).
      good = np.flatnonzero(~bad)
      for k in np.flatnonzero(bad):
        logging.warning("Skipping %s", exs[k])
        sub = int(good[np.searchsorted(good, k) % len(good)])
        exs[k], idx[k] = exs[sub], idx[sub]
    batch = _stack([self.transform(ex, i, spec["bucket"], spec["epoch"])
                    for ex, i in zip(exs, idx)])
    if self.skip_bad_records:
      batch["bad_records"] = bad.astype(np.int32)
    batch["step"] = np.full(len(idx), step, np.int64)
    if isinstance(self.plan, SequentialPlan):
      batch["valid"] = spec["valid"]
    return batch


# ----------------------------------------------------------------------------
# Pipeline and iterator.
# ----------------------------------------------------------------------------
class PipelineIterator(grain.DatasetIterator):
  """Iterator over batches; state {"next_step", "fingerprint"} (JSON).

  `set_state` restores to exactly the batch after the one last returned when
  `get_state` was called. A state from a different pipeline (other data,
  seed, batch, buckets, sampling) is refused; another process layout is not.
  """

  def __init__(self, pipeline: "Pipeline", start_step: int = 0):
    super().__init__()
    self._pipeline = pipeline
    self._next_step = int(start_step)
    self._it = None

  def _open(self):
    p = self._pipeline
    ds = grain.MapDataset.range(self._next_step, max(self._next_step, p.num_steps)).map(p.batcher)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=p.threads,
                                              prefetch_buffer_size=p.prefetch))
    if p.workers > 0:
      from absl import flags  # grain reads absl flags; outside absl.app use defaults.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=p.workers, per_worker_buffer_size=max(1, p.prefetch // p.workers)))
    self._it = iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._open()
    batch = next(self._it)
    self._next_step += 1
    return batch

  def start_prefetch(self) -> None:
    """Starts producing batches now (e.g. while the model state restores)."""
    if self._it is None:
      self._open()
    self._it.start_prefetch()

  @property
  def next_step(self) -> int:
    return self._next_step

  def get_state(self) -> dict[str, Any]:
    return {"version": _STATE_VERSION, "next_step": self._next_step,
            "fingerprint": self._pipeline.fingerprint}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if state.get("fingerprint") != self._pipeline.fingerprint:
      raise ValueError(
          "Data iterator state comes from a different pipeline (data, seed, batch, buckets or "
          f"sampling changed): {state.get('fingerprint')} != {self._pipeline.fingerprint}. "
          "To continue anyway from its step, use pipeline.iterator(start_step=state['next_step']).")
    self._close_inner()
    self._next_step = int(state["next_step"])

  def _close_inner(self):
    if self._it is not None:
      if hasattr(self._it, "close"):
        self._it.close()
      self._it = None

  def close(self) -> None:
    self._close_inner()
    super().close()


class Pipeline:
  """A random-access, step-indexed batch pipeline (see module docstring)."""

  def __init__(self, source, plan, transform, *, process_index: int, workers: int, threads: int,
               prefetch: int, num_steps: int, config: Mapping[str, Any]):
    self.source, self.plan = source, plan
    self.process_index, self.workers = process_index, workers
    self.threads, self.prefetch = threads, prefetch
    self.num_steps = num_steps
    self.batcher = _StepBatcher(source, plan, transform)
    self.config = dict(config)
    key = json.dumps({**self.config, "bucket_ids": plan.bucket_digest}, sort_keys=True)
    self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]

  @property
  def buckets(self) -> list[tuple[int, int]]:
    return self.plan.buckets

  @property
  def steps_per_epoch(self) -> int:
    return self.plan.steps_per_epoch

  @property
  def per_process_batch(self) -> int:
    return self.plan.per_process_batch

  def bucket_stats(self) -> dict[str, Any]:
    return self.plan.stats()

  def bucket_of_step(self, step: int) -> int:
    return self.plan.bucket_of_step(step)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch of a step, computed directly (debugging, tests)."""
    return self.batcher(step)

  def iterator(self, start_step: int = 0) -> PipelineIterator:
    return PipelineIterator(self, start_step)

  def __iter__(self) -> PipelineIterator:
    return self.iterator()

  def __len__(self) -> int:
    return self.num_steps


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Only when not given: tests and tools pass them explicitly.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count}).")
  return int(process_index), int(process_count)


def _bucket_setup(source, resolution, buckets, sizes):
  if (resolution is None) == (buckets is None):
    raise ValueError("Give exactly one of resolution=(h, w) or buckets=[(h, w), ...].")
  if buckets is None:
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    buckets = [(int(h), int(w))]
  buckets = [tuple(int(v) for v in b) for b in buckets]
  if len(buckets) == 1:
    return buckets, np.zeros(len(source), np.int64)
  if sizes is None:
    sizes = _image_sizes(source)
  if len(sizes) != len(source):
    raise ValueError(f"sizes has {len(sizes)} rows for {len(source)} examples.")
  return buckets, assign_buckets(sizes, buckets)


def _check_batch(global_batch: int, process_count: int) -> None:
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"global_batch={global_batch} must be a positive multiple of "
                     f"process_count={process_count}: change the global batch size.")


def make_image_text_pipeline(
    source, *, global_batch: int, resolution: int | tuple[int, int] | None = None,
    buckets: Sequence[tuple[int, int]] | None = None, seed: int = 0, p_synthetic: float = 0.5,
    process_index: int | None = None, process_count: int | None = None, workers: int = 0,
    threads: int = 2, prefetch: int = 4, crop: str = "center", shuffle: bool = True,
    num_epochs: int | None = None, sizes: np.ndarray | None = None) -> Pipeline:
  """Training pipeline over a random-access image-text source.

  `source[i]` is a dict with "image" (encoded bytes, uint8 HWC array or PIL
  image), "caption_original", optional "caption_synthetic" (records from
  `records.RecordSource`, `shapes_tfds.load_shapes`, or any sequence of such
  dicts). Give `resolution` (one shape) or `buckets` (aspect-ratio buckets;
  image sizes from `sizes`, else `source.image_sizes()`, else a decoding
  pass). `num_epochs=None` repeats forever. `workers` > 0 uses grain worker
  processes (the source must be picklable); `threads` are grain read threads.
  """
  process_index, process_count = _process_layout(process_index, process_count)
  _check_batch(global_batch, process_count)
  if not 0.0 <= p_synthetic <= 1.0:
    raise ValueError(f"p_synthetic must be in [0, 1], got {p_synthetic}.")
  buckets, bucket_ids = _bucket_setup(source, resolution, buckets, sizes)
  plan = TrainPlan(bucket_ids, buckets, global_batch=global_batch, process_index=process_index,
                   process_count=process_count, seed=seed, shuffle=shuffle)
  num_steps = (2**62 if num_epochs is None else num_epochs * plan.steps_per_epoch)
  transform = _ImageTextTransform(buckets, seed=seed, p_synthetic=p_synthetic, crop=crop,
                                  both_captions=False)
  config = {"kind": "image_text", "n": len(source), "global_batch": global_batch,
            "buckets": buckets, "seed": seed, "p_synthetic": p_synthetic, "crop": crop,
            "shuffle": shuffle, "sampling": _SAMPLING,
            "num_epochs": num_epochs}
  pipe = Pipeline(source, plan, transform, process_index=process_index, workers=workers,
                  threads=threads, prefetch=prefetch, num_steps=num_steps, config=config)
  logging.info("image-text pipeline: %s", json.dumps(plan.stats()))
  return pipe


def make_sequential_pipeline(
    source, *, global_batch: int, resolution: int | tuple[int, int] | None = None,
    buckets: Sequence[tuple[int, int]] | None = None, process_index: int | None = None,
    process_count: int | None = None, workers: int = 0, threads: int = 2, prefetch: int = 4,
    sizes: np.ndarray | None = None) -> Pipeline:
  """Single pass, in order, every example once: for precompute and evaluation.

  Batches carry both captions ("caption_original", "caption_synthetic"),
  "key", and "valid" (False on padding). Same bucket per step on every
  process; `len(pipeline)` steps.
  """
  process_index, process_count = _process_layout(process_index, process_count)
  _check_batch(global_batch, process_count)
  buckets, bucket_ids = _bucket_setup(source, resolution, buckets, sizes)
  plan = SequentialPlan(bucket_ids, buckets, global_batch=global_batch,
                        process_index=process_index, process_count=process_count)
  transform = _ImageTextTransform(buckets, seed=0, p_synthetic=0.0, crop="center",
                                  both_captions=True)
  config = {"kind": "sequential", "n": len(source), "global_batch": global_batch,
            "buckets": buckets, "process_index": process_index, "process_count": process_count}
  return Pipeline(source, plan, transform, process_index=process_index, workers=workers,
                  threads=threads, prefetch=prefetch, num_steps=plan.num_steps, config=config)


class _SelectKeys:
  """grain map fn wrapper: keeps only `keys` of each batch (picklable)."""

  def __init__(self, batcher: Callable, keys: Sequence[str]):
    self.batcher, self.keys = batcher, tuple(keys)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    batch = self.batcher(step)
    return {k: batch[k] for k in self.keys + ("bad_records",) if k in batch}
