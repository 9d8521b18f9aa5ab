"""A small copy-detection descriptor, trained self-supervised: SSCD's recipe at toy scale.

SSCD learns a descriptor under which an image and its edited copies are neighbours and
different images are not: contrastive training (InfoNCE) between two randomly edited views
of each image, against the other images of the batch, plus a KoLeo entropy term that spreads
descriptors over the sphere. Its published weights cannot be downloaded here, and a pixel
descriptor cannot tell a shifted copy from another scene that differs by one small object
(README, "Deduplication"), so the embedded default is this network trained the same way on
images the dedup set does not contain.

Differences from SSCD, each for size: five stride-2 3x3 convolutions on 64x64 inputs instead
of ResNet-50 at 288-320 px; the descriptor sees the flattened last (2x2) map, so where an object
sits counts, plus a GeM pool of the 8x8 map (which local patterns occur, wherever they are);
edits are a random scaled / shifted crop, colour jitter and noise in JAX, plus a JPEG-re-encoded
twin of every image made up front (SSCD's augmentations include JPEG too); after the first
`mine_every` steps, half of each batch is the current nearest neighbours of the other half.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm import tqdm

from sd3jax.dedup import DedupError

CONFIG_FILE = "copy_net.json"
PARAMS_FILE = "params.msgpack"


@dataclasses.dataclass(frozen=True)
class CopyNetConfig:
  size: int = 64                         # input side: images are resized to size x size
  widths: tuple[int, ...] = (32, 64, 128, 128, 128)  # 3x3 convs, each stride 2
  hidden: int = 256
  dims: int = 128                        # descriptor size (L2-normalised)


def gem(x: jax.Array, p: float = 3.0, eps: float = 1e-6) -> jax.Array:
  """Generalised-mean pooling over H, W (SSCD's): between average (p=1) and max pooling."""
  return jnp.mean(jnp.maximum(x, eps) ** p, axis=(1, 2)) ** (1.0 / p)


class CopyNet(nn.Module):
  """float32 [B, size, size, 3] in [0, 1] -> L2-normalised [B, dims]."""
  config: CopyNetConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = (x - 0.5) / 0.25
    pooled = []
    for i, w in enumerate(self.config.widths):
      x = nn.Conv(w, (3, 3), strides=2, name=f"conv{i}")(x)
      x = nn.LayerNorm(name=f"norm{i}")(x)
      x = nn.gelu(x)
      if i == len(self.config.widths) - 3:  # what local patterns occur, wherever they are
        pooled.append(gem(x))
    x = jnp.concatenate([x.reshape(x.shape[0], -1)] + pooled, -1)  # + where things are
    x = nn.gelu(nn.Dense(self.config.hidden, name="fc")(x))
    x = nn.Dense(self.config.dims, name="proj")(x)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


# ----------------------------------------------------------------------------
# Edits: what a copy may have undergone (one random draw per image and view).
# ----------------------------------------------------------------------------
def _edit_one(key: jax.Array, image: jax.Array, size: int) -> jax.Array:
  """A random scaled / shifted crop, colour jitter and noise of one [H, W, 3] image."""
  h, w = image.shape[:2]
  k = jax.random.split(key, 6)
  keep = jax.random.uniform(k[0], (2,), minval=0.88, maxval=1.0)     # side kept
  off = jax.random.uniform(k[1], (2,)) * (1.0 - keep) * jnp.array([h, w])
  shift = jax.random.uniform(k[2], (2,), minval=-0.05, maxval=0.05) * jnp.array([h, w])
  scale = jnp.array([size / h, size / w]) / keep
  translation = -(off + shift) * scale
  out = jax.image.scale_and_translate(image, (size, size, 3), (0, 1), scale, translation,
                                      "linear", antialias=True)
  bright, contrast, sat = jax.random.uniform(k[3], (3,), minval=0.8, maxval=1.2)
  out = out * bright
  mean = out.mean()
  out = (out - mean) * contrast + mean
  gray = out.mean(-1, keepdims=True)
  out = (out - gray) * sat + gray
  out = out + jax.random.normal(k[4], out.shape) * jax.random.uniform(k[5], (), maxval=0.03)
  return out.clip(0.0, 1.0)


def edit(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
  """Edited copies of a uint8 / [0, 1] batch [B, H, W, 3], resized to size x size."""
  images = images.astype(jnp.float32) / (255.0 if images.dtype == jnp.uint8 else 1.0)
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(_edit_one, in_axes=(0, 0, None))(keys, images, size)


def resize(images: jax.Array, size: int) -> jax.Array:
  """The descriptor's input: a uint8 / [0, 1] batch resized (antialiased) to size x size."""
  images = images.astype(jnp.float32) / (255.0 if images.dtype == jnp.uint8 else 1.0)
  return jax.image.resize(images, (images.shape[0], size, size, 3), "linear", antialias=True)


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------
def info_nce(a: jax.Array, b: jax.Array, temperature: float) -> jax.Array:
  """Symmetric InfoNCE: view a_i must pick b_i among all of b (and the other a's)."""
  z = jnp.concatenate([a, b], 0)
  sim = z @ z.T / temperature
  n = a.shape[0]
  sim = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, sim)
  target = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return optax.softmax_cross_entropy_with_integer_labels(sim, target).mean()


def koleo(z: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Kozachenko-Leonenko entropy estimate (negated): pushes each descriptor off its nearest."""
  sim = z @ z.T - 2.0 * jnp.eye(z.shape[0])
  nearest = jnp.sqrt(jnp.clip(2.0 - 2.0 * sim.max(-1), 0.0) + eps)
  return -jnp.log(nearest + eps).mean()


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
  """uint8 HWC image after a JPEG round trip at `quality`."""
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return np.asarray(Image.open(buf).convert("RGB"))


def _embed_pool(model: CopyNet, params: Any, data: jax.Array, chunk: int = 512) -> np.ndarray:
  size = model.config.size
  fn = jax.jit(lambda p, x: model.apply({"params": p}, resize(x, size)))
  return np.concatenate([np.asarray(fn(params, data[i:i + chunk]))
                         for i in range(0, data.shape[0], chunk)])


def hard_batch(rng: np.random.Generator, nearest: np.ndarray, batch: int) -> np.ndarray:
  """batch / 2 random images and each one's current nearest neighbour (distinct indices)."""
  anchors = rng.choice(len(nearest), batch // 2, replace=False)
  idx = list(dict.fromkeys(np.concatenate([anchors, nearest[anchors]]).tolist()))
  rest = np.setdiff1d(np.arange(len(nearest)), idx)
  idx += rng.choice(rest, batch - len(idx), replace=False).tolist()
  return np.asarray(idx)


def train(images: np.ndarray, *, config: CopyNetConfig = CopyNetConfig(), steps: int = 600,
          batch: int = 128, learning_rate: float = 2e-3, temperature: float = 0.05,
          koleo_weight: float = 0.1, mine_every: int = 100, seed: int = 0,
          progress: bool = True) -> tuple[Any, list[float]]:
  """Trains CopyNet on uint8 [N, H, W, 3] images; returns (params, losses).

  After the first `mine_every` steps, half of every batch is random images and the other
  half their nearest neighbours under the current network (re-found every `mine_every`
  steps): the images most easily mistaken for copies of each other are contrasted
  directly, where random batches would rarely hold them together.
  """
  model = CopyNet(config)
  key = jax.random.key(seed)
  rng = np.random.default_rng(seed)
  params = model.init(key, jnp.zeros((1, config.size, config.size, 3)))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(50, steps // 10),
                                                steps, learning_rate * 0.05)
  opt = optax.adamw(schedule, weight_decay=1e-4)
  state = opt.init(params)
  data = jnp.asarray(images)
  # JPEG re-encoding cannot run inside jit: every image gets one re-encoded twin up front
  # (quality 40-95), and each view starts from the twin half of the time.
  twins = jnp.asarray(np.stack([jpeg(im, int(q)) for im, q in zip(
      images, rng.integers(40, 96, len(images)))]))

  @jax.jit
  def step(params, state, key, idx):
    k_a, k_b, k_ta, k_tb = jax.random.split(key, 4)
    pick = lambda k: jax.random.bernoulli(k, 0.5, (idx.shape[0], 1, 1, 1))  # noqa: E731
    xa = jnp.where(pick(k_ta), twins[idx], data[idx])
    xb = jnp.where(pick(k_tb), twins[idx], data[idx])

    def loss_fn(p):
      za = model.apply({"params": p}, edit(k_a, xa, config.size))
      zb = model.apply({"params": p}, edit(k_b, xb, config.size))
      z = jnp.concatenate([za, zb])
      return info_nce(za, zb, temperature) + koleo_weight * koleo(z)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses, nearest = [], None
  for i in tqdm(range(steps), desc="copy-detection descriptor", disable=not progress):
    if mine_every and i and i % mine_every == 0:
      z = _embed_pool(model, params, data)
      sim = z @ z.T
      np.fill_diagonal(sim, -np.inf)
      nearest = sim.argmax(1)
    idx = (hard_batch(rng, nearest, batch) if nearest is not None
           else rng.choice(len(images), batch, replace=False))
    params, state, loss = step(params, state, jax.random.fold_in(key, i + 1), jnp.asarray(idx))
    losses.append(float(loss))
  return params, losses


def save(out_dir: str, params: Any, config: CopyNetConfig, info: dict[str, Any],
         background: np.ndarray | None = None) -> None:
  """The descriptor folder; with `background` (and info["score_norm"]), normalised scores."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, PARAMS_FILE), "wb") as f:
    f.write(serialization.to_bytes(params))
  if background is not None:
    from sd3jax.dedup import score_norm
    score_norm.save_background(out_dir, background)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump({"config": dataclasses.asdict(config), **info}, f, indent=2)


def load(path: str) -> tuple[CopyNet, Any, dict[str, Any]]:
  """(module, params, saved info) from a folder written by `save`."""
  with open(os.path.join(path, CONFIG_FILE)) as f:
    meta = json.load(f)
  cfg = meta["config"]
  config = CopyNetConfig(**{**cfg, "widths": tuple(cfg["widths"])})
  model = CopyNet(config)
  template = model.init(jax.random.key(0), jnp.zeros((1, config.size, config.size, 3)))["params"]
  with open(os.path.join(path, PARAMS_FILE), "rb") as f:
    params = serialization.from_bytes(template, f.read())
  return model, params, meta


def calibrate(model: CopyNet, params: Any, images: np.ndarray, seed: int = 0,
              background: np.ndarray | None = None, norm: dict[str, Any] | None = None
              ) -> dict[str, float]:
  """A copy threshold from the images themselves: each image against an edited copy of
  itself (shift, crop, colour, JPEG: edits training never made) and against its nearest
  other image; the threshold is the midpoint of the best-separating interval. With a
  `background` the scores are normalised (score_norm.py, settings `norm`)."""
  from sd3jax.dedup import score_norm
  from sd3jax.dedup.descriptors import prepare
  from sd3jax.dedup.shapes_duplicates import near_copy
  rng = np.random.default_rng([seed, 3])
  copies = np.stack([prepare(near_copy(im, rng)[0], images.shape[1]) for im in images])
  z = _embed_pool(model, params, jnp.asarray(images))
  zc = _embed_pool(model, params, jnp.asarray(copies))
  same = np.einsum("nd,nd->n", z, zc)
  sim = z @ z.T
  if background is not None:
    norm = norm or score_norm.settings(background)
    nz, nc = (score_norm.background_similarity(v, background, norm["neighbours"])
              for v in (z, zc))
    same = score_norm.adjust(same, nz, nc, norm["beta"])
    sim = score_norm.adjust(sim, nz[:, None], nz[None, :], norm["beta"])
  np.fill_diagonal(sim, -np.inf)
  other = sim.max(1)
  grid = np.unique(np.concatenate([same, other]))
  errors = [(np.sum(same < t) + np.sum(other >= t), t) for t in grid]
  best = min(errors)[0]
  ties = [t for e, t in errors if e == best]
  threshold = float((min(ties) + max(ties)) / 2)
  return {"threshold": threshold, "calibration_errors": int(best),
          "calibration_images": int(len(images)),
          "copy_similarity_p5": float(np.quantile(same, 0.05)),
          "nearest_other_p95": float(np.quantile(other, 0.95))}


def train_on_source(source, out_dir: str, *, steps: int = 600, max_images: int = 8192,
                    calibration_images: int = 1024, seed: int = 0, progress: bool = True,
                    config: CopyNetConfig = CopyNetConfig()) -> dict[str, Any]:
  """`sd3jax dedup train`: a CopyNet on (a sample of) a source's images, calibrated on
  held-out ones, saved to out_dir (a --descriptor folder) with its training images'
  descriptors as the score-normalisation background."""
  from sd3jax.dedup import score_norm
  from sd3jax.dedup.descriptors import prepare
  rng = np.random.default_rng(seed)
  n = len(source)
  calibration_images = min(calibration_images, n // 5)  # small sources: a fifth held out
  picks = rng.permutation(n)[:min(n, max_images + calibration_images)]
  images = np.stack([prepare(source[int(i)]["image"], config.size)
                     for i in tqdm(picks, desc="read images", disable=not progress)])
  held, train_images = images[:calibration_images], images[calibration_images:]
  if len(train_images) < 256:
    raise DedupError(f"the source has {n} images; training a descriptor needs at least 320 "
                     "(256 to train on, a fifth held out to calibrate the threshold).")
  params, losses = train(train_images, config=config, steps=steps, seed=seed,
                         progress=progress)
  # The score-normalisation background: the training images (none is held out).
  background = _embed_pool(CopyNet(config), params, jnp.asarray(train_images))
  norm = score_norm.settings(background)
  cal = calibrate(CopyNet(config), params, held, seed, background, norm)
  info = {"trained_on": f"{len(train_images)} images of {n}", "steps": steps,
          "final_loss": losses[-1], "score_norm": norm, **cal}
  save(out_dir, params, config, info, background)
  return {"out": out_dir, **info}
