"""Scaling curves: training-FLOPs accounting, compute frontier, power-law fits, plots.

    sd3jax scaling RUN_DIR... --out DIR [--eval-checkpoints] [--target-flops X]
    python -m sd3jax.scaling fit RUN_DIR... --out DIR [--target-flops X]     (same, no CLI)
    python -m sd3jax.scaling sweep --depths 1,2,3,4 --root runs/scaling [--arg steps=300,...]

The paper's scaling study (Esser et al. 2024, Sec. 5.3) trains the depth family of MM-DiTs
(depth d, hidden 64 d) on equal data and reads validation loss against training compute.
This module turns a set of run folders into that picture:

1. `collect` reads each run's validation loss per step (eval JSON files or metrics.jsonl,
   optionally evaluating saved checkpoints that have none) and attaches the run's training
   FLOPs at that step, `training_flops(config, step)`, from the run's own config.json.
2. `compute_frontier` keeps the points on the lower envelope of loss versus FLOPs across
   runs: what the best model of the family reaches for a given compute.
3. `fit_power_law` fits L(C) = a C^-b + c to the frontier in log space, with a pairs
   bootstrap for 68% / 95% intervals; `extrapolate` carries them to a target compute.
4. `fit_loss_vs_params_at_fixed_compute` reads every run at one compute (an IsoFLOP slice)
   and fits L(N) against the non-embedding parameter count N.
5. `plot` and `write_table` write the log-log PNG and CSV / JSON tables.

Workdir schema read here (written by sd3jax.train and the evaluation module):
  config.json                 the effective config (keys of sd3jax.config.defaults())
  eval/*.json                 one JSON object {"step": N, "val_loss": float, ...} per file
                              (or a list of them); "val_loss" may also be {"mean": float,
                              ...}; a file without "step" takes N from a `step_N` in its
                              name. The trainer writes eval/step_N.json; a standalone
                              evaluation eval/val_loss_step_N.json, which takes precedence
                              at the same step (more batches, fixed timesteps).
  metrics.jsonl               rows with "val_loss" or "eval/val_loss" (used for steps no
                              eval file covers; a resumed run's later row wins)
  checkpoints/<N>/            saved steps (for --eval-checkpoints)

FLOPs are analytic (`mmdit.flops_per_forward`: matmuls + attention, multiply-add = 2),
a train step counted as 3x the forward for the whole global batch, as the trainer's
throughput metrics count it. Parameter axis: the NON-EMBEDDING count (transformer blocks
only), following Kaplan et al. 2020: the input / output embedders (patch, context,
timestep, pooled-text, final layer) are a large share of a small model (the context
embedder alone is joint_attention_dim x hidden) and bend the curve without adding depth.
Rows carry both counts.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import glob
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Row = dict[str, Any]
EvaluateFn = Callable[[str, int], "float | Mapping[str, Any]"]

VAL_KEYS = ("val_loss", "eval/val_loss")       # metrics.jsonl keys read as validation loss
STANDALONE_EVAL = re.compile(r"val_loss_step_(\d+)\.json$")
ANY_STEP = re.compile(r"step_(\d+)")
DEFAULT_BOOTSTRAP = 500


class ScalingError(ValueError):
  """Nothing to fit or plot; the message says what is missing and where."""


# =============================================================================================
# FLOPs and parameters
# =============================================================================================

def _as_config(config: Any):
  """A ConfigDict of `config` (ConfigDict, dict or config.json path) over the trainer defaults."""
  from ml_collections import ConfigDict
  from sd3jax import config as config_lib
  if isinstance(config, str):
    with open(config) as f:
      config = json.load(f)
  if isinstance(config, ConfigDict):
    config = config.to_dict()

  def merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
      out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out
  return ConfigDict(merge(config_lib.defaults().to_dict(), config))


def model_config(config: Any):
  """The MMDiTConfig of an experiment config (unknown model keys ignored)."""
  from sd3jax.models import mmdit
  c = _as_config(config)
  fields = {f.name for f in dataclasses.fields(mmdit.MMDiTConfig)}
  kw = {k: v for k, v in c.model.to_dict().items() if k in fields}
  kw["qk_norm"] = kw.get("qk_norm") or None
  kw["dual_attention_layers"] = tuple(kw.get("dual_attention_layers") or ())
  return mmdit.MMDiTConfig(**kw)


def flops_per_step(config: Any) -> float:
  """Training FLOPs of one step: 3 x forward FLOPs per example x global batch."""
  from sd3jax.models import mmdit
  c = _as_config(config)
  latent = c.data.image_size // c.data.vae_factor
  text = c.conditioning.clip_tokens + c.conditioning.t5_tokens
  return 3.0 * mmdit.flops_per_forward(model_config(c), latent, latent, text) * c.batch_size


def training_flops(config: Any, step: int | float) -> float:
  """Training FLOPs spent after `step` steps of `config` (analytic; see the module doc)."""
  return flops_per_step(config) * float(step)


def params(config: Any, non_embedding: bool = False) -> int:
  """Parameter count of the config's MM-DiT; `non_embedding` counts the blocks only."""
  return _param_counts(model_config(config))[1 if non_embedding else 0]


@functools.lru_cache(maxsize=64)
def _param_counts(cfg) -> tuple[int, int]:
  """(all, blocks only) from abstract shapes; nothing is allocated."""
  import flax.linen as nn
  import jax
  from sd3jax.models import mmdit
  p = cfg.patch_size * 2
  shapes = jax.eval_shape(lambda r: nn.unbox(mmdit.init_params(cfg, r, (p, p))),
                          jax.random.key(0))
  count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
  return count(shapes), sum(count(t) for name, t in shapes.items() if name.startswith("block"))


# =============================================================================================
# Reading runs
# =============================================================================================

def _loss_value(v: Any) -> float | None:
  if isinstance(v, Mapping):
    v = v.get("mean")
  try:
    v = float(v)
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def _records(obj: Any) -> list[Mapping]:
  if isinstance(obj, list):
    return [r for r in obj if isinstance(r, Mapping)]
  return [obj] if isinstance(obj, Mapping) else []


def read_val_losses(run_dir: str) -> dict[int, tuple[float, str]]:
  """{step: (val_loss, source)} of one run, from eval/*.json and metrics.jsonl.

  Precedence at one step: eval/val_loss_step_N.json (standalone evaluation) over other
  eval/*.json files (the trainer's in-training hook) over metrics.jsonl rows.
  """
  out: dict[int, tuple[float, str]] = {}
  metrics = os.path.join(run_dir, "metrics.jsonl")
  if os.path.exists(metrics):
    with open(metrics) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a kill
        if not isinstance(rec, Mapping) or "step" not in rec:
          continue
        for key in VAL_KEYS:
          v = _loss_value(rec.get(key))
          if v is not None:
            out[int(rec["step"])] = (v, "metrics.jsonl")
            break
  files = sorted(glob.glob(os.path.join(run_dir, "eval", "*.json")),
                 key=lambda p: (bool(STANDALONE_EVAL.search(p)), p))
  for path in files:
    try:
      with open(path) as f:
        obj = json.load(f)
    except (OSError, json.JSONDecodeError):
      continue
    m = ANY_STEP.search(os.path.basename(path))
    for rec in _records(obj):
      step = rec.get("step", int(m.group(1)) if m else None)
      v = next((x for x in (_loss_value(rec.get(k)) for k in VAL_KEYS) if x is not None), None)
      if step is not None and v is not None:
        out[int(step)] = (v, os.path.join("eval", os.path.basename(path)))
  return out


def checkpoint_steps(run_dir: str) -> list[int]:
  """Saved steps: the numeric folders under RUN/checkpoints."""
  root = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(n) for n in os.listdir(root)
                if n.isdigit() and os.path.isdir(os.path.join(root, n)))


def _write_eval(run_dir: str, step: int, result: Any) -> tuple[float, str]:
  """Stores an evaluate_fn result as eval/val_loss_step_N.json, so a rerun reads it back."""
  record = dict(result) if isinstance(result, Mapping) else {"val_loss": result}
  value = _loss_value(record.get("val_loss"))
  if value is None:
    raise ScalingError(f"evaluate_fn({run_dir!r}, {step}) returned {result!r}: expected a float "
                       "or a mapping with a finite 'val_loss'.")
  record["step"] = int(step)
  name = os.path.join("eval", f"val_loss_step_{step}.json")
  os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
  tmp = os.path.join(run_dir, name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(_jsonable(record), f, indent=1)
  os.replace(tmp, os.path.join(run_dir, name))
  return value, name


def collect(run_dirs: Sequence[str], eval_checkpoints: bool = False,
            evaluate_fn: EvaluateFn | None = None) -> list[Row]:
  """Rows {run, depth, params, params_non_embedding, step, examples, flops, val_loss, source}.

  One row per (run, evaluated step), sorted by run then step. With `eval_checkpoints`,
  `evaluate_fn(run_dir, step) -> val_loss (or {"val_loss": ...})` is called for every
  saved checkpoint step without a result, and the result is stored in the run's eval/.
  """
  if eval_checkpoints and evaluate_fn is None:
    raise ScalingError("eval_checkpoints=True needs evaluate_fn(run_dir, step) -> val_loss.")
  rows: list[Row] = []
  names = _run_names(run_dirs)
  for run_dir, name in zip(run_dirs, names):
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
      raise ScalingError(f"{run_dir}: no config.json; is it an sd3jax workdir?")
    config = _as_config(cfg_path)
    losses = read_val_losses(run_dir)
    if eval_checkpoints:
      for step in checkpoint_steps(run_dir):
        if step not in losses:
          losses[step] = _write_eval(run_dir, step, evaluate_fn(run_dir, step))
    per_step = flops_per_step(config)
    n_all, n_blocks = params(config), params(config, non_embedding=True)
    for step in sorted(losses):
      value, source = losses[step]
      rows.append(dict(run=name, depth=int(config.model.depth), params=n_all,
                       params_non_embedding=n_blocks, step=step,
                       examples=step * int(config.batch_size), flops=per_step * step,
                       val_loss=value, source=source))
  return rows


def _run_names(run_dirs: Sequence[str]) -> list[str]:
  """Folder names, or paths relative to the common parent when the names collide."""
  names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
  if len(set(names)) == len(names):
    return names
  parent = os.path.commonpath([os.path.abspath(d) for d in run_dirs])
  return [os.path.relpath(os.path.abspath(d), parent) for d in run_dirs]


# =============================================================================================
# Frontier
# =============================================================================================

def _usable(rows: Sequence[Row], min_step: int = 1) -> list[Row]:
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
  rows = _usable(rows, min_step)
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


def _band(fit: Mapping[str, Any], C: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
  samples = np.asarray(fit["samples"])
  lx = np.log(C / fit["scale"])
  preds = np.exp(samples[:, :1] - samples[:, 1:2] * lx[None]) + samples[:, 2:3]
  lo = (100.0 - level) / 2.0
  return np.percentile(preds, lo, axis=0), np.percentile(preds, 100.0 - lo, axis=0)


def loss_at_flops(rows: Sequence[Row], C: float, min_step: int = 1) -> list[Row]:
  """Each run's loss at compute C (log-log interpolation; runs that do not reach C or start
  after it are left out): [{run, depth, params, params_non_embedding, flops, val_loss}]."""
  rows = _usable(rows, min_step)
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
  curves = _curves(_usable(rows, min_step))
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


# =============================================================================================
# Outputs
# =============================================================================================

def _jsonable(obj: Any) -> Any:
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items() if k != "samples"}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  if isinstance(obj, (np.floating, float)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def plot(rows: Sequence[Row], fit: Mapping[str, Any] | None, out_png: str, *,
         frontier: Sequence[Row] | None = None, target_flops: float | None = None,
         params_fit: Mapping[str, Any] | None = None) -> str:
  """Log-log PNG: each run's val loss vs training FLOPs (coloured by depth), the frontier,
  the fitted law with its 68% / 95% bootstrap bands and the extrapolation to `target_flops`;
  with `params_fit`, a second panel of loss vs parameters at that fixed compute."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  usable = _usable(rows, min_step=0)
  if not usable:
    raise ScalingError("Nothing to plot: no rows with positive FLOPs and a validation loss.")
  frontier = compute_frontier(rows) if frontier is None else frontier
  ncols = 2 if params_fit else 1
  fig, axes = plt.subplots(1, ncols, figsize=(7.5 * ncols, 5.5), squeeze=False)
  ax = axes[0, 0]
  depths = sorted({r["depth"] for r in usable})
  cmap = plt.get_cmap("viridis")
  colour = {d: cmap(i / max(len(depths) - 1, 1) * 0.9) for i, d in enumerate(depths)}
  for run in dict.fromkeys(r["run"] for r in usable):
    rs = sorted((r for r in usable if r["run"] == run), key=lambda r: r["flops"])
    d, n = rs[0]["depth"], rs[0]["params"]
    ax.plot([r["flops"] for r in rs], [r["val_loss"] for r in rs], "o-", ms=3.5, lw=1.2,
            color=colour[d], label=f"{run}: d={d}, {n / 1e6:.3g}M params")
  if frontier:
    ax.plot([r["flops"] for r in frontier], [r["val_loss"] for r in frontier], "o", ms=8,
            mfc="none", mec="black", mew=1.0, label="frontier (lower envelope)")
  if fit is not None:
    lo = min(r["flops"] for r in (frontier or usable))
    hi = max([r["flops"] for r in usable] + ([target_flops] if target_flops else []))
    grid = np.geomspace(lo, hi, 200)
    if len(np.asarray(fit.get("samples", []))):
      for level, alpha in ((95, 0.12), (68, 0.25)):
        b_lo, b_hi = _band(fit, grid, level)
        ax.fill_between(grid, b_lo, b_hi, color="crimson", alpha=alpha, lw=0,
                        label=f"bootstrap {level}%")
    ax.plot(grid, predict(fit, grid), "-", color="crimson", lw=1.6,
            label=f"fit: {fit['a']:.3g} C^-{fit['b']:.3g} + {fit['c']:.3g}")
    if target_flops:
      ex = extrapolate(fit, target_flops)
      err = None
      if "95" in ex:
        v = ex["val_loss"]
        err = [[max(v - ex["95"][0], 0.0)], [max(ex["95"][1] - v, 0.0)]]
      ax.errorbar([target_flops], [ex["val_loss"]], yerr=err, fmt="*", ms=12, color="crimson",
                  capsize=4, label=f"extrapolation at {target_flops:.3g}: {ex['val_loss']:.4g}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  _plain_y_labels(ax)
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel("validation loss")
  ax.set_title("Validation loss vs training compute")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  if params_fit:
    ax2 = axes[0, 1]
    pts = params_fit["points"]
    key = params_fit["x"]
    for p in pts:
      ax2.plot([p[key]], [p["val_loss"]], "o", color=colour.get(p["depth"], "k"), ms=7,
               label=f"d={p['depth']}")
    pf = params_fit["fit"]
    ns = np.geomspace(min(p[key] for p in pts), max(p[key] for p in pts), 100)
    ax2.plot(ns, predict(pf, ns), "-", color="crimson",
             label=f"fit: {pf['a']:.3g} N^-{pf['b']:.3g} + {pf['c']:.3g}")
    iso = params_fit.get("isoflop")
    if iso:
      ax2.plot(ns, np.polyval(iso["coef_log_n"], np.log(ns)), "--", color="grey",
               label="parabola in log N")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    _plain_y_labels(ax2)
    ax2.set_xlabel("non-embedding parameters" if key == "params_non_embedding" else key)
    ax2.set_ylabel("validation loss")
    ax2.set_title(f"At fixed compute {params_fit['flops']:.3g} FLOPs")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7, loc="best")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=120)
  plt.close(fig)
  return out_png


def _plain_y_labels(ax) -> None:
  """Loss values as plain numbers (a loss axis rarely spans a decade: label minor ticks)."""
  from matplotlib.ticker import FuncFormatter
  fmt = FuncFormatter(lambda v, _: f"{v:.4g}")
  ax.yaxis.set_major_formatter(fmt)
  lo, hi = ax.get_ylim()
  if hi / lo < 10:
    ax.yaxis.set_minor_formatter(fmt)


ROW_COLUMNS = ("run", "depth", "params", "params_non_embedding", "step", "examples", "flops",
               "val_loss", "source", "on_frontier")


def write_table(rows: Sequence[Row], fit: Mapping[str, Any] | None, out_dir: str, *,
                frontier: Sequence[Row] | None = None, extrapolation: Mapping | None = None,
                params_fit: Mapping[str, Any] | None = None) -> dict[str, str]:
  """Writes scaling_rows.csv (one row per evaluated step), scaling_fit.csv (parameters with
  intervals) and scaling.json (everything); returns their paths by name."""
  os.makedirs(out_dir, exist_ok=True)
  frontier = compute_frontier(rows) if frontier is None else frontier
  on = {(r["run"], r["step"]) for r in frontier}
  paths = {k: os.path.join(out_dir, f"scaling{s}") for k, s in
           (("rows_csv", "_rows.csv"), ("fit_csv", "_fit.csv"), ("json", ".json"))}
  with open(paths["rows_csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=ROW_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({**r, "on_frontier": int((r["run"], r["step"]) in on)})
  with open(paths["fit_csv"], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["quantity", "estimate", "lo68", "hi68", "lo95", "hi95"])
    entries = []
    if fit is not None:
      entries += [(f"L(C).{k}", fit[k], fit["bootstrap"].get(k)) for k in "abc"]
    if extrapolation is not None:
      entries.append((f"L({extrapolation['flops']:.6g})", extrapolation["val_loss"],
                      extrapolation if "68" in extrapolation else None))
    if params_fit is not None:
      pf = params_fit["fit"]
      entries += [(f"L(N at C={params_fit['flops']:.6g}).{k}", pf[k], pf["bootstrap"].get(k))
                  for k in "abc"]
    for name, est, iv in entries:
      iv = iv or {}
      w.writerow([name, est, *(iv.get("68") or ["", ""]), *(iv.get("95") or ["", ""])])
  with open(paths["json"], "w") as f:
    json.dump(_jsonable(dict(rows=rows, frontier=frontier, fit=fit, extrapolation=extrapolation,
                             params_fit=params_fit)), f, indent=1)
  return paths


def scaling_main(run_dirs: Sequence[str], out_dir: str, eval_checkpoints: bool = False,
                 target_flops: float | None = None, *, evaluate_fn: EvaluateFn | None = None,
                 params_at_flops: float | None = None, n_bootstrap: int = DEFAULT_BOOTSTRAP,
                 seed: int = 0, min_step: int = 1) -> dict[str, Any]:
  """`sd3jax scaling`: collect -> frontier -> fits -> PNG + tables in out_dir; returns a summary.

  `params_at_flops` picks the compute of the loss-vs-parameters slice (default:
  `common_flops`). A frontier with fewer than 3 distinct FLOPs values gets no fit (the
  summary says why); the plot and tables are still written.
  """
  rows = collect(run_dirs, eval_checkpoints=eval_checkpoints, evaluate_fn=evaluate_fn)
  if not _usable(rows, min_step):
    raise ScalingError(
        f"No validation loss at step >= {min_step} in {list(run_dirs)}: train with "
        "config.eval.every_steps > 0, or pass --eval-checkpoints to evaluate saved checkpoints.")
  frontier = compute_frontier(rows, min_step)
  summary: dict[str, Any] = {"runs": sorted({r["run"] for r in rows}), "rows": len(rows),
                             "frontier_points": len(frontier)}
  fit = extrapolation = params_fit = None
  try:
    fit = fit_power_law([r["flops"] for r in frontier], [r["val_loss"] for r in frontier],
                        n_bootstrap=n_bootstrap, seed=seed)
    if target_flops:
      extrapolation = fit["extrapolation"] = extrapolate(fit, target_flops)
  except ScalingError as e:
    summary["fit_skipped"] = str(e)
  c_fixed = params_at_flops or common_flops(rows, min_step)
  if c_fixed:
    try:
      params_fit = fit_loss_vs_params_at_fixed_compute(rows, c_fixed, n_bootstrap=n_bootstrap,
                                                       seed=seed, min_step=min_step)
    except ScalingError as e:
      summary["params_fit_skipped"] = str(e)
  paths = write_table(rows, fit, out_dir, frontier=frontier, extrapolation=extrapolation,
                      params_fit=params_fit)
  paths["png"] = plot(rows, fit, os.path.join(out_dir, "scaling.png"), frontier=frontier,
                      target_flops=target_flops if fit else None, params_fit=params_fit)
  summary.update(fit=_jsonable(fit), extrapolation=extrapolation,
                 params_fit=_jsonable(params_fit), paths=paths)
  print(format_summary(summary))
  return summary


def format_summary(summary: Mapping[str, Any]) -> str:
  """A few human lines: the fitted law with intervals, the extrapolation, the outputs."""
  lines = [f"scaling: {len(summary['runs'])} runs, {summary['rows']} evaluated steps, "
           f"{summary['frontier_points']} on the frontier"]
  fit = summary.get("fit")
  if fit:
    bs = fit["bootstrap"]
    iv = lambda k: (f" (95%: {bs[k]['95'][0]:.4g} .. {bs[k]['95'][1]:.4g})" if k in bs else "")
    lines.append(f"  L(C) = a C^-b + c: a={fit['a']:.4g}{iv('a')}, b={fit['b']:.4g}{iv('b')}, "
                 f"c={fit['c']:.4g}{iv('c')}; rms log residual {fit['rmse_log']:.3g}; "
                 f"{bs['n']} bootstrap fits")
  elif "fit_skipped" in summary:
    lines.append(f"  no L(C) fit: {summary['fit_skipped']}")
  ex = summary.get("extrapolation")
  if ex:
    ci = f" (68%: {ex['68'][0]:.4g} .. {ex['68'][1]:.4g}; 95%: {ex['95'][0]:.4g} .. " \
         f"{ex['95'][1]:.4g})" if "95" in ex else ""
    lines.append(f"  at {ex['flops']:.4g} FLOPs: val loss {ex['val_loss']:.4g}{ci}")
  pf = summary.get("params_fit")
  if pf:
    f = pf["fit"]
    lines.append(f"  at {pf['flops']:.4g} FLOPs across {len(pf['points'])} runs: "
                 f"{f['law'].replace('C', 'N')} with a={f['a']:.4g}, b={f['b']:.4g}, "
                 f"c={f['c']:.4g}")
    if pf.get("isoflop") and pf["isoflop"]["n_opt"]:
      lines.append(f"  IsoFLOP parabola minimum at N = {pf['isoflop']['n_opt']:.4g}")
  for name, path in summary.get("paths", {}).items():
    lines.append(f"  {name}: {path}")
  return "\n".join(lines)


# =============================================================================================
# Sweep launcher
# =============================================================================================

def _last_step(run_dir: str) -> int:
  steps = checkpoint_steps(run_dir)
  metrics = os.path.join(run_dir, "metrics.jsonl")
  if os.path.exists(metrics):
    with open(metrics) as f:
      for line in f:
        try:
          steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
          continue
  return max(steps, default=0)


def sweep(depths: Sequence[int], root: str, *, experiment: str = "experiments/scaling.py",
          arg: str = "", overrides: Sequence[str] = (), dry_run: bool = False,
          keep_going: bool = False) -> list[dict[str, Any]]:
  """Trains `experiment:depth=D,ARG` for each depth in turn into ROOT/dD (resuming what is
  there) and records each run's planned and spent training FLOPs in ROOT/sweep.json.

  All depths share ARG and the `--config.KEY=VALUE` overrides, so steps x batch (the data)
  is equal by construction; a difference is refused before anything runs.
  """
  from sd3jax import config as config_lib
  plans = []
  for d in depths:
    spec = f"{experiment}:depth={d}" + (f",{arg}" if arg else "")
    config = config_lib.complete(config_lib.load(spec, overrides))
    plans.append(dict(depth=int(d), workdir=os.path.join(root, f"d{d}"), config=spec,
                      overrides=list(overrides), total_steps=int(config.total_steps),
                      batch_size=int(config.batch_size), params=params(config),
                      params_non_embedding=params(config, non_embedding=True),
                      flops_per_step=flops_per_step(config),
                      planned_training_flops=training_flops(config, config.total_steps)))
  data = {(p["total_steps"] * p["batch_size"]) for p in plans}
  if len(data) > 1:
    raise ScalingError(f"Unequal data across depths (steps x batch: {sorted(data)}); the depth "
                       "family must see the same examples.")
  os.makedirs(root, exist_ok=True)
  record = os.path.join(root, "sweep.json")
  for p in plans:
    cmd = [sys.executable, "-m", "sd3jax.cli", "train", f"--config={p['config']}",
           f"--workdir={p['workdir']}", *[f"--config.{o.removeprefix('config.')}"
                                          for o in overrides]]
    p["command"] = " ".join(cmd[2:])
    print(f"[sweep] depth {p['depth']}: {p['params'] / 1e6:.3g}M params "
          f"({p['params_non_embedding'] / 1e6:.3g}M non-embedding), "
          f"{p['planned_training_flops']:.4g} training FLOPs planned\n  {p['command']}",
          flush=True)
    if dry_run:
      continue
    start = time.time()
    p["exit_code"] = subprocess.call(cmd)
    p["seconds"] = round(time.time() - start, 1)
    p["steps_done"] = _last_step(p["workdir"])
    cfg_json = os.path.join(p["workdir"], "config.json")
    if os.path.exists(cfg_json):
      p["training_flops"] = training_flops(cfg_json, p["steps_done"])
    with open(record, "w") as f:
      json.dump(_jsonable(plans), f, indent=1)
    if p["exit_code"] != 0 and not keep_going:
      raise SystemExit(f"[sweep] depth {p['depth']} failed with exit code {p['exit_code']}; "
                       f"rerun to resume it (recorded in {record}).")
  if not dry_run:
    print(f"[sweep] done; FLOPs recorded in {record}. Next: sd3jax scaling "
          f"{' '.join(p['workdir'] for p in plans)} --out {os.path.join(root, 'report')}")
  return plans


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m sd3jax.scaling {sweep, fit}`."""
  ap = argparse.ArgumentParser(prog="python -m sd3jax.scaling", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  sw = sub.add_parser("sweep", help="Train several depths in turn at equal data.")
  sw.add_argument("--depths", required=True, help="comma separated, e.g. 1,2,3,4")
  sw.add_argument("--root", required=True, help="runs go to ROOT/dD")
  sw.add_argument("--experiment", default="experiments/scaling.py")
  sw.add_argument("--arg", default="", help="experiment args shared by every depth, "
                  "e.g. steps=300,batch=16,eval_every=25")
  sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="a --config.KEY=VALUE override for every run (repeatable)")
  sw.add_argument("--dry-run", action="store_true", help="print the plan and FLOPs only")
  sw.add_argument("--keep-going", action="store_true", help="continue after a failed depth")
  ft = sub.add_parser("fit", help="Collect, fit and plot, as `sd3jax scaling`.")
  ft.add_argument("run_dirs", nargs="+")
  ft.add_argument("--out", required=True)
  ft.add_argument("--target-flops", type=float, default=None)
  ft.add_argument("--params-at-flops", type=float, default=None)
  ft.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP)
  args = ap.parse_args(argv)
  try:
    if args.cmd == "sweep":
      depths = [int(d) for d in args.depths.split(",") if d.strip()]
      sweep(depths, args.root, experiment=args.experiment, arg=args.arg, overrides=args.set,
            dry_run=args.dry_run, keep_going=args.keep_going)
    else:
      scaling_main(args.run_dirs, args.out, target_flops=args.target_flops,
                   params_at_flops=args.params_at_flops, n_bootstrap=args.bootstrap)
  except ScalingError as e:
    print(f"sd3jax scaling: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
