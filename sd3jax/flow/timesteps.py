"""The SD3 paper's timestep densities (uniform, logit-normal, mode, CosMap) and resolution shift.

Each density samples t in (0, 1) through its inverse CDF (or an equivalent transform) and has an
analytic pdf / cdf, so it can be checked against its samples and plotted like the paper's figure.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import ndtr, ndtri

Array = jax.Array

# Sampled t is kept inside [T_EPS, 1 - T_EPS]: the densities are defined on the open interval.
T_EPS = 1e-6


def _f32(x) -> Array:
  return jnp.asarray(x, jnp.float32)


def _like(result: Array, t) -> Any:
  """numpy in, numpy out: pdf / cdf serve plotting and scipy as well as traced code."""
  return result if isinstance(t, jax.Array) else np.asarray(result)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted(obj, method: str, *args):
  """One compiled call instead of dozens of eagerly dispatched ops (plots, scipy, tests)."""
  return getattr(obj, method)(*args)


# ------------------------------------------------------------------------------------------------
# Shift.
# ------------------------------------------------------------------------------------------------
def shift_time(t, shift):
  """t -> a t / (1 + (a - 1) t): multiplies the noise-to-signal ratio t / (1 - t) by `shift`.

  The paper's resolution shift (section 5.3.2); shift_time(., 1 / a) is its inverse.
  Works on Python floats, numpy and jax arrays alike.
  """
  return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_pixels: float, base_pixels: float = 256 * 256) -> float:
  """a = sqrt(m / n): keeps the noise per image at the base resolution's level.

  The paper derives the rule from pixel counts and then picks 3.0 at 1024^2 by human preference
  (the rule gives 4.0 there); pass the shift explicitly to follow the paper's choice.
  """
  return math.sqrt(num_pixels / base_pixels)


# ------------------------------------------------------------------------------------------------
# Timestep densities.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Density:
  """A density of t on (0, 1): `ppf` maps u ~ U(0, 1) to t; pdf and cdf are analytic."""
  name = "base"

  def ppf(self, u) -> Array:
    raise NotImplementedError

  def _pdf(self, t: Array) -> Array:
    raise NotImplementedError

  def _cdf(self, t: Array) -> Array:
    raise NotImplementedError

  def pdf(self, t):
    return _like(_jitted(self, "_pdf", _f32(t)), t)

  def cdf(self, t):
    return _like(_jitted(self, "_cdf", _f32(t)), t)

  def sample(self, rng: Array, shape: tuple[int, ...]) -> Array:
    u = jax.random.uniform(rng, shape, jnp.float32)
    return jnp.clip(self.ppf(u), T_EPS, 1.0 - T_EPS)


@dataclasses.dataclass(frozen=True)
class Uniform(Density):
  name = "uniform"

  def ppf(self, u):
    return _f32(u)

  def _pdf(self, t):
    return jnp.where((t >= 0) & (t <= 1), 1.0, 0.0)

  def _cdf(self, t):
    return jnp.clip(t, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class LogitNormal(Density):
  """t = sigmoid(n), n ~ N(m, s^2) (section 3.1); lognorm(0, 1) is its best rf setting."""
  m: float = 0.0
  s: float = 1.0
  name = "logit_normal"

  def ppf(self, u):
    return jax.nn.sigmoid(self.m + self.s * ndtri(_f32(u)))

  def sample(self, rng, shape):
    n = self.m + self.s * jax.random.normal(rng, shape, jnp.float32)
    return jnp.clip(jax.nn.sigmoid(n), T_EPS, 1.0 - T_EPS)

  def _pdf(self, t):
    inside = (t > 0) & (t < 1)
    t = jnp.where(inside, t, 0.5)
    n = (jnp.log(t) - jnp.log1p(-t) - self.m) / self.s
    p = jnp.exp(-0.5 * n**2) / (self.s * math.sqrt(2 * math.pi) * t * (1 - t))
    return jnp.where(inside, p, 0.0)

  def _cdf(self, t):
    t = jnp.clip(t, 0.0, 1.0)
    return ndtr((jnp.log(t) - jnp.log1p(-t) - self.m) / self.s)


@dataclasses.dataclass(frozen=True)
class Mode(Density):
  """t = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1) (section 3.1).

  s > 0 puts mass in the middle, s < 0 at the ends; f is monotone for -1 <= s <= 2 / (pi - 2).
  f has no closed-form inverse: cdf(t) = 1 - f^-1(t) by bisection (exact to float32).
  """
  s: float = 1.29
  name = "mode"

  def __post_init__(self):
    if not -1.0 <= self.s <= 2.0 / (math.pi - 2.0):
      raise ValueError(
          f"mode scale s={self.s} must lie in [-1, 2 / (pi - 2)] for f to be monotone.")

  def _f(self, u):
    return 1.0 - u - self.s * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)

  def _df(self, u):
    return -1.0 - self.s + 0.5 * jnp.pi * self.s * jnp.sin(jnp.pi * u)

  def _f_inv(self, t):
    def body(_, lohi):
      lo, hi = lohi
      mid = 0.5 * (lo + hi)
      right = self._f(mid) > t  # f decreases: the root lies right of mid
      return jnp.where(right, mid, lo), jnp.where(right, hi, mid)
    lo, hi = lax.fori_loop(0, 40, body, (jnp.zeros_like(t), jnp.ones_like(t)))
    return 0.5 * (lo + hi)

  def ppf(self, u):
    return self._f(1.0 - _f32(u))

  def _pdf(self, t):
    p = 1.0 / jnp.abs(self._df(self._f_inv(jnp.clip(t, 0.0, 1.0))))
    return jnp.where((t >= 0) & (t <= 1), p, 0.0)

  def _cdf(self, t):
    return 1.0 - self._f_inv(jnp.clip(t, 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class CosMap(Density):
  """t = 1 - 1 / (tan(pi u / 2) + 1): rf at the cosine schedule's noise levels (section 3.1)."""
  name = "cosmap"

  def ppf(self, u):
    u = _f32(u)
    sn, cs = jnp.sin(0.5 * jnp.pi * u), jnp.cos(0.5 * jnp.pi * u)
    return sn / (sn + cs)

  def _pdf(self, t):
    return jnp.where((t >= 0) & (t <= 1), 2.0 / (jnp.pi * (1.0 - 2.0 * t + 2.0 * t**2)), 0.0)

  def _cdf(self, t):
    t = jnp.clip(t, 0.0, 1.0)
    return jnp.arctan2(t, 1.0 - t) * (2.0 / jnp.pi)


@dataclasses.dataclass(frozen=True)
class Shifted(Density):
  """`base` pushed through shift_time(., shift): rf training's t at a shifted resolution."""
  base: Density = Uniform()
  shift: float = 1.0
  name = "shifted"

  def ppf(self, u):
    return shift_time(self.base.ppf(u), self.shift)

  def sample(self, rng, shape):
    return shift_time(self.base.sample(rng, shape), self.shift)

  def _pdf(self, t):
    inv = shift_time(t, 1.0 / self.shift)
    return self.base._pdf(inv) * (1.0 / self.shift) / (1.0 + (1.0 / self.shift - 1.0) * t) ** 2

  def _cdf(self, t):
    return self.base._cdf(shift_time(t, 1.0 / self.shift))


DENSITIES = {"uniform": Uniform, "logit_normal": LogitNormal, "mode": Mode, "cosmap": CosMap}


def get_density(name: str | Density = "logit_normal", **kwargs) -> Density:
  """uniform | logit_normal (m=0, s=1) | mode (s=1.29) | cosmap."""
  if isinstance(name, Density):
    return name
  if name not in DENSITIES:
    raise ValueError(f"Unknown density {name!r}; choose one of {sorted(DENSITIES)}.")
  return DENSITIES[name](**kwargs)


# ------------------------------------------------------------------------------------------------
# Plot.
# ------------------------------------------------------------------------------------------------
def plot_densities(path: str) -> str:
  """The paper's figure of the densities (logit-normal, mode, CosMap) plus the shift, as PNG."""
  from matplotlib.figure import Figure  # no pyplot: no global state, Agg through savefig

  t = np.linspace(1e-4, 1 - 1e-4, 1000, dtype=np.float32)
  panels = [
      ("logit-normal(m, s)", [(f"m={m:g}, s={s:g}", LogitNormal(m, s)) for m, s in
                               [(0.0, 1.0), (0.0, 0.5), (0.5, 0.6), (-0.5, 1.0), (1.0, 0.6)]]),
      ("mode(s)", [(f"s={s:g}", Mode(s)) for s in (-0.5, 0.0, 0.5, 1.0, 1.29, 1.75)]),
      ("CosMap / uniform", [("cosmap", CosMap()), ("uniform", Uniform())]),
      ("shift of logit-normal(0, 1)", [(f"shift={a:g}", Shifted(LogitNormal(), a))
                                       for a in (1.0, 2.0, 3.0, 4.0)]),
  ]
  fig = Figure(figsize=(16, 3.6), dpi=100)
  for i, (title, dens) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for label, d in dens:
      ax.plot(t, d.pdf(t), label=label)
    ax.set_title(title)
    ax.set_xlabel("t (0 = data, 1 = noise)")
    ax.set_ylim(0, 4)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path
