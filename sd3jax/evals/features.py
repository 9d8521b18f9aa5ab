"""FID and CLIP-score hooks: feature networks come from local paths, or not at all.

Both metrics need a pretrained network (Inception-v3 pool features for FID, a
CLIP image + text tower for CLIP score). sd3jax ships neither, and nothing is
downloaded at run time, so these are hooks:

  - the maths, exact and tested: `fid_from_features`, `fid_from_stats`,
    `feature_stats`, `clip_score`;
  - `FeatureNetwork` / `ClipNetwork`: the protocols a network must satisfy
    ("bring a callable");
  - `load_feature_network(path)` / `load_clip_network(path)`: resolve a
    configured local "module_or_file.py:factory" spec to a network, or return
    None with a logged "FID: not computed (config.eval.fid_network is empty)".

An evaluation that has no network reports the metric as absent (the key is not
written), never as 0: `compute_fid` / `compute_clip_score` return None then.

Gap, stated plainly: no loader for real weights exists yet. sd3jax has a Flax
CLIP *text* tower (sd3jax/models/clip.py) but no CLIP vision tower and no
Inception-v3, so a transformers CLIP folder or pytorch-fid weights cannot be
loaded here; a user supplies a factory that returns a callable (which may wrap
any framework they have installed).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import scipy.linalg
from absl import logging


@runtime_checkable
class FeatureNetwork(Protocol):
  """Images -> features, for FID. images: float32 [N, H, W, 3] in [0, 1] (NHWC).

  Resizing and normalisation to what the network expects are its own business,
  so one set of features is comparable whatever resolution sd3jax samples at.
  """

  def __call__(self, images: np.ndarray) -> np.ndarray:  # -> [N, D]
    ...


@runtime_checkable
class ClipNetwork(Protocol):
  """A CLIP-style pair of towers into one embedding space, for CLIP score."""

  def embed_images(self, images: np.ndarray) -> np.ndarray:  # [N, H, W, 3] in [0, 1] -> [N, D]
    ...

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:  # -> [N, D]
    ...


# ----------------------------------------------------------------------------
# Frechet distance.
# ----------------------------------------------------------------------------
def feature_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) in float64; cache these for a reference set."""
  x = np.asarray(feats, np.float64)
  if x.ndim != 2:
    raise ValueError(f"Features must be [N, D], got shape {x.shape}.")
  if x.shape[0] < 2:
    raise ValueError(f"FID needs at least 2 feature vectors per set, got {x.shape[0]}.")
  if x.shape[0] <= x.shape[1]:
    logging.warning("FID: %d samples for %d-dim features: the covariance is singular and "
                    "the estimate is biased high; use more samples than dimensions.",
                    x.shape[0], x.shape[1])
  return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def fid_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
  """Frechet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians.

  Numerics as in the reference implementation (pytorch-fid), so numbers are
  comparable: float64, scipy.linalg.sqrtm of the product; when the product is
  singular enough that sqrtm returns non-finite values, both covariances get
  `eps` on the diagonal; a spurious imaginary part from round-off is dropped
  (a large one raises: the inputs are not covariances). Clamped at 0, since
  round-off can push the distance of identical sets slightly negative.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"Mismatched statistics: means {mu1.shape}, {mu2.shape}; "
                     f"covariances {s1.shape}, {s2.shape}.")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    logging.warning("FID: singular covariance product; adding %g to the diagonals.", eps)
    offset = np.eye(s1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.abs(covmean.imag).max()
    scale = max(1.0, np.abs(covmean.real).max())
    if imag > 1e-3 * scale:
      raise ValueError(f"FID: imaginary part {imag:g} in sqrtm(S1 S2); are these covariances?")
    covmean = covmean.real
  fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
  return max(fid, 0.0)


def fid_from_features(feats_a: Any, feats_b: Any, eps: float = 1e-6) -> float:
  """Frechet distance between two feature sets [N, D] and [M, D] (see fid_from_stats)."""
  return fid_from_stats(*feature_stats(feats_a), *feature_stats(feats_b), eps=eps)


# ----------------------------------------------------------------------------
# CLIP score.
# ----------------------------------------------------------------------------
def clip_score(image_embeds: Any, text_embeds: Any) -> float:
  """100 * mean over pairs of max(cos(image_i, text_i), 0) (Hessel et al. 2021, w = 100)."""
  a = np.asarray(image_embeds, np.float64)
  b = np.asarray(text_embeds, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"Expected paired [N, D] embeddings, got {a.shape} and {b.shape}.")
  na = np.linalg.norm(a, axis=-1)
  nb = np.linalg.norm(b, axis=-1)
  cos = (a * b).sum(-1) / np.maximum(na * nb, 1e-12)
  return float(100.0 * np.maximum(cos, 0.0).mean())


# ----------------------------------------------------------------------------
# Loading ("bring a callable").
# ----------------------------------------------------------------------------
def _resolve_factory(spec: str) -> Callable[[], Any]:
  """'pkg.module:factory' or '/path/to/file.py:factory' -> the factory callable."""
  target, sep, name = spec.rpartition(":")
  if not sep or not target or not name or os.sep in name:
    raise ValueError(
        f"Network spec {spec!r} must be 'package.module:factory' or '/path/file.py:factory' "
        "naming a zero-argument function that returns the network. Loading weight folders "
        "(Inception, transformers CLIP) directly is not implemented: wrap them in a factory.")
  if target.endswith(".py"):
    if not os.path.isfile(target):
      raise FileNotFoundError(f"Network spec {spec!r}: no file {target}.")
    module_spec = importlib.util.spec_from_file_location(
        f"_sd3jax_eval_network_{abs(hash(target))}", target)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    module = importlib.import_module(target)
  factory = getattr(module, name, None)
  if not callable(factory):
    raise ValueError(f"Network spec {spec!r}: {target} has no callable {name!r}.")
  return factory


def load_feature_network(path: str | None, key: str = "config.eval.fid_network"
                         ) -> FeatureNetwork | None:
  """The configured FID feature network, or None (logged) when `path` is empty."""
  if not path:
    logging.info("FID: not computed (%s is empty)", key)
    return None
  network = _resolve_factory(path)()
  if not callable(network):
    raise TypeError(f"{key}={path!r} returned {type(network).__name__}, not a callable "
                    "images [N, H, W, 3] in [0, 1] -> features [N, D].")
  return network


def load_clip_network(path: str | None, key: str = "config.eval.clip_network"
                      ) -> ClipNetwork | None:
  """The configured CLIP network, or None (logged) when `path` is empty."""
  if not path:
    logging.info("CLIP score: not computed (%s is empty)", key)
    return None
  network = _resolve_factory(path)()
  if not isinstance(network, ClipNetwork):
    raise TypeError(f"{key}={path!r} returned {type(network).__name__}, which lacks "
                    "embed_images(images) and embed_texts(texts).")
  return network


def networks_from_config(eval_config: Any) -> tuple[FeatureNetwork | None, ClipNetwork | None]:
  """(FID network, CLIP network) from config.eval's fid_network / clip_network keys.

  Missing keys read as empty (config.defaults() does not declare them yet).
  """
  get = eval_config.get if hasattr(eval_config, "get") else (lambda k, d: d)
  return (load_feature_network(get("fid_network", "") or None),
          load_clip_network(get("clip_network", "") or None))


def _batched(fn: Callable[[np.ndarray], Any], images: Any, batch_size: int) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 255.0
  out = [np.asarray(fn(images[i:i + batch_size]), np.float64)
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out, 0)


def compute_fid(network: FeatureNetwork | None, images: Any,
                reference: Any, batch_size: int = 64) -> float | None:
  """FID of `images` against `reference` (images, or cached (mu, sigma)); None without a network."""
  if network is None:
    return None
  stats = feature_stats(_batched(network, images, batch_size))
  if isinstance(reference, tuple) and len(reference) == 2:
    ref_stats = reference
  else:
    ref_stats = feature_stats(_batched(network, reference, batch_size))
  return fid_from_stats(*stats, *ref_stats)


def compute_clip_score(network: ClipNetwork | None, images: Any, prompts: Sequence[str],
                       batch_size: int = 64) -> float | None:
  """CLIP score of images[i] against prompts[i]; None without a network."""
  if network is None:
    return None
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images for {len(prompts)} prompts.")
  image_embeds = _batched(network.embed_images, images, batch_size)
  text_embeds = np.concatenate([np.asarray(network.embed_texts(list(prompts[i:i + batch_size])))
                                for i in range(0, len(prompts), batch_size)], 0)
  return clip_score(image_embeds, text_embeds)


def present(metrics: dict[str, Any]) -> dict[str, Any]:
  """Drops absent (None) metrics so they are not written as 0 or null."""
  return {k: v for k, v in metrics.items() if v is not None}
