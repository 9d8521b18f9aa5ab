"""Copy-detection descriptors: images -> L2-normalised vectors whose dot product is similarity.

`load_descriptor(spec)` resolves what `--descriptor` names:

  DIR                a CopyNet folder (copy_net.json + params.msgpack; `sd3jax dedup train`
                     writes one): the embedded default, trained without downloaded weights;
                     with its background.npy, its scores are normalised (score_norm.py)
  sscd:FILE          SSCD (ResNet-50 + GeM + 512-d projection) from a local PyTorch state dict
                     or TorchScript file (sd3jax.models.sscd)
  thumbnail          a blurred 16x16 thumbnail: the pixel baseline (README: it cannot tell a
                     shifted copy from a scene that differs by one small object)
  FILE.py:factory    any callable, as the FID hook takes one: the factory returns an object
                     with `size`, `dims` and `__call__(float32 [B, size, size, 3] in [0, 1])
                     -> [B, dims]`, and optionally `fingerprint` and `threshold`

Every descriptor sees images resized (antialiased, whole image) to `size` x `size` on the
host, so any source (mixed sizes included) batches. The fingerprint hashes the spec's
kind and its weights, never a path: descriptor files are keyed by it, and files of another
descriptor are refused, never mixed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sd3jax.data.pipeline import _to_pil
from sd3jax.dedup import DedupError


@dataclasses.dataclass
class Descriptor:
  """fn: float32 [B, size, size, 3] in [0, 1] -> [B, dims], L2-normalised rows."""
  name: str
  fingerprint: str
  size: int
  dims: int
  fn: Callable[[Any], Any]
  jittable: bool = True          # fn is a JAX function: batches go over the local devices
  threshold: float | None = None  # the copy threshold measured for it, when known
  # Score normalisation (sd3jax.dedup.score_norm): background descriptors float32 [M, dims]
  # and the settings; when set, `threshold` applies to normalised scores.
  background: np.ndarray | None = None
  score_norm: dict[str, Any] | None = None
  # Pair verification measured with it (sd3jax.dedup.verify): {"candidate_threshold",
  # "threshold", "config"}; `dedup cluster` then verifies its candidates by default.
  verify: dict[str, Any] | None = None

  def info(self) -> dict[str, Any]:
    return {"name": self.name, "fingerprint": self.fingerprint, "size": self.size,
            "dims": self.dims, "threshold": self.threshold, "score_norm": self.score_norm,
            "verify": self.verify}


def _fingerprint(params: Any, kind: str) -> str:
  """sha256 of the descriptor's kind and settings with producer.params_fingerprint (weights)."""
  from sd3jax.data.producer import params_fingerprint
  return hashlib.sha256(f"{kind}|{params_fingerprint(params)}".encode()).hexdigest()


def prepare(image: Any, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: an image (bytes, array or PIL) resized whole, antialiased."""
  im = _to_pil(image).convert("RGB")
  if im.size != (size, size):
    im = im.resize((size, size), Image.BILINEAR, reducing_gap=None)
  return np.asarray(im, np.uint8)


def _l2(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def thumbnail(size: int = 64, cells: int = 16) -> Descriptor:
  """The pixel baseline: blur, pool to cells x cells, remove brightness and contrast."""
  k = size // cells

  def fn(x):
    b = x.shape[0]
    x = x.reshape(b, cells, k, cells, k, 3).mean((2, 4))
    x = x - x.mean((1, 2, 3), keepdims=True)
    return _l2(x.reshape(b, -1))

  return Descriptor(f"thumbnail{cells}", hashlib.sha256(
      f"thumbnail|{size}|{cells}".encode()).hexdigest(), size, cells * cells * 3, fn)


def copy_net(path: str) -> Descriptor:
  from sd3jax.dedup import copy_net as cn
  from sd3jax.dedup import score_norm
  model, params, meta = cn.load(path)
  size = model.config.size
  fn = lambda x: model.apply({"params": params}, x)  # noqa: E731
  background = score_norm.load_background(path) if meta.get("score_norm") else None
  if meta.get("score_norm") and background is None:
    raise FileNotFoundError(f"--descriptor {path}: its threshold applies to normalised scores, "
                            f"but {score_norm.BACKGROUND_FILE} is missing: copy the whole "
                            "folder `sd3jax dedup train` wrote.")
  return Descriptor("copy_net", _fingerprint(params, f"copy_net|{meta['config']}"), size,
                    model.config.dims, fn, threshold=meta.get("threshold"),
                    background=background, score_norm=meta.get("score_norm"),
                    verify=meta.get("verify"))


def sscd(path: str, size: int = 320) -> Descriptor:
  """SSCD at its README's batched recipe: the whole image resized to 320 x 320."""
  from sd3jax.models import sscd as sscd_lib
  module, params = sscd_lib.load_sscd(path)
  fn = lambda x: module.apply({"params": params}, sscd_lib.preprocess(x, size))  # noqa: E731
  return Descriptor("sscd", _fingerprint(params, f"sscd|{size}"), size,
                    int(module.config.dims), fn)


def from_factory(spec: str) -> Descriptor:
  from sd3jax.evals.features import _resolve_factory
  net = _resolve_factory(spec)()
  for attr in ("size", "dims"):
    if not hasattr(net, attr) or not callable(net):
      raise DedupError(f"--descriptor {spec!r} returned {type(net).__name__}: it needs `size`, "
                      "`dims` and __call__(float32 [B, size, size, 3] in [0, 1]) -> [B, dims].")
  fp = getattr(net, "fingerprint", None) or hashlib.sha256(spec.encode()).hexdigest()
  fn = lambda x: np.asarray(net(np.asarray(x)), np.float32)  # noqa: E731
  return Descriptor(f"factory:{spec.rpartition(':')[2]}", fp, int(net.size), int(net.dims),
                    fn, jittable=False, threshold=getattr(net, "threshold", None))


def load_descriptor(spec: str) -> Descriptor:
  """The descriptor `spec` names (module docstring); errors say what is accepted."""
  if not spec:
    raise DedupError("no descriptor given: --descriptor DIR (a CopyNet folder: `sd3jax dedup "
                     "train` makes one), sscd:FILE (SSCD weights), thumbnail, or FILE.py:factory.")
  if spec == "thumbnail":
    return thumbnail()
  if spec.startswith("sscd:"):
    return sscd(spec[len("sscd:"):])
  if os.path.isdir(spec):
    from sd3jax.dedup import copy_net as cn
    if not os.path.exists(os.path.join(spec, cn.CONFIG_FILE)):
      raise FileNotFoundError(f"--descriptor {spec}: the folder has no {cn.CONFIG_FILE}; give "
                              "a folder written by `sd3jax dedup train`.")
    return copy_net(spec)
  if ":" in spec:
    return from_factory(spec)
  raise FileNotFoundError(f"--descriptor {spec!r} is not a folder, sscd:FILE, thumbnail or "
                          "FILE.py:factory.")
