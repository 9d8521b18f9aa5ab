"""A shapes record set with injected near-duplicates: dedup with a known answer.

Web data holds re-uploads of the same picture: shifted, cropped, colour-adjusted and
re-encoded. This builder makes such a set from the embedded shapes scenes so that the
whole dedup procedure (embed -> cluster -> filter) can be scored against ground truth:

  - `num_unique` distinct scenes. Distinct by construction: no two share the set of
    (cell, colour, shape, size) objects, so the only near-duplicates are the injected ones.
    Two renders of one such set differ by a few pixels of jitter, and the backgrounds
    (white, gray, cream) by what a brightness / colour edit does, so they would be
    duplicates the truth could not name.
  - `copy_fraction` x `num_unique` copies of originals drawn at random (an original may
    be copied more than once), each with 1-4 of these edits: a shift of 1-2 px, a crop
    keeping 90-98% of each side resized back, brightness / contrast / saturation x
    [0.9, 1.1], JPEG re-encoding at quality 60-90.
  - everything shuffled; keys say nothing ("img-000123"); the truth is in each record's
    meta: "group" (the original scene's number) and "edits".

The records are ordinary image_text records, so they go through ingest's consumers
(precompute, pipelines) unchanged.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageEnhance
from tqdm import tqdm

from sd3jax.data import records, shapes
from sd3jax.dedup import DedupError

EDITS = ("shift", "crop", "colour", "jpeg")


def _signature(example: dict[str, Any]) -> tuple:
  return tuple(sorted((o["cell"], o["color"], o["shape"], o["size"])
                      for o in example["objects"]))


def unique_scenes(num: int, *, seed: int = 0, height: int = 64, width: int = 64
                  ) -> list[dict[str, Any]]:
  """The first `num` shapes train scenes with pairwise distinct signatures."""
  seen, out, index = set(), [], 0
  while len(out) < num:
    ex = shapes.make_example(index, seed=seed, height=height, width=width)
    index += 1
    sig = _signature(ex)
    if sig not in seen:
      seen.add(sig)
      out.append(ex)
    if index > 50 * num + 1000:
      raise DedupError(f"only {len(out)} distinct shapes scenes in {index} draws; ask for "
                       "fewer (num_unique).")
  return out


def near_copy(image: np.ndarray, rng: np.random.Generator,
              edits: Sequence[str] | None = None) -> tuple[bytes, str, list[str]]:
  """An edited copy of a uint8 HWC image: (encoded bytes, format, edits applied)."""
  if edits is None:
    edits = [e for e in EDITS if rng.random() < 0.5] or [str(rng.choice(EDITS))]
  h, w = image.shape[:2]
  im = Image.fromarray(image)
  if "shift" in edits:
    dy, dx = 0, 0
    while dy == 0 and dx == 0:
      dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
    padded = np.pad(np.asarray(im), ((2, 2), (2, 2), (0, 0)), mode="edge")
    im = Image.fromarray(padded[2 - dy:2 - dy + h, 2 - dx:2 - dx + w])
  if "crop" in edits:
    keep = rng.uniform(0.9, 0.98, size=2)
    ch, cw = int(round(h * keep[0])), int(round(w * keep[1]))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
  if "colour" in edits:
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
      im = enhance(im).enhance(float(rng.uniform(0.9, 1.1)))
  buf = io.BytesIO()
  if "jpeg" in edits:
    im.save(buf, format="JPEG", quality=int(rng.integers(60, 91)))
    return buf.getvalue(), "jpeg", list(edits)
  im.save(buf, format="PNG")
  return buf.getvalue(), "png", list(edits)


def build(out_dir: str, *, num_unique: int = 2000, copy_fraction: float = 0.05,
          resolution: int = 64, seed: int = 0, examples_per_shard: int = 1000,
          progress: bool = True) -> dict[str, Any]:
  """Writes the record set; returns its manifest (with a "duplicates" summary)."""
  if not 0.0 <= copy_fraction <= 1.0:
    raise DedupError(f"copy_fraction={copy_fraction} must be in [0, 1].")
  rng = np.random.default_rng([seed, 7])
  scenes = unique_scenes(num_unique, seed=seed, height=resolution, width=resolution)
  num_copies = int(round(copy_fraction * num_unique))
  originals = rng.integers(0, num_unique, size=num_copies)
  items = [(g, None) for g in range(num_unique)] + [(int(g), k) for k, g in enumerate(originals)]
  order = rng.permutation(len(items))

  def examples():
    for pos in tqdm(order, desc="shapes + near-duplicates", unit="img", disable=not progress):
      group, copy = items[int(pos)]
      scene = scenes[group]
      if copy is None:
        data, fmt, edits = shapes.encode_png(scene["image"]), "png", []
      else:
        data, fmt, edits = near_copy(scene["image"], np.random.default_rng([seed, 8, copy]))
      yield {"key": f"img-{int(pos):06d}", "image": data, "image_format": fmt,
             "height": resolution, "width": resolution,
             "caption_original": scene["caption_original"],
             "caption_synthetic": scene["caption_synthetic"],
             "meta": {"group": group, "edits": edits}}

  manifest = records.write_records(
      out_dir, examples(), kind=records.KIND_IMAGE_TEXT, examples_per_shard=examples_per_shard,
      columns=("height", "width"),
      producer={"tool": "sd3jax.dedup.shapes_duplicates", "num_unique": num_unique,
                "copy_fraction": copy_fraction, "resolution": resolution, "seed": seed})
  return manifest


def truth_groups(source) -> np.ndarray:
  """int [N]: the ground-truth group (original scene) of every record of a built set."""
  return np.asarray([int(source[i]["meta"]["group"]) for i in range(len(source))], np.int64)
