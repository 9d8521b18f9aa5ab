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

from sd3jax.scaling_fit import (  # noqa: F401  (re-exported: the public API of this module)
    DEFAULT_BOOTSTRAP, Row, ScalingError, common_flops, compute_frontier, extrapolate,
    fit_loss_vs_params_at_fixed_compute, fit_power_law, loss_at_flops, predict)
from sd3jax.scaling_fit import confidence_band, usable_rows

EvaluateFn = Callable[[str, int], "float | Mapping[str, Any]"]

VAL_KEYS = ("val_loss", "eval/val_loss")       # metrics.jsonl keys read as validation loss
STANDALONE_EVAL = re.compile(r"val_loss_step_(\d+)\.json$")
ANY_STEP = re.compile(r"step_(\d+)")


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

  usable = usable_rows(rows, min_step=0)
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
        b_lo, b_hi = confidence_band(fit, grid, level)
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
  if not usable_rows(rows, min_step):
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
