"""Pair verification: is a candidate pair one picture under a crop, shift and colour edit?

A global descriptor scores whole images, so two scenes that differ in one small region
(one object's shape) can sit as close as a picture and its cropped, re-encoded copy. That
is the descriptor's blind spot on the dedup demo (README, "Deduplication"). Copy-detection
systems therefore verify the descriptor's candidates with the pixels. This is that step,
after the descriptor's kNN and before the clusters:

  1. Both images are resized to `size` x `size`.
  2. Alignment. The edits that make a near copy are, to first order, an axis-aligned affine
     map of the pixel grid (crop + resize, shift; scale per axis and translation) and a
     global colour map. The colour family is alpha * x + beta * luma(x) + gamma: brightness,
     contrast and saturation edits all lie in it (PIL's definitions), and it is closed under
     composition. alpha > 0, so it cannot swap hues. The geometric parameters are fitted by
     damped Gauss-Newton (Lucas-Kanade) on a coarse-to-fine pyramid of area-downsampled
     images, started from a few scales with the translation from FFT cross-correlation.
     At every step the colour map is solved in closed form (weighted least squares), and
     the best start wins.
  3. The score is local, in the spirit of the tiled L2 distance of Carlini et al. 2023
     ("Extracting training data from diffusion models"). It is the RMS colour residual in
     the worst `window` x `window` window of the overlap, so a distinct scene differs
     somewhere by a whole object part, whereas a copy differs everywhere by a little
     (resampling, JPEG). The residual is smoothed first, its chroma more than its luma
     (JPEG stores chroma at half resolution), and chroma counts half as much as luma:
     JPEG's standard chroma quantisation steps are 1-4x the luma's, so a re-encoded copy
     errs more there (weight and window were chosen on the dedup demo's development sets).
     Windows with less than half their pixels in the overlap are not scored, and neither
     are pairs whose overlap is below `min_overlap` of either frame: no copy edit hides
     that much of a picture.

Lower scores mean more alike. A pair is a duplicate when its descriptor score reaches the
candidate threshold and its verification score is at most `threshold`. Everything runs
in JAX, batched over pairs (vmap), so it compiles once per image size.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

LUMA = (0.299, 0.587, 0.114)  # PIL's "L" conversion: what its colour and contrast edits use
# JPEG's colour space (ITU-R BT.601, full range): luma and two colour differences.
YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
# The maps searched, (sy, sx, ty, tx) in frame units: crops down to 80% of a side either way.
LOWER = np.array([0.8, 0.8, -0.25, -0.25], np.float32)
UPPER = np.array([1.25, 1.25, 0.25, 0.25], np.float32)


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
  size: int = 64                  # both images resized to size x size
  window: int = 6                 # side of the scored windows, pixels at `size` (a corner's size)
  scales: Sequence[float] = (0.94, 1.0, 1.06)  # starting scales (crops of 85-100% converge)
  max_shift: int = 10             # translation searched by cross-correlation, pixels at `size`
  levels: Sequence[int] = (4, 2, 1)  # the pyramid: downsampling factor per level, coarse first
  iterations: int = 6             # Gauss-Newton steps per level
  smooth: int = 1                 # 3x3 binomial passes over the residual before it is scored
  chroma_smooth: int = 2          # extra passes over its chroma (JPEG stores chroma at half size)
  chroma_weight: float = 0.5      # chroma's weight against luma's (JPEG quantises it more coarsely)
  margin: int = 2                 # pixels at the frame's edge left out (edge padding, resampling)
  min_overlap: float = 0.7        # below this overlap of either frame, a pair is no copy


def _downsample(x: jax.Array, factor: int) -> jax.Array:
  """Area average of [H, W, C] by an integer factor."""
  if factor == 1:
    return x
  h, w, c = x.shape
  return x.reshape(h // factor, factor, w // factor, factor, c).mean((1, 3))


def _gradients(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Central differences along y and x of [H, W, C] (one-sided at the edges), per pixel."""
  return jnp.gradient(x, axis=0), jnp.gradient(x, axis=1)


def _coords(theta: jax.Array, s: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """b's pixel coordinates of a's pixels at grid size s, and a's normalised coordinates.

  Coordinates are normalised to the frame, u = (pixel + 0.5) / s - 0.5, so one theta
  (sy, sx, ty, tx) means the same map at every pyramid level: u_b = s u_a + t."""
  u = (jnp.arange(s, dtype=theta.dtype) + 0.5) / s - 0.5
  uy, ux = jnp.meshgrid(u, u, indexing="ij")
  yb = (theta[0] * uy + theta[2] + 0.5) * s - 0.5
  xb = (theta[1] * ux + theta[3] + 0.5) * s - 0.5
  return yb, xb, uy, ux


def _bilinear(img: jax.Array, yb: jax.Array, xb: jax.Array) -> tuple[jax.Array, jax.Array]:
  """img [S, S, C] sampled at (yb, xb), clamped at the edges; (values, inside the image)."""
  s = img.shape[0]
  inside = ((yb >= -0.5) & (yb <= s - 0.5) & (xb >= -0.5) & (xb <= s - 0.5)).astype(img.dtype)
  yc, xc = jnp.clip(yb, 0, s - 1), jnp.clip(xb, 0, s - 1)
  y0, x0 = jnp.minimum(jnp.floor(yc), s - 2), jnp.minimum(jnp.floor(xc), s - 2)
  fy, fx = (yc - y0)[..., None], (xc - x0)[..., None]
  flat = img.reshape(s * s, -1)
  i00 = (y0 * s + x0).astype(jnp.int32)
  v00, v01 = flat[i00], flat[i00 + 1]
  v10, v11 = flat[i00 + s], flat[i00 + s + 1]
  top = v00 + fx * (v01 - v00)
  bottom = v10 + fx * (v11 - v10)
  return top + fy * (bottom - top), inside


def _colour_map(a: jax.Array, wb: jax.Array, w: jax.Array) -> jax.Array:
  """(alpha, beta, gamma) of alpha * x + beta * luma(x) + gamma taking wb onto a, weighted by w."""
  luma = wb @ jnp.asarray(LUMA, wb.dtype)
  design = jnp.stack([wb, jnp.broadcast_to(luma[..., None], wb.shape), jnp.ones_like(wb)], -1)
  weighted = design * w[..., None, None]
  # A weak pull towards the identity map keeps flat images (no contrast to fit) defined.
  ridge = 1e-3 * jnp.maximum(jnp.sum(w), 1.0)
  gram = jnp.einsum("hwcp,hwcq->pq", weighted, design) + ridge * jnp.eye(3, dtype=wb.dtype)
  rhs = jnp.einsum("hwcp,hwc->p", weighted, a) + ridge * jnp.asarray([1.0, 0.0, 0.0], wb.dtype)
  alpha, beta, gamma = jnp.linalg.solve(gram, rhs)
  # A colour edit keeps the order of hues: alpha > 0 (brightness x contrast x saturation).
  return jnp.stack([jnp.clip(alpha, 0.5, 2.0), beta, gamma])


def _apply_colour(colour: jax.Array, x: jax.Array) -> jax.Array:
  luma = x @ jnp.asarray(LUMA, x.dtype)
  return colour[0] * x + colour[1] * luma[..., None] + colour[2]


def _residual(theta: jax.Array, a: jax.Array, b: jax.Array, frame: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """(a minus b aligned by theta and colour-mapped, per pixel [S, S, 3]; weights [S, S])."""
  yb, xb, _, _ = _coords(theta, a.shape[0])
  wb, inside = _bilinear(b, yb, xb)
  w = inside * frame
  return (a - _apply_colour(_colour_map(a, wb, w), wb)) * w[..., None], w


def _gauss_newton(theta: jax.Array, a: jax.Array, b: jax.Array, frame: jax.Array,
                  iterations: int) -> jax.Array:
  """Lucas-Kanade: theta refined by damped Gauss-Newton steps on the colour-mapped residual."""
  s = a.shape[0]
  gy, gx = _gradients(b)
  stacked = jnp.concatenate([b, gy, gx], -1)

  def step(t, _):
    yb, xb, uy, ux = _coords(t, s)
    sampled, inside = _bilinear(stacked, yb, xb)
    wb, dy, dx = jnp.split(sampled, 3, -1)
    w = inside * frame
    colour = _colour_map(a, wb, w)
    r = (a - _apply_colour(colour, wb)) * w[..., None]
    # d(b(coords)) / d theta, in pixels of this level per unit of theta, through the
    # colour map's linear part.
    partial = [dy * (s * uy)[..., None], dx * (s * ux)[..., None], dy * s, dx * s]
    jac = jnp.stack([_apply_colour(colour.at[2].set(0.0), p) * w[..., None] for p in partial],
                    -1).reshape(-1, 4)
    jtj = jac.T @ jac
    damping = 1e-2 * jnp.diag(jnp.diag(jtj)) + (1e-6 + 1e-6 * jnp.trace(jtj)) * jnp.eye(4)
    delta = jnp.linalg.solve(jtj + damping, jac.T @ r.reshape(-1))
    return jnp.clip(t + jnp.clip(delta, -0.05, 0.05), LOWER, UPPER), None

  return jax.lax.scan(step, theta, None, length=iterations)[0]


def _shift_init(a: jax.Array, wb: jax.Array, max_shift: int) -> jax.Array:
  """Integer (dy, dx) maximising the cross-correlation of a(p) with wb(p - d)."""
  def grey(x):
    g = x @ jnp.asarray(LUMA, x.dtype)
    return g - g.mean()
  corr = jnp.real(jnp.fft.ifft2(jnp.fft.fft2(grey(a)) * jnp.conj(jnp.fft.fft2(grey(wb)))))
  s = a.shape[0]
  d = jnp.arange(s)
  d = jnp.where(d > s // 2, d - s, d)
  ok = (jnp.abs(d)[:, None] <= max_shift) & (jnp.abs(d)[None, :] <= max_shift)
  best = jnp.argmax(jnp.where(ok, corr, -jnp.inf))
  return jnp.stack([d[best // s], d[best % s]]).astype(a.dtype)


def _smooth(r: jax.Array, passes: int) -> jax.Array:
  """`passes` 3x3 binomial filters over [H, W, C] (zero outside): JPEG's ringing averages out,
  a missing or extra object part does not."""
  for _ in range(passes):
    p = jnp.pad(r, ((1, 1), (1, 1), (0, 0)))
    p = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    r = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
  return r


def _window_score(r: jax.Array, w: jax.Array, window: int) -> jax.Array:
  """RMS residual of the worst window with at least half its pixels weighted."""
  def box(x):
    c = jnp.cumsum(jnp.cumsum(jnp.pad(x, ((1, 0), (1, 0))), 0), 1)
    return (c[window:, window:] - c[:-window, window:] - c[window:, :-window]
            + c[:-window, :-window])
  err, area = box(jnp.sum(r ** 2, -1)), box(w)
  rms = jnp.sqrt(jnp.maximum(err, 0.0) / jnp.maximum(area, 1.0))
  return jnp.max(jnp.where(area >= window * window / 2, rms, 0.0))


@functools.partial(jax.jit, static_argnums=2)
def _verify_batch(a: jax.Array, b: jax.Array, cfg: VerifyConfig) -> dict[str, jax.Array]:
  """a, b: float32 [P, S, S, 3] in [0, 1] -> per pair score, overlap and the fitted theta."""
  s = cfg.size
  frames = []
  for f in cfg.levels:
    m = np.zeros((s, s), np.float32)
    m[cfg.margin:s - cfg.margin, cfg.margin:s - cfg.margin] = 1.0
    frames.append(jnp.asarray(m.reshape(s // f, f, s // f, f).min((1, 3))))

  def one(a1, b1):
    pyramid = [(_downsample(a1, f), _downsample(b1, f)) for f in cfg.levels]
    a0, b0 = pyramid[0]

    def fit(scale):
      theta = jnp.stack([scale, scale, 0.0, 0.0])
      yb, xb, _, _ = _coords(theta, a0.shape[0])
      d = _shift_init(a0, _bilinear(b0, yb, xb)[0], -(-cfg.max_shift // cfg.levels[0]))
      # a(p) ~ wb(p - d): b's coordinates move by -scale * d (normalised units).
      theta = jnp.stack([scale, scale, -scale * d[0] / a0.shape[0],
                         -scale * d[1] / a0.shape[0]])
      for (al, bl), frame in zip(pyramid, frames):
        theta = _gauss_newton(theta, al, bl, frame, cfg.iterations)
      r, w = _residual(theta, a1, b1, frames[-1])
      return theta, jnp.sum(r ** 2) / jnp.maximum(jnp.sum(w), 1.0), r, w

    thetas, losses, rs, ws = jax.vmap(fit)(jnp.asarray(cfg.scales, jnp.float32))
    k = jnp.argmin(losses)
    r, w = rs[k], ws[k]
    # Of a's frame, and of b's: a's frame covers sy * sx of b's area (less outside it).
    covered = jnp.sum(w) / jnp.sum(frames[-1])
    overlap = jnp.minimum(covered, covered * thetas[k][0] * thetas[k][1])
    r = r @ jnp.asarray(YCBCR, r.dtype).T
    r = jnp.concatenate([r[..., :1], cfg.chroma_weight * _smooth(r[..., 1:], cfg.chroma_smooth)],
                        -1)
    score = jnp.where(overlap >= cfg.min_overlap,
                      _window_score(_smooth(r, cfg.smooth), w, cfg.window), jnp.inf)
    return {"score": score, "overlap": overlap, "theta": thetas[k]}

  return jax.vmap(one)(a, b)


def verify_images(a: np.ndarray, b: np.ndarray, cfg: VerifyConfig = VerifyConfig()
                  ) -> dict[str, np.ndarray]:
  """Scores pairs of uint8 [P, size, size, 3] images (a[p] against b[p])."""
  out = _verify_batch(jnp.asarray(a, jnp.float32) / 255.0, jnp.asarray(b, jnp.float32) / 255.0,
                      cfg)
  return {k: np.asarray(v) for k, v in out.items()}


def verify_pairs(source, i: np.ndarray, j: np.ndarray, cfg: VerifyConfig = VerifyConfig(), *,
                 batch: int = 64, progress: bool = True) -> np.ndarray:
  """float32 [P]: the verification score of every pair (source[i[p]], source[j[p]])."""
  from sd3jax.dedup.descriptors import prepare
  scores = np.zeros(len(i), np.float32)
  cache: dict[int, np.ndarray] = {}

  def image(k: int) -> np.ndarray:
    if k not in cache:
      cache[k] = prepare(source[k]["image"], cfg.size)
    return cache[k]

  for lo in tqdm(range(0, len(i), batch), desc="dedup verify", unit="batch",
                 disable=not progress):
    hi = min(lo + batch, len(i))
    a = np.stack([image(int(k)) for k in i[lo:hi]])
    b = np.stack([image(int(k)) for k in j[lo:hi]])
    pad = batch - len(a)  # one compiled shape for every batch
    if pad:
      a, b = np.pad(a, ((0, pad), (0, 0), (0, 0), (0, 0))), np.pad(b, ((0, pad), (0, 0), (0, 0),
                                                                    (0, 0)))
    scores[lo:hi] = verify_images(a, b, cfg)["score"][:hi - lo]
  return scores


def config_dict(cfg: VerifyConfig) -> dict[str, Any]:
  """The settings as JSON stores them (stored with a descriptor; config_from_dict reverses)."""
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(d: dict[str, Any]) -> VerifyConfig:
  """A VerifyConfig from config_dict's output (lists back to tuples: the config is hashed).

  Settings stored before `chroma_weight` existed scored chroma at full weight, and their
  stored threshold was measured so: they keep 1.0, not today's default."""
  d = {"chroma_weight": 1.0, **d}
  return VerifyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
