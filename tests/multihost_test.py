"""Multi-host on one machine: 2 processes x 4 CPU devices vs 1 x 8, via launch/local.sh.

Real processes joined by jax.distributed (gloo collectives over localhost) run `sd3jax train`:
equal losses, checkpoints that move between the two layouts, SIGTERM to one process, and
process 0 as the only writer of logs. Every run has a timeout, so a hung collective fails.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sd3jax import checkpoint as ckpt_lib
from sd3jax import distributed
from sd3jax import metrics as metrics_lib
from sd3jax import train

import subprocess_env

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EXPERIMENT = os.path.join(ROOT, "experiments", "tiny.py")
LOCAL = os.path.join(ROOT, "launch", "local.sh")
TIMEOUT_S = 400


def _env():
  return subprocess_env.env()  # launch/local.sh adds the device count


def _command(processes: int, workdir: str, logs: str, cache: str, *flags: str) -> list[str]:
  return [LOCAL, "-n", str(processes), "-d", str(8 // processes), "-l", logs, "--", "train",
          "--config", EXPERIMENT, "--workdir", workdir, f"--config.compilation_cache_dir={cache}",
          "--config.log.tensorboard=true", *flags]


def _kill(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)  # local.sh and the processes it started
  except ProcessLookupError:
    pass


def _logs(logs: str, tail: int = 3000) -> str:
  return "\n".join(f"== {f}\n" + (open(f).read()[-tail:] if tail else open(f).read())
                   for f in sorted(glob.glob(os.path.join(logs, "*.log"))))


def launch(processes: int, workdir: str, logs: str, cache: str, *flags: str) -> int:
  """Runs `sd3jax train` as `processes` x (8 / processes) devices; returns the exit code."""
  return run_command(_command(processes, workdir, logs, cache, *flags), processes, logs)


def run_command(command: list[str], processes: int, logs: str) -> int:
  """Runs a launch/local.sh command line within TIMEOUT_S; returns the exit code."""
  proc = subprocess.Popen(command, env=_env(), cwd=ROOT, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    return proc.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    _kill(proc)
    pytest.fail(f"{processes}-process run timed out (hung collective?)\n{_logs(logs)}")


def losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in
          metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def load_state(workdir: str, step: int) -> dict:
  """A checkpoint's train state as numpy arrays (no mesh needed)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path)
  tree = tree.item_metadata.tree if hasattr(tree, "item_metadata") else tree
  args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                      is_leaf=lambda x: hasattr(x, "shape"))
  return ckptr.restore(path, restore_args=args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """5 steps as 1 x 8 and as 2 x 4 devices (checkpoint at 5), sharing one XLA cache."""
  root = tmp_path_factory.mktemp("multihost")
  cache = str(root / "xla_cache")
  out = {}
  for n in (1, 2):
    workdir, logs = str(root / f"p{n}"), str(root / f"p{n}_logs")
    code = launch(n, workdir, logs, cache, "--config.total_steps=5",
                  "--config.checkpoint.every_steps=5")
    assert code == 0, _logs(logs)
    out[n] = workdir
  return root, cache, out


def test_two_processes_train_like_one(runs):
  _, _, workdirs = runs
  one, two = losses(workdirs[1]), losses(workdirs[2])
  assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
  print("losses 1x8:", [one[s] for s in sorted(one)])
  print("losses 2x4:", [two[s] for s in sorted(two)])
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=1e-5)
  a, b = load_state(workdirs[1], 5), load_state(workdirs[2], 5)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


def test_only_process_0_writes_logs(runs, tmp_path, monkeypatch):
  _, _, workdirs = runs
  workdir = workdirs[2]
  # One writer: one record per step, one event file, config.json once; no samples/ or eval/.
  steps = [r["step"] for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4, 5]
  assert len(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))) == 1
  assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 5
  assert not glob.glob(os.path.join(workdir, "**", "*.png"), recursive=True)
  # The writer itself, as process 1: no files at all.
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = metrics_lib.MetricsWriter(str(tmp_path / "p1"), total_steps=5)
  writer.write(1, {"loss": 1.0}, histograms={"t": np.zeros(4)})
  writer.close()
  assert not os.path.exists(tmp_path / "p1")


def test_checkpoints_move_between_layouts_and_sigterm_on_one_process(runs):
  """2 x 4 -> 1 x 8 and 1 x 8 -> 2 x 4 resumes agree; then SIGTERM to process 1 only."""
  root, cache, workdirs = runs
  one_from_two, two_from_one = str(root / "one_from_two"), str(root / "two_from_one")
  shutil.copytree(workdirs[2], one_from_two)
  shutil.copytree(workdirs[1], two_from_one)
  logs = str(root / "one_from_two_logs")
  assert launch(1, one_from_two, logs, cache, "--config.total_steps=6") == 0, _logs(logs)
  assert "Resumed from step 5" in _logs(logs, tail=0)

  # 1 x 8 -> 2 x 4, run until SIGTERM reaches process 1 alone.
  logs = str(root / "two_from_one_logs")
  flags = ["--config.checkpoint.every_steps=100000"]
  proc = subprocess.Popen(_command(2, two_from_one, logs, cache, "--config.total_steps=100000",
                                   *flags), env=_env(), cwd=ROOT, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + TIMEOUT_S
    while max(losses(two_from_one)) < 7:
      assert proc.poll() is None, _logs(logs)
      assert time.time() < deadline, "no step after the resume was logged\n" + _logs(logs)
      time.sleep(0.5)
    os.kill(int(open(os.path.join(logs, "process_1.pid")).read()), signal.SIGTERM)
    code = proc.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    _kill(proc)
    pytest.fail("SIGTERM did not stop the 2-process run\n" + _logs(logs))
  assert code == train.EXIT_INTERRUPTED, _logs(logs)
  np.testing.assert_allclose(losses(two_from_one)[6], losses(one_from_two)[6], rtol=1e-5)
  out = [open(os.path.join(logs, f"process_{i}.log")).read() for i in (0, 1)]
  assert "Resumed from step 5" in out[0] and "Resumed from step 5" in out[1]
  assert "Received SIGTERM" in out[1] and "Received SIGTERM" not in out[0]
  stopped = [int(o.split("Stopped at step ")[1].split()[0]) for o in out]
  assert stopped[0] == stopped[1], stopped
  stopped = stopped[0]
  ckpt = ckpt_lib.Checkpointer(os.path.join(two_from_one, "checkpoints"), read_only=True)
  assert ckpt.latest_step() == stopped == max(losses(two_from_one))

  # The rerun resumes from the step both processes saved.
  logs = str(root / "rerun_logs")
  code = launch(2, two_from_one, logs, cache, f"--config.total_steps={stopped + 1}", *flags)
  assert code == 0, _logs(logs)
  assert _logs(logs, tail=0).count(f"Resumed from step {stopped}") == 2
  assert max(losses(two_from_one)) == stopped + 1
  assert ckpt.latest_step() == stopped + 1


def test_initialize_single_process_and_bad_flags():
  assert distributed.detect({}) is None
  assert distributed.detect({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]",
                             "SLURM_NTASKS": "2"}) == "slurm"
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert distributed.initialize(env={}) is False
  assert distributed.initialize("localhost:1234", 1, 0, env={}) is False
  with pytest.raises(ValueError, match="process_id"):
    distributed.initialize("localhost:1234", 2, env={})
