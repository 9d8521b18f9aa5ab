"""Score normalisation (SSCD, Pizzi et al. 2022): a pair's similarity minus how similar its
images are to images that are certainly not their copies.

One threshold on raw cosine similarity fails where the data is dense: two distinct images of
a common kind (one small red circle in a corner, a stock photo of a beach) can be closer than
an image and its edited copy elsewhere. SSCD subtracts from each similarity the query's
similarity to its nearest neighbours in a background set (images known not to be copies;
for DISC21, its training images). In SSCD's DISC21 evaluation this raised muAP from 61% to 72%.

Here a pair (a, b) scores

    s(a, b) - beta * (n(a) + n(b)) / 2

where n(x) is the mean similarity of x to its `neighbours` nearest background descriptors.
Dedup pairs have no query side, so the two images' terms are averaged. beta 1 is SSCD's.
SSCD averages 3 neighbours; 10 were steadier on the shapes demo (README, "Deduplication").

A CopyNet folder carries its background: the descriptors of its own training images
(`background.npy`, written by `sd3jax dedup train`); `dedup embed` copies it next to the
descriptors, so `dedup cluster` needs nothing more. Any other descriptor can use a background
embedded with it: `dedup cluster ... --background OTHER/descriptors-XXXX`.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from sd3jax.dedup import DedupError

BACKGROUND_FILE = "background.npy"
DEFAULTS = {"beta": 1.0, "neighbours": 10}


def settings(background: np.ndarray, beta: float = DEFAULTS["beta"],
             neighbours: int = DEFAULTS["neighbours"]) -> dict[str, Any]:
  """What a threshold on normalised scores depends on (stored with the descriptor)."""
  if not 1 <= neighbours <= len(background):
    raise DedupError(f"score normalisation averages {neighbours} background neighbours, but "
                     f"the background holds {len(background)} descriptors: embed more "
                     "background images or lower the number of neighbours.")
  return {"beta": float(beta), "neighbours": int(neighbours),
          "background_size": int(len(background))}


def background_similarity(x: np.ndarray, background: np.ndarray, neighbours: int,
                          batch: int = 16384) -> np.ndarray:
  """float32 [N]: each row's mean similarity to its `neighbours` nearest background rows."""
  import faiss
  index = faiss.IndexFlatIP(background.shape[1])
  index.add(np.ascontiguousarray(background, np.float32))
  x = np.ascontiguousarray(x, np.float32)
  out = np.empty(len(x), np.float32)
  for lo in range(0, len(x), batch):
    sims, _ = index.search(x[lo:lo + batch], neighbours)
    out[lo:lo + batch] = sims.mean(1)
  return out


def adjust(sims: np.ndarray, n_a: np.ndarray, n_b: np.ndarray,
           beta: float = DEFAULTS["beta"]) -> np.ndarray:
  """The normalised score of similarities `sims` between images with background
  similarities n_a and n_b (arrays broadcast): sims - beta * (n_a + n_b) / 2."""
  return sims - beta * 0.5 * (n_a + n_b)


def normalise(x: np.ndarray, ids: np.ndarray, sims: np.ndarray, background: np.ndarray,
              norm: dict[str, Any]) -> np.ndarray:
  """Normalised scores of kNN results within one set: sims [N, k] of rows of x against
  their neighbours ids [N, k] (-1: none)."""
  n = background_similarity(x, background, norm["neighbours"])
  out = adjust(sims, n[:, None], n[np.maximum(ids, 0)], norm["beta"])
  return np.where(ids >= 0, out, -np.inf).astype(np.float32)


def save_background(folder: str, background: np.ndarray) -> None:
  """folder/background.npy (float16), appearing only complete (a temporary file, renamed)."""
  tmp = os.path.join(folder, f".{BACKGROUND_FILE}.tmp-{os.getpid()}.npy")
  np.save(tmp, np.asarray(background, np.float16))
  os.replace(tmp, os.path.join(folder, BACKGROUND_FILE))


def load_background(folder: str) -> np.ndarray | None:
  path = os.path.join(folder, BACKGROUND_FILE)
  return np.load(path).astype(np.float32) if os.path.exists(path) else None
