"""`sd3jax dedup demo`: the whole dedup procedure on shapes with injected copies, scored.

  1. descriptor: a CopyNet trained self-supervised on `train_scenes` shapes scenes of
     another seed (none of the evaluation images);
  2. score normalisation: the descriptor's training scenes are its background
     (score_norm.py);
  3. thresholds, chosen on a validation set (its own seed) as the best pair F1 of the whole
     procedure and stored with the descriptor: the candidate threshold on normalised scores
     together with the pair-verification threshold (verify.py), and, for clustering without
     verification, a normalised-score threshold alone;
  4. test: a fresh set (`num_unique` scenes + `copy_fraction` injected copies) is embedded,
     clustered (with verification) and filtered; duplicate-pair precision / recall are
     scored against the injected truth, at the chosen thresholds and over sweeps
     (pr_curve.png). The descriptor alone, with normalised and with raw similarities (each
     at its own validation threshold), shows what verification and normalisation buy;
  5. more test sets (`more_test_seeds`, the same size), each embedded and clustered the same
     way: one set's score moves by a few false pairs, so the precision / recall to trust
     is the pooled one.
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
from sd3jax.dedup import verify as verify_lib

# Raw similarities lie in [-1, 1]; normalised scores (score_norm.py) mostly in [-0.5, 1].
THRESHOLDS = np.round(np.arange(-0.5, 1.0001, 0.0025), 4)
# With verification: candidates from normalised scores >= 0 (every validation copy pair
# of the README's run scored above 0.2), verification scores are RMS colour differences.
CANDIDATE_THRESHOLDS = np.round(np.arange(0.0, 0.5001, 0.025), 4)
VERIFY_THRESHOLDS = np.round(np.arange(0.0, 0.5001, 0.0025), 4)


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
  fig, axes = plt.subplots(1, len(curves) + 1, figsize=(4 * len(curves) + 4, 3.4))
  colours = {"verified": "#c44e52", "normalised": "#55a868", "raw": "#8172b3"}
  for a, kind in zip(axes, curves):
    curve = curves[kind]
    t = [r["threshold"] for r in curve]
    a.plot(t, [r["precision"] for r in curve], label="precision", color="#4c72b0")
    a.plot(t, [r["recall"] for r in curve], label="recall", color="#dd8452")
    a.axvline(chosen[kind], color="#c44e52", ls="--", label=f"chosen {chosen[kind]:.3f}")
    a.axhline(0.95, color="#999999", lw=0.8, ls=":")
    # Where the decisions are: between full recall and none (recall falls with a similarity
    # threshold and rises with a verification one, a difference).
    full = [r["threshold"] for r in curve if r["recall"] >= 0.99]
    none = [r["threshold"] for r in curve if r["recall"] == 0.0]
    if kind == "verified":
      a.set_xlabel("verification threshold (candidates fixed)")
      lo, hi = max(none or [t[0]]) - 0.02, min(full or [t[-1]]) + 0.1
    else:
      a.set_xlabel(f"threshold on {kind} scores (descriptor alone)")
      lo, hi = max(full or [t[0]]) - 0.1, min(none or [t[-1]]) + 0.05
    a.set_xlim(max(lo, t[0]), min(hi, t[-1]))
    a.set_ylim(0, 1.02)
    a.legend(fontsize=8)
  b = axes[-1]
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


def _verified_curve(n: int, cand: dict[str, np.ndarray], truth: np.ndarray,
                    candidate_threshold: float, thresholds) -> list[dict[str, float]]:
  """Pair precision / recall of the whole procedure per verification threshold."""
  keep = cand["score"] >= candidate_threshold
  i, j, vs = cand["i"][keep], cand["j"][keep], cand["verify_score"][keep]
  out = []
  for t in thresholds:
    ok = vs <= t
    out.append({"threshold": float(t), "candidate_threshold": float(candidate_threshold),
                **cluster_lib.pair_scores(cluster_lib.components(n, i[ok], j[ok]), truth)})
  return out


def _central_best(grid: list[dict[str, float]]) -> tuple[float, float]:
  """(candidate, verification) thresholds: the middle of those with the best F1.

  F1 on a few dozen validation pairs is flat over a range of thresholds; its middle is the
  choice farthest from both kinds of error (as copy_net.calibrate picks its threshold)."""
  best = max(_f1(r) for r in grid)
  tied = [r for r in grid if _f1(r) >= best - 1e-12]

  def middle(values):
    values = sorted(set(values))
    return min(values, key=lambda v: (abs(v - (values[0] + values[-1]) / 2), v))
  tc = middle(r["candidate_threshold"] for r in tied)
  return tc, middle(r["threshold"] for r in tied if r["candidate_threshold"] == tc)


def _candidates(source, ids: np.ndarray, sims: np.ndarray, threshold: float,
                cfg: verify_lib.VerifyConfig, progress: bool) -> dict[str, np.ndarray]:
  i, j, s = cluster_lib.pairs_at(ids, sims, threshold)
  return {"i": i, "j": j, "score": s,
          "verify_score": verify_lib.verify_pairs(source, i, j, cfg, progress=progress)}


def _scores(x: np.ndarray, desc) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """kNN (ids, scores) of x, normalised with the descriptor's background and raw."""
  ids, sims, _ = cluster_lib.neighbours(x, 10, progress=False)
  normalised = score_norm.normalise(x, ids, sims, desc.background, desc.score_norm)
  return {"normalised": (ids, normalised), "raw": (ids, sims)}


def _score_filter(folder: str, truth: np.ndarray) -> dict[str, float]:
  """Pair precision / recall of a `cluster` output folder (its joined pairs) against truth."""
  with open(os.path.join(folder, cluster_lib.REPORT)) as f:
    report = json.load(f)
  cand = dict(np.load(os.path.join(folder, cluster_lib.CANDIDATES)))
  return _verified_curve(len(truth), cand, truth, report["threshold"],
                         [report["verify"]["threshold"]])[0]


def run_demo(out_dir: str, *, num_unique: int = 2000, copy_fraction: float = 0.05,
             train_scenes: int = 4096, train_steps: int = 600,
             more_test_seeds: tuple[int, ...] = tuple(range(5, 14)), progress: bool = True
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
  val_scores = _scores(xv, desc)
  for kind, (ids, sims) in val_scores.items():
    val_curves[kind] = cluster_lib.pr_curve(ids, sims, val_truth, THRESHOLDS)
    thresholds[kind] = max(val_curves[kind], key=lambda r: (_f1(r), r["threshold"]))["threshold"]
  threshold = thresholds["normalised"]
  # With verification: the (candidate, verification) pair of thresholds with the best F1.
  vcfg = verify_lib.VerifyConfig()
  ids, sims = val_scores["normalised"]
  val_cand = _candidates(val_src, ids, sims, float(CANDIDATE_THRESHOLDS[0]), vcfg, progress)
  grid = [r for tc in CANDIDATE_THRESHOLDS
          for r in _verified_curve(len(val_truth), val_cand, val_truth, tc, VERIFY_THRESHOLDS)]
  tc, tv = _central_best(grid)
  verify = {"candidate_threshold": tc, "threshold": tv, "config": verify_lib.config_dict(vcfg),
            "from": "best pair F1 on the demo's validation set (seed 2), the middle of the "
                    "tied thresholds; candidates from normalised scores"}
  if meta.get("threshold") != threshold or meta.get("verify") != verify:
    meta["threshold"] = threshold
    meta["threshold_from"] = ("best pair F1 on the demo's validation set (seed 2), "
                              "normalised scores, without verification")
    meta["verify"] = verify
    with open(os.path.join(net_dir, copy_net.CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
  times["choose_thresholds"] = time.perf_counter() - t

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
  cand = dict(np.load(os.path.join(out_dir, "filter", cluster_lib.CANDIDATES)))
  curves = {"verified": _verified_curve(len(truth), cand, truth, verify["candidate_threshold"],
                                        VERIFY_THRESHOLDS)}
  thresholds["verified"] = verify["threshold"]
  at = {"verified": next(r for r in curves["verified"] if r["threshold"] == verify["threshold"])}
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

  # More test sets: the same procedure (descriptor, stored thresholds, verification).
  t = time.perf_counter()
  test_sets = [{"seed": 0, **at["verified"]}]
  for seed in more_test_seeds:
    rec = os.path.join(out_dir, f"records_seed{seed}")
    if not os.path.exists(os.path.join(rec, "manifest.json")):
      shapes_duplicates.build(rec, num_unique=num_unique, copy_fraction=copy_fraction,
                              seed=seed, progress=progress)
    s_src, s_emb, _ = _embed(rec, os.path.join(out_dir, f"dedup_seed{seed}"), desc, progress)
    folder = os.path.join(out_dir, f"filter_seed{seed}")
    cluster_lib.cluster(s_emb["path"], folder, source=s_src, plots=False, progress=progress)
    test_sets.append({"seed": seed, **_score_filter(folder, shapes_duplicates.truth_groups(s_src))})
  if more_test_seeds:
    times["more_test_sets"] = time.perf_counter() - t
  sums = {k: sum(r[k] for r in test_sets) for k in ("true_pairs", "predicted_pairs",
                                                    "correct_pairs")}
  pooled = {"precision": sums["correct_pairs"] / max(sums["predicted_pairs"], 1),
            "recall": sums["correct_pairs"] / max(sums["true_pairs"], 1), **sums}
  result = {
      "test_set": {"images": int(len(truth)), "unique_scenes": num_unique,
                   "injected_copies": should_drop},
      "descriptor": desc.info(), "verify": verify,
      "precision": at["verified"]["precision"], "recall": at["verified"]["recall"],
      "pairs": at["verified"], "test_sets": test_sets, "pooled": pooled,
      "without_verification": {"threshold": threshold, **at["normalised"]},
      "raw_similarity": {"threshold": thresholds["raw"], **at["raw"]},
      "best_f1_on_test": {kind: max(c, key=_f1) for kind, c in curves.items()},
      "filter": {"dropped": int(dropped.sum()), "should_drop": should_drop,
                 "copy_groups_left_with_one_image": int((kept_groups[group_sizes > 1] == 1).sum()),
                 "copy_groups": int((group_sizes > 1).sum()),
                 "unique_images_dropped": int((dropped & ~in_copied).sum()),
                 "groups_emptied": int((kept_groups == 0).sum())},
      "cluster_report": report, "seconds": {k: round(v, 1) for k, v in times.items()},
      "curve": curves["verified"], "unverified_curve": curves["normalised"],
      "raw_curve": curves["raw"], "validation_curve": val_curves["normalised"],
      "raw_validation_curve": val_curves["raw"],
  }
  plot_pr(os.path.join(out_dir, "pr_curve.png"), curves, thresholds,
          f"dedup of {len(truth)} shapes images with {should_drop} injected copies: pair "
          f"precision {result['precision']:.3f}, recall {result['recall']:.3f} (candidates at "
          f"normalised {verify['candidate_threshold']:.3f}, verified at "
          f"{verify['threshold']:.3f})")
  with open(os.path.join(out_dir, "demo.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result
