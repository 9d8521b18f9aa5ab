"""What identifies a precomputed record set: its source, VAE, text encoders and shapes.

The precompute stage writes `make_producer(...)` into every record set's manifest, with its
sha256 `producer_key`. The trainer compares them with what a run expects before reading a
record (sd3jax.data.latent_pipeline.check_producer), so latents made by another VAE, other
text encoders or other buckets are refused, never mixed.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd3jax.data import records

STAGE = "sd3jax.precompute"
RECORD_VERSION = 1


def open_source(path: str, split: str = "train", filter: str = ""):  # noqa: A002
  """A records folder (image_text) or a built shapes TFDS dir -> random-access source;
  without the examples a dedup `filter` folder drops (sd3jax.dedup.filter) when given."""
  if os.path.exists(os.path.join(path, records.MANIFEST)):
    source = records.RecordSource(path, kind=records.KIND_IMAGE_TEXT)
  else:
    from sd3jax.data import shapes_tfds
    try:
      source = shapes_tfds.load_shapes(path, split)
    except (FileNotFoundError, ValueError) as e:
      raise FileNotFoundError(
          f"{path!r} is neither an image_text record set (no {records.MANIFEST}) nor a built "
          f"shapes dataset ({e}). Ingest the data (sd3jax ingest) or build shapes "
          "(shapes_tfds.build_shapes) first.") from e
  if filter:
    from sd3jax.dedup.filter import FilteredSource
    source = FilteredSource(source, filter)
  return source


def source_identity(source) -> dict[str, Any]:
  """What identifies the data without reading it (paths excluded: data may move)."""
  if hasattr(source, "identity"):  # a filtered source: the wrapped one's + the filter's hash
    return source.identity()
  ident: dict[str, Any] = {"type": type(source).__name__, "num_examples": len(source)}
  if isinstance(source, records.RecordSource):
    m = source.manifest
    ident.update(created=m.get("created"), num_shards=m.get("num_shards"))
  elif hasattr(source, "dataset_dir"):  # shapes: the config name encodes every field.
    parts = os.path.normpath(source.dataset_dir).split(os.sep)
    ident.update(dataset="/".join(parts[-3:]), split=getattr(source, "split", None))
  return ident


def params_fingerprint(params: Any) -> str:
  """sha256 over a params tree (paths, dtypes, shapes, bytes); process-local arrays only."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      raise ValueError("params_fingerprint needs process-local params; pass the weights "
                       "folder's fingerprint (conditioning.folder_fingerprint) instead.")
    arr = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.name}|{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def producer_key(producer: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(producer, sort_keys=True).encode()).hexdigest()[:16]


def vae_factor(vae_model) -> int:
  return int(vae_model.config.downsample_factor)


def make_producer(source, vae_model, vae_params, text_encoders, *,
                  buckets: Sequence[tuple[int, int]], storage_dtype: str,
                  examples_per_shard: int, vae_fingerprint: str | None = None) -> dict[str, Any]:
  """Everything that decides the records' bytes (and nothing that does not: batch, mesh)."""
  cfg = vae_model.config
  text_key = text_encoders.cache_key()
  for name in ("clip_l", "clip_g", "t5"):  # In-memory encoders: hash their weights.
    enc = text_encoders.encoders[name]
    if enc is not None and not text_key[name].get("files"):
      text_key[name]["params_sha256"] = params_fingerprint(enc.params)
  f = vae_factor(vae_model)
  clip_l, clip_g = (text_encoders.encoders[n].model.config for n in ("clip_l", "clip_g"))
  extra = {}
  if getattr(source, "has_source_image", False):  # edit triplets (sd3jax.data.shapes_edit)
    extra["source_image"] = "vae_mean"
  return {
      **extra,
      "stage": STAGE, "record_version": RECORD_VERSION,
      "source": source_identity(source),
      "vae": {"config": cfg.to_diffusers(), "dtype": jnp.dtype(vae_model.dtype).name,
              "weights": vae_fingerprint or params_fingerprint(vae_params)},
      "text_encoders": text_key,
      "storage_dtype": storage_dtype,
      "moments": "mean_std",
      "latent_normalization": {"shift": float(cfg.shift_factor or 0.0),
                               "scale": float(cfg.scaling_factor)},
      "resize": "bicubic_cover_center_crop",
      "order": "bucket_major",
      "examples_per_shard": int(examples_per_shard),
      "shapes": {
          "buckets": [[int(h), int(w)] for h, w in buckets],
          "latent_buckets": [[int(h) // f, int(w) // f] for h, w in buckets],
          "vae_factor": f, "latent_channels": int(cfg.latent_channels),
          "clip_length": int(text_encoders.clip_length),
          "clip_l_width": int(clip_l.hidden_size),
          "clip_l_pooled_width": int(clip_l.projection_dim),
          "clip_g_width": int(clip_g.hidden_size),
          "clip_g_pooled_width": int(clip_g.projection_dim),
          "t5_length": int(text_encoders.t5_length), "t5_width": int(text_encoders.t5_width),
          "has_t5": text_encoders.encoders["t5"] is not None,
      },
  }
