"""Checkpoints: restore on another mesh, fallback from a truncated step, SIGTERM, init_from."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorstore as ts

from sd3jax import checkpoint as ckpt_lib
from sd3jax import config as config_lib
from sd3jax import metrics as metrics_lib
from sd3jax import optim, parallel, train
from sd3jax.models import mmdit

import subprocess_env

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXPERIMENT = os.path.join(ROOT, "experiments", "tiny.py")


def tiny(**overrides):
  config = config_lib.load(EXPERIMENT)
  with config.unlocked():
    config.total_steps = 6
    config.checkpoint.every_steps = 3
    for key, value in overrides.items():
      config_lib.set_key(config, key.replace("__", "."), value)
  return config


def target(config, mesh_shape, rules):
  """Abstract train state (with shardings) for `config` on a mesh of all 8 devices."""
  with config.unlocked():
    config.mesh.update(mesh_shape)
    config.sharding_rules = rules
  config = config_lib.validate(config)
  mesh = train.make_mesh(config)
  model = mmdit.MMDiT(config_lib.model_config(config))
  init_fn = train.make_init_fn(config, model, optim.make_optimizer(config.optimizer),
                               mesh.shape["data"] * mesh.shape["fsdp"])
  return train.abstract_state(init_fn, mesh, parallel.get_rules(rules), jax.random.PRNGKey(0))[0]


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """6 steps on (data 8), checkpoints at steps 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("data8"))
  return workdir, train.train(tiny(), workdir)


def test_restore_on_a_different_mesh(run):
  workdir, result = run
  abstract = target(tiny(), dict(data=1, fsdp=4, tensor=2), "fsdp_tp")
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  restored = ckpt.restore_latest(abstract)
  assert restored.step == 6 and restored.data_state["next_index"] == 6
  assert_same(restored.state, result.state)
  kernel = restored.state.params["blocks_0"]["img_mlp"]["fc1"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert dict(kernel.sharding.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert result.state.params["blocks_0"]["img_mlp"]["fc1"]["kernel"].sharding.is_fully_replicated


def truncate_latest(checkpoints: str) -> int:
  """Cuts every array file of the latest step to 3 bytes; returns that step."""
  step = max(int(n) for n in os.listdir(checkpoints) if n.isdigit())
  files = [f for f in glob.glob(os.path.join(checkpoints, str(step), "state", "**", "d", "*"),
                                recursive=True) if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, "r+b") as handle:
      handle.truncate(3)
  return step


def test_truncated_latest_step_falls_back_to_the_previous_one(run, tmp_path, caplog):
  source, straight = run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  assert truncate_latest(os.path.join(workdir, "checkpoints")) == 6
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          straight.state)
  with caplog.at_level("WARNING"):
    restored = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).restore_latest(abstract)
  assert restored.step == 3 and restored.data_state["next_index"] == 3
  assert any("step 6" in r.getMessage() and "cannot be restored" in r.getMessage()
             for r in caplog.records)
  assert any("Resuming from step 3" in r.getMessage() for r in caplog.records)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "unreadable_6"))
  # Resuming from step 3 retraces steps 4-6 exactly.
  result = train.train(tiny(), workdir)
  assert [r["step"] for r in result.history] == [4, 5, 6]
  assert_same(result.state.params, straight.state.params)


def test_unreadable_only_checkpoint_is_an_error_not_a_fresh_start(run, tmp_path):
  source, _ = run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  truncate_latest(os.path.join(workdir, "checkpoints"))
  with pytest.raises(ckpt_lib.CheckpointError, match="No checkpoint in .* can be restored"):
    train.train(tiny(), workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "0"))


def flip_a_bit(checkpoints: str, step: int) -> None:
  """Flips one bit in the middle of the step's largest array, written back through
  TensorStore: the files still decompress and decode, only the content is wrong, as after
  silent corruption. (Flipping bytes of the files instead hits zstd-compressed chunks in
  some layouts, which fail to decode before any checksum is read.)"""
  base = "file://" + os.path.abspath(os.path.join(checkpoints, str(step), "state")) + "/"
  keys = ts.KvStore.open({"driver": "ocdbt", "base": base}).result().list().result()
  names = [k.decode()[:-len("/.zarray")] for k in keys if k.endswith(b"/.zarray")]
  stores = {n: ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base,
                                                       "path": n + "/"}}).result()
            for n in names}
  name = max(names, key=lambda n: stores[n].size)
  values = np.ascontiguousarray(stores[name].read().result())
  values.reshape(-1).view(np.uint8)[values.nbytes // 2] ^= 0x10
  stores[name].write(values).result()


def test_bit_flipped_step_fails_its_checksums_and_an_older_step_is_used(run, tmp_path, caplog):
  """A flipped bit in each of the two newest of three kept steps: the run resumes from the oldest,
  retraces the rest exactly, and the bad steps are moved aside."""
  source, straight = run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  result = train.train(tiny(total_steps=9, checkpoint__keep_last=3), workdir)  # 3, 6, 9 kept
  checkpoints = os.path.join(workdir, "checkpoints")
  assert sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit()) == [3, 6, 9]
  for step in (9, 6):
    flip_a_bit(checkpoints, step)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          straight.state)
  with pytest.raises(ckpt_lib.ChecksumMismatch, match="content checksum mismatch"):
    ckpt_lib.Checkpointer(checkpoints, read_only=True).restore_step(9, abstract)
  with caplog.at_level("WARNING"):
    resumed = train.train(tiny(total_steps=9, checkpoint__keep_last=3), workdir)
  warnings = [r.getMessage() for r in caplog.records]
  assert any("step 9" in w and "content checksum mismatch" in w for w in warnings), warnings
  assert any("Resuming from step 3" in w for w in warnings), warnings
  assert [r["step"] for r in resumed.history] == [4, 5, 6, 7, 8, 9]
  assert_same(resumed.state, result.state)
  names = sorted(os.listdir(checkpoints))
  assert "unreadable_9" in names and "unreadable_6" in names


def test_every_step_unreadable_lists_each_step_in_a_short_message(run, tmp_path):
  source, straight = run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  flip_a_bit(checkpoints, 6)
  truncate_latest_of = lambda step: [open(f, "r+b").truncate(3) for f in glob.glob(
      os.path.join(checkpoints, str(step), "state", "**", "d", "*"), recursive=True)
      if os.path.isfile(f)]
  truncate_latest_of(3)
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    train.train(tiny(), workdir)
  message = str(info.value)
  lines = message.splitlines()
  assert lines[0] == f"No checkpoint in {checkpoints} can be restored:"
  assert lines[1].startswith("  step 6: content checksum mismatch")
  assert lines[2].startswith("  step 3: files are cut short")
  assert len(lines) == 4 and max(map(len, lines)) < 600, message
  assert "config no longer matches" not in message
  assert sorted(n for n in os.listdir(checkpoints)) == ["3", "6"]  # nothing moved


def test_init_from_loads_weights_only(run, tmp_path):
  source, straight = run
  # One step (total_steps must be >= 1) with the EMA frozen (decay 1): the EMA still holds
  # exactly the weights that were loaded, and the optimizer state is fresh (one update, not
  # the source run's three).
  result = train.train(tiny(total_steps=1, init_from=source, ema__decay=1.0), str(tmp_path))
  assert result.step == 1
  assert_same(result.state.ema_params, straight.state.ema_params)
  assert int(result.state.opt_state.inner_state[1][0].count) == 1
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       result.state.params, straight.state.ema_params)
  assert 0.0 < max(jax.tree.leaves(moved)) < 0.1  # one small step from the loaded weights
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          straight.state.params)
  raw = ckpt_lib.load_weights(os.path.join(source, "checkpoints", "3"), abstract, use_ema=False)
  assert_same(raw, train.train(tiny(total_steps=3), str(tmp_path / "three")).state.params)
  with pytest.raises(ckpt_lib.CheckpointError, match="neither an sd3jax checkpoint"):
    ckpt_lib.load_weights(str(tmp_path / "nothing_here"), abstract)


def test_keep_last_n_and_every_mth(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep_last=2, keep_every=4, async_save=True)
  state = {"w": jax.numpy.arange(4.0)}
  for step in range(1, 11):
    ckpt.save(step, state, {"next_index": step}, {"step": step})
  ckpt.close()
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps() == [4, 8, 9, 10]


def _env():
  return subprocess_env.env(devices=8)


def _sd3jax(*args):
  exe = shutil.which("sd3jax")
  return ([exe] if exe else [sys.executable, "-m", "sd3jax.cli"]) + list(args)


def test_sigterm_saves_the_current_step_and_a_rerun_resumes(tmp_path):
  workdir, cache = str(tmp_path / "run"), str(tmp_path / "xla_cache")
  flags = ["--config", EXPERIMENT, "--workdir", workdir, "--config.checkpoint.every_steps=100000",
           f"--config.compilation_cache_dir={cache}"]
  log = open(tmp_path / "first.log", "w")
  proc = subprocess.Popen(_sd3jax("train", *flags, "--config.total_steps=100000"),
                          stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while not (os.path.exists(metrics) and metrics_lib.read_jsonl(metrics)):
    assert proc.poll() is None, open(tmp_path / "first.log").read()
    assert time.time() < deadline, "no step was logged"
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == train.EXIT_INTERRUPTED, open(tmp_path / "first.log").read()
  output = open(tmp_path / "first.log").read()
  assert "Received SIGTERM" in output
  last = metrics_lib.read_jsonl(metrics)[-1]["step"]
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  stopped = ckpt.latest_step()
  assert stopped == last and 0 < stopped < 100000  # the step it was at, not a periodic one

  rerun = subprocess.run(_sd3jax("train", *flags, f"--config.total_steps={stopped + 2}"),
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Resumed from step {stopped}" in rerun.stdout
  steps = [r["step"] for r in metrics_lib.read_jsonl(metrics)]
  assert steps[-2:] == [stopped + 1, stopped + 2]
  assert ckpt.latest_step() == stopped + 2


def test_host_and_device_checksums_agree_on_a_sharded_mixed_state():
  """Small states are summed in NumPy, large ones on their devices: the same numbers, so a
  checkpoint saved by either verifies under the other."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
  rng = np.random.default_rng(0)
  state = {
      "w": jax.device_put(rng.standard_normal((8, 6)).astype(np.float32),
                          NamedSharding(mesh, P("data", "fsdp"))),
      "bf16": jnp.asarray(rng.standard_normal((5, 3)), jnp.bfloat16),
      "step": jnp.asarray(7, jnp.int32),
      "mask": jnp.asarray(rng.random(9) > 0.5),
      "u8": jnp.asarray(rng.integers(0, 255, (4, 4)), jnp.uint8),
      "key": jax.random.key(3),
      "host": rng.standard_normal((2, 3)).astype(np.float32),
  }
  on_host = ckpt_lib.state_checksums(state)
  on_devices = ckpt_lib.state_checksums(state, host_max_bytes=0)
  assert on_host == on_devices and len(on_host) == len(state)
  swapped = dict(state, w=jnp.flip(state["w"], axis=1))  # same words, other places
  assert ckpt_lib.state_checksums(swapped)["['w']"][0] == on_host["['w']"][0]
  assert ckpt_lib.state_checksums(swapped)["['w']"][1] != on_host["['w']"][1]
