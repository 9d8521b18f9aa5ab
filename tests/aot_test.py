"""AOT compilation for TPU topologies through libtpu, on a CPU-only machine.

Needs libtpu (aot.libtpu_requirement()); without it these tests fail, on purpose.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sd3jax import aot, parallel
from sd3jax.models import mmdit

TOPOLOGY = "v5p:2x2x1"  # the smallest multi-chip v5p slice (v5p-8): 4 chips


def tiny(scan_layers: bool) -> mmdit.MMDiTConfig:
  return mmdit.MMDiTConfig(depth=3, hidden_size=64, num_heads=2, joint_attention_dim=32,
                           pooled_projection_dim=32, pos_embed_max_size=16, sample_size=8,
                           dtype="bfloat16", scan_layers=scan_layers)


@pytest.fixture(scope="module")
def tiny_reports():
  return {scan: aot.mmdit_train_step_report(tiny(scan), TOPOLOGY, global_batch=8,
                                             latent_hw=(8, 8), text_len=8)
          for scan in (True, False)}


def test_topology_names():
  assert aot.parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4))
  assert aot.parse_topology("v5p-128") == ("v5p", (4, 4, 4))    # 128 TensorCores = 64 chips
  assert aot.parse_topology("v5p-64") == ("v5p", (2, 4, 4))
  assert aot.parse_topology("v5p-8") == ("v5p", (2, 2, 1))
  assert aot.parse_topology("v4-8") == ("v4", (2, 2, 1))
  assert aot.parse_topology("v6e-16") == ("v6e", (4, 4))
  assert aot.parse_topology("v6e-256") == ("v6e", (16, 16))
  assert aot.parse_topology("v5litepod-8") == ("v5e", (2, 4))
  with pytest.raises(ValueError, match="v5p:2x2x1"):
    aot.parse_topology("v5p")


def test_topology_devices():
  for name, n, kind in [("v5p:2x2x1", 4, "TPU v5"), ("v4:2x2x1", 4, "TPU v4"),
                        ("v6e:2x2", 4, "TPU v6 lite"), ("v5e:1x1", 1, "TPU v5 lite"),
                        ("v6e-16", 16, "TPU v6 lite")]:
    devices = aot.topology_devices(name)
    assert len(devices) == n and devices[0].device_kind == kind, name
    assert aot.chip_for(devices[0]) is not None
  assert aot.topology_devices("v5p:2x2x1") == aot.topology_devices("v5p-8")
  assert len(jax.devices()) == 8 and jax.devices()[0].platform == "cpu"  # CPU backend untouched
  with pytest.raises(ValueError, match="rejected"):
    aot.topology_devices("v6e:3x3")
  two = aot.topology_devices("v5p:2x2x1", num_slices=2)
  assert len(two) == 8 and {d.slice_index for d in two} == {0, 1}
  mesh = parallel.make_mesh(ici={"fsdp": -1}, dcn={"data": 2}, devices=two)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_jaxpr_matmul_flops():
  mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
  def f(w, x):
    h = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]
    per_shard = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("x"), P()),
                              out_specs=P("x"))
    return per_shard(h, w[0])
  w = jax.ShapeDtypeStruct((5, 16, 16), jnp.float32)
  x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  with jax.set_mesh(mesh):
    jaxpr = jax.jit(f).trace(w, x).jaxpr
  one = 2 * 8 * 16 * 16
  assert aot.jaxpr_matmul_flops(jaxpr) == 6 * one
  assert aot.jaxpr_matmul_flops(jaxpr, expand_loops=False) == 2 * one


def test_tiny_mmdit_fits(tiny_reports):
  r = tiny_reports[True]
  assert r["num_devices"] == 4 and r["chip"] == "TPU v5p" and r["mesh"]["fsdp"] == 4
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes",
              "total_bytes", "flops", "bytes_accessed", "step_seconds", "mfu"):
    assert r[key] > 0, key
  assert r["alias_bytes"] > 0  # the donated state is reused for the new state
  assert r["fits"] is True
  assert "does NOT" not in aot.format_report(r)


def test_scan_loop_correction(tiny_reports):
  scanned, unscanned = tiny_reports[True], tiny_reports[False]
  # Depth 3 = a scan over 2 blocks + the pre-only block; XLA counts the scan's body once ...
  assert scanned["xla_flops"] < 0.8 * unscanned["xla_flops"]
  assert unscanned["loop_factor"] == 1.0 and scanned["loop_factor"] > 1.2
  # ... the jaxpr count of the missing iterations restores it (matmuls exactly).
  assert scanned["matmul_flops"] == pytest.approx(unscanned["matmul_flops"], rel=1e-6)
  assert scanned["flops"] == pytest.approx(unscanned["flops"], rel=0.1)
  # And the analytic model FLOPs agree with the matmuls XLA runs.
  assert scanned["model_flops"] == pytest.approx(scanned["matmul_flops"], rel=0.1)


def test_absurd_config_does_not_fit():
  """A dense layer with 128 GiB of weights per v5p chip: compiled, never allocated."""
  devices = aot.topology_devices(TOPOLOGY)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("fsdp",))
  w_sharding, replicated = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
  step = jax.value_and_grad(lambda w, x: jnp.sum(jnp.tanh(x @ w).astype(jnp.float32)))

  def args(rows):  # bfloat16: f32 matmuls at "highest" precision (conftest) compile slowly
    return (jax.ShapeDtypeStruct((rows, 2**15), jnp.bfloat16, sharding=w_sharding),
            jax.ShapeDtypeStruct((8, rows), jnp.bfloat16, sharding=replicated))

  r = aot.compile_report(step, args(2**23), out_shardings=(replicated, w_sharding), mesh=mesh)
  assert r["fits"] is False and "memory" in r["error"].lower()
  assert r["chip"] == "TPU v5p" and r["num_devices"] == 4
  assert "NOT fit" in aot.format_report(r)
  # A quarter of it (32 GiB per chip) compiles; it is over the 90% budget of v5e's 16 GiB.
  jitted = jax.jit(step, out_shardings=(replicated, w_sharding))
  r = aot.compile_report(jitted, args(2**21), chip="v5e")
  assert r["argument_bytes"] >= 32 * aot.GiB and r["fits"] is False
  assert aot.compile_report(jitted, args(2**21))["fits"] is True  # v5p: 95 GiB


def test_jitted_function_and_chip_table():
  devices = aot.topology_devices("v6e:2x2")
  mesh = parallel.make_mesh(ici={"data": -1}, devices=devices)
  f = jax.jit(lambda a, b: a @ b, in_shardings=(parallel.batch_sharding(mesh, 2),
                                                parallel.replicated(mesh)))
  a = jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16)
  b = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)
  r = aot.compile_report(f, (a, b), model_flops=2 * 4096 * 1024 * 1024)
  assert r["chip"] == "TPU v6e" and r["num_devices"] == 4
  assert r["xla_flops"] == pytest.approx(2 * 1024 * 1024 * 1024)  # per device
  assert r["flops"] == r["matmul_flops"] == r["xla_flops"]
  assert r["argument_bytes"] == 2 * 1024 * 1024 * 2  # a's shard + b, bf16
  assert 0 < r["mfu"] <= 1
  assert aot.chip_for("NVIDIA H100 80GB HBM3").name.startswith("H100")
  assert aot.chip_for("TPU v5 lite") is aot.CHIPS["v5e"]
  assert aot.chip_for("TPU v7") is None


def _tiny_experiment():
  from sd3jax import config as config_lib
  return config_lib.load("experiments/tiny.py")


def test_search_fewest_microbatches_logic():
  """The search on a stand-in compiler with a known memory model: per (attention, remat) it
  returns the fewest microbatches that fit, compiles only O(log n) counts, ranks the fitting
  rows by the cost model and prints the config line of the fastest."""
  from sd3jax import compile as compile_lib
  config = _tiny_experiment()
  config.batch_size = 64
  activations = {("splash", "none"): 30, ("splash", "full"): 3, ("xla", "none"): 90,
                 ("xla", "full"): 9}  # GiB per chip at one microbatch
  calls = []

  def fake_compile(c, topology, **kw):
    key = (c.model.attention_impl, c.model.remat_policy)
    calls.append((*key, c.microbatches))
    total = (2 + activations[key] / c.microbatches) * aot.GiB
    seconds = (1.0 if key[0] == "splash" else 2.0) * (1.3 if key[1] == "full" else 1.0)
    return {"fits": total <= 10 * aot.GiB, "total_bytes": total, "temp_bytes": total - aot.GiB,
            "step_seconds": seconds, "cost_model_seconds": seconds * 1.5, "mfu": 0.5,
            "cost_model_mfu": 0.3}

  r = compile_lib.search(config, "v5p:2x2x1", remats=("full", "none"), compile_fn=fake_compile,
                         verbose=False)
  assert r["options"] == [1, 2, 4, 8, 16]          # batch 64 over 4 data shards
  got = {(x["attention_impl"], x["remat_policy"]): x["microbatches"] for x in r["rows"]}
  assert got == {("splash", "none"): 4, ("splash", "full"): 1, ("xla", "none"): 16,
                 ("xla", "full"): 2}
  for (attn, remat), mb in got.items():            # the next smaller count was tried, failed
    if mb > 1:
      assert (attn, remat, mb // 2) in calls
  assert len(calls) <= 4 * 3
  assert r["best"]["attention_impl"] == "splash" and r["best"]["remat_policy"] == "none"
  assert r["command"] == ("--config.model.attention_impl=splash "
                          "--config.model.remat_policy=none --config.microbatches=4")
  text = compile_lib.format_search(r)
  assert "Fastest by libtpu's cost model" in text and "| splash | none | 4 |" in text


def test_search_tiny_model_on_v5p():
  """`sd3jax compile --search` for real: the tiny MM-DiT in bf16 on v5p:2x2x1, both kernels
  (at the default matmul precision: Mosaic does not compile bf16 at "highest"); one remat
  policy, as the search over policies is tested above without compiling."""
  from sd3jax import compile as compile_lib
  config = _tiny_experiment()
  config.model.dtype = "bfloat16"
  with jax.default_matmul_precision("default"):
    r = compile_lib.search(config, TOPOLOGY, remats=("none",), verbose=False)
  assert [(x["attention_impl"], x["remat_policy"]) for x in r["rows"]] == [
      ("splash", "none"), ("xla", "none")]
  for row in r["rows"]:
    assert row["fits"] and row["microbatches"] == 1 and row["num_devices"] == 4
    assert row["cost_model_seconds"] > 0 and row["step_seconds"] > 0
  splash = r["rows"][0]
  assert splash["kernel_flops"] > 0 and r["rows"][1]["kernel_flops"] == 0
  assert r["command"].startswith("--config.model.attention_impl=")


def test_bucket_set_plans_on_the_largest_and_checks_the_rest():
  """Buckets: the search compiles only the largest bucket, then the best row's settings on
  the others; a bucket that needs more memory than the largest is reported as not fitting."""
  from sd3jax import compile as compile_lib
  config = _tiny_experiment()
  config.batch_size = 64
  with config.unlocked():
    config.data.buckets = ((64, 64), (48, 80), (80, 48))
  seen = []

  def fake_compile(c, topology, **kw):
    (h, w), = c.data.buckets
    seen.append((h, w, c.microbatches))
    total = (1 + 8 * h * w / 4096 / c.microbatches) * aot.GiB
    if (h, w) == (80, 48):
      total *= 1.5    # e.g. a layout XLA handles worse
    return {"fits": total <= 4 * aot.GiB, "total_bytes": total, "temp_bytes": total / 2,
            "step_seconds": 1.0 / c.microbatches ** 0.1}

  r = compile_lib.search(config, "v5p:2x2x1", remats=("none",), attention=("xla",),
                         compile_fn=fake_compile, verbose=False)
  assert r["bucket"] == "64x64" and r["best"]["microbatches"] == 4
  assert {(h, w) for h, w, _ in seen[:-2]} == {(64, 64)}      # planned on the largest
  assert seen[-2:] == [(48, 80, 4), (80, 48, 4)]              # then the best row elsewhere
  assert [(b["bucket"], b["fits"]) for b in r["other_buckets"]] == [("48x80", True),
                                                                    ("80x48", False)]
  assert "80x48 do NOT fit" in compile_lib.format_search(r)


def test_compile_reports_every_bucket_largest_first():
  """`sd3jax compile` with three buckets: three real compiles, the largest one's report."""
  from sd3jax import compile as compile_lib
  config = _tiny_experiment()
  with config.unlocked():
    config.data.buckets = ((48, 80), (64, 64), (80, 48))
  r = compile_lib.compile_main(config, TOPOLOGY, verbose=False)
  assert [b["bucket"] for b in r["buckets"]] == ["64x64", "48x80", "80x48"]
  assert r["all_buckets_fit"] and r["latent"] == "8x8"
  assert all(b["fits"] and b["step_seconds"] > 0 for b in r["buckets"])
  text = compile_lib.format_buckets(r)
  assert "| 48x80 | yes |" in text and "All buckets fit" in text


def test_out_of_memory_message_is_read():
  from sd3jax import compile as compile_lib
  need = compile_lib._needed_bytes  # pylint: disable=protected-access
  assert need("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
              "temporaries (256.12G) exceeds available HBM (95.74G).") == 256.12 * aot.GiB
  assert need("Ran out of memory in memory space hbm. Used 146.2G of 95.74G hbm.") == 146.2 * aot.GiB
  assert need("INTERNAL: something else") is None
