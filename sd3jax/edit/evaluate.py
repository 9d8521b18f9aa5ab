"""Did the edit happen, and did nothing else change? Per edit type, with the shapes checker.

For a result image of a held-out triplet (sd3jax.data.shapes_edit), the checker's detections
(sd3jax.evals.shapes_checker.detect_objects) are compared with the triplet's description:

  success       the instruction's effect is there:
                  recolour / change_shape  the object, in its cell, has the new colour /
                                           shape, and no object of the old kind is left there
                  move    the object is in the new cell and no longer in the old one
                  add     the new object is in its cell
                  remove  no object of that colour and shape is left in its cell
                  resize  the object is in its cell, and its area changed by more than
                          RESIZE_RATIO the right way
  preservation  every object the instruction does not name is still there: same colour,
                shape and cell, area within RESIZE_RATIO of its area in the source. Only
                triplets with such objects count (a one-object scene has none).
  exact         success, preservation, and no other object anywhere.

Areas are compared with the same object's detection in the source image, so the VAE's and
the checker's own biases cancel. Two baselines bracket the model: `copy` (the source image
itself: preservation 1, success 0 but for accidents) and `regenerate` (the text-to-image model
drawing the target scene's caption: what a model that ignores the source can do).
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from sd3jax.data import shapes
from sd3jax.data import shapes_edit
from sd3jax.evals import shapes_checker

# The side ratio of a large to a small object: the square root of their area ratio, so
# halfway between the two sizes in log area (1.31: small -> large is x1.71 in area).
RESIZE_RATIO = shapes.SIZE_FRACTION["large"] / shapes.SIZE_FRACTION["small"]


def _find(detections: Sequence[Mapping[str, Any]], color: str, shape: str,
          cell: int) -> Mapping[str, Any] | None:
  hits = [d for d in detections
          if (d["color"], d["shape"], d["cell"]) == (color, shape, int(cell))]
  return max(hits, key=lambda d: d["area"]) if hits else None


def _area(obj: Mapping[str, Any], reference: Sequence[Mapping[str, Any]]) -> float | None:
  ref = _find(reference, obj["color"], obj["shape"], obj["cell"])
  return None if ref is None else float(ref["area"])


def score_edit(result: Any, source: Any, edit: Mapping[str, Any]) -> dict[str, Any]:
  """{success, preserved (None without untouched objects), exact, num_detected} of one result
  image (uint8 or [0, 1] HWC) for the triplet `edit` whose source image is `source`."""
  found = shapes_checker.detect_objects(result)
  before = shapes_checker.detect_objects(source)
  kind, k = edit["edit_type"], int(edit["edited"])
  src = edit["source_objects"]
  touched = src[k] if k >= 0 else None
  if kind == "add":
    new = [o for o in edit["target_objects"]
           if not any(o["cell"] == s["cell"] for s in src)][0]
    success = _find(found, new["color"], new["shape"], new["cell"]) is not None
  elif kind == "remove":
    success = _find(found, touched["color"], touched["shape"], touched["cell"]) is None
  else:  # the edited object after the edit: in a new cell (move) or in its own
    moved = [o for o in edit["target_objects"] if all(o["cell"] != s["cell"] for s in src)]
    after = moved[0] if kind == "move" else next(
        o for o in edit["target_objects"] if o["cell"] == touched["cell"])
    hit = _find(found, after["color"], after["shape"], after["cell"])
    success = hit is not None
    if kind in ("recolour", "change_shape", "move"):
      success = success and _find(found, touched["color"], touched["shape"],
                                  touched["cell"]) is None
    if kind == "resize" and hit is not None:
      ref = _area(touched, before)
      ratio = hit["area"] / ref if ref else 1.0
      success = ratio > RESIZE_RATIO if after["size"] == "large" else ratio < 1 / RESIZE_RATIO
  untouched = [o for i, o in enumerate(src) if i != k]
  preserved = None
  if untouched:
    preserved = True
    for o in untouched:
      hit, ref = _find(found, o["color"], o["shape"], o["cell"]), _area(o, before)
      if hit is None or (ref and not 1 / RESIZE_RATIO <= hit["area"] / ref <= RESIZE_RATIO):
        preserved = False
  exact = bool(success) and preserved is not False and len(found) == len(
      edit["target_objects"])
  return {"success": bool(success), "preserved": preserved, "exact": exact,
          "num_detected": len(found)}


def interval(outcomes: Sequence[bool], level: float = 0.95) -> list[float]:
  """The Wilson interval of a rate from `outcomes`: 32 triplets of one type pin a rate down
  to about +-0.15, which a target of 0.9 has to be read against."""
  if not len(outcomes):
    return [float("nan"), float("nan")]
  from scipy import stats
  ci = stats.binomtest(int(sum(outcomes)), len(outcomes)).proportion_ci(level, method="wilson")
  return [float(ci.low), float(ci.high)]


def summarize(scores: Sequence[Mapping[str, Any]], edits: Sequence[Mapping[str, Any]]
              ) -> dict[str, Any]:
  """Success / preservation / exact per edit type (with 95% intervals), overall (mean over
  types) and by phrasing (seen in training or held out)."""
  def rates(rows):
    kept = [r["preserved"] for r in rows if r["preserved"] is not None]
    made = [r["success"] for r in rows]
    return {"success": float(np.mean(made)) if rows else float("nan"),
            "preserved": float(np.mean(kept)) if kept else float("nan"),
            "exact": float(np.mean([r["exact"] for r in rows])) if rows else float("nan"),
            "n": len(rows), "n_preserved": len(kept),
            "success_ci": interval(made), "preserved_ci": interval(kept)}
  per_type = {t: rates([s for s, e in zip(scores, edits) if e["edit_type"] == t])
              for t in shapes_edit.EDIT_TYPES
              if any(e["edit_type"] == t for e in edits)}
  out = {"per_type": per_type,
         "success": float(np.mean([v["success"] for v in per_type.values()])),
         "preserved": float(np.nanmean([v["preserved"] for v in per_type.values()])),
         "exact": float(np.mean([v["exact"] for v in per_type.values()]))}
  for name, held in (("seen_phrasing", False), ("held_out_phrasing", True)):
    rows = [s for s, e in zip(scores, edits) if bool(e["held_out_phrasing"]) == held]
    if rows:
      out[name] = rates(rows)
  return out


def held_out_edits(source: shapes_edit.EditSource, per_type: int) -> list[dict[str, Any]]:
  """The first `per_type` triplets of each edit type of a held-out split (index order), as
  {"source", "target" (uint8), "instruction", "target_caption", "edit"}."""
  chosen: dict[str, list[int]] = {t: [] for t in shapes_edit.EDIT_TYPES}
  for start in range(0, len(source), 256):
    rows = source.__getitems__(list(range(start, min(len(source), start + 256))))
    for ex in rows:
      if len(chosen[ex["edit_type"]]) < per_type:
        chosen[ex["edit_type"]].append(ex["index"])
    if all(len(v) >= per_type for v in chosen.values()):
      break
  order = sorted(i for v in chosen.values() for i in v)
  return [{"source": np.asarray(ex["source_image"]), "target": np.asarray(ex["image"]),
           "instruction": ex["caption_original"], "target_caption": ex["target_caption"],
           "edit": ex["edit"]} for ex in source.__getitems__(order)]


def score_all(results: np.ndarray, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  scores = [score_edit(r, ex["source"], ex["edit"]) for r, ex in zip(results, examples)]
  return summarize(scores, [ex["edit"] for ex in examples])


def evaluate_editing(edit_pipe, t2i_pipe, examples: Sequence[Mapping[str, Any]], *,
                     settings: Mapping[str, Any], t2i_settings: Mapping[str, Any],
                     guidance: Sequence[tuple[float, float]] = (),
                     guidance_examples: int = 0, out_dir: str | None = None,
                     progress: bool = True) -> dict[str, Any]:
  """The editing model at `settings` (image_cfg, text_cfg, steps, shift) against both
  baselines on `examples`; each (image_cfg, text_cfg) of `guidance` on the first
  `guidance_examples` of each type. Writes out_dir/edit_grid.png when out_dir is set."""
  from sd3jax import sample as sample_lib
  from sd3jax.edit import sampling
  t0 = time.perf_counter()
  sources = np.stack([ex["source"] for ex in examples])
  results = sampling.edit(edit_pipe, sources, [ex["instruction"] for ex in examples],
                          image_cfg=settings["image_cfg"], text_cfg=settings["text_cfg"],
                          steps=settings["steps"], shift=settings["shift"], progress=progress)
  out: dict[str, Any] = {"settings": dict(settings), "model": score_all(results, examples)}
  out["seconds_model"] = time.perf_counter() - t0
  out["baselines"] = {"copy": score_all(sources, examples)}
  if t2i_pipe is not None:
    h, w = sources.shape[1:3]
    regen = sample_lib.generate(
        t2i_pipe, [ex["target_caption"] or "" for ex in examples], height=h, width=w,
        steps=t2i_settings["steps"], guidance_scale=t2i_settings["cfg"],
        guidance_max_t=t2i_settings["cfg_max_t"], autoguidance=t2i_settings["autoguidance"],
        shift=t2i_settings["shift"], progress=progress)
    out["baselines"]["regenerate"] = score_all(regen, examples)
  rows = []
  if guidance and guidance_examples:
    subset = _first_per_type(examples, guidance_examples)
    for image_cfg, text_cfg in guidance:
      res = sampling.edit(edit_pipe, np.stack([ex["source"] for ex in subset]),
                          [ex["instruction"] for ex in subset], image_cfg=float(image_cfg),
                          text_cfg=float(text_cfg), steps=settings["steps"],
                          shift=settings["shift"], progress=False)
      s = score_all(res, subset)
      rows.append({"image_cfg": float(image_cfg), "text_cfg": float(text_cfg),
                   "success": s["success"], "preserved": s["preserved"], "exact": s["exact"],
                   "n": len(subset)})
  out["guidance"] = rows
  out["seconds"] = time.perf_counter() - t0
  if out_dir:
    out["grid"] = save_grid(os.path.join(out_dir, "edit_grid.png"), examples, results)
  return out


def _first_per_type(examples, n):
  seen: dict[str, int] = {}
  out = []
  for ex in examples:
    t = ex["edit"]["edit_type"]
    if seen.get(t, 0) < n:
      seen[t] = seen.get(t, 0) + 1
      out.append(ex)
  return out


def save_grid(path: str, examples: Sequence[Mapping[str, Any]], results: np.ndarray,
              per_type: int = 2) -> str:
  """Rows of (source, result, target) with the instruction above: `per_type` per edit type."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  picked = []
  for t in shapes_edit.EDIT_TYPES:
    picked += [i for i, ex in enumerate(examples) if ex["edit"]["edit_type"] == t][:per_type]
  cols = 2  # two triplets side by side
  rows = -(-len(picked) // cols)
  fig, axes = plt.subplots(rows, 3 * cols, figsize=(3 * cols * 1.3, rows * 1.55), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for n, i in enumerate(picked):
    r, c = divmod(n, cols)
    ex = examples[i]
    score = score_edit(results[i], ex["source"], ex["edit"])
    for j, img in enumerate((ex["source"], results[i], ex["target"])):
      ax = axes[r, 3 * c + j]
      img = np.asarray(img)
      ax.imshow(img if img.dtype == np.uint8 else np.clip(img, 0, 1))
      if j == 0:
        ax.set_title(ex["instruction"], fontsize=6.5, loc="left")
      if j == 1:
        ok = score["success"] and score["preserved"] is not False
        ax.text(0.5, -0.04, ("edit made" if score["success"] else "edit missed")
                + ("" if score["preserved"] is not False else ", rest changed"),
                transform=ax.transAxes, ha="center", va="top", fontsize=5.5,
                color="green" if ok else "red")
  fig.suptitle("held-out scenes: source | editing model | ground truth", fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=130)
  plt.close(fig)
  return path
