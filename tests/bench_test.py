"""sd3jax bench / compile: timing the real step, diffusers side by side, AOT for a topology,
and the analytic FLOPs formula against XLA's cost analysis."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from sd3jax import bench, cli, train
from sd3jax import compile as compile_lib
from sd3jax import config as config_lib
from sd3jax.models import mmdit


def tiny(*overrides: str, arg: str = "dp"):
  return config_lib.load(f"experiments/tiny.py:{arg}", overrides)


@pytest.fixture(scope="module")
def tiny_bench():
  # One run serves both tests: 2 timed steps per side after 1 warmup step.
  return bench.bench_main(tiny(), steps=2, warmup=1, vs_diffusers=True, peak_n=512,
                          devices=jax.devices()[:1])


def test_bench_tiny(tiny_bench):
  r = tiny_bench
  s = r["sd3jax"]
  for key in ("steps_per_sec", "examples_per_sec", "tflops_per_sec_per_device", "mfu"):
    assert s[key] > 0, key
  assert r["peak_gflops_per_sec"] > 0 and r["flops_per_step"] == train.flops_per_step(
      config_lib.validate(tiny(), num_devices=1))
  assert len(s["seconds_per_step"]) == 2


def test_bench_vs_diffusers(tiny_bench):
  r = tiny_bench
  assert r["diffusers"]["steps_per_sec"] > 0 and r["torch_peak_gflops_per_sec"] > 0
  assert r["ratio"] == pytest.approx(r["sd3jax"]["steps_per_sec"] /
                                     r["diffusers"]["steps_per_sec"])
  assert "sd3jax / diffusers" in bench.format_result(r)


def test_vs_diffusers_refuses_another_optimizer():
  with pytest.raises(ValueError, match="optimizer.name='muon'.*--config.optimizer.name=adamw"):
    bench.bench_main(tiny("optimizer.name=muon"), steps=1, vs_diffusers=True)


def test_compile_small_topology(capsys):
  r = compile_lib.compile_main(tiny("batch_size=8", arg="fsdp"), "v5p:2x2x1")
  assert r["num_devices"] == 4 and r["chip"] == "TPU v5p" and r["mesh"]["fsdp"] == 4
  assert r["fits"] and r["argument_bytes"] > 0 and r["temp_bytes"] > 0
  assert r["flops"] > 0 and r["step_seconds"] > 0 and 0 < r["mfu"] < 1
  assert "fits" in capsys.readouterr().out


def test_cli_commands_registered():
  for name in ("bench", "compile", "scaling"):
    assert name in cli.COMMANDS
  assert not cli.COMMANDS["scaling"].needs_config
  assert not cli.COMMANDS["bench"].needs_workdir


# A model whose work is matmuls (hidden 128, 64 image + 8 text tokens), unscanned: XLA's
# cost analysis counts every layer, so analytic and XLA FLOPs are comparable.
FLOPS_OVERRIDES = ("model.hidden_size=128", "model.num_heads=2", "model.scan_layers=False",
                   "data.image_size=128", "model.sample_size=16", "batch_size=8")


def _xla_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])


def test_flops_match_xla_forward():
  config = config_lib.validate(tiny(*FLOPS_OVERRIDES), num_devices=1)
  cfg, latent = config_lib.model_config(config), config_lib.latent_size(config)
  shapes = train.input_shapes(config, 1)
  args = [jnp.zeros(shapes[k]) for k in ("x", "t", "context", "pooled")]
  model = mmdit.MMDiT(cfg)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *args)["params"]))
  compiled = jax.jit(lambda p, *a: model.apply({"params": p}, *a)).lower(params, *args).compile()
  analytic = mmdit.flops_per_forward(cfg, latent, latent, config_lib.text_len(config))
  assert _xla_flops(compiled) == pytest.approx(analytic, rel=0.1)


def test_flops_match_xla_train_step():
  built = bench.build_jax_step(tiny(*FLOPS_OVERRIDES), devices=jax.devices()[:1])
  assert _xla_flops(built["compiled"]) == pytest.approx(built["flops_per_step"], rel=0.1)
