"""The command line a new user meets: per-command help, exit codes with one-line messages for
their mistakes, run folders found from a job folder, paths recorded absolute, quiet logs.

Every CLI case runs `python -m sd3jax.cli` as a subprocess, as a user would.
"""
import json
import os
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from sd3jax import config as config_lib
from sd3jax import metrics as metrics_lib
from sd3jax import sample

import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "experiments", "shapes.py")
TINY = os.path.join(ROOT, "experiments", "tiny.py")


def _cli(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "sd3jax.cli", *args], capture_output=True,
                        text=True, env=subprocess_env.env(), cwd=cwd, timeout=300)


@pytest.mark.parametrize("command,flag,example", [
    ("run", "--workdir", "sd3jax run --config experiments/shapes.py --workdir runs/shapes"),
    ("sample", "--prompt", "sd3jax sample --workdir runs/shapes --prompt"),
    ("evaluate", "--all_steps", "sd3jax evaluate --workdir runs/shapes"),
])
def test_each_command_has_its_own_help(command, flag, example):
  for spelling in ("--help", "-h"):
    proc = _cli(command, spelling)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: sd3jax {command} ")
    assert flag in proc.stdout and example in proc.stdout
    assert "--helpfull" not in proc.stdout and "absl" not in proc.stdout  # ours, not absl's
  assert "--prompt" not in _cli("run", "--help").stdout  # only the command's own flags


# (arguments, the message on stderr); each must exit 2 with one line and no traceback.
USER_ERRORS = [
    (["train", "--config", "no_such_experiment.py", "--workdir", "{tmp}/w"],
     "--config no_such_experiment.py: no such file 'no_such_experiment.py'"),
    (["train", "--config", SHAPES + ":bogus", "--workdir", "{tmp}/w"],
     "experiments/shapes.py:ARG: 'bogus'"),
    (["train", "--config", SHAPES + ":smoke", "--workdir", "{tmp}/a_file"],
     "--workdir {tmp}/a_file is a file; give a folder"),
    (["train", "--config", SHAPES + ":smoke", "--workdir", "{tmp}/w",
      "--config.optimizer.learning_rate=-1e-3"],
     "config.optimizer.learning_rate=-0.001 is out of range: it must be in (0.0, inf)"),
    (["train", "--config", SHAPES + ":smoke", "--workdir", "{tmp}/w", "--config.total_steps=0"],
     "config.total_steps=0 is out of range: it must be in [1, inf)"),
    (["train", "--config", SHAPES + ":smoke", "--workdir", "{tmp}/w"],
     "config.data.source='records' needs config.data.path"),
    (["sample", "--workdir", "{tmp}/missing", "--prompt", "a red circle"],
     "--workdir {tmp}/missing does not exist."),
    (["sample", "--workdir", "{tmp}/a_file", "--prompt", "a red circle"],
     "--workdir {tmp}/a_file is a file"),
    (["evaluate", "--workdir", "{tmp}/empty"],
     "{tmp}/empty is not a run folder: it has no config.json"),
    (["export", "--workdir", "{tmp}/job_not_trained", "--out", "{tmp}/e"],
     "has not started training its MM-DiT yet"),
    # A folder that cannot be created (root may write anywhere else, so /sys stands in for
    # an unwritable place).
    (["train", "--config", TINY, "--workdir", "/sys/sd3jax_cli_test"],
     "Operation not permitted: '/sys/sd3jax_cli_test'"),
]


@pytest.mark.parametrize("args,message", USER_ERRORS, ids=[str(i) for i in range(len(USER_ERRORS))])
def test_user_errors_exit_2_with_one_line(args, message, tmp_path):
  (tmp_path / "a_file").write_text("not a folder")
  (tmp_path / "empty").mkdir()
  (tmp_path / "job_not_trained" / "job").mkdir(parents=True)
  fill = lambda text: text.replace("{tmp}", str(tmp_path))
  proc = _cli(*map(fill, args), cwd=str(tmp_path))
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert fill(message) in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_a_run_that_stops_itself_exits_3_with_its_message(tmp_path):
  proc = _cli("train", "--config", TINY, "--workdir", str(tmp_path / "w"),
              "--config.optimizer.learning_rate=1e30", "--config.optimizer.max_nonfinite_steps=2",
              "--config.total_steps=20")
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "sd3jax train: stopped: 2 consecutive steps up to step" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_resolve_run_dir_finds_the_mmdit_run_of_a_job(tmp_path):
  run = tmp_path / "job" / "mmdit"
  run.mkdir(parents=True)
  (tmp_path / "job" / "job").mkdir()
  (run / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="has not saved a checkpoint yet"):
    sample.resolve_run_dir(str(tmp_path / "job"))
  (run / "checkpoints" / "5").mkdir(parents=True)
  assert sample.resolve_run_dir(str(tmp_path / "job")) == str(run)
  assert sample.resolve_run_dir(str(run)) == str(run)


def test_runs_record_absolute_paths_and_only_their_task_settings(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = config_lib.load(SHAPES)
  with config.unlocked():
    config.data.path = "records/train"
    config.precompute.vae = "~/vae"
    config.eval.path = "gs://bucket/val"  # URLs stay as they are
  out = config_lib.with_absolute_paths(config)
  assert out.data.path == str(tmp_path / "records" / "train")
  assert out.precompute.vae == os.path.expanduser("~/vae")
  assert out.eval.path == "gs://bucket/val" and out.init_from == ""
  assert config.data.path == "records/train"  # a copy; the input is untouched
  mmdit = config_lib.for_task(config_lib.to_json(config_lib.complete(config)))
  assert "vae" not in mmdit and "job" not in mmdit and "shapes_seed" not in mmdit["data"]
  vae = config_lib.for_task(config_lib.to_json(config_lib.complete(config.job.vae)))
  assert not {"model", "conditioning", "flow", "precompute"} & set(vae)
  assert "p_synthetic" not in vae["data"] and "sample_cfg" not in vae["eval"]
  # What was left out comes back as defaults when a run's config.json is read again.
  assert config_lib.complete(ConfigDict(mmdit)).vae.width == config_lib.defaults().vae.width


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
  """A run killed after logging step 30 but resumed from its step-20 checkpoint re-logs 21-30;
  the file must hold one row per step (and a torn last line is dropped)."""
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
  assert metrics_lib.truncate_after(str(path), 20) == 2
  assert [r["step"] for r in metrics_lib.read_jsonl(str(path))] == [10, 20]
  assert metrics_lib.truncate_after(str(path), 20) == 0
  assert metrics_lib.truncate_after(str(tmp_path / "absent.jsonl"), 5) == 0


def test_config_overrides_without_config_apply_to_the_runs_own_config(tmp_path):
  """`sd3jax evaluate --workdir RUN --config.eval.seed=201`: the run's config.json, changed."""
  from absl import flags
  from sd3jax import cli
  run = tmp_path / "run"
  (run / "checkpoints" / "1").mkdir(parents=True)  # a run with a checkpoint to evaluate
  saved = config_lib.to_json(config_lib.complete(config_lib.load(SHAPES)))
  (run / "config.json").write_text(json.dumps(saved))
  parse = lambda *args: cli.parse(["sd3jax", "evaluate", *args], flags.FlagValues())
  name, config, workdir, _ = parse("--workdir", str(run), "--config.eval.seed=201",
                                   "--config.eval.prompts_per_category=7")
  assert (name, workdir) == ("evaluate", str(run))
  assert config.eval.seed == 201 and config.eval.prompts_per_category == 7
  assert config.eval.sample_cfg == saved["eval"]["sample_cfg"]  # the rest is the run's
  with pytest.raises(cli.UsageError, match="--config.eval.no_such_key on .*config.json"):
    parse("--workdir", str(run), "--config.eval.no_such_key=1")
  job = tmp_path / "job"  # a job folder (sd3jax run): its MM-DiT run's config
  (job / "job").mkdir(parents=True)
  (job / "mmdit" / "checkpoints" / "1").mkdir(parents=True)
  (job / "mmdit" / "config.json").write_text(json.dumps(saved))
  assert parse("--workdir", str(job), "--config.eval.seed=5")[1].eval.seed == 5
  with pytest.raises(cli.UsageError, match="--config.eval.seed needs --config experiments/FILE.py"):
    parse("--workdir", str(tmp_path), "--config.eval.seed=1")
  with pytest.raises(cli.UsageError, match="sd3jax run: --config experiments/FILE.py is required"):
    cli.parse(["sd3jax", "run", "--workdir", str(job), "--config.total_steps=9"],
              flags.FlagValues())


def test_bench_lets_torch_share_the_accelerator_unless_the_user_chose(monkeypatch):
  from sd3jax import bench
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "bfc")
  monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
  bench.share_accelerator_memory()
  assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] == "bfc"  # the user's setting stays
  assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
