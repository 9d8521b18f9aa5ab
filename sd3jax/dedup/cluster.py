"""`sd3jax dedup cluster`: near-duplicate clusters from descriptors, and the filter that drops them.

The SD3 paper's procedure: find every pair of images whose descriptors are closer than a
threshold, join pairs into clusters, keep one image per cluster.

  1. k nearest neighbours of every descriptor by inner product (= cosine: descriptors are
     L2-normalised) with faiss: an exact flat index up to `exact_limit` descriptors, an
     IVF-PQ index above (coarse quantiser + product-quantised codes, `nprobe` lists
     searched). Candidates are rescored with exact dot products, so the threshold applies
     to true similarities whichever index proposed them.
     With a background (score_norm.py), each similarity is normalised first: minus how
     close the two images are to images that are not their copies.
  2. With verification (verify.py; on by default when the descriptor carries its measured
     settings), each pair at or above the threshold is a candidate, and it stays only if
     the pixels agree: aligned by a crop / shift / colour edit, no window differs by more
     than the verification threshold.
  3. The remaining pairs are the edges of a graph; its connected components
     (scipy.sparse.csgraph, the union-find result) are the clusters.
  4. Kept per cluster: the largest image (pixel area), then the lowest index: deterministic.
  5. filter.json + drop.npy (sd3jax.dedup.filter), report.json, a histogram of nearest-
     neighbour similarities, and a grid of the pairs closest to the threshold on each side.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from sd3jax.dedup import filter as filter_lib
from sd3jax.dedup import score_norm
from sd3jax.dedup import verify as verify_lib
from sd3jax.dedup.embed import load_descriptors
from sd3jax.dedup import DedupError

REPORT = "report.json"
CANDIDATES = "candidates.npz"  # with verification: every candidate pair and its two scores


def build_index(x: np.ndarray, *, exact_limit: int = 200_000, nlist: int | None = None,
                pq_bytes: int | None = None, nprobe: int = 32, seed: int = 0):
  """A faiss inner-product index over x (float32 [N, D]); (index, description)."""
  import faiss
  n, d = x.shape
  if n <= exact_limit:
    index = faiss.IndexFlatIP(d)
    index.add(x)
    return index, {"type": "flat (exact)", "bytes_per_vector": 4 * d}
  nlist = nlist or int(2 ** round(np.log2(4 * np.sqrt(n))))
  m = pq_bytes or next(b for b in (64, 48, 32, 16, 8) if d % b == 0)
  index = faiss.index_factory(d, f"IVF{nlist},PQ{m}", faiss.METRIC_INNER_PRODUCT)
  sample = np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)
  index.train(x[np.sort(sample)])
  index.add(x)
  faiss.extract_index_ivf(index).nprobe = nprobe
  return index, {"type": f"IVF{nlist},PQ{m} (nprobe {nprobe})", "bytes_per_vector": m + 8}


def neighbours(x: np.ndarray, k: int, *, batch: int = 16384, progress: bool = True,
               **index_kwargs) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """(ids [N, k], exact similarities [N, k], info): each row's k nearest others (-1: none)."""
  x = np.ascontiguousarray(x, np.float32)
  n = len(x)
  start = time.perf_counter()
  index, info = build_index(x, **index_kwargs)
  built = time.perf_counter()
  kk = min(k + 1, n)
  ids = np.full((n, k), -1, np.int64)
  for lo in tqdm(range(0, n, batch), desc="dedup knn", unit="batch", disable=not progress):
    _, found = index.search(x[lo:lo + batch], kk)
    # Drop self (first, or anywhere among exact ties) and misses; keep the order of the rest.
    bad = (found < 0) | (found == np.arange(lo, lo + len(found))[:, None])
    order = np.argsort(bad, axis=1, kind="stable")
    found = np.where(np.take_along_axis(bad, order, 1), -1, np.take_along_axis(found, order, 1))
    ids[lo:lo + len(found)] = found[:, :k] if kk > k else np.pad(
        found, ((0, 0), (0, k - kk)), constant_values=-1)
  searched = time.perf_counter()
  sims = np.where(ids >= 0, np.einsum("nd,nkd->nk", x, x[np.maximum(ids, 0)]), -np.inf)
  info.update(build_seconds=round(built - start, 3), search_seconds=round(searched - built, 3),
              queries_per_second=round(n / max(searched - built, 1e-9), 1), k=k)
  return ids, sims.astype(np.float32), info


def pairs_at(ids: np.ndarray, sims: np.ndarray, threshold: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Unique pairs (i < j) with similarity >= threshold: (i, j, sim)."""
  rows, cols = np.nonzero((sims >= threshold) & (ids >= 0))
  i, j = rows, ids[rows, cols]
  a, b = np.minimum(i, j), np.maximum(i, j)
  key = a * len(ids) + b
  _, first = np.unique(key, return_index=True)
  return a[first], b[first], sims[rows, cols][first]


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
  """int [n]: the cluster (connected component) of every example."""
  import scipy.sparse
  import scipy.sparse.csgraph
  graph = scipy.sparse.coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
  return scipy.sparse.csgraph.connected_components(graph, directed=False)[1]


def keep_one(labels: np.ndarray, areas: np.ndarray | None = None) -> np.ndarray:
  """bool [n]: per cluster, the largest image (then the lowest index) is kept."""
  n = len(labels)
  areas = np.zeros(n) if areas is None else np.asarray(areas, np.float64)
  order = np.lexsort((np.arange(n), -areas, labels))  # by cluster, area desc, index asc
  first = np.ones(n, bool)
  first[1:] = labels[order][1:] != labels[order][:-1]
  keep = np.zeros(n, bool)
  keep[order[first]] = True
  return keep


def pair_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  """Duplicate-pair precision / recall of a clustering against true groups."""
  def pairs(counts):
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())
  _, joint = np.unique(np.stack([pred, truth], 1), axis=0, return_counts=True)
  tp, predicted = pairs(joint), pairs(np.unique(pred, return_counts=True)[1])
  actual = pairs(np.unique(truth, return_counts=True)[1])
  return {"precision": tp / predicted if predicted else 1.0,
          "recall": tp / actual if actual else 1.0, "true_pairs": actual,
          "predicted_pairs": predicted, "correct_pairs": tp}


def pr_curve(ids: np.ndarray, sims: np.ndarray, truth: np.ndarray,
             thresholds: Sequence[float]) -> list[dict[str, float]]:
  """Pair precision / recall of the whole procedure (clusters, not single pairs) per threshold."""
  out = []
  for t in thresholds:
    i, j, _ = pairs_at(ids, sims, float(t))
    out.append({"threshold": float(t), **pair_scores(components(len(ids), i, j), truth)})
  return out


def _images(source, indices: Sequence[int], size: int = 96) -> list[np.ndarray]:
  from sd3jax.dedup.descriptors import prepare
  return [prepare(source[int(i)]["image"], size) for i in indices]


def plot_histogram(path: str, nearest: np.ndarray, threshold: float, title: str,
                   score: str = "similarity") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.2))
  ax.hist(nearest[np.isfinite(nearest)], bins=100, color="#4c72b0")
  ax.axvline(threshold, color="#c44e52", ls="--", label=f"threshold {threshold:.3f}")
  ax.set_yscale("log")
  ax.set_xlabel(f"{score} to the nearest other image")
  ax.set_ylabel("images")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_pairs(path: str, source, pairs: Sequence[tuple[int, int, str, bool]], title: str,
               size: int = 96) -> None:
  """Pairs as (a | b), titled with their scores, red when joined: the closest decisions."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = 4
  rows = max(1, -(-len(pairs) // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 1.4), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (i, j, label, joined) in zip(axes.flat, pairs):
    a, b = _images(source, [i, j], size)
    ax.imshow(np.concatenate([a, np.full((size, 4, 3), 255, np.uint8), b], 1))
    ax.set_title(f"{i} | {j}: {label} {'dup' if joined else 'kept'}", fontsize=7,
                 color="#c44e52" if joined else "#333333")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _background(descriptors: str, desc: dict[str, Any], background: str | None,
                threshold: float | None) -> tuple[np.ndarray | None, dict[str, Any] | None]:
  """(background descriptors, score-normalisation settings), or (None, None): raw scores."""
  norm = desc.get("score_norm")
  if background:
    bg, bg_manifest = load_descriptors(background)
    if bg_manifest["descriptor"]["fingerprint"] != desc["fingerprint"]:
      raise DedupError(f"--background {background} was embedded with descriptor "
                       f"{bg_manifest['descriptor']['name']} "
                       f"({bg_manifest['descriptor']['fingerprint'][:12]}), the descriptors "
                       f"with {desc['name']} ({desc['fingerprint'][:12]}): embed the background "
                       "images with the same --descriptor.")
    if not norm and threshold is None:
      raise DedupError(f"descriptor {desc['name']} has no threshold for normalised scores "
                       "(a stored one applies to raw similarities): with --background give "
                       "--threshold on normalised scores (e.g. from the dedup demo's PR curve).")
    norm = norm or score_norm.DEFAULTS
    return bg, score_norm.settings(bg, norm["beta"], norm["neighbours"])
  if not norm:
    return None, None
  bg = score_norm.load_background(descriptors)
  if bg is None:
    raise FileNotFoundError(f"{descriptors}: descriptor {desc['name']} normalises scores, but "
                            f"{score_norm.BACKGROUND_FILE} is missing (`dedup embed` writes it "
                            "with the manifest): re-embed, or give --background.")
  return bg, score_norm.settings(bg, norm["beta"], norm["neighbours"])


def _verification(desc: dict[str, Any], verify: bool | None, verify_threshold: float | None,
                  threshold: float | None, source) -> tuple[dict[str, Any] | None, float | None]:
  """(verification settings or None, the descriptor threshold for candidates)."""
  stored = desc.get("verify")
  if verify is None:
    verify = bool(stored) or verify_threshold is not None
  if not verify:
    return None, threshold
  if verify_threshold is None and not stored:
    raise DedupError(f"descriptor {desc['name']} carries no measured verification threshold: "
                     "give --verify_threshold (e.g. from the dedup demo's report), or --noverify.")
  if source is None:
    raise DedupError("pair verification compares the images: give --source (the source these "
                     "descriptors were embedded from), or --noverify.")
  settings = {"threshold": float(verify_threshold if verify_threshold is not None
                                 else stored["threshold"]),
              "config": (stored or {}).get("config",
                                            verify_lib.config_dict(verify_lib.VerifyConfig()))}
  if threshold is None and stored:
    threshold = stored["candidate_threshold"]
  return settings, threshold


def cluster(descriptors: str, out_dir: str, *, threshold: float | None = None, k: int = 10,
            source=None, background: str | None = None, verify: bool | None = None,
            verify_threshold: float | None = None, plots: bool = True,
            progress: bool = True, **index_kwargs) -> dict[str, Any]:
  """Clusters a finished descriptors folder; writes the filter and the report to out_dir.

  Scores are normalised (score_norm.py) when the descriptor carries a background or
  `background` names a descriptors folder of the same descriptor. Candidate pairs are
  verified on the pixels (verify.py) when `verify`, or by default when the descriptor
  carries verification settings; `threshold` then selects the candidates."""
  x, manifest = load_descriptors(descriptors)
  desc = manifest["descriptor"]
  checked, threshold = _verification(desc, verify, verify_threshold, threshold, source)
  bg, norm = _background(descriptors, desc, background, threshold)
  if threshold is None:
    threshold = desc.get("threshold")
    if threshold is None:
      raise DedupError(f"descriptor {desc['name']} carries no measured copy threshold: give "
                       "--threshold (cosine similarity, e.g. from the dedup demo's PR curve).")
  if source is not None and len(source) != manifest["num_examples"]:
    raise DedupError(f"the source has {len(source)} examples, the descriptors "
                     f"{manifest['num_examples']}: embed this source first.")
  ids, sims, info = neighbours(x, k, progress=progress, **index_kwargs)
  if norm:
    sims = score_norm.normalise(x, ids, sims, bg, norm)
  i, j, s = pairs_at(ids, sims, threshold)
  candidates = len(i)
  if checked:
    vs = verify_lib.verify_pairs(source, i, j, verify_lib.config_from_dict(checked["config"]),
                                 progress=progress)
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, CANDIDATES), i=i, j=j, score=s, verify_score=vs)
    ok = vs <= checked["threshold"]
    rejected = (i[~ok], j[~ok], s[~ok], vs[~ok])
    i, j, s, vs = i[ok], j[ok], s[ok], vs[ok]
  labels = components(len(x), i, j)
  areas = None
  if source is not None and hasattr(source, "image_sizes"):
    areas = np.prod(np.asarray(source.image_sizes(), np.float64), axis=1)
  keep = keep_one(labels, areas)
  sizes = np.bincount(labels)
  hist = {int(v): int(c) for v, c in zip(*np.unique(sizes[sizes > 1], return_counts=True))}
  os.makedirs(out_dir, exist_ok=True)
  report = {
      "descriptors": os.path.abspath(descriptors), "descriptor": desc,
      "num_examples": int(len(x)), "threshold": float(threshold), "score_norm": norm,
      "index": info, "verify": checked, "num_candidates": int(candidates),
      "num_pairs": int(len(i)), "num_clusters": int((sizes > 1).sum()),
      "cluster_sizes": hist, "num_dropped": int((~keep).sum()), "num_kept": int(keep.sum()),
      "keep_rule": "largest image (pixel area), then lowest index",
  }
  filter_lib.write_filter(out_dir, source_identity=manifest["source"],
                          num_examples=len(x), drop=np.flatnonzero(~keep),
                          info={"threshold": float(threshold), "score_norm": norm,
                                "descriptor": desc, "verify": checked,
                                "keep_rule": report["keep_rule"],
                                "num_clusters": report["num_clusters"]})
  nearest = sims.max(1) if k else np.zeros(len(x))
  if plots:
    plot_histogram(os.path.join(out_dir, "similarity_hist.png"), nearest, threshold,
                   f"{len(x)} images, {desc['name']}: {report['num_clusters']} clusters, "
                   f"{report['num_dropped']} dropped",
                   "normalised similarity" if norm else "similarity")
    if checked:  # the verified pairs and rejected candidates nearest the verification threshold
      both = [(int(a), int(b), float(v), True) for a, b, v in zip(i, j, vs)]
      both += [(int(a), int(b), float(v), False) for a, b, _, v in zip(*rejected)]
      both = sorted(both, key=lambda p: abs(p[2] - checked["threshold"]))[:16]
      plot_pairs(os.path.join(out_dir, "pairs.png"), source,
                 [(a, b, f"verify {v:.3f}", ok) for a, b, v, ok in sorted(both,
                                                                          key=lambda p: p[2])],
                 f"candidates nearest the verification threshold {checked['threshold']:.3f} "
                 "(red: joined)")
    elif source is not None:
      a, b, ps = pairs_at(ids, sims, -np.inf)
      order = np.argsort(np.abs(ps - threshold))[:16]
      near = sorted(((int(a[o]), int(b[o]), float(ps[o])) for o in order), key=lambda p: -p[2])
      plot_pairs(os.path.join(out_dir, "pairs.png"), source,
                 [(a, b, f"{v:.3f}", v >= threshold) for a, b, v in near],
                 f"pairs nearest the threshold {threshold:.3f} (red: joined)")
  with open(os.path.join(out_dir, REPORT), "w") as f:
    json.dump(report, f, indent=2)
  return report
