"""Aspect-ratio buckets of a run: which image shapes it trains on, and each one's timestep shift.

SD3 trains its 1024^2 stage on several aspect ratios of about equal pixel count (SDXL's
buckets). A run lists them in config.data.buckets as pixel (height, width) pairs; an empty
list means one square bucket of config.data.image_size. Every global batch comes from one
bucket (sd3jax.data.pipeline), and the trainer compiles one step per bucket before step 1.

The timestep shift follows config.flow.shift_rule:

  "fixed"       every bucket uses config.flow.shift (and sampling config.eval.sample_shift);
  "resolution"  the shift scales with the side of a square of the bucket's pixel count,
                  shift_b = shift * sqrt(h_b * w_b) / image_size,
                so config.flow.shift is the shift at config.data.image_size^2. This is the
                paper's rule (Esser et al. 2024, Sec. 5.3.2: the noise-to-signal ratio grows
                with the number of pixels, alpha = sqrt(m / n)), applied per bucket.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

SHIFT_RULES = ("fixed", "resolution")


def _get(section: Any, key: str, default: Any) -> Any:
  return section.get(key, default) if hasattr(section, "get") else default


def pixel_buckets(config: Any) -> list[tuple[int, int]]:
  """The run's buckets as pixel (height, width), in config order."""
  listed = [tuple(int(v) for v in b) for b in (_get(config.data, "buckets", ()) or ())]
  if not listed:
    size = int(config.data.image_size)
    return [(size, size)]
  return listed


def latent_buckets(config: Any) -> list[tuple[int, int]]:
  """The buckets as latent (height, width): pixels / config.data.vae_factor."""
  f = int(config.data.vae_factor)
  return [(h // f, w // f) for h, w in pixel_buckets(config)]


def name(height: int, width: int) -> str:
  """'HxW': the bucket's key in logs, metrics and file names."""
  return f"{int(height)}x{int(width)}"


def bucket_shift(shift: float, rule: str, reference: int, height: int, width: int) -> float:
  """The shift for a (height, width) image under `rule` (see the module docstring)."""
  if rule == "fixed":
    return float(shift)
  if rule == "resolution":
    return float(shift) * math.sqrt(height * width) / float(reference)
  raise ValueError(f"config.flow.shift_rule={rule!r}; use one of {SHIFT_RULES}.")


def train_shift(config: Any, height: int, width: int) -> float:
  """Training shift of t for images of (height, width) pixels."""
  return bucket_shift(float(config.flow.shift), _get(config.flow, "shift_rule", "fixed"),
                      int(config.data.image_size), height, width)


def sample_shift(config: Any, height: int, width: int, base: float | None = None) -> float:
  """Sampling shift at (height, width): `base` (default config.eval.sample_shift, else
  config.flow.shift) under the run's shift rule, so training and sampling agree per bucket."""
  if base is None:
    base = float(_get(_get(config, "eval", {}), "sample_shift", config.flow.shift))
  return bucket_shift(base, _get(config.flow, "shift_rule", "fixed"),
                      int(config.data.image_size), height, width)


def check(config: Any) -> list[str]:
  """Problems with config.data.buckets / config.flow.shift_rule, each naming the fix."""
  problems = []
  rule = _get(config.flow, "shift_rule", "fixed")
  if rule not in SHIFT_RULES:
    problems.append(f"config.flow.shift_rule={rule!r}; use one of {SHIFT_RULES}.")
  m, f = config.model, int(config.data.vae_factor)
  multiple = int(m.patch_size) * f
  # Listed buckets only: the implicit square one is data.image_size, which validate checks.
  buckets = [tuple(int(v) for v in b) for b in (_get(config.data, "buckets", ()) or ())]
  if len(set(buckets)) != len(buckets):
    problems.append(f"config.data.buckets={buckets} lists a bucket twice.")
  for h, w in buckets:
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
      problems.append(
          f"bucket {name(h, w)} in config.data.buckets is not a positive multiple of "
          f"patch_size x vae_factor = {multiple} on both sides: use e.g. "
          f"{name(max(multiple, round(h / multiple) * multiple), max(multiple, round(w / multiple) * multiple))}.")
    elif max(h, w) // multiple > int(m.pos_embed_max_size):
      problems.append(
          f"bucket {name(h, w)} gives a {max(h, w) // multiple}-patch side, larger than "
          f"config.model.pos_embed_max_size={m.pos_embed_max_size}.")
  return problems


def describe(config: Any) -> str:
  """One line per bucket for logs: pixels, latent, tokens and shift."""
  p = int(config.model.patch_size)
  return "; ".join(
      f"{name(h, w)} (latent {name(lh, lw)}, {(lh // p) * (lw // p)} tokens, shift "
      f"{train_shift(config, h, w):.3g})"
      for (h, w), (lh, lw) in zip(pixel_buckets(config), latent_buckets(config)))


def largest(buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """The bucket with the most pixels (ties: the first): the one that sets memory."""
  return max(buckets, key=lambda b: b[0] * b[1])


def crop_stats(sizes: np.ndarray, bucket_ids: np.ndarray,
               buckets: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
  """Per bucket: how many images it holds and what resizing to it costs them.

  Each image is scaled to cover its bucket and centre-cropped, so it loses
  1 - (h_b w_b) / (h w s^2) of its area, s = max(h_b / h, w_b / w); s > 1 means it was
  upsampled. Nothing is dropped: every image goes to its nearest-aspect bucket.
  """
  sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
  ids = np.asarray(bucket_ids, np.int64)
  out = []
  for b, (bh, bw) in enumerate(buckets):
    hw = sizes[ids == b]
    row: dict[str, Any] = {"bucket": name(bh, bw), "count": int(len(hw))}
    if len(hw):
      s = np.maximum(bh / hw[:, 0], bw / hw[:, 1])
      cropped = 1.0 - (bh * bw) / (hw[:, 0] * hw[:, 1] * s * s)
      row.update(cropped_mean=round(float(cropped.mean()), 4),
                 cropped_p90=round(float(np.quantile(cropped, 0.9)), 4),
                 cropped_max=round(float(cropped.max()), 4),
                 cropped_over_10pct=int(np.sum(cropped > 0.1)),
                 upsampled=int(np.sum(s > 1.0 + 1e-9)))
    out.append(row)
  return out


__all__ = ["crop_stats", "SHIFT_RULES", "bucket_shift", "check", "describe", "largest", "latent_buckets",
           "name", "pixel_buckets", "sample_shift", "train_shift"]
