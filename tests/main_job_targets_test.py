"""Acceptance: the default main job (`sd3jax run --config experiments/shapes.py`) reaches
issue 16's prompt-following targets on single-object prompts with positions, with an
autoencoder ceiling of at least 0.95.

About 15 minutes on 2 CPU cores, so skipped unless SD3JAX_SLOW=1 (CI does not set it). With
SD3JAX_MAIN_JOB_WORKDIR=DIR it checks a finished job's DIR/summary.json instead of running
the job again (the README's fresh-clone run is checked that way).
SD3JAX_MAIN_JOB_CONFIG=experiments/shapes.py:ARG runs a variant of the job instead (e.g.
steps=7200). It passes on the README's fresh-clone run of the default (d073d09, the AVX2
AMD machine: shape 0.87, 52 of 60; it fails on the same recipe with training seed 1 on that
run's records: colour 0.90, shape 0.62), on that of 88133e8 (the Xeon: 0.87) and on that of 858088f (3,600 steps with autoguidance: 0.85, exactly).
It failed on the runs of 70a0a53 and 449f928 (shape 0.82 / 0.83), passed on one earlier run
of four (shapes 1.0.0, the slower machine, seed 0: shape 0.87) and on the earlier AdamW
recipe with twice its steps (README, "Twice the training"). These were checked through
SD3JAX_MAIN_JOB_WORKDIR.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"attribute_color": 0.95, "attribute_shape": 0.85, "attribute_position": 0.90}
CEILING = 0.95


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SD3JAX_SLOW") != "1",
                    reason="a 15-minute run of the default job; set SD3JAX_SLOW=1")
def test_default_job_follows_prompts(tmp_path):
  workdir = os.environ.get("SD3JAX_MAIN_JOB_WORKDIR")
  if not workdir:
    workdir = str(tmp_path / "shapes")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device and XLA's defaults, as on the command line
    config = os.environ.get("SD3JAX_MAIN_JOB_CONFIG", "experiments/shapes.py")
    proc = subprocess.run([sys.executable, "-m", "sd3jax.cli", "run", "--config",
                           os.path.join(ROOT, config), "--workdir", workdir],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  scores, ceiling = summary["shapes"], summary["ceiling"]
  assert ceiling["vae_overall"] >= CEILING, ceiling
  missed = {k: round(scores[k], 3) for k, bound in TARGETS.items() if scores[k] < bound}
  assert not missed, f"below the targets {TARGETS}: {missed} (all scores: {scores})"
