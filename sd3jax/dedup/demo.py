"""`sd3jax dedup demo`: the whole dedup procedure on shapes with injected copies, scored.

  1. descriptor: a CopyNet trained self-supervised on `train_scenes` shapes scenes of
     another seed (none of the evaluation images);
  2. threshold: chosen on a validation set (its own seed) as the best pair F1 of the whole
     procedure, and stored with the descriptor;
  3. test: a fresh set (`num_unique` scenes + `copy_fraction` injected copies) is embedded,
     clustered at that threshold and filtered; duplicate-pair precision / recall are scored
     against the injected truth, at the threshold and over a sweep (pr_curve.png).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from sd3jax.dedup import cluster as cluster_lib
from sd3jax.dedup import copy_net, descriptors, embed as embed_lib, shapes_duplicates

THRESHOLDS = np.round(np.arange(0.70, 1.0001, 0.005), 4)


def _embed(records_dir: str, out: str, descriptor, progress: bool):
  from sd3jax.data import records
  source = records.RecordSource(records_dir)
  res = embed_lib.embed(source, out, descriptor, progress=progress, part_size=1024)
  x, _ = embed_lib.load_descriptors(res["path"])
  return source, res, x


def plot_pr(path: str, curve: list[dict[str, float]], chosen: float, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  t = [r["threshold"] for r in curve]
  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
  a.plot(t, [r["precision"] for r in curve], label="precision", color="#4c72b0")
  a.plot(t, [r["recall"] for r in curve], label="recall", color="#dd8452")
  a.axvline(chosen, color="#c44e52", ls="--", label=f"chosen {chosen:.3f}")
  a.axhline(0.95, color="#999999", lw=0.8, ls=":")
  a.set_xlabel("similarity threshold")
  a.set_ylim(0, 1.02)
  a.legend(fontsize=8)
  b.plot([r["recall"] for r in curve], [r["precision"] for r in curve], ".-", color="#55a868")
  c = min(curve, key=lambda r: abs(r["threshold"] - chosen))
  b.plot([c["recall"]], [c["precision"]], "o", color="#c44e52")
  b.set_xlabel("recall")
  b.set_ylabel("precision")
  b.set_xlim(0, 1.02)
  b.set_ylim(0, 1.02)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_demo(out_dir: str, *, num_unique: int = 2000, copy_fraction: float = 0.05,
             train_scenes: int = 4096, train_steps: int = 600, progress: bool = True
             ) -> dict[str, Any]:
  """Runs (or resumes: finished steps are kept) the demo in out_dir; returns demo.json."""
  os.makedirs(out_dir, exist_ok=True)
  times: dict[str, float] = {}
  net_dir = os.path.join(out_dir, "copy_net")
  t = time.perf_counter()
  if not os.path.exists(os.path.join(net_dir, copy_net.CONFIG_FILE)):
    scenes = shapes_duplicates.unique_scenes(train_scenes, seed=1)
    params, losses = copy_net.train(np.stack([s["image"] for s in scenes]), steps=train_steps,
                                    progress=progress)
    copy_net.save(net_dir, params, copy_net.CopyNetConfig(),
                  {"trained_on": f"{train_scenes} shapes scenes, seed 1",
                   "steps": train_steps, "final_loss": losses[-1]})
  times["train_descriptor"] = time.perf_counter() - t

  t = time.perf_counter()
  val_dir = os.path.join(out_dir, "val_records")
  if not os.path.exists(os.path.join(val_dir, "manifest.json")):
    shapes_duplicates.build(val_dir, num_unique=1000, copy_fraction=copy_fraction, seed=2,
                            progress=progress)
  desc = descriptors.load_descriptor(net_dir)
  val_src, _, xv = _embed(val_dir, os.path.join(out_dir, "val_dedup"), desc, progress)
  ids, sims, _ = cluster_lib.neighbours(xv, 10, progress=False)
  val_curve = cluster_lib.pr_curve(ids, sims, shapes_duplicates.truth_groups(val_src),
                                   THRESHOLDS)
  f1 = lambda r: 2 * r["precision"] * r["recall"] / max(r["precision"] + r["recall"], 1e-9)  # noqa: E731
  threshold = max(val_curve, key=lambda r: (f1(r), r["threshold"]))["threshold"]
  with open(os.path.join(net_dir, copy_net.CONFIG_FILE)) as f:
    meta = json.load(f)
  if meta.get("threshold") != threshold:
    meta["threshold"] = threshold
    meta["threshold_from"] = "best pair F1 on the demo's validation set (seed 2)"
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
  ids, sims, _ = cluster_lib.neighbours(x, 10, progress=False)
  curve = cluster_lib.pr_curve(ids, sims, truth, THRESHOLDS)
  at = next(r for r in curve if r["threshold"] == threshold)  # both from THRESHOLDS
  # What the filter does: every injected copy group should keep exactly one image.
  from sd3jax.dedup import filter as filter_lib
  _, drop = filter_lib.load_filter(os.path.join(out_dir, "filter"))
  dropped = np.zeros(len(truth), bool)
  dropped[drop] = True
  group_sizes = np.bincount(truth)
  in_copied = group_sizes[truth] > 1
  should_drop = int((group_sizes[group_sizes > 1] - 1).sum())
  kept_groups = np.bincount(truth[~dropped], minlength=len(group_sizes))
  result = {
      "test_set": {"images": int(len(truth)), "unique_scenes": num_unique,
                   "injected_copies": should_drop},
      "descriptor": desc.info(), "threshold": threshold,
      "precision": at["precision"], "recall": at["recall"], "pairs": at,
      "filter": {"dropped": int(dropped.sum()), "should_drop": should_drop,
                 "copy_groups_left_with_one_image": int((kept_groups[group_sizes > 1] == 1).sum()),
                 "copy_groups": int((group_sizes > 1).sum()),
                 "unique_images_dropped": int((dropped & ~in_copied).sum()),
                 "groups_emptied": int((kept_groups == 0).sum())},
      "cluster_report": report, "seconds": {k: round(v, 1) for k, v in times.items()},
      "curve": curve, "validation_curve": val_curve,
  }
  plot_pr(os.path.join(out_dir, "pr_curve.png"), curve, threshold,
          f"dedup of {len(truth)} shapes images with {should_drop} injected copies: pair "
          f"precision {at['precision']:.3f}, recall {at['recall']:.3f} at {threshold:.3f}")
  with open(os.path.join(out_dir, "demo.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result
