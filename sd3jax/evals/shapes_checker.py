"""The shapes prompt-following checker: GenEval-style scores by pixel analysis.

GenEval (Ghosh et al. 2023) scores a text-to-image model by detecting the
objects in its images and checking them against the prompt. On the embedded
`shapes` data (sd3jax/data/shapes.py) no learned detector is needed: objects
are flat palette colours on a plain background, so colour, shape, position
and count can be recovered from the pixels. This module does that, robustly
enough for the noisy, blurry images of a small model:

  detect_objects   image -> [{color, shape, position, center, bbox, area, ...}]
  score_prompt     one image against one eval prompt spec -> correct + details
  score_images     a batch -> accuracy per category, overall, and the three
                   single-object attribute accuracies (see below)
  render_prompt    a ground-truth scene satisfying a spec (the oracle)

Detection (thresholds scale with the image, so it works from 32 px up,
square or not):
  1. Background = per-channel median of the 2-pixel border (objects never
     touch the border), unless given; pixel noise = robust spread of the
     border's first differences (smooth colour variation does not count).
  2. Each pixel takes its nearest palette colour if that colour is within
     `color_threshold` (RGB L2 on 0-255; palette colours are >= 135 apart)
     and nearer than the background. Anti-aliased or blurred edge pixels
     (mixtures with the background) fall outside it and stay unassigned.
  3. Connected components (8-connectivity) per colour, holes filled; same-
     colour components at most `merge_gap` pixels apart are merged (one
     object split by a seam); components under `min_area` pixels are dropped
     (speckle).
  4. Geometry from the object's coverage map alpha (projection of each pixel
     on the background -> object-colour segment; this undoes anti-aliasing
     and blur instead of thresholding them): area = sum(alpha); extents
     W = sum over columns of the column's max alpha, H likewise (exact for a
     box, and unchanged by blur: a blurred edge profile keeps its integral);
     fill = area / (W * H); asymmetry = distance of the alpha centroid from
     the extent centre, in units of the extent. In theory a square has fill
     1 and asymmetry 0, a circle fill pi/4 and asymmetry 0, a triangle fill
     1/2 and asymmetry 1/6 (its centroid sits a third of the height above its
     base). Shape: triangle if asymmetry > 0.05, else square if fill > 0.87,
     else circle (classify_shape; the margins hold under noise and blur).
  5. A component is an object only if it sits on the background (>= 80% of a
     ring around it, neighbours' surroundings excepted, is background or a
     blend of background and the object's colour, as a blurred edge is), its
     extents have aspect <= 2, its fill is >= 0.3 and its median pixel is
     within 0.75 x color_threshold of the palette colour; smooth colour
     noise, gradients and stripes fail these. Count = number of objects.
  6. Position = cell of the alpha centroid on the 3x3 grid.

Scoring per category (in the spirit of GenEval; an object "matches" a spec
object when shape, and colour / position where the spec names them, agree):
  single_object  some detected object has the shape;
  color          some detected object has the shape and the colour;
  position       some detected object has shape, colour and position;
  count          exactly N detected objects have the shape and the colour
                 (objects of other shapes or colours are allowed, as in
                 GenEval's counting, which only counts the named class);
  two_objects    both spec objects match distinct detected objects.

Single-object attribute accuracies (the targets of the main-job issue:
colour >= 0.90, shape >= 0.80, position >= 0.80). Over the prompts whose spec
names exactly one object (categories single_object, color, position), the
"dominant" detection is the detected object of largest extent box, W * H (no detection =
wrong on every attribute). Then
  attribute_color    = over those prompts whose spec names a colour
                       (color + position), the fraction whose dominant
                       object has that colour;
  attribute_shape    = over all of them, the fraction whose dominant object
                       has the spec shape;
  attribute_position = over those whose spec names a position (position),
                       the fraction whose dominant object is in that cell.
Each attribute is judged on its own (a red square for "a red circle" counts
for colour, not for shape). `n_attribute_*` gives each denominator.
  attribute_shape_<category>  attribute_shape over one category's prompts
                     (single_object: shape only, color: + colour, position:
                     + colour + position): how much naming the other
                     attributes helps the shape;
  empty_single       fraction of one-object prompts whose image holds no
                     detected object (a missed shape that is not a wrong one).

How many objects are drawn, whatever their attributes (why counts fail: a
small model guided at CFG 5 draws too many, not too few):
  extra_objects_single / _multi  mean (detected - asked) objects over the
                     one-object prompts / the count and two-object prompts;
  exact_objects_multi  fraction of count and two-object prompts whose image
                     holds exactly the asked number of objects.
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from sd3jax.data import shapes as S

PALETTE_NAMES: tuple[str, ...] = tuple(S.COLORS)
PALETTE: np.ndarray = np.asarray([S.COLORS[c] for c in PALETTE_NAMES], np.float32)
# Shape rule (see classify_shape); thresholds sit between the values measured
# on clean, noisy and blurred renders at 32-96 px (tests/shapes_checker_test.py).
TRIANGLE_MIN_ASYMMETRY = 0.05  # Triangles 0.07-0.15 (theory 1/6); circles, squares < 0.04.
SQUARE_MIN_FILL = 0.87  # Squares 0.90-1.0 (theory 1); circles 0.74-0.84 (theory pi/4).
# Extents are read from the coverage map smoothed along the other axis with a
# Gaussian of this fraction of the object's size: averages pixel noise away
# without changing a box's extent (its columns are constant along y).
PROFILE_SMOOTHING = 0.1
# What counts as an object at all (dataset objects: isolation ~1, aspect 1,
# fill >= 0.5): see detect_objects.
MIN_ISOLATION = 0.8
# A ring pixel is background-like when it lies within this fraction of the
# object's contrast (|colour - background|) of the background -> object blend
# line (raised to 3 noise sigmas on noisy images, never past half the
# contrast), less than 3/4 of the way to the object colour.
BACKGROUND_LIKE = 0.3
MAX_ASPECT = 2.0
MIN_FILL = 0.3
# A flat object's pixels sit on its palette colour (plus noise); a region whose
# median pixel is this far along the colour threshold is a gradient passing by.
MAX_COLOR_SPREAD = 0.75
# More same-colour fragments than this is speckle, not a split object.
_MAX_MERGE_CANDIDATES = 32
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position")


# ----------------------------------------------------------------------------
# Detection.
# ----------------------------------------------------------------------------
def to_rgb255(image: Any) -> np.ndarray:
  """float32 [H, W, 3] in 0..255 from uint8 or float [0, 1] HWC (or HW, HW1, HW4)."""
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(f"Expected an HWC image with 1, 3 or 4 channels, got shape {arr.shape}.")
  arr = arr[..., :3] if arr.shape[-1] != 1 else np.repeat(arr, 3, axis=-1)
  if arr.dtype == np.uint8:
    return arr.astype(np.float32)
  if not np.issubdtype(arr.dtype, np.floating):
    raise ValueError(f"Expected uint8 or float [0, 1] pixels, got dtype {arr.dtype}.")
  arr = arr.astype(np.float32)
  if arr.size and (arr.min() < -0.25 or arr.max() > 1.25):
    raise ValueError(f"Float images must be in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]; "
                     "map a [-1, 1] model output with (x + 1) / 2.")
  return np.clip(arr, 0.0, 1.0) * 255.0  # Decoders overshoot a little: clip that.


def estimate_background(rgb: np.ndarray, border: int = 2) -> np.ndarray:
  """Per-channel median of the image border (robust to a stray object)."""
  b = max(1, min(border, min(rgb.shape[:2]) // 4))
  ring = np.concatenate([
      rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
      rgb[b:-b, :b].reshape(-1, 3), rgb[b:-b, -b:].reshape(-1, 3)])
  return np.median(ring, axis=0).astype(np.float32)


def estimate_noise(rgb: np.ndarray) -> float:
  """Per-channel pixel noise (0-255) from the border's first differences.

  MAD / 0.6745 / sqrt(2) of neighbour differences along the border: white
  noise counts, smooth colour variation (a vignette, blobs) barely does.
  """
  diffs = np.concatenate([
      np.diff(rgb[0], axis=0), np.diff(rgb[-1], axis=0),
      np.diff(rgb[:, 0], axis=0), np.diff(rgb[:, -1], axis=0)])
  mad = np.median(np.abs(diffs), axis=0)
  return float(np.sqrt((mad ** 2).mean()) / 0.6745 / np.sqrt(2.0))


def _background_rgb(rgb: np.ndarray, background: Any) -> np.ndarray:
  if background is None:
    return estimate_background(rgb)
  if isinstance(background, str):
    if background not in S.BACKGROUNDS:
      raise ValueError(f"Unknown background {background!r}; known: {list(S.BACKGROUNDS)}.")
    return np.asarray(S.BACKGROUNDS[background], np.float32)
  bg = np.asarray(background, np.float32).reshape(-1)
  if bg.shape != (3,):
    raise ValueError(f"background must be a BACKGROUNDS name or an RGB triple (0-255), "
                     f"got {background!r}.")
  return bg


def cell_of(center: Sequence[float], height: int, width: int) -> int:
  """Row-major 3x3 grid cell of a (y, x) point in pixel units."""
  row = int(np.clip(np.floor(3.0 * center[0] / height), 0, 2))
  col = int(np.clip(np.floor(3.0 * center[1] / width), 0, 2))
  return row * 3 + col


def classify_shape(fill: float, asymmetry: float) -> str:
  """Shape from geometry: asymmetry singles out the triangle, fill splits the rest.

  Asymmetry (centroid off the extent centre) is blur-invariant and separates
  triangles by a wide margin; fill (area / extent box) then tells a square
  (1) from a circle (pi/4).
  """
  if asymmetry > TRIANGLE_MIN_ASYMMETRY:
    return "triangle"
  return "square" if fill > SQUARE_MIN_FILL else "circle"


def _window(box: tuple[slice, slice], margin: int, shape: tuple[int, ...]) -> tuple[slice, slice]:
  """A bounding box (from ndimage.find_objects) grown by `margin`, clipped to the image."""
  return tuple(slice(max(0, sl.start - margin), min(n, sl.stop + margin))
               for sl, n in zip(box, shape[:2]))


def _merge_close(labels: np.ndarray, n: int, gap: int) -> tuple[np.ndarray, int]:
  """Merges components whose pixels are at most `gap` empty pixels apart.

  One object split by a noisy seam becomes one again. Pairs whose boxes are
  further apart than the gap are skipped without a distance transform.
  """
  if n < 2 or gap <= 0 or n > _MAX_MERGE_CANDIDATES:
    return labels, n
  boxes = ndimage.find_objects(labels)
  parent = list(range(n + 1))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for i in range(1, n + 1):
    win = _window(boxes[i - 1], gap + 2, labels.shape)
    for j in range(i + 1, n + 1):
      bj = boxes[j - 1]
      if any(b.start > w.stop or b.stop < w.start for b, w in zip(bj, win)):
        continue
      both = _window(bj, 1, labels.shape)
      both = tuple(slice(min(u.start, v.start), max(u.stop, v.stop)) for u, v in zip(win, both))
      dist = ndimage.distance_transform_edt(labels[both] != i)
      # Euclidean gap in empty pixels: 4-neighbours (distance 1) have gap 0.
      if dist[labels[both] == j].min() - 1.0 <= gap + 1e-6:
        parent[find(j)] = find(i)
  roots = sorted({find(i) for i in range(1, n + 1)})
  remap = np.zeros(n + 1, np.int32)
  for i in range(1, n + 1):
    remap[i] = roots.index(find(i)) + 1
  return remap[labels], len(roots)


def _components(assigned: np.ndarray, nearest: np.ndarray, min_area: float,
                merge_gap: int) -> list[tuple[int, np.ndarray]]:
  """(palette index, mask) per connected same-colour region of >= min_area pixels."""
  comps = []
  eight = np.ones((3, 3), bool)
  for k in np.unique(nearest[assigned]):
    labels, n = ndimage.label(assigned & (nearest == k), structure=eight)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.flatnonzero(sizes >= max(1.0, min_area / 2.0))
    keep = keep[keep > 0]  # Fragments of half the min area may still merge.
    if not len(keep):
      continue
    remap = np.zeros(n + 1, np.int32)
    remap[keep] = np.arange(1, len(keep) + 1)
    labels, n = _merge_close(remap[labels], len(keep), merge_gap)
    for i, box in enumerate(ndimage.find_objects(labels)):
      win = _window(box, 1, labels.shape)
      mask = np.zeros(labels.shape, bool)
      mask[win] = ndimage.binary_fill_holes(labels[win] == i + 1)
      if mask.sum() >= min_area:
        comps.append((int(k), mask))
  return comps


def detect_objects(image: Any, background: Any = None, *,
                   color_threshold: float = 80.0,
                   min_area: float | None = None,
                   merge_gap: int | None = None,
                   pad: int | None = None,
                   ramp: float = 0.2,
                   noise: float | None = None) -> list[dict[str, Any]]:
  """Detects the flat-coloured objects of a shapes-style image.

  Args:
    image: uint8, or float in [0, 1], [H, W, 3] (HW, HW1, HW4 accepted).
    background: None (estimate from the border), a BACKGROUNDS name, or an
      RGB triple on the 0-255 scale.
    color_threshold: max RGB L2 distance (0-255 scale) of a pixel to its
      palette colour; half the smallest distance between palette colours.
    min_area: min pixels of an object; default 0.3x the smallest object the
      dataset draws (a small triangle): max(4, 0.3 * min(H, W)^2 / 72).
    merge_gap: same-colour components this many pixels apart or closer are
      one object; default floor(0.025 * min(H, W)) (0 at 32 px, 1 at 64 px;
      objects of different cells are >= 2 empty pixels apart at 64 px).
    pad: pixels around an object read for its coverage map; default
      max(2, round(0.04 * min(H, W))).
    ramp: coverage below `ramp` maps to 0 and above 1 - ramp to 1, linearly
      between (raised to 3 noise sigmas on noisy images): kills background
      noise, and, being symmetric, keeps the integral of a linear edge.
    noise: per-channel pixel noise (0-255); default estimated from the border.

  Returns:
    Objects sorted by (cell, -area), each a dict: color, shape, position,
    cell, center (y, x in pixels, continuous coordinates as in
    shapes.object_geometry), bbox (y0, x0, y1, x1 of the assigned pixels,
    exclusive ends), area (sum of coverage, pixels), pixels (assigned pixel
    count), fill, asymmetry, isolation, color_distance (median RGB distance of
    the assigned pixels to the palette colour).
  """
  rgb = to_rgb255(image)
  h, w = rgb.shape[:2]
  side = min(h, w)
  bg = _background_rgb(rgb, background)
  noise = estimate_noise(rgb) if noise is None else float(noise)
  if min_area is None:
    min_area = max(4.0, 0.3 * side * side / 72.0)
  if merge_gap is None:
    merge_gap = int(0.025 * side)
  if pad is None:
    pad = max(2, int(round(0.04 * side)))

  dist = np.sqrt(((rgb[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1))  # [H, W, K]
  nearest = dist.argmin(-1)
  d_near = np.take_along_axis(dist, nearest[..., None], -1)[..., 0]
  d_bg = np.sqrt(((rgb - bg) ** 2).sum(-1))
  assigned = (d_near < color_threshold) & (d_near < d_bg)
  comps = _components(assigned, nearest, min_area, merge_gap)
  if not comps:
    return []

  # Each pixel within `pad` of an object belongs to its nearest object, so
  # coverage never bleeds from a neighbour.
  labels = np.zeros((h, w), np.int32)
  for i, (_, mask) in enumerate(comps):
    labels[mask] = i + 1
  gap_dist, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
  owner = np.where(gap_dist <= pad, labels[iy, ix], 0)

  objects = []
  eight = np.ones((3, 3), bool)
  for i, (k, full_mask) in enumerate(comps):
    win = _window(ndimage.find_objects(full_mask.astype(np.int8))[0], 2 * pad + 3, (h, w))
    mask, px_rgb = full_mask[win], rgb[win]
    # Coverage map: projection on the background -> object-colour segment.
    core = ndimage.binary_erosion(mask, structure=eight)
    color_rgb = np.median(px_rgb[core if core.sum() >= 3 else mask], axis=0)
    axis = color_rgb - bg
    norm2 = float((axis ** 2).sum())
    if norm2 < 1e-6:
      continue
    t = ((px_rgb - bg) * axis).sum(-1) / norm2  # Position along background -> colour.
    r = float(np.clip(max(ramp, 3.0 * noise / np.sqrt(norm2)), 0.0, 0.45))
    alpha = np.clip((t - r) / (1.0 - 2.0 * r), 0.0, 1.0) * (owner[win] == i + 1)
    area = float(alpha.sum())
    if area <= 0:
      continue
    # Extents: per column (row) the max coverage, summed; read after
    # smoothing along the column (row), which averages noise out.
    sig = PROFILE_SMOOTHING * np.sqrt(mask.sum())
    col_profile = ndimage.gaussian_filter1d(alpha, sig, axis=0, mode="constant").max(0)
    row_profile = ndimage.gaussian_filter1d(alpha, sig, axis=1, mode="constant").max(1)
    ext_w, ext_h = float(col_profile.sum()), float(row_profile.sum())
    yy = np.arange(win[0].start, win[0].stop, dtype=np.float64) + 0.5
    xx = np.arange(win[1].start, win[1].stop, dtype=np.float64) + 0.5
    cy = float(alpha.sum(1) @ yy / area)
    cx = float(alpha.sum(0) @ xx / area)
    fill = area / max(ext_w * ext_h, 1e-6)
    asym = float(np.hypot((cy - row_profile @ yy / ext_h) / ext_h,
                          (cx - col_profile @ xx / ext_w) / ext_w))
    # An object sits on the background: most of a ring around it (minus the
    # surroundings of other objects and the image outside) is background, or
    # a blend of background and this object (a blurred edge). Colour noise
    # and blobs bordering other colours fail this.
    others = (labels[win] > 0) & ~mask
    near_others = ndimage.distance_transform_edt(~others) <= pad if others.any() else others
    ring_dist = ndimage.distance_transform_edt(~mask)
    ring = (ring_dist > 0.5 * pad + 0.5) & (ring_dist <= pad + 1) & ~near_others
    contrast = np.sqrt(norm2)
    off_blend = np.sqrt(((px_rgb - bg - np.clip(t, 0.0, 1.0)[..., None] * axis) ** 2).sum(-1))
    tol = np.clip(3.0 * np.sqrt(2.0) * noise, BACKGROUND_LIKE * contrast, 0.5 * contrast)
    bg_like = (off_blend < tol) & (t < 0.75)
    # No ring left (boxed in by the border and neighbours): no evidence.
    isolation = float(bg_like[ring].mean()) if ring.sum() >= 4 else 1.0
    aspect = ext_w / max(ext_h, 1e-6)
    color_distance = float(np.median(dist[..., k][full_mask]))
    if (isolation < MIN_ISOLATION or not 1 / MAX_ASPECT <= aspect <= MAX_ASPECT
        or fill < MIN_FILL or color_distance > MAX_COLOR_SPREAD * color_threshold):
      continue
    ys, xs = np.nonzero(full_mask)
    cell = cell_of((cy, cx), h, w)
    objects.append({
        "color": PALETTE_NAMES[k],
        "shape": classify_shape(fill, asym),
        "position": S.POSITIONS[cell], "cell": cell,
        "center": [cy, cx],
        "bbox": [int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1],
        "area": area, "pixels": int(full_mask.sum()),
        "fill": float(fill), "asymmetry": asym, "isolation": isolation,
        "color_distance": color_distance,
    })
  objects.sort(key=lambda o: (o["cell"], -o["area"]))
  return objects


# ----------------------------------------------------------------------------
# Scoring.
# ----------------------------------------------------------------------------
def matches(obj: Mapping[str, Any], spec_obj: Mapping[str, Any]) -> bool:
  """Whether a detected object satisfies one spec object (None = any)."""
  return all(spec_obj.get(key) is None or obj[key] == spec_obj[key] for key in ATTRIBUTES)


def _assign(detections: Sequence[Mapping[str, Any]],
            spec_objs: Sequence[Mapping[str, Any]]) -> list[int] | None:
  """Distinct detections matching every spec object (brute force; <= 3 specs)."""
  candidates = [[i for i, d in enumerate(detections) if matches(d, s)] for s in spec_objs]
  for combo in itertools.product(*candidates):
    if len(set(combo)) == len(combo):
      return list(combo)
  return None


def dominant_object(detections: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
  """The detected object of largest extent box (what a single-object image shows).

  The box (area / fill), not the covered area: a large triangle fills half its box, so on
  covered pixels alone it would lose to any square over 0.71x its side (a small one is
  0.76x: 0.65 / 0.85 of a cell).
  """
  return max(detections, key=lambda d: d["area"] / d["fill"]) if detections else None


def score_detections(detections: Sequence[Mapping[str, Any]],
                     prompt_spec: Mapping[str, Any]) -> dict[str, Any]:
  """score_prompt on already detected objects (see the module docstring)."""
  category = prompt_spec["category"]
  spec_objs = prompt_spec["objects"]
  details: dict[str, Any] = {"num_detected": len(detections), "num_asked": len(spec_objs)}
  if category == "count":
    target = spec_objs[0]
    if any(dict(o) != dict(target) for o in spec_objs):
      raise ValueError(f"A count spec repeats one object; got {spec_objs}.")
    found = [i for i, d in enumerate(detections) if matches(d, target)]
    details.update(expected=len(spec_objs), found=len(found), matched=found)
    correct = len(found) == len(spec_objs)
  elif category in ("single_object", "color", "position", "two_objects"):
    assignment = _assign(detections, spec_objs)
    details["matched"] = assignment
    correct = assignment is not None
  else:
    raise ValueError(f"Unknown category {category!r}; known: {S.EVAL_CATEGORIES}.")
  if len(spec_objs) == 1:  # Single-object prompt: per-attribute judgements.
    dom = dominant_object(detections)
    for key in ATTRIBUTES:
      if spec_objs[0].get(key) is not None:
        details[f"attribute_{key}"] = dom is not None and dom[key] == spec_objs[0][key]
    details["dominant"] = None if dom is None else {k: dom[k] for k in ATTRIBUTES}
  return {"category": category, "correct": bool(correct), "details": details,
          "detections": list(detections)}


def score_prompt(image: Any, prompt_spec: Mapping[str, Any], background: Any = None,
                 **detect_kwargs) -> dict[str, Any]:
  """Scores one image against one eval prompt spec (shapes.sample_eval_prompts).

  Returns {"category", "correct", "details", "detections"}; `details` holds the
  matched detections and, for single-object specs, `attribute_<key>` booleans.
  """
  return score_detections(detect_objects(image, background, **detect_kwargs), prompt_spec)


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
  """Accuracy per category present, `overall` (mean over those categories,
  as GenEval averages its task scores), `n`, the attribute accuracies, and how many objects
  were drawn against how many were asked (the module docstring names each key)."""
  if not results:
    raise ValueError("No results to summarise.")
  out: dict[str, float | int] = {}
  by_cat: dict[str, list[bool]] = {}
  for r in results:
    by_cat.setdefault(r["category"], []).append(r["correct"])
  for cat in S.EVAL_CATEGORIES:
    if cat in by_cat:
      out[cat] = float(np.mean(by_cat[cat]))
      out[f"n_{cat}"] = len(by_cat[cat])
  out["overall"] = float(np.mean([out[c] for c in by_cat]))
  out["n"] = len(results)
  for key in ATTRIBUTES:
    vals = [r["details"][f"attribute_{key}"] for r in results
            if f"attribute_{key}" in r["details"]]
    if vals:  # Absent, not zero, when no prompt names the attribute.
      out[f"attribute_{key}"] = float(np.mean(vals))
      out[f"n_attribute_{key}"] = len(vals)
  for cat in S.EVAL_CATEGORIES:
    vals = [r["details"]["attribute_shape"] for r in results
            if r["category"] == cat and "attribute_shape" in r["details"]]
    if vals:
      out[f"attribute_shape_{cat}"] = float(np.mean(vals))
  drawn = np.asarray([(r["details"]["num_detected"], r["details"]["num_asked"])
                      for r in results]).reshape(-1, 2)
  single, multi = drawn[drawn[:, 1] == 1], drawn[drawn[:, 1] > 1]
  if len(single):  # Absent when no prompt of the group was scored.
    out["extra_objects_single"] = float(np.mean(single[:, 0] - single[:, 1]))
    out["empty_single"] = float(np.mean(single[:, 0] == 0))
  if len(multi):
    out["extra_objects_multi"] = float(np.mean(multi[:, 0] - multi[:, 1]))
    out["exact_objects_multi"] = float(np.mean(multi[:, 0] == multi[:, 1]))
  return out


def score_images(images: Sequence[Any] | np.ndarray,
                 prompt_specs: Sequence[Mapping[str, Any]], background: Any = None,
                 **detect_kwargs) -> dict[str, float | int]:
  """Scores images[i] against prompt_specs[i]; see `summarize` for the keys."""
  if len(images) != len(prompt_specs):
    raise ValueError(f"{len(images)} images for {len(prompt_specs)} prompt specs.")
  return summarize([score_prompt(img, spec, background, **detect_kwargs)
                    for img, spec in zip(images, prompt_specs)])


# ----------------------------------------------------------------------------
# Ground-truth renders (the oracle).
# ----------------------------------------------------------------------------
def render_prompt(spec: Mapping[str, Any], seed: int = 0, *, height: int = 64, width: int = 64,
                  distractors: int = 0, background: str | None = None
                  ) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Renders a scene that satisfies a prompt spec; returns (uint8 image, objects).

  Unspecified colours, positions, sizes, jitter and the background are drawn
  from `seed`. `distractors` adds objects that match no spec object (a
  different shape, or a different colour where the spec names one); with
  distractors the spec's objects are large and distractors small, so the
  dominant object is still the prompted one. The image scores as correct
  under the spec: the upper bound of any model.
  """
  rng = np.random.default_rng([seed, 11])
  spec_objs = list(spec["objects"])
  n = len(spec_objs) + distractors
  if n > 9:
    raise ValueError(f"At most 9 objects fit the 3x3 grid, got {n}.")
  fixed = {o["position"] for o in spec_objs if o.get("position") is not None}
  free = [c for c in range(9) if S.POSITIONS[c] not in fixed]
  free = [int(c) for c in rng.permutation(free)]
  colors, shapes = list(S.COLORS), list(S.SHAPES)
  objects = []
  for o in spec_objs:
    cell = S.POSITIONS.index(o["position"]) if o.get("position") is not None else free.pop()
    objects.append({
        "shape": o["shape"],
        "color": o["color"] if o.get("color") is not None else str(rng.choice(colors)),
        "size": "large" if distractors else str(rng.choice(S.SIZES)),
        "cell": cell, "position": S.POSITIONS[cell],
        "jitter": [float(v) for v in rng.uniform(-1.0, 1.0, size=2)]})
  allowed = [{"shape": sh, "color": c} for sh in shapes for c in colors
             if not any(sh == o["shape"] and o.get("color") in (None, c) for o in spec_objs)]
  if distractors and not allowed:
    raise ValueError(f"No distractor can avoid matching {spec_objs}.")
  for _ in range(distractors):
    cand = allowed[int(rng.integers(len(allowed)))]
    cell = free.pop()
    objects.append(dict(cand, size="small", cell=cell, position=S.POSITIONS[cell],
                        jitter=[float(v) for v in rng.uniform(-1.0, 1.0, size=2)]))
  bg = background if background is not None else str(rng.choice(list(S.BACKGROUNDS)))
  objects = [dict(o, **S.object_geometry(o, height, width)) for o in objects]
  return S.render(objects, height, width, bg), objects
