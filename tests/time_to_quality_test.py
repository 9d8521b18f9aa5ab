"""The time-to-quality curve: in-training eval rows against minutes since the job started."""
import json

import pytest

from sd3jax.evals import time_to_quality


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_curve_counts_minutes_from_the_first_stage_and_keeps_one_row_per_step(tmp_path):
  job = tmp_path / "job"
  job.mkdir()
  t0 = 1_000_000.0
  (job / "data.json").write_text(json.dumps({"stage": "data", "finished": t0 + 10, "seconds": 10}))
  (job / "vae.json").write_text(json.dumps({"stage": "vae", "finished": t0 + 190, "seconds": 180}))
  (job / "train.json").write_text(json.dumps({"stage": "train", "finished": t0 + 900,
                                              "seconds": 660}))
  metrics = tmp_path / "metrics.jsonl"
  _write(metrics, [
      {"step": 50, "time": t0 + 300, "loss": 0.5},                      # a train row: ignored
      {"step": 100, "time": t0 + 360, "eval/val_loss": 0.40, "eval/shapes/attribute_color": 0.2,
       "eval/cond_gap": 0.01},
      {"step": 200, "time": t0 + 480, "eval/val_loss": 0.35, "eval/shapes/attribute_color": 0.5},
      # a resumed run re-ran step 200's eval: the later row wins
      {"step": 200, "time": t0 + 600, "eval/val_loss": 0.34, "eval/shapes/attribute_color": 0.6},
  ])
  c = time_to_quality.curve(str(metrics), str(job))
  assert c["step"] == [100, 200]
  assert c["minutes"] == pytest.approx([6.0, 10.0])
  assert c["attribute_color"] == [0.2, 0.6]
  assert c["val_loss"] == [0.40, 0.34]
  assert c["cond_gap"] == [0.01, None]
  assert c["train_start_min"] == pytest.approx(4.0)  # train began at t0 + 240
  out = time_to_quality.plot(str(metrics), str(job), str(tmp_path / "ttq.png"))
  assert out and (tmp_path / "ttq.png").stat().st_size > 1000


def test_no_scored_evals_means_no_plot(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  _write(metrics, [{"step": 10, "time": 5.0, "loss": 1.0}])
  assert time_to_quality.plot(str(metrics), str(tmp_path / "none"), str(tmp_path / "x.png")) is None
  assert not (tmp_path / "x.png").exists()
