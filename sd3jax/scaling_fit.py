"""Compute frontier and power-law fits of scaling curves (numpy only; no JAX, no files).

`compute_frontier` keeps the points on the lower envelope of loss versus training FLOPs
across runs; `fit_power_law` fits L(C) = a C^-b + c to them in log space with a pairs
bootstrap for intervals; `fit_loss_vs_params_at_fixed_compute` reads every run at one
compute (an IsoFLOP slice). `sd3jax.scaling` reads runs into rows and plots; rows are
dicts with "run", "step", "flops", "val_loss", "params" and "params_non_embedding".
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

Row = dict[str, Any]
DEFAULT_BOOTSTRAP = 500


class ScalingError(ValueError):
  """Nothing to fit or plot; the message says what is missing and where."""


# =============================================================================================
# Frontier
# =============================================================================================

def usable_rows(rows: Sequence[Row], min_step: int = 1) -> list[Row]:
  return [r for r in rows if r["flops"] > 0 and r["step"] >= min_step
          and r["val_loss"] is not None and math.isfinite(r["val_loss"]) and r["val_loss"] > 0]


def _curves(rows: Sequence[Row]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per run: (log FLOPs, log loss), sorted by FLOPs."""
  by_run: dict[str, list[Row]] = {}
  for r in rows:
    by_run.setdefault(r["run"], []).append(r)
  out = {}
  for run, rs in by_run.items():
    rs = sorted(rs, key=lambda r: r["flops"])
    out[run] = (np.log([r["flops"] for r in rs]), np.log([r["val_loss"] for r in rs]))
  return out


def compute_frontier(rows: Sequence[Row], min_step: int = 1) -> list[Row]:
  """The observed points on the lower envelope of loss versus FLOPs across runs.

  A point of run r at compute C stays unless another run's curve (piecewise linear in
  log-log, only inside that run's own FLOPs range: no extrapolation) is lower at C. The
  result is sorted by FLOPs. Points before `min_step` (and step 0, zero FLOPs) are left out.
  """
  rows = usable_rows(rows, min_step)
  curves = _curves(rows)
  keep = []
  for r in rows:
    lc, ll = math.log(r["flops"]), math.log(r["val_loss"])
    beaten = False
    for run, (xs, ys) in curves.items():
      if run == r["run"] or not xs[0] <= lc <= xs[-1]:
        continue
      if np.interp(lc, xs, ys) < ll - 1e-12:
        beaten = True
        break
    if not beaten:
      keep.append(r)
  return sorted(keep, key=lambda r: (r["flops"], r["val_loss"]))


# =============================================================================================
# Power-law fits
# =============================================================================================

def _theta_to_abc(theta: np.ndarray, scale: float) -> tuple[float, float, float]:
  """(alpha, b, c) with x = C / scale -> (a, b, c) with L = a C^-b + c."""
  alpha, b, c = theta
  return math.exp(alpha + b * math.log(scale)), float(b), float(c)


def _predict(theta: np.ndarray, logx: np.ndarray) -> np.ndarray:
  return np.exp(theta[0] - theta[1] * logx) + theta[2]


def _initial_guesses(logx: np.ndarray, y: np.ndarray, free_c: bool) -> list[np.ndarray]:
  """Log-linear regressions of log(L - c) on log x over a grid of c, best first."""
  fractions = (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99) if free_c else (0.0,)
  cands = []
  for frac in fractions:
    c = frac * y.min()
    slope, intercept = np.polyfit(logx, np.log(y - c), 1) if len(set(logx)) > 1 else (0.0, 0.0)
    theta = np.array([intercept, max(-slope, 1e-3), c])
    cost = np.sum((np.log(_predict(theta, logx)) - np.log(y)) ** 2)
    cands.append((cost, frac, theta))
  return [t for _, _, t in sorted(cands, key=lambda z: (z[0], z[1]))]


def _least_squares(logx: np.ndarray, y: np.ndarray, starts: Sequence[np.ndarray],
                   free_c: bool) -> tuple[np.ndarray, float]:
  """Best (theta, cost) of log-residual least squares from each start; b >= 0, 0 <= c <= min L."""
  from scipy.optimize import least_squares
  logy = np.log(y)
  c_max = float(y.min())
  b_max = 20.0

  def residual(th):
    full = np.array([th[0], th[1], th[2] if free_c else 0.0])
    return np.log(_predict(full, logx)) - logy

  def jac(th):
    c = th[2] if free_c else 0.0
    p = np.exp(th[0] - th[1] * logx)
    m = p + c
    cols = [p / m, -p * logx / m] + ([1.0 / m] if free_c else [])
    return np.stack(cols, axis=1)

  lb = [-np.inf, 0.0] + ([0.0] if free_c else [])
  ub = [np.inf, b_max] + ([c_max] if free_c else [])
  best, best_cost = None, np.inf
  for s in starts:
    x0 = np.array([s[0], min(max(s[1], 0.0), b_max)] +
                  ([min(max(s[2], 0.0), c_max)] if free_c else []))
    try:
      res = least_squares(residual, x0, jac=jac, bounds=(lb, ub), method="trf",
                          x_scale="jac", ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=2000)
    except (ValueError, FloatingPointError):
      continue
    if np.isfinite(res.cost) and res.cost < best_cost:
      best, best_cost = res.x, float(res.cost)
  if best is None:
    raise ScalingError("The power-law fit failed from every initial guess.")
  theta = np.array([best[0], best[1], best[2] if free_c else 0.0])
  return theta, best_cost


def _interval(samples: np.ndarray, level: float) -> list[float]:
  lo = (100.0 - level) / 2.0
  return [float(np.percentile(samples, lo)), float(np.percentile(samples, 100.0 - lo))]


def fit_power_law(C: Sequence[float], L: Sequence[float], *, free_c: bool = True,
                  n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                  target: float | None = None) -> dict[str, Any]:
  """Fits L = a C^-b + c (c = 0 when not `free_c`) by least squares on log residuals.

  Parameterised as a = exp(alpha) / C0^-b with C0 the geometric mean of C (well-conditioned
  for C of 1e10-1e25), b in [0, 20], c in [0, min L]; started from log-linear fits over a
  grid of c. Uncertainty: pairs bootstrap (resample the points with replacement, refit;
  resamples with fewer distinct C than parameters are skipped), percentile intervals at
  68% and 95% for a, b, c, and for the loss at `target` when given. The bootstrap treats
  points as independent, which points of one run are not, so read the bands as a lower
  bound on the real uncertainty.

  Returns {law, a, b, c, n_points, rmse_log, scale, theta, samples, bootstrap: {...}}
  (`samples`: bootstrap (alpha, b, c) rows, used by `extrapolate` and `plot`).
  """
  x = np.asarray(C, dtype=np.float64)
  y = np.asarray(L, dtype=np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ScalingError(f"C and L must be 1-D of one length, got {x.shape} and {y.shape}.")
  ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
  x, y = x[ok], y[ok]
  n_par = 3 if free_c else 2
  if len(np.unique(x)) < n_par:
    raise ScalingError(f"A {n_par}-parameter power law needs at least {n_par} distinct compute "
                       f"values with a positive loss; got {len(np.unique(x))}.")
  scale = float(np.exp(np.mean(np.log(x))))
  logx = np.log(x / scale)
  theta, cost = _least_squares(logx, y, _initial_guesses(logx, y, free_c), free_c)
  a, b, c = _theta_to_abc(theta, scale)
  rmse = float(np.sqrt(2.0 * cost / len(x)))

  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(int(n_bootstrap)):
    idx = rng.integers(0, len(x), len(x))
    if len(np.unique(x[idx])) < n_par:
      continue
    lx, ly = logx[idx], y[idx]
    starts = [theta, _initial_guesses(lx, ly, free_c)[0]]
    try:
      samples.append(_least_squares(lx, ly, starts, free_c)[0])
    except ScalingError:
      continue
  samples = np.array(samples).reshape(-1, 3)
  fit = dict(law="L = a * C^-b + c" if free_c else "L = a * C^-b", a=a, b=b, c=c,
             n_points=int(len(x)), rmse_log=rmse, scale=scale, theta=theta.tolist(),
             samples=samples, bootstrap={"n": int(len(samples)), "seed": int(seed)})
  if len(samples):
    abc = np.array([_theta_to_abc(s, scale) for s in samples])
    for i, name in enumerate("abc"):
      fit["bootstrap"][name] = {"68": _interval(abc[:, i], 68), "95": _interval(abc[:, i], 95)}
  if target is not None:
    fit["extrapolation"] = extrapolate(fit, target)
  return fit


def predict(fit: Mapping[str, Any], C: float | np.ndarray) -> np.ndarray:
  """The fitted law at C."""
  return fit["a"] * np.asarray(C, dtype=np.float64) ** -fit["b"] + fit["c"]


def extrapolate(fit: Mapping[str, Any], C_target: float) -> dict[str, Any]:
  """The fitted loss at `C_target` with bootstrap 68% / 95% percentile intervals."""
  out: dict[str, Any] = {"flops": float(C_target), "val_loss": float(predict(fit, C_target))}
  samples = np.asarray(fit.get("samples", np.zeros((0, 3))))
  if len(samples):
    lx = math.log(C_target / fit["scale"])
    preds = np.array([_predict(s, np.array([lx]))[0] for s in samples])
    out["median"] = float(np.median(preds))
    out["68"], out["95"] = _interval(preds, 68), _interval(preds, 95)
  return out


def confidence_band(fit: Mapping[str, Any], C: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
  samples = np.asarray(fit["samples"])
  lx = np.log(C / fit["scale"])
  preds = np.exp(samples[:, :1] - samples[:, 1:2] * lx[None]) + samples[:, 2:3]
  lo = (100.0 - level) / 2.0
  return np.percentile(preds, lo, axis=0), np.percentile(preds, 100.0 - lo, axis=0)


def loss_at_flops(rows: Sequence[Row], C: float, min_step: int = 1) -> list[Row]:
  """Each run's loss at compute C (log-log interpolation; runs that do not reach C or start
  after it are left out): [{run, depth, params, params_non_embedding, flops, val_loss}]."""
  rows = usable_rows(rows, min_step)
  out = []
  curves = _curves(rows)
  for run, (xs, ys) in curves.items():
    if not xs[0] - 1e-12 <= math.log(C) <= xs[-1] + 1e-12:
      continue
    r = next(r for r in rows if r["run"] == run)
    out.append(dict(run=run, depth=r["depth"], params=r["params"],
                    params_non_embedding=r["params_non_embedding"], flops=float(C),
                    val_loss=float(np.exp(np.interp(math.log(C), xs, ys)))))
  return sorted(out, key=lambda r: r["params_non_embedding"])


def common_flops(rows: Sequence[Row], min_step: int = 1) -> float | None:
  """A compute every run reaches (the smallest final compute when all runs overlap), else
  the observed compute covered by the most runs (the largest such)."""
  curves = _curves(usable_rows(rows, min_step))
  if not curves:
    return None
  lo = max(xs[0] for xs, _ in curves.values())
  hi = min(xs[-1] for xs, _ in curves.values())
  if lo <= hi:
    return float(math.exp(hi))
  cands = sorted({float(x) for xs, _ in curves.values() for x in xs})
  cover = [sum(xs[0] <= x <= xs[-1] for xs, _ in curves.values()) for x in cands]
  best = max(cover)
  return float(math.exp(max(x for x, n in zip(cands, cover) if n == best)))


def fit_loss_vs_params_at_fixed_compute(rows: Sequence[Row], C: float, *,
                                        key: str = "params_non_embedding",
                                        n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                                        min_step: int = 1) -> dict[str, Any] | None:
  """Loss versus parameters N at training compute C (an IsoFLOP slice across runs).

  Each run's loss at C is interpolated linearly in (log FLOPs, log loss) between its
  evaluated steps (no extrapolation; runs outside C are left out). Fitted law: with >= 4
  runs L(N) = a N^-b + c, with 2-3 runs the log-linear L(N) = a N^-b (c = 0); bootstrap as in
  `fit_power_law`, over runs. With >= 3 runs a parabola of L in log N is also reported
  ("isoflop": Chinchilla's approach 2): at fixed compute a larger model has seen fewer
  steps, so L(N) can turn up, and the parabola's minimum, when inside the range, estimates
  the compute-optimal size at C. Returns None with fewer than 2 runs at C.
  """
  points = loss_at_flops(rows, C, min_step)
  if len({p[key] for p in points}) < 2:
    return None
  n = np.array([p[key] for p in points], dtype=np.float64)
  loss = np.array([p["val_loss"] for p in points])
  free_c = len(np.unique(n)) >= 4
  fit = fit_power_law(n, loss, free_c=free_c, n_bootstrap=n_bootstrap, seed=seed)
  out = {"flops": float(C), "x": key, "points": points, "fit": fit, "isoflop": None}
  if len(np.unique(n)) >= 3:
    coef = np.polyfit(np.log(n), loss, 2)
    iso: dict[str, Any] = {"coef_log_n": coef.tolist(), "n_opt": None, "loss_opt": None}
    if coef[0] > 0:
      v = -coef[1] / (2 * coef[0])
      if np.log(n).min() <= v <= np.log(n).max():
        iso["n_opt"], iso["loss_opt"] = float(np.exp(v)), float(np.polyval(coef, v))
    out["isoflop"] = iso
  return out
