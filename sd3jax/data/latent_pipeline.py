"""The trainer's input: precomputed records (sd3jax.data.precompute) as grain batches.

`make_precomputed_pipeline(source, *, global_batch, seed, p_synthetic=0.5, ...)` runs on
sd3jax.data.pipeline's machinery (`TrainPlan`, `Pipeline`, `PipelineIterator`): buckets
are the distinct latent shapes (a record index column, no resizing), and
`_PrecomputedTransform` replaces the image pipeline's decode-and-resize. Its batches follow the layout the
trainer reads (sd3jax.data.synthetic): "latents" [B, h/8, w/8, C] float32, sampled here,
on the host, from the stored posterior moments (z = mean + std * eps, eps from a generator
seeded by (seed, record index, epoch)) and normalised (z - shift) * scale with the VAE's
factors from the records' producer, so the train step takes them as x0 unchanged;
"clip_l" / "clip_g" [B, 77, D], "clip_l_pooled" / "clip_g_pooled" [B, D], "t5" [B, L, W]
of the chosen caption (same generator, p_synthetic); edit records add "source_latents",
the normalised posterior mean of the image the edit starts from; plus "caption_is_synthetic",
"index" (record index), "epoch", "step", "bucket" unless `keys` selects (TRAIN_KEYS).
The records' producer is checked first (`check_producer`). The trainer's
`make_train_iterator(config)` wraps it and checks the config's shapes against the records.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from sd3jax.models import vae as vae_lib
from sd3jax.data.pipeline import (Pipeline, PipelineIterator, TrainPlan, _SAMPLING,
                                  _SelectKeys, _check_batch, _process_layout)

# Keys of a trainer batch (sd3jax.data.synthetic's layout); metadata is left out so that
# every key can be sharded onto the devices as a number array.
TRAIN_KEYS: tuple[str, ...] = ("latents", "clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled",
                               "t5", "source_latents")  # the last: edit records only


class PrecomputeMismatchError(ValueError):
  """Precomputed records made by something other than what the run expects."""


def producer_differences(expected: Any, actual: Any, prefix: str = "",
                         partial: bool = False) -> list[str]:
  """'path: expected != actual' for every differing leaf (partial: expected's keys only)."""
  if isinstance(expected, Mapping) and isinstance(actual, Mapping):
    keys = list(expected) if partial else sorted(set(expected) | set(actual), key=str)
    out = []
    for k in keys:
      out += producer_differences(expected.get(k, "<absent>"), actual.get(k, "<absent>"),
                                  f"{prefix}{k}.", partial)
    return out
  norm = lambda v: json.loads(json.dumps(v, default=str))  # tuples == lists
  if norm(expected) != norm(actual):
    short = lambda v: (s if len(s := json.dumps(norm(v))) <= 80 else s[:77] + "...")
    return [f"{prefix.rstrip('.')}: {short(expected)} != {short(actual)}"]
  return []


def check_producer(manifest: Mapping[str, Any], *, expected: Mapping[str, Any] | None = None,
                   key: str | None = None, path: str = "") -> None:
  """Raises PrecomputeMismatchError unless the records' producer matches.

  `expected` is a (partial) producer dict compared leaf by leaf; `key` the full
  producer_key printed by precompute.
  """
  where = f"The precomputed records in {path or 'this folder'}"
  fix = ("Point the run at records made with its settings, or rerun `sd3jax precompute` "
         "with them into a new folder.")
  if key and manifest.get("producer_key") != key:
    raise PrecomputeMismatchError(
        f"{where} have producer_key {manifest.get('producer_key')!r}, the run expects {key!r} "
        f"(they were made by different weights, encoders, dtype or data). {fix}")
  if expected:
    diffs = producer_differences(expected, manifest.get("producer", {}), partial=True)
    if diffs:
      raise PrecomputeMismatchError(
          f"{where} were made by a different producer (expected != found): "
          f"{'; '.join(diffs)}. {fix}")


class _PrecomputedTransform:
  """Caption choice, a latent sample from the stored moments, float32 outputs."""

  def __init__(self, *, seed: int, p_synthetic: float, shift: float, scale: float,
               t5_shape: tuple[int, int] | None):
    self.seed, self.p_synthetic = seed, p_synthetic
    self.shift, self.scale, self.t5_shape = shift, scale, t5_shape

  def __call__(self, ex: Mapping[str, Any], index: int, bucket: int, epoch: int) -> dict[str, Any]:
    rng = np.random.default_rng([self.seed, 5, index, epoch])
    use_synthetic = bool(rng.random() < self.p_synthetic) and "synthetic" in ex
    emb = ex["synthetic" if use_synthetic else "original"]
    mean = ex["vae_mean"].astype(np.float32)
    eps = rng.standard_normal(mean.shape, dtype=np.float32)
    z = mean + ex["vae_std"].astype(np.float32) * eps
    out = {"latents": vae_lib.normalize_latents(z, self.scale, self.shift)}
    if "source_vae_mean" in ex:  # an edit's source image: its posterior mode, as at sampling
      out["source_latents"] = vae_lib.normalize_latents(
          ex["source_vae_mean"].astype(np.float32), self.scale, self.shift)
    for k in ("clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled"):
      out[k] = emb[k].astype(np.float32)
    out["t5"] = (emb["t5"].astype(np.float32) if "t5" in emb
                 else np.zeros(self.t5_shape, np.float32))  # No T5: zeros, as SD3.
    out.update(caption_is_synthetic=use_synthetic, index=np.int64(index),
               epoch=np.int32(epoch), bucket=np.int32(bucket))
    return out


def make_precomputed_pipeline(
    source, *, global_batch: int, seed: int = 0, p_synthetic: float = 0.5,
    process_index: int | None = None, process_count: int | None = None, workers: int = 0,
    threads: int = 2, prefetch: int = 4, shuffle: bool = True, num_epochs: int | None = None,
    expected_producer: Mapping[str, Any] | None = None, producer_key: str | None = None,
    keys: Sequence[str] | None = None, skip_bad_records: bool = False) -> Pipeline:
  """Training pipeline over precomputed records (a folder or a RecordSource).

  Batches: "latents" float32 [B, h, w, C] = (mean + std * eps - shift) * scale with eps
  drawn from a generator seeded by (seed, record index, epoch) (fresh every epoch, same
  on every rerun); the chosen caption's "clip_l", "clip_l_pooled", "clip_g",
  "clip_g_pooled", "t5" (float32; T5 zeros when the records have none), with
  p(synthetic) = p_synthetic from the same generator (the original caption where an
  example has no synthetic one); metadata "caption_is_synthetic", "index", "epoch",
  "step", "bucket". `keys` keeps only those keys (the trainer: TRAIN_KEYS). Buckets are
  the distinct latent shapes (one shape per batch, the same on every process). The
  records' producer is checked against `expected_producer` / `producer_key` first.
  Sharding, shuffling, epochs and the resumable iterator state are the training
  pipeline's (see the module docstring). A record that cannot be read raises
  records.BadRecordError naming its shard; with `skip_bad_records` its slot takes another
  example of the same batch instead, and batch["bad_records"] marks the slot (the trainer
  counts them against config.data.max_bad_records).
  """
  from sd3jax.data import records  # Light; here to keep the module's imports as they were.
  process_index, process_count = _process_layout(process_index, process_count)
  _check_batch(global_batch, process_count)
  if not 0.0 <= p_synthetic <= 1.0:
    raise ValueError(f"p_synthetic must be in [0, 1], got {p_synthetic}.")
  if not isinstance(source, records.RecordSource):
    source = records.RecordSource(source, kind=records.KIND_PRECOMPUTED)
  elif source.kind != records.KIND_PRECOMPUTED:
    raise ValueError(f"{source.path} holds {source.kind!r} records, not precomputed ones: run "
                     "`sd3jax precompute` on it first.")
  manifest = source.manifest
  check_producer(manifest, expected=expected_producer, key=producer_key, path=source.path)
  producer = manifest.get("producer", {})
  shapes = producer.get("shapes", {})
  norm = producer.get("latent_normalization", {"shift": 0.0, "scale": 1.0})

  latent_hw = np.stack([source.column("latent_height"), source.column("latent_width")], 1)
  buckets = sorted({(int(h), int(w)) for h, w in latent_hw.tolist()})
  lookup = {b: i for i, b in enumerate(buckets)}
  bucket_ids = np.asarray([lookup[(int(h), int(w))] for h, w in latent_hw.tolist()], np.int64)
  plan = TrainPlan(bucket_ids, buckets, global_batch=global_batch, process_index=process_index,
                   process_count=process_count, seed=seed, shuffle=shuffle)
  num_steps = (2**62 if num_epochs is None else num_epochs * plan.steps_per_epoch)
  t5_shape = (int(shapes["t5_length"]), int(shapes["t5_width"])) if shapes else None
  transform = _PrecomputedTransform(seed=seed, p_synthetic=p_synthetic,
                                    shift=float(norm["shift"]), scale=float(norm["scale"]),
                                    t5_shape=t5_shape)
  config = {"kind": "precomputed", "n": len(source), "global_batch": global_batch,
            "buckets": buckets, "seed": seed, "p_synthetic": p_synthetic, "shuffle": shuffle,
            "sampling": _SAMPLING, "num_epochs": num_epochs, "producer_key": manifest.get("producer_key"),
            "keys": list(keys) if keys is not None else None}
  pipe = Pipeline(source, plan, transform, process_index=process_index, workers=workers,
                  threads=threads, prefetch=prefetch, num_steps=num_steps, config=config)
  pipe.batcher.skip_bad_records = skip_bad_records
  if keys is not None:
    pipe.batcher = _SelectKeys(pipe.batcher, keys)
  logging.info("precomputed pipeline: %s", json.dumps(plan.stats()))
  return pipe


def config_mismatches(config, producer: Mapping[str, Any]) -> list[str]:
  """Where a trainer config disagrees with the shapes of precomputed records."""
  s = producer.get("shapes", {})
  d, c = config.data, config.conditioning
  from sd3jax import buckets as buckets_lib
  factor = int(d.vae_factor)
  want = sorted([list(b) for b in buckets_lib.pixel_buckets(config)])
  found = s.get("buckets")
  checks = [
      ("data.buckets" if d.get("buckets") else "data.image_size",
       [tuple(b) for b in want] if d.get("buckets") else d.image_size,
       sorted(found) if found else found, want),
      ("data.vae_factor", factor, s.get("vae_factor"), factor),
      ("model.out_channels", config.model.out_channels, s.get("latent_channels"),
       config.model.out_channels),  # in_channels is twice that for an editing model
      ("conditioning.clip_tokens", c.clip_tokens, s.get("clip_length"), c.clip_tokens),
      ("conditioning.clip_l_dim", c.clip_l_dim,
       [s.get("clip_l_width"), s.get("clip_l_pooled_width")], [c.clip_l_dim] * 2),
      ("conditioning.clip_g_dim", c.clip_g_dim,
       [s.get("clip_g_width"), s.get("clip_g_pooled_width")], [c.clip_g_dim] * 2),
      ("conditioning.t5_tokens", c.t5_tokens, s.get("t5_length"), c.t5_tokens),
      ("conditioning.t5_dim", c.t5_dim, s.get("t5_width"), c.t5_dim),
  ]
  return [f"config.{name}={value} but the records have {found}"
          for name, value, found, want in checks if found != want]


def make_train_iterator(config, *, process_index: int | None = None,
                        process_count: int | None = None) -> PipelineIterator:
  """The trainer's iterator over config.data.path (precomputed records).

  Local batches of config.batch_size / process_count with TRAIN_KEYS only; seeded by
  config.seed; p(synthetic) from config.data.p_synthetic (default 0.5). The records must
  match the config's shapes (config.data.buckets, else one square bucket of
  data.image_size; latent channels, text widths and lengths) and, when
  config.data.producer_key is set, that key.
  """
  d = config.data
  if not d.path:
    from sd3jax.config import ConfigError
    raise ConfigError("config.data.source='records' needs config.data.path: the folder "
                      "`sd3jax precompute` (or `sd3jax run`, in WORKDIR/records/train) wrote.")
  from sd3jax.data import records
  source = records.RecordSource(d.path, kind=records.KIND_PRECOMPUTED)
  mismatches = config_mismatches(config, source.manifest.get("producer", {}))
  if mismatches:
    raise PrecomputeMismatchError(
        f"The precomputed records in {d.path} do not fit this config: {'; '.join(mismatches)}. "
        "Set these keys to the records' values, or rerun `sd3jax precompute` with this config "
        "into a new folder.")
  pipe = make_precomputed_pipeline(
      source, global_batch=int(config.batch_size), seed=int(config.seed),
      p_synthetic=float(d.get("p_synthetic", 0.5)), process_index=process_index,
      process_count=process_count, workers=int(d.get("workers", 0)),
      threads=int(d.get("threads", 2)), prefetch=int(d.get("prefetch", 4)),
      producer_key=d.get("producer_key", "") or None, keys=TRAIN_KEYS,
      skip_bad_records=int(d.get("max_bad_records", 0)) > 0)
  return pipe.iterator()
