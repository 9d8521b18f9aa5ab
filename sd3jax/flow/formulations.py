"""The formulations of the SD3 paper's study (rf, eps/linear, v/cosine, EDM) and the training loss.

Each is a forward process z_t = a(t) x0 + b(t) eps with its network target, loss weight and the
conversion of a network output back to (x0, eps), plus its clock in the straight frame
s = b / (a + b) (see sd3jax.flow) that the samplers step in.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

from sd3jax.flow.timesteps import Density, _f32, get_density, shift_time

Array = jax.Array


def _bcast(c: Array, x: Array) -> Array:
  """Per-example coefficients of shape (B,) (or scalars) against x of shape (B, ...)."""
  c = _f32(c)
  return c.reshape(c.shape + (1,) * (jnp.ndim(x) - c.ndim))


# ------------------------------------------------------------------------------------------------
# Formulations.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Formulation:
  """z_t = a(t) x0 + b(t) eps, a target, a weight, and output -> (x0, eps) conversions.

  Subclasses define `ab`, the straight-frame clock (`s_from_t`, `t_from_s`, `ab_from_s`), the
  parameterisation (`_split`: output -> (x0, eps); `_target`) and `s_max`, the largest frame noise
  level the sampler starts from. Frozen dataclasses, so they can be static jit arguments.
  """

  name = "base"

  # -- to be defined by each formulation -----------------------------------------------------
  def ab(self, t) -> tuple[Array, Array]:
    raise NotImplementedError

  def t_from_s(self, s) -> Array:
    raise NotImplementedError

  def ab_from_s(self, s) -> tuple[Array, Array]:
    """(a, b) at frame noise level s; overridden where going through t would lose precision."""
    return self.ab(self.t_from_s(s))

  def _split(self, out: Array, z: Array, a: Array, b: Array) -> tuple[Array, Array]:
    raise NotImplementedError

  def _target(self, x0: Array, eps: Array, a: Array, b: Array) -> Array:
    raise NotImplementedError

  @property
  def s_max(self) -> float:
    return 1.0

  # -- shared -------------------------------------------------------------------------------------
  def s_from_t(self, t) -> Array:
    a, b = self.ab(t)
    return b / (a + b)

  def noisy(self, x0: Array, eps: Array, t) -> Array:
    a, b = self.ab(t)
    return _bcast(a, x0) * _f32(x0) + _bcast(b, x0) * _f32(eps)

  def target(self, x0: Array, eps: Array, t) -> Array:
    a, b = self.ab(t)
    return self._target(_f32(x0), _f32(eps), _bcast(a, x0), _bcast(b, x0))

  def loss_weight(self, t) -> Array:
    """Every formulation of the study trains unweighted on its own target (see `paper_weight`)."""
    return jnp.ones_like(_f32(t))

  def to_x0(self, out: Array, z: Array, t) -> Array:
    a, b = self.ab(t)
    return self._split(_f32(out), _f32(z), _bcast(a, z), _bcast(b, z))[0]

  def to_eps(self, out: Array, z: Array, t) -> Array:
    a, b = self.ab(t)
    return self._split(_f32(out), _f32(z), _bcast(a, z), _bcast(b, z))[1]

  def velocity(self, out: Array, z: Array, t) -> Array:
    """dz/dt in this formulation's own time: a'(t) x0_hat + b'(t) eps_hat (the paper's u_t).

    Unbounded where a' or b' is (EDM at t in {0, 1}, eps_linear's b' ~ 1/sqrt(t) at 0); the
    samplers therefore step in the straight frame instead.
    """
    t = _f32(t)
    (a, b), (da, db) = jax.jvp(self.ab, (t,), (jnp.ones_like(t),))
    x0, eps = self._split(_f32(out), _f32(z), _bcast(a, z), _bcast(b, z))
    return _bcast(da, z) * x0 + _bcast(db, z) * eps

  def shift(self, t, shift) -> Array:
    """The resolution shift in this formulation's clock: shift_time acts on the frame level s."""
    return self.t_from_s(shift_time(self.s_from_t(t), shift))

  def paper_weight(self, t) -> Array:
    """w_t of the paper's unified loss -1/2 w_t lambda'_t ||eps_hat - eps||^2 (section 2).

    Our loss is loss_weight * ||out - target||^2; out - target = (eps_hat - eps) / beta where
    beta = d eps_hat / d out. rf gives t / (1 - t), v_cosine exp(-lambda / 2) and edm
    N(lambda; -2 P_m, (2 P_s)^2) (exp(-lambda) + sigma_data^2), up to constant factors.
    """
    t = _f32(t)
    lam = lambda t: 2.0 * (jnp.log(self.ab(t)[0]) - jnp.log(self.ab(t)[1]))
    _, dlam = jax.jvp(lam, (t,), (jnp.ones_like(t),))
    a, b = self.ab(t)
    beta = self._split(jnp.ones_like(t), jnp.zeros_like(t), a, b)[1]
    return self.loss_weight(t) / (beta**2 * (-0.5 * dlam))

  # Straight-frame pieces used by the samplers.
  def _to_z(self, x: Array, a: Array, b: Array) -> Array:
    return (a + b) * x

  def _frame_velocity(self, out: Array, z: Array, a: Array, b: Array) -> Array:
    x0, eps = self._split(out, z, a, b)
    return eps - x0


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Formulation):
  """z_t = (1 - t) x0 + t eps; the network predicts v = eps - x0 (the paper's default).

  With unit weight this is conditional flow matching, w_t = t / (1 - t) in the paper's terms;
  the density of t (logit-normal, mode, cosmap, ...) is the rest of the recipe.
  """
  name = "rf"

  def ab(self, t):
    t = _f32(t)
    return 1.0 - t, t

  def s_from_t(self, t):
    return _f32(t)

  def t_from_s(self, s):
    return _f32(s)

  def ab_from_s(self, s):
    return self.ab(s)

  def _split(self, out, z, a, b):
    return z - b * out, z + a * out  # a + b == 1

  def _target(self, x0, eps, a, b):
    return eps - x0

  def velocity(self, out, z, t):
    return _f32(out)

  def shift(self, t, shift):
    return shift_time(_f32(t), shift)

  def _to_z(self, x, a, b):
    return x

  def _frame_velocity(self, out, z, a, b):
    return out


def _vp_ab_from_s(s) -> tuple[Array, Array]:
  """a^2 + b^2 = 1 and b / (a + b) = s, computed without going through t."""
  s = _f32(s)
  n = jnp.sqrt((1.0 - s) ** 2 + s**2)
  return (1.0 - s) / n, s / n


@dataclasses.dataclass(frozen=True)
class EpsLinear(Formulation):
  """LDM's variance-preserving "scaled linear" schedule in continuous time, eps-prediction.

  LDM: beta_k = (sqrt(beta_start) + k / (T - 1) (sqrt(beta_end) - sqrt(beta_start)))^2 and
  a_k^2 = prod_{j <= k} (1 - beta_j). Continuous limit (T -> inf at fixed T beta(t)):
  log a(t)^2 = -T int_0^t beta(u) du, a cubic in t, with a(0) = 1, b(0) = 0 and
  a(1)^2 = 0.0048 (the discrete a_999^2 is 0.0047). b = sqrt(1 - a^2). LDM's step k is
  t = (k + 1) / T here (a within 1e-3 of the discrete schedule). Loss: unweighted
  ||eps_hat - eps||^2, t ~ uniform. Its noise end is not pure noise (a(1) = 0.069): sampling
  starts from z_1 = b(1) eps, ignoring a(1) x0 as LDM does.
  """
  beta_start: float = 0.00085
  beta_end: float = 0.012
  num_timesteps: int = 1000
  name = "eps_linear"

  def _coeffs(self):
    c0 = math.sqrt(self.beta_start)
    return c0, math.sqrt(self.beta_end) - c0

  def _log_alpha_bar(self, t):
    c0, d = self._coeffs()
    t = _f32(t)
    return -self.num_timesteps * t * (3 * c0**2 + 3 * c0 * d * t + d**2 * t**2) / 3.0

  def ab(self, t):
    la = self._log_alpha_bar(t)
    return jnp.exp(0.5 * la), jnp.sqrt(-jnp.expm1(la))

  @property
  def s_max(self) -> float:
    c0, d = self._coeffs()
    la = -self.num_timesteps * (3 * c0**2 + 3 * c0 * d + d**2) / 3.0
    a, b = math.exp(0.5 * la), math.sqrt(-math.expm1(la))
    return b / (a + b)

  def t_from_s(self, s):
    c0, d = self._coeffs()
    s = jnp.minimum(_f32(s), self.s_max)
    la = 2.0 * jnp.log1p(-s) - jnp.log1p(-2.0 * s * (1.0 - s))  # log a^2 at a/b = (1-s)/s
    delta = -3.0 * d * la / self.num_timesteps                  # (c0 + d t)^3 - c0^3
    root = jnp.cbrt(c0**3 + delta)
    return jnp.clip(delta / (root**2 + root * c0 + c0**2) / d, 0.0, 1.0)

  def ab_from_s(self, s):
    return _vp_ab_from_s(s)

  def _split(self, out, z, a, b):
    return (z - b * out) / a, out

  def _target(self, x0, eps, a, b):
    return eps


@dataclasses.dataclass(frozen=True)
class VCosine(Formulation):
  """a = cos(pi t / 2), b = sin(pi t / 2) (Nichol & Dhariwal), v-prediction v = a eps - b x0.

  Unweighted v-loss, i.e. w_t = exp(-lambda_t / 2) in the paper; t ~ uniform. Its frame clock
  s(t) = b / (a + b) is exactly the CosMap map, so rf/cosmap shares its noise levels.
  """
  name = "v_cosine"

  def ab(self, t):
    t = _f32(t)
    return jnp.sin(0.5 * jnp.pi * (1.0 - t)), jnp.sin(0.5 * jnp.pi * t)  # a(1) == 0 exactly

  def t_from_s(self, s):
    s = _f32(s)
    return jnp.arctan2(s, 1.0 - s) * (2.0 / jnp.pi)

  def ab_from_s(self, s):
    return _vp_ab_from_s(s)

  def _split(self, out, z, a, b):
    return a * z - b * out, b * z + a * out

  def _target(self, x0, eps, a, b):
    return a * eps - b * x0


@dataclasses.dataclass(frozen=True)
class EDM(Formulation):
  """Karras et al. 2022 as in the paper: sigma(t) = exp(F_N^-1(t; P_m, P_s^2)), F-prediction.

  With t ~ uniform, log sigma ~ N(P_m, P_s^2), EDM's training distribution. The network sees EDM's
  preconditioned input c_in (x0 + sigma eps), so here a = c_in = 1 / sqrt(sigma^2 + sigma_d^2) and
  b = sigma c_in (the paper's z_t = x0 + sigma eps scaled by c_in: the same flow, unit-variance
  input). Output F: x0_hat = c_skip z_edm + c_out F = sigma_d^2 a z + sigma_d b F. EDM's
  lambda(sigma) c_out^2 = 1 makes the F-loss unweighted. Every coefficient is finite at t = 0
  (sigma = 0) and t = 1 (sigma = inf), so the sampler starts from pure noise at s = 1.
  """
  p_mean: float = -1.2
  p_std: float = 1.2
  sigma_data: float = 0.5
  name = "edm"

  def _log_sigma(self, t):
    return self.p_mean + self.p_std * ndtri(_f32(t))

  def ab(self, t):
    sigma = jnp.exp(self._log_sigma(t))
    a = jax.lax.rsqrt(sigma**2 + self.sigma_data**2)
    b = jax.lax.rsqrt(1.0 + (self.sigma_data / sigma) ** 2)
    return a, b

  def s_from_t(self, t):
    return jax.nn.sigmoid(self._log_sigma(t))  # sigma / (1 + sigma)

  def t_from_s(self, s):
    s = _f32(s)
    return ndtr((jnp.log(s) - jnp.log1p(-s) - self.p_mean) / self.p_std)

  def ab_from_s(self, s):
    s = _f32(s)
    n = jnp.sqrt(s**2 + (self.sigma_data * (1.0 - s)) ** 2)
    return (1.0 - s) / n, s / n

  def _split(self, out, z, a, b):
    sd = self.sigma_data
    return sd**2 * a * z + sd * b * out, b * z - sd * a * out  # uses 1 - sd^2 a^2 == b^2

  def _target(self, x0, eps, a, b):
    sd = self.sigma_data
    return b * x0 / sd - sd * a * eps


FORMULATIONS = {"rf": RectifiedFlow, "eps_linear": EpsLinear, "v_cosine": VCosine, "edm": EDM}


def get_formulation(name: str | Formulation = "rf", **kwargs) -> Formulation:
  """rf | eps_linear | v_cosine | edm (kwargs: the dataclass fields, e.g. p_mean for edm)."""
  if isinstance(name, Formulation):
    return name
  if name not in FORMULATIONS:
    raise ValueError(f"Unknown formulation {name!r}; choose one of {sorted(FORMULATIONS)}.")
  return FORMULATIONS[name](**kwargs)


# ------------------------------------------------------------------------------------------------
# Training.
# ------------------------------------------------------------------------------------------------
def training_inputs(rng: Array, x0: Array, formulation: str | Formulation = "rf",
                    density: str | Density = "logit_normal",
                    shift: float = 1.0) -> tuple[Array, Array, Array, Array]:
  """(z_t, t, target, weight) for a batch x0: eps ~ N(0, I), t ~ density, then shifted.

  t is this formulation's own time in [0, 1], the value the network is called with. The shift is
  applied here and only here (in the formulation's clock, see Formulation.shift).
  """
  f, d = get_formulation(formulation), get_density(density)
  rng_t, rng_eps = jax.random.split(rng)
  eps = jax.random.normal(rng_eps, x0.shape, jnp.float32)
  t = d.sample(rng_t, (x0.shape[0],))
  if not (isinstance(shift, (int, float)) and shift == 1):
    t = f.shift(t, shift)
  return f.noisy(x0, eps, t), t, f.target(x0, eps, t), f.loss_weight(t)


def loss(pred: Array, target: Array, weight: Array) -> Array:
  """mean_b weight_b * mean_pixels (pred - target)^2, in float32 whatever the compute dtype."""
  err = (pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
  per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  return jnp.mean(_f32(weight) * per_example)
