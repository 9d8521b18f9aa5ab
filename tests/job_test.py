"""The main job (`sd3jax run`): the README's command with the shortened `smoke` experiment,
interrupted with SIGTERM in the middle of MM-DiT training and rerun to completion.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from ml_collections import ConfigDict

from sd3jax import config as config_lib
from sd3jax import job

import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "shapes.py") + ":smoke"
EDIT_SMOKE = os.path.join(ROOT, "experiments", "shapes_edit.py") + ":smoke"


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "sd3jax.cli", "run", "--config", SMOKE, "--workdir",
          str(workdir), *extra]


def _env():
  return subprocess_env.env(PYTHONUNBUFFERED="1")  # one CPU device, as on the command line


def test_run_interrupted_in_training_then_rerun_finishes(tmp_path):
  workdir = tmp_path / "job"
  log_path = tmp_path / "first.log"
  with open(log_path, "w") as log:
    # Launched from tmp_path with a relative --workdir: every path the job records must
    # still work from elsewhere (checked with `sd3jax sample` below).
    proc = subprocess.Popen(_cmd("job"), stdout=log, stderr=subprocess.STDOUT, env=_env(),
                            cwd=tmp_path)
    metrics = workdir / "mmdit" / "metrics.jsonl"
    deadline = time.time() + 900
    # Wait until MM-DiT training has logged a step, then stop the job.
    while time.time() < deadline and proc.poll() is None:
      if metrics.exists() and metrics.read_text().strip():
        break
      time.sleep(0.05)
    assert proc.poll() is None, log_path.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == job.EXIT_INTERRUPTED, log_path.read_text()[-3000:]
  first = log_path.read_text()
  assert "[train] interrupted" in first
  # One progress bar per long loop, named for it (with the loss while training).
  for bar in ("train vae:", "precompute train:", "precompute validation:", "train mmdit:"):
    assert bar in first, bar
  assert "loss=" in first
  for stage in ("data", "encoders", "vae", "precompute"):
    assert (workdir / "job" / f"{stage}.json").exists()
  assert not (workdir / "job" / "train.json").exists()
  stopped_at = max(int(n) for n in os.listdir(workdir / "mmdit" / "checkpoints") if n.isdigit())
  assert 0 < stopped_at <= 30  # 30: the signal came during the final save, kept whole

  proc = subprocess.run(_cmd(workdir), capture_output=True, text=True, env=_env(), cwd=ROOT,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for stage in ("data", "encoders", "vae", "precompute"):
    assert f"[{stage}] done earlier, skipped" in proc.stdout
  # Quiet by default: one line per stage on stdout, progress bars and warnings only on stderr
  # (no absl INFO lines, no config dumps, no Orbax bookkeeping).
  assert not re.search(r"^I\d{4} ", proc.stderr, re.M), proc.stderr[-3000:]
  assert "Effective config" not in proc.stderr and "[process=0]" not in proc.stderr
  stage_lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
  assert [line.split("]")[0][1:] for line in stage_lines] == list(job.STAGES), stage_lines
  assert all(line.split("] ")[1].startswith("done ") for line in stage_lines), stage_lines
  assert "prompt following: single-object colour" in proc.stdout
  assert "shape by prompt: shape only" in proc.stdout
  assert "train mmdit:" in proc.stderr and "sampling:" in proc.stderr
  assert f"Resumed from step {stopped_at}" in proc.stdout  # resumed, not restarted
  summary = json.loads((workdir / "summary.json").read_text())
  assert os.path.exists(summary["grid"])
  assert summary["val_loss"] > 0 and 0.0 <= summary["shapes"]["overall"] <= 1.0
  assert summary["ceiling"]["truth_overall"] >= 0.98  # the checker on ground truth
  ev = json.loads((workdir / "eval.json").read_text())
  assert ev["step"] == 30 and len(ev["per_t"]) == 8
  assert ev["in_training"]  # the trainer's eval of step 30, not sampled a second time
  assert "cond_gap" in ev and summary["cond_gap"] == ev["cond_gap"]
  assert os.path.getsize(summary["time_to_quality"]) > 0  # evals at steps 15 and 30
  records = json.loads((workdir / "job" / "train.json").read_text())
  assert records["steps"] == 30

  # The run records absolute paths and settings of its own task only (no `vae:` block of
  # defaults in the MM-DiT's config, no `job:` section).
  mm_config = json.loads((workdir / "mmdit" / "config.json").read_text())
  assert os.path.isabs(mm_config["precompute"]["vae"]), mm_config["precompute"]
  assert os.path.isabs(mm_config["data"]["path"]) and os.path.isabs(mm_config["eval"]["path"])
  assert "vae" not in mm_config and "job" not in mm_config
  assert "shapes_num_train" not in mm_config["data"]
  vae_config = json.loads((workdir / "vae" / "config.json").read_text())
  assert "model" not in vae_config and vae_config["data"]["shapes_num_train"] == 256

  # `sd3jax sample --workdir JOB` (the job's folder, not its mmdit/ run) from another
  # directory; images go to JOB/generated, apart from the job's samples/ and training grids.
  # -v brings INFO lines back (the rerun above showed them off by default); --height /
  # --width: any size the patch grid allows.
  sampled = subprocess.run(
      [sys.executable, "-m", "sd3jax.cli", "sample", "--workdir", str(workdir), "--prompt",
       "a red circle", "--steps", "2", "-v", "--height", "48", "--width", "80"],
      capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert sorted(os.listdir(workdir / "generated")) == ["0000_a_red_circle.png", "grid.png"]
  assert re.search(r"^I\d{4} ", sampled.stderr, re.M), sampled.stderr[-3000:]
  from PIL import Image
  assert Image.open(workdir / "generated" / "0000_a_red_circle.png").size == (80, 48)

  # The editing experiment on the finished job: only its own stages run (the text-to-image
  # ones are the same settings, so they are skipped), then `sd3jax edit` on its model.
  edit_config = EDIT_SMOKE
  edited = subprocess.run([sys.executable, "-m", "sd3jax.cli", "run", "--config", edit_config,
                           "--workdir", str(workdir)], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=900)
  assert edited.returncode == 0, edited.stdout[-3000:] + edited.stderr[-3000:]
  stage_lines = [line for line in edited.stdout.splitlines() if line.startswith("[")]
  assert [line.split("]")[0][1:] for line in stage_lines] == list(job.STAGES) + [
      "edit_data", "edit_train", "edit_evaluate"], stage_lines
  assert all("done earlier, skipped" in line for line in stage_lines[:len(job.STAGES)])
  assert "editing (held-out scenes; success / preservation): recolour" in edited.stdout
  ev = json.loads((workdir / "edit_eval.json").read_text())
  assert set(ev["baselines"]) == {"copy", "regenerate"} and ev["baselines"]["copy"][
      "preserved"] >= 0.9  # the copy baseline keeps what the checker sees
  assert os.path.getsize(workdir / "edit" / "edit_grid.png") > 0
  edit_run = json.loads((workdir / "edit" / "config.json").read_text())
  assert edit_run["model"]["in_channels"] == 32 and edit_run["init_from_in_channels"] == 16
  from sd3jax.data import shapes_edit
  from PIL import Image
  Image.fromarray(shapes_edit.render_edit(shapes_edit.make_edit(0))[0]).save(tmp_path / "in.png")
  cli_edit = subprocess.run(
      [sys.executable, "-m", "sd3jax.cli", "edit", "--workdir", str(workdir), "--image",
       str(tmp_path / "in.png"), "--instruction", "make the red circle blue", "--steps", "2",
       "--image-cfg", "1.2", "--out", str(tmp_path / "edited")],
      capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
  assert cli_edit.returncode == 0, cli_edit.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "edited")) == [
      "0000_in_make_the_red_circle_blue.png", "grid.png"]
  assert Image.open(tmp_path / "edited" / "grid.png").size[0] >= 2 * 64  # input | result
  exported = subprocess.run(
      [sys.executable, "-m", "sd3jax.cli", "export", "--workdir", str(workdir / "edit"),
       "--out", str(tmp_path / "edit_export")], capture_output=True, text=True, env=_env(),
      cwd=ROOT, timeout=600)
  assert exported.returncode == 0, exported.stderr[-3000:]
  from diffusers import SD3Transformer2DModel
  transformer = SD3Transformer2DModel.from_pretrained(str(tmp_path / "edit_export" / "transformer"))
  assert (transformer.config.in_channels, transformer.config.out_channels) == (32, 16)
  not_edit = subprocess.run(
      [sys.executable, "-m", "sd3jax.cli", "edit", "--workdir", str(workdir / "mmdit"),
       "--image", str(tmp_path / "in.png"), "--instruction", "remove the red circle"],
      capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
  assert not_edit.returncode == 2 and "text-to-image run" in not_edit.stderr, not_edit.stderr

  # A third run does nothing; a changed setting is refused, naming the stage.
  again = subprocess.run(_cmd(workdir), capture_output=True, text=True, env=_env(), cwd=ROOT)
  assert again.returncode == 0 and "[evaluate] done earlier, skipped" in again.stdout
  changed = subprocess.run(_cmd(workdir, "--config.job.shapes.num_train=300"),
                           capture_output=True, text=True, env=_env(), cwd=ROOT)
  assert changed.returncode == 2
  assert "finished stage 'data' with other settings" in changed.stderr


def test_sigterm_outside_training_exits_75_and_keeps_finished_stages(tmp_path, monkeypatch):
  done = []

  def finished(config, paths):
    done.append(True)
    return {}

  def killed(config, paths):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts this
    raise AssertionError("SIGTERM did not interrupt the stage")
  before = signal.getsignal(signal.SIGTERM)
  monkeypatch.setitem(job.STAGE_FNS, "data", finished)
  monkeypatch.setitem(job.STAGE_FNS, "encoders", killed)
  config = config_lib.load(SMOKE)
  assert job.run_main(config, str(tmp_path)) == job.EXIT_INTERRUPTED
  assert (tmp_path / "job" / "data.json").exists()
  assert not (tmp_path / "job" / "encoders.json").exists()
  assert signal.getsignal(signal.SIGTERM) is before  # the job's handler was removed
  monkeypatch.setitem(job.STAGE_FNS, "encoders", finished)
  assert job.run_main(config, str(tmp_path), stages=("data", "encoders")) == 0
  assert done == [True, True]  # data ran once, encoders once (after the interruption)


def test_run_needs_a_job_section(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="`job` section"):
    job.run_main(ConfigDict({"task": "mmdit"}), str(tmp_path))


@pytest.mark.parametrize("experiment,key,value", [
    (SMOKE, "optimizer.muon_ns_steps", 0), (SMOKE, "job.vae.optimizer.learning_rate", -1.0),
    (SMOKE, "eval.sample_cfg_max_t", 0.0), (SMOKE, "eval.sample_autoguidance", 0.5),
    (EDIT_SMOKE, "job.edit.train.learning_rate", -1.0)])
def test_a_bad_training_setting_fails_before_any_stage_runs(tmp_path, experiment, key, value):
  """The VAE's, MM-DiT's and editing MM-DiT's settings are checked up front, not after
  minutes of the stages before them."""
  config = config_lib.load(experiment)
  section, _, leaf = key.rpartition(".")
  node = config
  for part in section.split("."):
    node = node[part]
  with config.unlocked():
    node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"{leaf}={value}")):
    job.run_main(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "job")  # nothing ran, no marker written


def test_the_weak_stage_trains_a_short_run_that_the_sampler_uses(tmp_path, monkeypatch):
  """With job.weak_steps (off in the default job and its smoke) the weak stage trains the same
  MM-DiT for that many steps, without evals, into WORKDIR/mmdit_weak, and the main run's
  evals sample with it as the autoguidance model."""
  import types
  from sd3jax import train
  config = config_lib.load(SMOKE + ",weak_steps=10")
  paths = job.Paths(str(tmp_path), config)
  assert job.uses_weak_model(config) and config.eval.sample_autoguidance == 2.0
  trained = []

  def fake_train(c, workdir):
    trained.append((c, workdir))
    return types.SimpleNamespace(step=c.total_steps, interrupted=len(trained) > 1)
  monkeypatch.setattr(train, "train", fake_train)
  assert job.stage_weak(config, paths) == {"path": paths.mmdit_weak, "steps": 10}
  weak, workdir = trained[0]
  assert workdir == paths.mmdit_weak and weak.total_steps == 10
  assert weak.eval.every_steps == 0 and weak.eval.sample_autoguidance == 1.0
  main = job.mmdit_config(config, paths)
  assert main.eval.sample_autoguidance_run == paths.mmdit_weak
  for key in ("model", "data", "flow", "optimizer", "conditioning"):
    assert weak[key].to_dict() == main[key].to_dict(), key  # the same MM-DiT and recipe
  with pytest.raises(job.Interrupted, match="weak MM-DiT training stopped at step 10"):
    job.stage_weak(config, paths)
  base = job.fingerprints(config)
  with config.unlocked():
    config.job.weak_steps = 20
  changed = job.fingerprints(config)
  assert [s for s in job.STAGES if base[s] != changed[s]] == ["weak", "train", "sample",
                                                               "evaluate"]
  smoke = config_lib.load(SMOKE)  # the default job's smoke: no weak model, nothing trained
  assert not job.uses_weak_model(smoke)
  assert "skipped" in job.stage_weak(smoke, job.Paths(str(tmp_path), smoke))
  assert len(trained) == 2 and not job.mmdit_config(smoke, paths).eval.get(
      "sample_autoguidance_run")


def test_fingerprints_cover_upstream_stages():
  config = config_lib.load(SMOKE)
  base = job.fingerprints(config)
  with config.unlocked():
    config.job.vae.total_steps = 21
  changed = job.fingerprints(config)
  assert [s for s in job.STAGES if base[s] != changed[s]] == list(job.STAGES[2:])


def test_fingerprints_cover_the_shapes_dataset_version(monkeypatch):
  """A new shapes release (other scenes) invalidates every stage: old data is never reused."""
  import tensorflow_datasets as tfds
  from sd3jax.data import shapes_tfds
  config = config_lib.load(SMOKE)
  base = job.fingerprints(config)
  monkeypatch.setattr(shapes_tfds.Sd3jaxShapes, "VERSION", tfds.core.Version("9.9.9"))
  changed = job.fingerprints(config)
  assert all(base[s] != changed[s] for s in job.STAGES)


@pytest.mark.parametrize("experiment,params", [("sd3_medium.py:256", 2_028_328_000),
                                               ("sd35_large.py:1024", 8_056_627_520)])
def test_real_scale_experiments_validate_for_a_v5p_slice(experiment, params):
  """The lab-scale files load, pass validation for 64 chips, and build the released sizes."""
  import flax.linen as nn
  import jax
  import numpy as np
  from sd3jax.models import mmdit
  config = config_lib.validate(config_lib.load(os.path.join(ROOT, "experiments", experiment)),
                               num_devices=64)
  cfg = config_lib.model_config(config)
  shapes = jax.eval_shape(lambda r: mmdit.init_params(cfg, r), jax.random.key(0))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes))) == params
  assert config.model.remat_policy == "full" and config.sharding_rules == "fsdp"
