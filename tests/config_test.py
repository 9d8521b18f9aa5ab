"""Configs: loading, overrides, and errors that name the key before anything compiles."""
import os
import subprocess
import sys

import jax
import pytest
from absl import flags

from sd3jax import cli
from sd3jax import config as config_lib
from sd3jax import train

import subprocess_env

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXPERIMENT = os.path.join(ROOT, "experiments", "tiny.py")


def tiny(arg="", **overrides):
  config = config_lib.load(EXPERIMENT + (f":{arg}" if arg else ""))
  with config.unlocked():
    for key, value in overrides.items():
      config_lib.set_key(config, key.replace("__", "."), value)
  return config


@pytest.fixture
def no_compiling(monkeypatch):
  """Fails the test if anything reaches jax.jit (i.e. would compile)."""
  def refuse(*args, **kwargs):
    raise AssertionError("jax.jit was called before the config was validated")
  monkeypatch.setattr(jax, "jit", refuse)


def test_tiny_experiment_is_valid_and_complete():
  config = config_lib.validate(tiny(), num_devices=8)
  assert set(config_lib.all_keys(config)) == set(config_lib.all_keys(config_lib.defaults()))
  assert config.model.depth == 2 and config.model.hidden_size == 64
  assert config_lib.latent_size(config) == 8 and config_lib.text_len(config) == 8
  assert config_lib.validate(tiny("fsdp_tp"), num_devices=8).sharding_rules == "fsdp_tp"


def test_cli_parses_command_config_overrides_and_workdir():
  argv = ["sd3jax", "train", "--config", EXPERIMENT + ":fsdp", "--config.optimizer.eps=1e-15",
          "--config.total_steps=7", "--workdir", "/tmp/x"]
  name, config, workdir, rest = cli.parse(argv, flags.FlagValues())
  assert (name, workdir, rest) == ("train", "/tmp/x", [])
  assert config.optimizer.eps == 1e-15 and config.total_steps == 7
  assert config.sharding_rules == "fsdp" and config.mesh.fsdp == -1


def test_unknown_key_on_the_command_line_names_the_key_and_the_fix():
  argv = ["sd3jax", "train", "--config", EXPERIMENT, "--config.optimizer.epz=1e-15",
          "--workdir", "/tmp/x"]
  with pytest.raises(cli.UsageError) as e:
    cli.parse(argv, flags.FlagValues())
  message = str(e.value)
  assert "config.optimizer.epz" in message and "Did you mean 'config.optimizer.eps'" in message
  with pytest.raises(cli.UsageError, match="unknown command 'trian'"):
    cli.parse(["sd3jax", "trian", "--config", EXPERIMENT], flags.FlagValues())


def test_unknown_key_in_a_config_names_the_key(no_compiling):
  config = tiny()
  with config.unlocked():
    config.optimizer.learning_rat = 1.0
  with pytest.raises(config_lib.ConfigError, match=r"config\.optimizer\.learning_rat.*"
                     r"Did you mean 'config\.optimizer\.learning_rate'"):
    config_lib.validate(config, num_devices=8)
  with pytest.raises(config_lib.ConfigError, match="config.totl_steps"):
    config_lib.set_key(tiny(), "totl_steps", 3)


@pytest.mark.parametrize("overrides, pattern", [
    (dict(batch_size=12), r"config\.batch_size=12 is not divisible by .* data shards.*8"),
    (dict(batch_size=16, microbatches=4), r"config\.batch_size=16 .* = 32"),
    (dict(mesh__data=16), r"config\.mesh=.*needs 16 devices but only 8"),
    (dict(mesh__data=2, mesh__fsdp=2), r"config\.mesh=.* needs 4 devices but 8 are available"),
    (dict(data__image_size=72), r"config\.data\.image_size=72 is not divisible by config\.model"
                                r"\.patch_size x config\.data\.vae_factor = 2 x 8 = 16"),
    (dict(model__num_heads=3), r"config\.model\.hidden_size=64 is not divisible"),
    (dict(conditioning__t5_dim=16), r"config\.model\.joint_attention_dim=32 must equal"),
    (dict(schedule__name="linear"), r"config\.schedule\.name='linear'"),
    (dict(optimizer__learning_rate=-1e-3),
     r"config\.optimizer\.learning_rate=-0\.001 is out of range: it must be in \(0\.0, inf\)"),
    (dict(total_steps=0), r"config\.total_steps=0 is out of range: it must be in \[1, inf\)"),
    (dict(total_steps=-5), r"config\.total_steps=-5 is out of range"),
    (dict(ema__decay=1.5), r"config\.ema\.decay=1\.5 is out of range: it must be in \[0\.0, 1\.0\]"),
    (dict(data__p_synthetic=-0.1), r"config\.data\.p_synthetic=-0\.1 is out of range"),
])
def test_bad_configs_fail_before_compiling(overrides, pattern, no_compiling, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=pattern):
    train.train(tiny(**overrides), str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing written, nothing compiled


def test_tensor_axis_must_divide_the_heads(no_compiling):
  with pytest.raises(config_lib.ConfigError, match=r"num_heads=2 is not divisible by the tensor "
                     r"axis 4.*config\.mesh\.tensor"):
    config_lib.validate(tiny("fsdp_tp", mesh__tensor=4), num_devices=8)


def test_bad_config_on_the_command_line_exits_2_with_the_message(tmp_path):
  env = subprocess_env.env(devices=8)
  for override, message in (("--config.batch_size=12", "config.batch_size=12 is not divisible"),
                            ("--config.optimzer.eps=1",
                             "Unknown config key 'config.optimzer.eps'")):
    out = subprocess.run(
        [sys.executable, "-m", "sd3jax.cli", "train", "--config", EXPERIMENT, override,
         "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
  assert not os.path.exists(tmp_path / "w")


def test_effective_config_round_trips_through_json():
  config = config_lib.validate(tiny(), num_devices=8)
  as_json = config_lib.to_json(config)
  assert as_json["model"]["dual_attention_layers"] == [] and as_json["flow"]["formulation"] == "rf"
  again = config_lib.complete(config_lib.ConfigDict(as_json))
  assert config_lib.to_json(again) == as_json
