"""`sd3jax dedup memorisation`: does a trained model reproduce its training images?

The SD3 paper's check: generate images for training captions, find each one's nearest
training image by copy-detection descriptor, and count the generations that are copies
(similarity at or above the copy threshold; normalised, score_norm.py, when the
descriptor carries a background). A model that memorised duplicated training
images shows them here. Written to RUN/memorisation/: memorisation.json (the fraction, every
generation's nearest training image and similarity) and memorisation.png (the closest cases:
generation | nearest training image).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from sd3jax.dedup import descriptors as descriptors_lib
from sd3jax.dedup import embed as embed_lib
from sd3jax.dedup import score_norm
from sd3jax.dedup import DedupError


def _grid(path: str, gen: np.ndarray, train: list[np.ndarray], sims: np.ndarray,
          captions: list[str], threshold: float) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = len(gen)
  cols = 4
  rows = max(1, -(-n // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 1.7), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, g, t, s, c in zip(axes.flat, gen, train, sims, captions):
    ax.imshow(np.concatenate([g, np.full((g.shape[0], 4, 3), 255, np.uint8), t], 1))
    ax.set_title(f"{s:.3f}{' COPY' if s >= threshold else ''}\n{c[:34]}", fontsize=6,
                 color="#c44e52" if s >= threshold else "#333333")
  fig.suptitle(f"closest generations (left) to a training image (right); copy threshold "
               f"{threshold:.3f}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


class _Nearest:
  """Each query's nearest training image by the descriptor's score: the similarity, or
  with a background the normalised score (score_norm.py; best of the 10 most similar)."""

  def __init__(self, train_x: np.ndarray, desc):
    import faiss
    self.train_x, self.desc = train_x, desc
    self.index = faiss.IndexFlatIP(train_x.shape[1])
    self.index.add(np.ascontiguousarray(train_x))
    self.norm = desc.score_norm
    if self.norm:
      self.n_train = score_norm.background_similarity(train_x, desc.background,
                                                      self.norm["neighbours"])

  def _n(self, x: np.ndarray) -> np.ndarray:
    return score_norm.background_similarity(x, self.desc.background, self.norm["neighbours"])

  def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims, ids = self.index.search(np.ascontiguousarray(x), 10 if self.norm else 1)
    if self.norm:
      sims = score_norm.adjust(sims, self._n(x)[:, None], self.n_train[ids], self.norm["beta"])
    best = sims.argmax(1)[:, None]
    return (np.take_along_axis(sims, best, 1)[:, 0],
            np.take_along_axis(ids, best, 1)[:, 0])

  def score(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x[i]'s score against training image rows[i]."""
    s = np.einsum("nd,nd->n", x, self.train_x[rows])
    if self.norm:
      s = score_norm.adjust(s, self._n(x), self.n_train[rows], self.norm["beta"])
    return s


def _held_out_baseline(pre: Any, desc, nearest: _Nearest, num: int, threshold: float,
                       seed: int) -> dict[str, Any] | None:
  """The same count for held-out images of the training distribution (the source's
  validation split, when it has one): what a model that never saw the training images but
  draws from the same distribution would score. On a small combinatorial set like shapes,
  a faithful image of a simple caption is a near-copy of the training images that show it."""
  from sd3jax.data import records
  from sd3jax.data.producer import open_source
  if os.path.exists(os.path.join(pre["source"], records.MANIFEST)):
    return None  # a record set has no held-out split
  try:
    held = open_source(pre["source"], "validation")
  except (FileNotFoundError, ValueError):
    return None
  picks = np.sort(np.random.default_rng(seed).choice(len(held), min(num, len(held)),
                                                     replace=False))
  x = np.stack([descriptors_lib.prepare(held[int(i)]["image"], desc.size) for i in picks])
  sims = nearest(np.asarray(desc.fn(x.astype(np.float32) / 255.0), np.float32))[0]
  return {"images": int(len(picks)), "fraction_copies": float((sims >= threshold).mean()),
          "similarity_nearest_mean": float(sims.mean())}


def memorisation(config: Any, workdir: str, descriptor: str, *, num: int = 64,
                 threshold: float | None = None, seed: int = 0, embeddings: str | None = None,
                 steps: int | None = None, cfg: float | None = None, out: str | None = None,
                 show: int = 16, progress: bool = True) -> dict[str, Any]:
  """Generates `num` images for training captions of the run at `workdir` and scores them."""
  from sd3jax import sample as sample_lib
  from sd3jax.data.producer import open_source
  run = sample_lib.resolve_run_dir(workdir)
  config = sample_lib.run_config(config, run)
  pre = config.get("precompute", None) or {}
  if not pre.get("source"):
    raise DedupError(f"the run in {run} names no training images (config.precompute.source); "
                     "memorisation needs the image source the run was precomputed from.")
  source = open_source(pre["source"], pre.get("split", "train") or "train",
                       config.data.get("filter", ""))
  desc = descriptors_lib.load_descriptor(descriptor)
  threshold = desc.threshold if threshold is None else float(threshold)
  if threshold is None:
    raise DedupError(f"descriptor {desc.name} carries no copy threshold: give --threshold.")
  out = out or os.path.join(run, "memorisation")
  path = embeddings or embed_lib.embed(source, out, desc, progress=progress)["path"]
  train_x, manifest = embed_lib.load_descriptors(path)
  if manifest["descriptor"]["fingerprint"] != desc.fingerprint or len(train_x) != len(source):
    raise DedupError(f"{path} holds descriptors of another descriptor or source; embed the "
                     "run's training source with this descriptor (omit --embeddings).")
  rng = np.random.default_rng(seed)
  picks = np.sort(rng.choice(len(source), min(num, len(source)), replace=False))
  captions = [str(source[int(i)]["caption_original"]) for i in picks]
  settings = sample_lib.run_sampling_settings(config)
  size = int(config.data.image_size)
  pipe = sample_lib.pipeline_from_run(config, run, shift=settings["shift"])
  images = sample_lib.generate(
      pipe, captions, height=size, width=size, seed=seed,
      steps=settings["steps"] if steps is None else steps,
      guidance_scale=settings["cfg"] if cfg is None else cfg,
      guidance_max_t=settings["cfg_max_t"], autoguidance=settings["autoguidance"],
      progress=progress)
  gen = np.stack([descriptors_lib.prepare(sample_lib.to_uint8(im), desc.size) for im in images])
  fn = desc.fn
  gen_x = np.asarray(fn(gen.astype(np.float32) / 255.0), np.float32)
  nearest = _Nearest(train_x, desc)
  sims, ids = nearest(gen_x)
  own = nearest.score(gen_x, picks)
  copies = sims >= threshold
  baseline = _held_out_baseline(pre, desc, nearest, len(picks), threshold, seed)
  report = {
      "run": run, "descriptor": desc.info(), "threshold": threshold, "num_generated": len(picks),
      "fraction_copies": float(copies.mean()), "num_copies": int(copies.sum()),
      "similarity_nearest": {"mean": float(sims.mean()), "max": float(sims.max()),
                             "p90": float(np.quantile(sims, 0.9))},
      "similarity_own_training_image": {"mean": float(own.mean()), "max": float(own.max())},
      "held_out_baseline": baseline,
      "training_descriptors": path,
      "generations": [{"caption": c, "training_index": int(p), "nearest": int(j),
                       "similarity": float(s), "similarity_own": float(o)}
                      for c, p, j, s, o in zip(captions, picks, ids, sims, own)],
  }
  os.makedirs(out, exist_ok=True)
  worst = np.argsort(-sims)[:show]
  train_images = [descriptors_lib.prepare(source[int(ids[w])]["image"], images.shape[1])
                  for w in worst]
  _grid(os.path.join(out, "memorisation.png"),
        np.stack([sample_lib.to_uint8(images[w]) for w in worst]), train_images, sims[worst],
        [captions[w] for w in worst], threshold)
  with open(os.path.join(out, "memorisation.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report
