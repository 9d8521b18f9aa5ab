"""The precompute stage: VAE posterior moments + per-encoder text embeddings -> records.

    sd3jax precompute --config experiments/FILE.py --workdir OUT

SD3 trains on latents and text embeddings computed once (Esser et al. 2024, Sec. 5.1):
the frozen VAE encoder and the three frozen text encoders would otherwise cost more than
the MM-DiT step itself. This stage runs them over an image-text dataset and writes a
`precomputed` record set (sd3jax.data.records) that `latent_pipeline.make_precomputed_pipeline`
reads.

What a record holds (one example; arrays in the storage dtype, bfloat16 or float32):
  key, index (source index), height, width (the bucket, pixels), latent_height,
  latent_width, original_size, caption_original, caption_synthetic (str),
  vae_mean, vae_std          (h/f, w/f, C) posterior moments, NOT normalised
  original  {clip_l (77, Dl), clip_l_pooled (Pl), clip_g (77, Dg), clip_g_pooled (Pg),
             t5 (L, Dt) (absent without a T5)}           embeddings of caption_original
  synthetic {... the same ...}  embeddings of caption_synthetic; absent when the example
                                has none (the trainer then uses the original caption)
  source_vae_mean  (h/f, w/f, C) posterior mean of the image an edit starts from; only in
                   edit records (sources with has_source_image: sd3jax.data.shapes_edit)
Index columns (sidecar, no decoding needed): index, latent_height, latent_width.

Moments, not latents: the trainer draws z = mean + std * eps afresh every time it sees an
example (the pipeline does it, seeded by (seed, record index, epoch)), then normalises
(z - shift_factor) * scaling_factor, as LDM / SD3 training with stored moments does. The
std (not logvar) is stored: in bfloat16 it keeps 0.4% relative precision, where a rounded
logvar would move the std by up to ~2%. Encoder outputs are stored per encoder and for both
captions, so the trainer can drop encoders independently and mix captions with
p(synthetic).

Order and shards: examples are sorted by bucket (stable: source order within a bucket),
and shard s holds positions [s E, (s + 1) E) of that order (E = examples_per_shard), so a
shard spans at most a few buckets and every batch has one shape. The assignment depends
only on (data, buckets, E): a rerun computes every shard from exactly the same inputs and
writes identical records.

Resume: a shard is published by an atomic rename when complete (records.ShardWriter), so
a rerun skips every finished shard, deletes the temporary files of half-written ones and
redoes those. `precompute_plan.json`, written before the first shard, records what
produces the set; a rerun with a different producer is refused, never mixed.

Hosts: shard s belongs to process s % process_count, which alone writes it. Each process
runs the encoders on its own devices (frozen weights, no gradients: nothing to
communicate), batch split over the ("data", "fsdp") axes of its local mesh; a mesh
spanning processes is refused. When every process is done (a barrier), process 0 verifies
every shard's count and index column against the plan and writes the manifest, whose
"producer" (VAE config + weights hash, TextEncoders.cache_key(), storage dtype, buckets,
sequence lengths, source) and "producer_key" the trainer checks before reading.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sd3jax.data import latent_pipeline
from sd3jax.data import pipeline as pipeline_lib
from sd3jax.data.batch_encoder import BatchEncoder, local_mesh
from sd3jax.data import records
from sd3jax.data.producer import make_producer, open_source, producer_key, vae_factor

PLAN_FILE = "precompute_plan.json"
STORAGE_DTYPES = ("bfloat16", "float32")
COLUMNS = ("index", "latent_height", "latent_width")
TEXT_KEYS = ("clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled", "t5")

PrecomputeMismatchError = latent_pipeline.PrecomputeMismatchError


@dataclasses.dataclass
class PrecomputeResult:
  """What one call did; `manifest` is set once the whole record set is published."""
  out_dir: str
  complete: bool
  manifest: dict | None
  producer_key: str
  num_shards: int
  shards_written: list[int]
  shards_skipped: list[int]
  examples_written: int
  seconds: float
  compiled_shapes: list[tuple[int, int]]

  @property
  def examples_per_sec(self) -> float:
    return self.examples_written / max(self.seconds, 1e-9)


# ----------------------------------------------------------------------------
# The plan: order, shards, ownership.
# ----------------------------------------------------------------------------
def example_order(bucket_ids: np.ndarray) -> np.ndarray:
  """Source indices in record order: bucket-major, source order within a bucket."""
  return np.argsort(np.asarray(bucket_ids, np.int64), kind="stable")


def shard_slice(shard: int, examples_per_shard: int, n: int) -> slice:
  return slice(shard * examples_per_shard, min(n, (shard + 1) * examples_per_shard))


def owned_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
  """Shard s belongs to process s % process_count (disjoint, covering, balanced)."""
  return list(range(process_index, num_shards, process_count))


def _sidecar(path: str) -> str:
  return path + ".json"


def _shard_ok(path: str, indices: np.ndarray) -> bool:
  """A published shard whose sidecar lists exactly the planned examples, less the bad
  source records it skipped (listed in the sidecar)."""
  if not (os.path.exists(path) and os.path.exists(_sidecar(path))):
    return False
  with open(_sidecar(path)) as f:
    side = json.load(f)
  skipped = {int(b["index"]) for b in side.get("bad_records", [])}
  want = [int(i) for i in indices if int(i) not in skipped]
  return (skipped <= {int(i) for i in indices} and side.get("num_examples") == len(want)
          and side.get("columns", {}).get("index") == want)


def _bad_records(path: str) -> list[dict[str, Any]]:
  with open(_sidecar(path)) as f:
    return json.load(f).get("bad_records", [])


def _check_or_write_plan(out_dir: str, plan: dict[str, Any]) -> None:
  """Refuses a folder started (or finished) by another producer; else records ours."""
  for name in (records.MANIFEST, PLAN_FILE):
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      old = json.load(f)
    if old.get("producer_key") != plan["producer_key"]:
      diffs = latent_pipeline.producer_differences(plan["producer"], old.get("producer", {}))
      raise PrecomputeMismatchError(
          f"{out_dir} holds precomputed records of a different producer ({name}: "
          f"{old.get('producer_key')} != {plan['producer_key']}); differences "
          f"(ours vs theirs): {'; '.join(diffs[:8]) or 'layout'}. Use a new output folder, or "
          "delete this one to recompute.")
  path = os.path.join(out_dir, PLAN_FILE)
  if not os.path.exists(path):  # Every process writes the same bytes: races are harmless.
    records.atomic_write_text(path, json.dumps(plan, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------
# Loading (a thread, overlapped with the device).
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Chunk:
  shard: int
  indices: np.ndarray     # source indices, all of one bucket
  bucket: int
  last_of_shard: bool


def _chunks(shard: int, indices: np.ndarray, bucket_ids: np.ndarray,
            batch: int) -> list[_Chunk]:
  """A shard's examples as same-bucket runs of at most `batch`."""
  out = []
  b = bucket_ids[indices]
  starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
  for s, e in zip(starts, np.r_[starts[1:], len(indices)]):
    for k in range(s, e, batch):
      out.append(_Chunk(shard, indices[k:min(e, k + batch)], int(b[s]), False))
  out[-1].last_of_shard = True
  return out


def _load(source, chunk: _Chunk, hw: tuple[int, int], batch: int, encoder: BatchEncoder,
          skip_bad: bool = False):
  """(images, token ids, meta, bad): a chunk's examples ready for the encoders. Records
  that cannot be read or decoded raise records.BadRecordError, or with `skip_bad` are
  left out and listed in `bad` ({"index", "reason"})."""
  idx = [int(i) for i in chunk.indices]
  if hasattr(source, "read_many"):
    exs = source.read_many(idx)
  else:
    exs = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
  images, sources, meta, bad = [], [], [], []
  for i, ex in zip(idx, exs):
    try:
      if isinstance(ex, Exception):
        raise ex
      try:
        pixels, orig, _ = pipeline_lib.resize_and_crop(ex["image"], *hw, crop="center")
        if "source_image" in ex:  # an edit: the image it starts from, cropped the same way
          sources.append(pipeline_lib.to_float(pipeline_lib.resize_and_crop(
              ex["source_image"], *hw, crop="center")[0]))
      except Exception as e:  # noqa: BLE001 -- a readable record with an undecodable image
        raise records.BadRecordError(*_record_place(source, i), f"the image does not decode "
                                     f"({type(e).__name__}: {e})") from e
    except records.BadRecordError as e:
      if not skip_bad:
        raise
      logging.warning("precompute: skipping %s", e)
      bad.append({"index": i, "shard": e.shard, "record": e.record, "reason": e.reason})
      continue
    images.append(pipeline_lib.to_float(pixels))
    meta.append({"key": str(ex.get("key", i)), "index": i, "original_size": list(orig),
                 "caption_original": str(ex["caption_original"]),
                 "caption_synthetic": str(ex.get("caption_synthetic") or "")})
  if not meta:
    return None, None, meta, bad
  pad = batch - len(meta)  # Padding repeats the last example; its outputs are discarded.
  images = np.stack(images + [images[-1]] * pad)
  if sources:  # the edit's source images after the targets: one VAE call
    images = np.concatenate([images, np.stack(sources + [sources[-1]] * pad)])
  caps = [m["caption_original"] for m in meta] + [meta[-1]["caption_original"]] * pad
  if any(m["caption_synthetic"] for m in meta):  # else (edits, alt-text only) half the work
    caps += [m["caption_synthetic"] for m in meta] + [meta[-1]["caption_synthetic"]] * pad
  return images, encoder.tokenize(caps), meta, bad


def _record_place(source, index: int) -> tuple[str, int, int]:
  """(shard, record in shard, index) of a source example, for BadRecordError."""
  if hasattr(source, "locate"):
    return (*source.locate(index), index)
  return getattr(source, "path", type(source).__name__), index, index


def _prefetch(items: Sequence[Any], fn, depth: int = 2) -> Iterator[tuple[Any, Any]]:
  """(item, fn(item)) in order, with up to `depth` loads running ahead."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    futures = [pool.submit(fn, it) for it in items[:depth]]
    for k, it in enumerate(items):
      if k + depth < len(items):
        futures.append(pool.submit(fn, items[k + depth]))
      yield it, futures[k].result()
      futures[k] = None


# ----------------------------------------------------------------------------
# The stage.
# ----------------------------------------------------------------------------
def _records(meta, mean, std, text, hw, f, has_t5, b) -> Iterator[dict[str, Any]]:
  """A batch of b examples: text rows are the b originals, then (when any example has one)
  the b synthetic captions; an edit's batch has 2b images, targets then sources."""
  edit = mean.shape[0] == 2 * b
  for j, m in enumerate(meta):
    rec = {"key": m["key"], "index": m["index"], "height": hw[0], "width": hw[1],
           "latent_height": hw[0] // f, "latent_width": hw[1] // f,
           "original_size": m["original_size"], "caption_original": m["caption_original"],
           "caption_synthetic": m["caption_synthetic"],
           "vae_mean": mean[j], "vae_std": std[j]}
    if edit:  # the source's posterior mean: the editing model conditions on its mode
      rec["source_vae_mean"] = mean[b + j]
    keys = TEXT_KEYS if has_t5 else TEXT_KEYS[:4]
    rec["original"] = {k: text[k][j] for k in keys}
    if m["caption_synthetic"]:
      rec["synthetic"] = {k: text[k][b + j] for k in keys}
    yield rec


def precompute(source, out_dir: str, vae: tuple[Any, Any], text_encoders, *, global_batch: int,
               resolution: int | tuple[int, int] | None = None,
               buckets: Sequence[tuple[int, int]] | None = None,
               storage_dtype: str = "bfloat16", examples_per_shard: int = 1000,
               mesh: Mesh | None = None, rules: Any = None, split: str = "train",
               filter: str = "",  # noqa: A002
               process_index: int | None = None, process_count: int | None = None,
               vae_fingerprint: str | None = None, max_shards: int | None = None,
               sizes: np.ndarray | None = None, progress: bool = True,
               max_bad_records: int = 0) -> PrecomputeResult:
  """Writes (or completes) the precomputed record set of `source` in `out_dir`.

  `source`: a random-access image-text source, or a path (records folder / shapes TFDS
  dir, `split`; `filter`: a dedup filter folder whose dropped examples are left out).
  `vae` = (AutoencoderKL, params); `text_encoders` a TextEncoders. Give
  `resolution` (one shape) or `buckets` (pixel (h, w), multiples of the VAE factor).
  Each process runs batches of global_batch / process_count on `mesh` (its own devices;
  default: one local device). `max_shards` stops after writing that many shards (a
  partial run, as an interruption leaves it). `vae_fingerprint` replaces hashing the
  VAE params (pass the weights folder's). A source record that cannot be read or decoded
  stops the run with records.BadRecordError naming it; with `max_bad_records` > 0 up to
  that many (per process) are left out instead, listed in their shard's sidecar and counted
  in the manifest ("bad_records"). Returns what was done; the manifest is written by
  process 0 once every shard exists.
  """
  t_start = time.perf_counter()
  if isinstance(source, (str, os.PathLike)):
    source = open_source(os.fspath(source), split, filter)
  pi, pc = pipeline_lib._process_layout(process_index, process_count)
  pipeline_lib._check_batch(global_batch, pc)
  if storage_dtype not in STORAGE_DTYPES:
    raise ValueError(f"storage_dtype={storage_dtype!r}; choose one of {STORAGE_DTYPES}.")
  if examples_per_shard < 1:
    raise ValueError(f"examples_per_shard={examples_per_shard} must be >= 1.")
  vae_model, vae_params = vae
  if vae_model.config.latents_mean is not None or vae_model.config.latents_std is not None:
    raise NotImplementedError("VAE configs with per-channel latents_mean / latents_std are not "
                              "supported (sd3jax normalises with shift_factor / scaling_factor).")
  n = len(source)
  if n == 0:
    raise ValueError("The source has no examples.")
  buckets, bucket_ids = pipeline_lib._bucket_setup(source, resolution, buckets, sizes)
  f = vae_factor(vae_model)
  for h, w in buckets:
    if h % f or w % f:
      raise ValueError(f"Bucket {h}x{w} is not divisible by the VAE factor {f}; use sides that "
                       f"are multiples of {f} (pipeline.make_buckets(multiple=16) does).")

  mesh = mesh if mesh is not None else local_mesh(jax.local_devices()[:1])
  if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
    raise ValueError("precompute runs each process on its own devices: pass a mesh of "
                     "jax.local_devices() (precompute.local_mesh()), not a global one.")
  batch = global_batch // pc
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch % shards:
    raise ValueError(f"global_batch={global_batch} gives {batch} examples per process, not "
                     f"divisible by the mesh's data x fsdp = {shards}: use a global batch that "
                     f"is a multiple of {shards * pc}.")
  rules = rules if rules is not None else getattr(text_encoders, "rules", "fsdp")

  producer = make_producer(source, vae_model, vae_params, text_encoders, buckets=buckets,
                           storage_dtype=storage_dtype, examples_per_shard=examples_per_shard,
                           vae_fingerprint=vae_fingerprint)
  key = producer_key(producer)
  order = example_order(bucket_ids)
  num_shards = math.ceil(n / examples_per_shard)
  plan = {"producer": producer, "producer_key": key, "num_examples": n, "num_shards": num_shards}
  os.makedirs(out_dir, exist_ok=True)
  _check_or_write_plan(out_dir, plan)

  def result(manifest, complete, written=(), skipped=(), count=0, compiled=()):
    return PrecomputeResult(os.fspath(out_dir), complete, manifest, key, num_shards,
                            list(written), list(skipped), count,
                            time.perf_counter() - t_start, list(compiled))

  if os.path.exists(os.path.join(out_dir, records.MANIFEST)):
    return result(records.read_manifest(out_dir), True)

  mine = owned_shards(num_shards, pi, pc)
  stale = records.remove_stale_shards(out_dir, mine)
  if stale:
    logging.info("precompute: removed %d temporary files of interrupted shards.", len(stale))
  planned = {s: order[shard_slice(s, examples_per_shard, n)] for s in mine}
  done, todo = [], []
  for s in mine:
    path = records.shard_path(out_dir, s)
    if _shard_ok(path, planned[s]):
      done.append(s)
      continue
    if os.path.exists(path):  # Published but not what the plan says: redo it.
      logging.warning("precompute: %s does not hold its planned examples; rewriting it.", path)
      os.remove(path)
    todo.append(s)
  stopped_early = max_shards is not None and len(todo) > max_shards
  todo = todo[:max_shards] if max_shards is not None else todo

  encoder = BatchEncoder(vae_model, vae_params, text_encoders, mesh, rules, storage_dtype, batch)
  has_t5 = text_encoders.encoders["t5"] is not None
  chunks = [c for s in todo for c in _chunks(s, planned[s], bucket_ids, batch)]
  load = lambda c: _load(source, c, buckets[c.bucket], batch, encoder, max_bad_records > 0)
  from tqdm.auto import tqdm
  bar = tqdm(total=sum(len(planned[s]) for s in todo), unit="ex", disable=not progress,
             desc=f"precompute {os.path.basename(os.path.normpath(out_dir))}" + (f" [process {pi}/{pc}]" if pc > 1 else ""))
  written, count, num_bad = [], 0, 0
  writer: records.ShardWriter | None = None

  def emit(chunk: _Chunk, meta: list[dict[str, Any]], outputs: tuple | None,
           bad: list[dict[str, Any]]) -> None:
    nonlocal writer, count, num_bad
    if writer is None:
      writer = records.ShardWriter(records.shard_path(out_dir, chunk.shard), columns=COLUMNS)
    if outputs is not None:
      mean, std, text = jax.device_get(outputs)
      for rec in _records(meta, mean, std, text, buckets[chunk.bucket], f, has_t5, batch):
        writer.write(rec)
    writer.sidecar_extra.setdefault("bad_records", []).extend(bad)
    num_bad += len(bad)
    if num_bad > max_bad_records and bad:
      raise records.DataError(
          f"precompute: {num_bad} unreadable source records, more than max_bad_records="
          f"{max_bad_records}; each is named in a warning above. Repair the source, or raise "
          "config.data.max_bad_records.")
    bar.update(len(meta) + len(bad))
    count += len(meta)
    if chunk.last_of_shard:
      writer.close()
      writer = None
      written.append(chunk.shard)

  pending = None  # Batch k is written while batch k + 1 runs on the devices.
  try:
    for chunk, (images, ids, meta, bad) in _prefetch(chunks, load):
      outputs = encoder(images, ids) if meta else None
      if pending is not None:
        emit(*pending)
      pending = (chunk, meta, outputs, bad)
    if pending is not None:
      emit(*pending)
  except BaseException:
    if writer is not None:
      writer.abort()
    raise
  finally:
    bar.close()
  compiled = sorted({k[:2] for k in encoder._vae})  # (h, w); edits compile 2x batches too
  if stopped_early:
    return result(None, False, written, done, count, compiled)

  multihost = pc > 1 and jax.process_count() > 1
  if multihost:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("sd3jax precompute: shards written")
  manifest = None
  if pi == 0:
    manifest = finalize(out_dir, plan, order, examples_per_shard,
                        extra={"global_batch": global_batch, "process_count": pc,
                               "mesh": dict(mesh.shape), "bucket_counts":
                               np.bincount(bucket_ids, minlength=len(buckets)).tolist(),
                               "bucket_stats": _bucket_stats(source, sizes, bucket_ids,
                                                             buckets)})
  if multihost:
    multihost_utils.sync_global_devices("sd3jax precompute: manifest written")
    manifest = records.read_manifest(out_dir)
  return result(manifest, manifest is not None, written, done, count, compiled)


def _bucket_stats(source, sizes, bucket_ids, buckets) -> list[dict[str, Any]] | None:
  """Counts and crop statistics per bucket (sd3jax.buckets.crop_stats); None when the image
  sizes are unknown without decoding every image."""
  from sd3jax import buckets as buckets_lib
  if sizes is None and not hasattr(source, "image_sizes"):
    return None
  sizes = np.asarray(sizes if sizes is not None else source.image_sizes())
  return buckets_lib.crop_stats(sizes, bucket_ids, buckets)


def finalize(out_dir: str, plan: Mapping[str, Any], order: np.ndarray, examples_per_shard: int,
             extra: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
  """Verifies every shard against the plan, then publishes the manifest (process 0).

  Returns None (and logs which) when shards are still missing, e.g. other processes of a
  simulated multi-process run have not written theirs yet.
  """
  n, num_shards = int(plan["num_examples"]), int(plan["num_shards"])
  names = {os.path.basename(p) for p in records.completed_shards(out_dir)}
  expected = [records.shard_name(s) for s in range(num_shards)]
  unexpected = sorted(names - set(expected))
  if unexpected:
    raise ValueError(f"{out_dir} holds shards outside the plan ({unexpected[:4]}...): it was "
                     "written by something else. Use a new output folder.")
  missing = [s for s in range(num_shards) if records.shard_name(s) not in names]
  if missing:
    logging.warning("precompute: %d of %d shards missing (e.g. %s): the manifest waits for "
                    "them.", len(missing), num_shards, missing[:8])
    return None
  bad: list[dict[str, Any]] = []
  for s in range(num_shards):
    path = records.shard_path(out_dir, s)
    want = order[shard_slice(s, examples_per_shard, n)]
    if not _shard_ok(path, want):
      raise ValueError(f"{path} does not hold its planned {len(want)} examples; delete it and "
                       "rerun precompute to rewrite it.")
    bad += _bad_records(path)
  if bad:
    logging.warning("precompute: %d bad source records were left out (listed in the manifest "
                    "under bad_records).", len(bad))
  first = records.first_record(next(records.shard_path(out_dir, s) for s in range(num_shards)
                             if _sidecar_count(records.shard_path(out_dir, s))))
  features = records.feature_spec(first)
  if "synthetic" not in features:
    features["synthetic"] = features["original"]  # Absent on examples without one.
  return records.write_manifest(
      out_dir, kind=records.KIND_PRECOMPUTED, features=features, producer=plan["producer"],
      expected_num_examples=n - len(bad),
      extra={"producer_key": plan["producer_key"], "precompute": dict(extra or {}),
             "bad_records": {"count": len(bad), "first": bad[:100]}})


def _sidecar_count(path: str) -> int:
  with open(_sidecar(path)) as f:
    return int(json.load(f)["num_examples"])


def dir_size(path: str) -> int:
  """Bytes of a record set's shard files (what storage_dtype changes)."""
  return sum(os.path.getsize(p) for p in records.completed_shards(path))


# ----------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------
PRECOMPUTE_DEFAULTS = {
    "source": "",             # image_text records folder, or a built shapes TFDS data dir
    "split": "train",         # shapes split
    "text_encoders": "",      # SD3 pipeline folder: text_encoder{,_2,_3}, tokenizer{,_2,_3}
    "vae": "",                # diffusers AutoencoderKL folder (config.json + safetensors)
    "use_t5": True,
    "batch_size": 64,         # global, across processes
    "storage_dtype": "bfloat16",
    "examples_per_shard": 1000,
    "text_dtype": "float32",
    "vae_dtype": "float32",
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},  # over this process's devices
}


def _settings(config) -> dict[str, Any]:
  section = config.get("precompute", None)
  section = {} if section is None else {
      k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in section.items()}
  settings = dict(PRECOMPUTE_DEFAULTS)
  unknown = sorted(set(section) - set(settings))
  if unknown:
    raise ValueError(f"Unknown key config.precompute.{unknown[0]} (all unknown: {unknown}); "
                     f"known: {sorted(settings)}.")
  settings.update(section)
  for key in ("source", "text_encoders", "vae"):
    if not settings[key]:
      raise ValueError(f"config.precompute.{key} is empty: set it (see "
                       "sd3jax/data/precompute.py PRECOMPUTE_DEFAULTS).")
  return settings


def precompute_main(config, workdir: str, announce: bool = True) -> int:
  """`sd3jax precompute`: records of config.precompute.source into `workdir`; `announce`
  prints how to train on them (the main job, which trains on them itself, passes False)."""
  from sd3jax import conditioning
  from sd3jax.interop import diffusers_vae
  s = _settings(config)
  mesh = local_mesh(shape=s["mesh"])
  rules = config.get("sharding_rules", "fsdp")
  te = conditioning.TextEncoders.from_pipeline_folder(
      s["text_encoders"], dtype=jnp.dtype(s["text_dtype"]),
      t5_length=int(config.conditioning.t5_tokens), use_t5=bool(s["use_t5"]),
      t5_width=int(config.conditioning.t5_dim), mesh=mesh, rules=rules)
  vae = diffusers_vae.load_vae(s["vae"], dtype=jnp.dtype(s["vae_dtype"]))
  from sd3jax import buckets as buckets_lib
  buckets = buckets_lib.pixel_buckets(config)  # config.data.buckets, else one square
  res = precompute(s["source"], workdir, vae, te, global_batch=int(s["batch_size"]),
                   max_bad_records=int(config.data.get("max_bad_records", 0)),
                   buckets=buckets, storage_dtype=s["storage_dtype"],
                   examples_per_shard=int(s["examples_per_shard"]), mesh=mesh, rules=rules,
                   split=s["split"], filter=str(config.data.get("filter", "")),
                   vae_fingerprint=conditioning.folder_fingerprint(s["vae"]))
  logging.info("precompute: %d examples in %.1f s (%.1f examples/s); %d shards written, %d "
               "already done; producer_key %s.", res.examples_written, res.seconds,
               res.examples_per_sec, len(res.shards_written), len(res.shards_skipped),
               res.producer_key)
  stats = (res.manifest or {}).get("precompute", {}).get("bucket_stats") or []
  if len(stats) > 1:
    logging.info("precompute buckets: %s", "; ".join(
        f"{r['bucket']}: {r['count']} images" + (f", {r['cropped_mean']:.1%} of the area cropped "
                                                 f"on average (max {r['cropped_max']:.1%}), "
                                                 f"{r['upsampled']} upsampled"
                                                 if r["count"] else "") for r in stats))
  if res.manifest is not None and announce:
    print(f"precomputed {res.manifest['num_examples']} examples into {workdir} "
          f"(producer_key {res.producer_key}); train with --config.data.source=records "
          f"--config.data.path={workdir}")
  return 0
