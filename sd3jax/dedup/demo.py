"""`sd3jax dedup demo`: the whole dedup procedure on shapes with injected copies, scored.

  1. descriptor: a CopyNet trained self-supervised on `train_scenes` shapes scenes of
     another seed (none of the evaluation images);
  2. score normalisation: the descriptor's training scenes are its background
     (score_norm.py); threshold: chosen on a validation set (its own seed) as the best pair
     F1 of the whole procedure on normalised scores, and stored with the descriptor;
  3. test: a fresh set (`num_unique` scenes + `copy_fraction` injected copies) is embedded,
     clustered at that threshold and filtered; duplicate-pair precision / recall are scored
     against the injected truth, at the threshold and over a sweep (pr_curve.png); the
     same with raw similarities (their own validation threshold) shows what normalisation buys.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from sd3jax.dedup import cluster as cluster_lib
from sd3jax.dedup import copy_net, descriptors, embed as embed_lib, score_norm, shapes_duplicates

# Raw similarities lie in [-1, 1]; normalised scores (score_norm.py) mostly in [-0.5, 1].
THRESHOLDS = np.round(np.arange(-0.5, 1.0001, 0.0025), 4)


def _embed(records_dir: str, out: str, descriptor, progress: bool):
  from sd3jax.data import records
  source = records.RecordSource(records_dir)
  res = embed_lib.embed(source, out, descriptor, progress=progress, part_size=1024)
  x, _ = embed_lib.load_descriptors(res["path"])
  return source, res, x


def plot_pr(path: str, curves: dict[str, list[dict[str, float]]], chosen: dict[str, float],
            title: str) -> None:
  """Precision / recall against the threshold, and against each other, per kind of score."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  colours = {"normalised": "#55a868", "raw": "#8172b3"}
  for a, kind in zip(axes[:2], curves):
    curve = curves[kind]
    t = [r["threshold"] for r in curve]
    a.plot(t, [r["precision"] for r in curve], label="precision", color="#4c72b0")
    a.plot(t, [r["recall"] for r in curve], label="recall", color="#dd8452")
    a.axvline(chosen[kind], color="#c44e52", ls="--", label=f"chosen {chosen[kind]:.3f}")
    a.axhline(0.95, color="#999999", lw=0.8, ls=":")
    a.set_xlabel(f"threshold on {kind} scores")
    # Where the decisions are: from the last threshold with full recall to the first with none.
    lo = max([r["threshold"] for r in curve if r["recall"] >= 0.99] or [t[0]]) - 0.1
    hi = min([r["threshold"] for r in curve if r["recall"] == 0.0] or [t[-1]]) + 0.05
    a.set_xlim(max(lo, t[0]), min(hi, t[-1]))
    a.set_ylim(0, 1.02)
    a.legend(fontsize=8)
  b = axes[2]
  for kind, curve in curves.items():
    b.plot([r["recall"] for r in curve], [r["precision"] for r in curve], ".-", ms=3,
           color=colours.get(kind, "#333333"), label=kind)
    c = min(curve, key=lambda r: abs(r["threshold"] - chosen[kind]))
    b.plot([c["recall"]], [c["precision"]], "o", color="#c44e52")
  b.set_xlabel("recall")
  b.set_ylabel("precision")
  b.set_xlim(0, 1.02)
  b.set_ylim(0, 1.02)
  b.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _f1(r: dict[str, float]) -> float:
  return 2 * r["precision"] * r["recall"] / max(r["precision"] + r["recall"], 1e-9)


def _scores(x: np.ndarray, desc) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """kNN (ids, scores) of x, normalised with the descriptor's background and raw."""
  ids, sims, _ = cluster_lib.neighbours(x, 10, progress=False)
  normalised = score_norm.normalise(x, ids, sims, desc.background, desc.score_norm)
  return {"normalised": (ids, normalised), "raw": (ids, sims)}


def run_demo(out_dir: str, *, num_unique: int = 2000, copy_fraction: float = 0.05,
             train_scenes: int = 4096, train_steps: int = 600, progress: bool = True
             ) -> dict[str, Any]:
  """Runs (or resumes: finished steps are kept) the demo in out_dir; returns demo.json."""
  os.makedirs(out_dir, exist_ok=True)
  times: dict[str, float] = {}
  net_dir = os.path.join(out_dir, "copy_net")
  t = time.perf_counter()
  images = None
  if not os.path.exists(os.path.join(net_dir, copy_net.CONFIG_FILE)):
    images = np.stack([s["image"] for s in shapes_duplicates.unique_scenes(train_scenes, seed=1)])
    params, losses = copy_net.train(images, steps=train_steps, progress=progress)
    copy_net.save(net_dir, params, copy_net.CopyNetConfig(),
                  {"trained_on": f"{train_scenes} shapes scenes, seed 1",
                   "steps": train_steps, "final_loss": losses[-1]})
  times["train_descriptor"] = time.perf_counter() - t
  with open(os.path.join(net_dir, copy_net.CONFIG_FILE)) as f:
    meta = json.load(f)
  if score_norm.load_background(net_dir) is None:
    # The background: the descriptor's own training scenes (none is an evaluation image).
    if images is None:
      images = np.stack([s["image"] for s in shapes_duplicates.unique_scenes(train_scenes,
                                                                             seed=1)])
    model, params, _ = copy_net.load(net_dir)
    background = copy_net._embed_pool(model, params, jnp.asarray(images))
    score_norm.save_background(net_dir, background)
    meta["score_norm"] = score_norm.settings(background)
    meta.pop("threshold", None)  # chosen below, on normalised scores

  t = time.perf_counter()
  val_dir = os.path.join(out_dir, "val_records")
  if not os.path.exists(os.path.join(val_dir, "manifest.json")):
    shapes_duplicates.build(val_dir, num_unique=1000, copy_fraction=copy_fraction, seed=2,
                            progress=progress)
  with open(os.path.join(net_dir, copy_net.CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  desc = descriptors.load_descriptor(net_dir)
  val_src, _, xv = _embed(val_dir, os.path.join(out_dir, "val_dedup"), desc, progress)
  val_truth = shapes_duplicates.truth_groups(val_src)
  # The threshold: best pair F1 on the validation set, for normalised scores (the
  # procedure) and for raw similarities (what normalisation buys).
  val_curves, thresholds = {}, {}
  for kind, (ids, sims) in _scores(xv, desc).items():
    val_curves[kind] = cluster_lib.pr_curve(ids, sims, val_truth, THRESHOLDS)
    thresholds[kind] = max(val_curves[kind], key=lambda r: (_f1(r), r["threshold"]))["threshold"]
  threshold = thresholds["normalised"]
  if meta.get("threshold") != threshold:
    meta["threshold"] = threshold
    meta["threshold_from"] = ("best pair F1 on the demo's validation set (seed 2), "
                              "normalised scores")
    with open(os.path.join(net_dir, copy_net.CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
  times["choose_threshold"] = time.perf_counter() - t

  t = time.perf_counter()
  test_dir = os.path.join(out_dir, "records")
  if not os.path.exists(os.path.join(test_dir, "manifest.json")):
    shapes_duplicates.build(test_dir, num_unique=num_unique, copy_fraction=copy_fraction,
                            seed=0, progress=progress)
  desc = descriptors.load_descriptor(net_dir)
  src, emb, x = _embed(test_dir, os.path.join(out_dir, "dedup"), desc, progress)
  times["embed_test"] = time.perf_counter() - t
  t = time.perf_counter()
  report = cluster_lib.cluster(emb["path"], os.path.join(out_dir, "filter"), source=src,
                               progress=progress)
  times["cluster_test"] = time.perf_counter() - t
  truth = shapes_duplicates.truth_groups(src)
  curves, at = {}, {}
  for kind, (ids, sims) in _scores(x, desc).items():
    curves[kind] = cluster_lib.pr_curve(ids, sims, truth, THRESHOLDS)
    at[kind] = next(r for r in curves[kind] if r["threshold"] == thresholds[kind])
  # What the filter does: every injected copy group should keep exactly one image.
  from sd3jax.dedup import filter as filter_lib
  _, drop = filter_lib.load_filter(os.path.join(out_dir, "filter"))
  dropped = np.zeros(len(truth), bool)
  dropped[drop] = True
  group_sizes = np.bincount(truth)
  in_copied = group_sizes[truth] > 1
  should_drop = int((group_sizes[group_sizes > 1] - 1).sum())
  kept_groups = np.bincount(truth[~dropped], minlength=len(group_sizes))
  best = max(curves["normalised"], key=_f1)
  result = {
      "test_set": {"images": int(len(truth)), "unique_scenes": num_unique,
                   "injected_copies": should_drop},
      "descriptor": desc.info(), "threshold": threshold,
      "precision": at["normalised"]["precision"], "recall": at["normalised"]["recall"],
      "pairs": at["normalised"],
      "raw_similarity": {"threshold": thresholds["raw"], **at["raw"]},
      "best_f1_on_test": {"normalised": best, "raw": max(curves["raw"], key=_f1)},
      "filter": {"dropped": int(dropped.sum()), "should_drop": should_drop,
                 "copy_groups_left_with_one_image": int((kept_groups[group_sizes > 1] == 1).sum()),
                 "copy_groups": int((group_sizes > 1).sum()),
                 "unique_images_dropped": int((dropped & ~in_copied).sum()),
                 "groups_emptied": int((kept_groups == 0).sum())},
      "cluster_report": report, "seconds": {k: round(v, 1) for k, v in times.items()},
      "curve": curves["normalised"], "validation_curve": val_curves["normalised"],
      "raw_curve": curves["raw"], "raw_validation_curve": val_curves["raw"],
  }
  plot_pr(os.path.join(out_dir, "pr_curve.png"), curves, thresholds,
          f"dedup of {len(truth)} shapes images with {should_drop} injected copies: pair "
          f"precision {result['precision']:.3f}, recall {result['recall']:.3f} at "
          f"{threshold:.3f} (normalised)")
  with open(os.path.join(out_dir, "demo.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result
