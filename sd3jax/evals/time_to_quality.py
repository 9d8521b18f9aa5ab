"""Time to quality: the checker's scores from the in-training evals against wall-clock minutes.

A recipe is judged by how soon it draws what the prompt says, so the x axis is minutes since
the job started (the VAE and precompute stages included), not steps. The in-training evals
write their scores to WORKDIR/mmdit/metrics.jsonl with a unix "time"; the job's stage markers
(WORKDIR/job/STAGE.json: "finished", "seconds") give the job's start and the start of MM-DiT
training. Evals of a resumed run that were re-run keep their last row per step.
"""
from __future__ import annotations

import json
import os
from typing import Any

SCORES = ("attribute_color", "attribute_shape", "attribute_position", "count", "two_objects")


def eval_rows(metrics_path: str) -> list[dict[str, Any]]:
  """The in-training eval rows of a metrics.jsonl ({"step", "time", "eval/..."}), one per step
  (the last written wins), in step order."""
  rows: dict[int, dict[str, Any]] = {}
  with open(metrics_path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      if "time" in row and any(k.startswith("eval/") for k in row):
        rows.setdefault(int(row["step"]), {}).update(row)
  return [rows[s] for s in sorted(rows)]


def stage_times(job_dir: str) -> dict[str, tuple[float, float]]:
  """{stage: (start, end)} unix seconds, from the job's stage markers."""
  out = {}
  if not os.path.isdir(job_dir):
    return out
  for name in sorted(os.listdir(job_dir)):
    if name.endswith(".json"):
      with open(os.path.join(job_dir, name)) as f:
        rec = json.load(f)
      if "finished" in rec and "seconds" in rec:
        out[rec.get("stage", name[:-5])] = (rec["finished"] - rec["seconds"], rec["finished"])
  return out


def curve(metrics_path: str, job_dir: str, train_start: float | None = None
          ) -> dict[str, Any]:
  """{"minutes": [...], "step": [...], score: [...], "cond_gap": [...], "train_start_min"}.

  Minutes count from the first stage's start; `train_start` (unix s) marks when MM-DiT
  training began (default: the job's train marker, else the first eval's time)."""
  rows = eval_rows(metrics_path)
  stages = stage_times(job_dir)
  origin = min([s for s, _ in stages.values()], default=None)
  if origin is None:
    origin = rows[0]["time"] if rows else 0.0
  if train_start is None:
    train_start = stages["train"][0] if "train" in stages else None
  out: dict[str, Any] = {"minutes": [(r["time"] - origin) / 60.0 for r in rows],
                         "step": [int(r["step"]) for r in rows]}
  for key in SCORES:
    out[key] = [r.get(f"eval/shapes/{key}") for r in rows]
  out["cond_gap"] = [r.get("eval/cond_gap") for r in rows]
  out["val_loss"] = [r.get("eval/val_loss") for r in rows]
  out["train_start_min"] = None if train_start is None else (train_start - origin) / 60.0
  return out


def plot(metrics_path: str, job_dir: str, out_path: str, *, title: str = "",
         train_start: float | None = None) -> str | None:
  """Writes the two-panel figure (scores; conditioning gap and validation loss) to out_path.
  Returns the path, or None when there are no evals with scores to plot."""
  c = curve(metrics_path, job_dir, train_start)
  if not c["minutes"] or all(v is None for v in c["attribute_color"]):
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  names = {"attribute_color": "colour", "attribute_shape": "shape",
           "attribute_position": "position", "count": "count", "two_objects": "two objects"}
  for key in SCORES:
    if any(v is not None for v in c[key]):
      left.plot(c["minutes"], c[key], marker="o", label=names[key])
  left.set_ylim(-0.02, 1.02)
  left.set_ylabel("checker score (EMA weights)")
  lines = right.plot(c["minutes"], c["val_loss"], marker="o", color="k",
                     label="validation loss")
  right.set_ylabel("validation loss (8 fixed t)")
  if any(v is not None for v in c["cond_gap"]):
    gap = right.twinx()
    lines += gap.plot(c["minutes"], c["cond_gap"], marker="s", color="tab:red",
                      label="conditioning gap")
    gap.set_ylabel("conditioning gap (dropped - real)", color="tab:red")
  end = max(c["minutes"]) * 1.05
  for ax in (left, right):
    ax.set_xlabel("wall-clock minutes since the job started")
    ax.set_xlim(0, end)
    ax.grid(alpha=0.3)
    if c["train_start_min"] is not None:
      ax.axvline(c["train_start_min"], color="gray", ls="--", lw=1)
      ax.text(c["train_start_min"], ax.get_ylim()[1], " MM-DiT starts", va="top",
              fontsize=8, color="gray")
  left.legend(loc="center left", fontsize=8)
  right.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
  fig.suptitle(title or "time to quality")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return out_path


__all__ = ["SCORES", "curve", "eval_rows", "plot", "stage_times"]
