"""The trainer on 8 fake CPU devices: mesh invariance, exact resume, accumulation, the guard."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from sd3jax import checkpoint as ckpt_lib
from sd3jax import config as config_lib
from sd3jax import metrics as metrics_lib
from sd3jax import optim, parallel, train
from sd3jax.data import synthetic
from sd3jax.models import mmdit

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "tiny.py")

# name -> (mesh, rules, number of devices)
MESHES = {
    "one_device": (dict(data=-1, fsdp=1, tensor=1), "dp", 1),
    "data8": (dict(data=8, fsdp=1, tensor=1), "dp", 8),
    "fsdp8": (dict(data=1, fsdp=8, tensor=1), "fsdp", 8),
    "data2_fsdp2_tensor2": (dict(data=2, fsdp=2, tensor=2), "fsdp_tp", 8),
}


def tiny(mesh="data8", **overrides):
  """experiments/tiny.py on one of MESHES, with dotted-key overrides."""
  config = config_lib.load(EXPERIMENT)
  shape, rules, _ = MESHES[mesh]
  with config.unlocked():
    config.mesh.update(shape)
    config.sharding_rules = rules
    config.total_steps = 6
    config.checkpoint.every_steps = 3
    for key, value in overrides.items():
      config_lib.set_key(config, key.replace("__", "."), value)
  return config


def devices(mesh):
  return jax.devices()[:MESHES[mesh][2]]


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(leaves(a), leaves(b)))


@pytest.fixture(scope="module")
def start(tmp_path_factory):
  """Random weights to start from: at init, adaLN-Zero gates hide the blocks from the loss."""
  config = config_lib.validate(tiny("one_device"), 1)
  init_fn = train.make_init_fn(config, mmdit.MMDiT(config_lib.model_config(config)),
                               optim.make_optimizer(config.optimizer), 1)
  shapes = jax.eval_shape(lambda r: nn.unbox(init_fn(r)).params, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jax.numpy.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                        shapes)
  path = str(tmp_path_factory.mktemp("start"))
  ckpt = ckpt_lib.Checkpointer(path)
  ckpt.save(0, {"params": params, "ema_params": params}, {}, {})
  ckpt.close()
  return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, start):
  """6 steps of the tiny model on each mesh, from the same random weights."""
  out = {}
  for name in MESHES:
    workdir = str(tmp_path_factory.mktemp(name))
    out[name] = (workdir, train.train(tiny(name, init_from=start), workdir,
                                      devices=devices(name)))
  return out


def test_same_losses_on_every_mesh(runs):
  reference = [r["loss"] for r in runs["one_device"][1].history[:5]]
  assert len(reference) == 5 and all(np.isfinite(reference))
  assert len(set(reference)) == 5  # the data and noise differ from step to step
  for name, (_, result) in runs.items():
    losses = [r["loss"] for r in result.history[:5]]
    np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=name)
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5, 6]


def test_state_is_sharded_as_the_rules_say(runs):
  params = runs["data2_fsdp2_tensor2"][1].state.params
  kernel = params["blocks_0"]["img_mlp"]["fc1"]["kernel"]  # (layers, embed, mlp)
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  mu = runs["fsdp8"][1].state.opt_state.inner_state[1][0].mu  # AdamW moments follow the params
  assert mu["blocks_0"]["img_mlp"]["fc1"]["kernel"].sharding.spec[1] == "fsdp"
  replicated = runs["data8"][1].state.params["blocks_0"]["img_mlp"]["fc1"]["kernel"]
  assert replicated.sharding.is_fully_replicated


def test_resume_is_exact(runs, start, tmp_path):
  straight_dir, straight = runs["data8"]
  workdir = str(tmp_path)
  first = train.train(tiny(total_steps=3, init_from=start), workdir, devices=devices("data8"))
  assert first.step == 3 and not first.interrupted
  second = train.train(tiny(total_steps=6, init_from=start), workdir, devices=devices("data8"))
  assert second.step == 6
  assert [r["step"] for r in second.history] == [4, 5, 6]
  # Same data at steps 4-6 (the iterator continued), hence the same losses, bit for bit.
  assert [r["loss"] for r in second.history] == [r["loss"] for r in straight.history[3:]]
  assert max_abs_diff(second.state.params, straight.state.params) <= 1e-7
  assert max_abs_diff(second.state.ema_params, straight.state.ema_params) <= 1e-7
  assert max_abs_diff(second.state.opt_state, straight.state.opt_state) <= 1e-7
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ckpt.all_steps() == [3, 6]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          straight.state)
  assert ckpt.restore_step(3, abstract).data_state["next_index"] == 3
  assert ckpt.restore_step(6, abstract).data_state["next_index"] == 6
  # The effective config is saved next to every step and in the workdir.
  saved = ckpt.restore_step(6, abstract).config
  assert saved["total_steps"] == 6 and saved["model"]["hidden_size"] == 64
  assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 6


def test_microbatches_equal_one_full_batch(runs):
  name = "data2_fsdp2_tensor2"
  state = runs[name][1].state
  mesh = train.make_mesh(tiny(name), devices(name))
  rules = parallel.get_rules(MESHES[name][1])
  batch = train.shard_batch(synthetic.make_iterator(tiny(name)).batch(0), mesh)
  rng = jax.random.PRNGKey(7)
  out = {}
  for k in (1, 4):
    config = config_lib.validate(tiny(name, microbatches=k), 8)
    model = mmdit.MMDiT(config_lib.model_config(config))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      fn = jax.jit(train.make_loss_and_grads(config, model, mesh))
      out[k] = jax.device_get(fn(state.params, batch, rng))
  (loss1, grads1, t1), (loss4, grads4, t4) = out[1], out[4]
  np.testing.assert_array_equal(t1, t4)
  assert abs(loss4 - loss1) <= 1e-6 * abs(loss1)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads1))
  assert scale > 0
  assert max_abs_diff(grads4, grads1) <= 1e-6 * scale


class NaNAt:
  """Synthetic batches with NaN latents at the given batch indices."""

  def __init__(self, config, bad):
    self.inner, self.bad = synthetic.make_iterator(config), bad

  def __next__(self):
    index = self.inner.get_state()["next_index"]
    batch = dict(next(self.inner))
    if self.bad(index):
      batch["latents"] = np.full_like(batch["latents"], np.nan)
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
  config = tiny(total_steps=5, checkpoint__every_steps=1, checkpoint__keep_last=10)
  result = train.train(config, str(tmp_path), data=NaNAt(config, lambda i: i == 2),
                       devices=devices("data8"))
  assert result.step == 5
  assert [r["nonfinite_total"] for r in result.history] == [0, 0, 1, 1, 1]
  assert result.history[2]["loss"] != result.history[2]["loss"]  # NaN: nothing finite to average
  assert np.isfinite(result.history[3]["loss"])
  ckpt = ckpt_lib.Checkpointer(os.path.join(str(tmp_path), "checkpoints"), read_only=True)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          result.state)
  s2, s3, s4 = (ckpt.restore_step(s, abstract).state for s in (2, 3, 4))
  assert int(s3.step) == 3 and int(s3.nonfinite_total) == 1
  for part in ("params", "opt_state", "ema_params"):  # step 3 changed nothing ...
    assert max_abs_diff(getattr(s3, part), getattr(s2, part)) == 0.0
  assert max_abs_diff(s4.params, s3.params) > 0.0     # ... and training went on after it


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
  config = tiny(total_steps=10, optimizer__max_nonfinite_steps=3)
  with pytest.raises(train.NonFiniteError, match=r"3 consecutive steps up to step 4 .*"
                     r"max_nonfinite_steps"):
    train.train(config, str(tmp_path), data=NaNAt(config, lambda i: i >= 1),
                devices=devices("data8"))


def test_eval_hook_writes_validation_loss(start, tmp_path):
  config = tiny(total_steps=2, init_from=start, eval__every_steps=2, eval__batches=1,
                log__peak_tflops_per_device=2.0)
  seen = []
  result = train.train(config, str(tmp_path), devices=devices("data8"),
                       eval_fns=[lambda step, state: seen.append(step) or {"custom": 1.5}])
  assert seen == [2] and result.step == 2
  record = json.load(open(tmp_path / "eval" / "step_2.json"))
  assert record["step"] == 2 and record["custom"] == 1.5 and np.isfinite(record["val_loss"])
  logged = [r for r in metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
            if "eval/val_loss" in r]
  per_t = [f"eval/{k}" for k in record if k.startswith("val_loss_t")]
  assert len(per_t) == 8  # sd3jax.evals.validation: 8 fixed timesteps
  assert len(logged) == 1
  row = dict(logged[0])
  assert row.pop("time") > 0  # unix seconds, for time-to-quality curves
  assert row == {"step": 2, **{f"eval/{k}": v for k, v in record.items() if k != "step"}}
  assert {"eval/custom", "eval/val_loss", "eval/cond_gap", *per_t} <= set(row)
  # The conditioning gap: the same loss with every encoder dropped, minus the real one.
  assert record["cond_gap"] == pytest.approx(record["val_loss_dropped"] - record["val_loss"])
  last = result.history[-1]  # with a known peak, MFU is reported
  assert last["mfu"] == pytest.approx(last["tflops_per_sec_per_device"] / 2.0)


def test_metrics_file_and_tensorboard(runs):
  workdir = runs["data8"][0]
  records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "learning_rate", "grad_norm", "param_norm", "steps_per_sec",
              "examples_per_sec", "tflops_per_sec_per_device"):
    assert all(np.isfinite(r[key]) for r in records[1:]), key
  assert records[-1]["examples_per_sec"] == pytest.approx(16 * records[-1]["steps_per_sec"])
  flops = train.flops_per_step(tiny())
  assert records[-1]["tflops_per_sec_per_device"] == pytest.approx(
      flops * records[-1]["steps_per_sec"] / 8 / 1e12)
  assert records[0]["learning_rate"] == pytest.approx(5e-4)  # warmup 2: 1e-3 * 1 / 2
  assert records[1]["learning_rate"] == pytest.approx(1e-3)
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_schedules():
  def sched(name, **kw):
    c = config_lib.defaults().schedule
    with c.unlocked():
      c.name = name
      c.update(kw)
    return optim.make_schedule(c, 1.0, 100)
  warm = sched("warmup_constant", warmup_steps=10)
  assert [float(warm(s)) for s in (0, 4, 9, 10, 99)] == pytest.approx([0.1, 0.5, 1, 1, 1])
  cos = sched("cosine", warmup_steps=0, final_fraction=0.1)
  assert float(cos(0)) == pytest.approx(1.0)
  assert float(cos(50)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
  assert float(cos(100)) == pytest.approx(0.1)
  wsd = sched("wsd", warmup_steps=10, decay_steps=20, final_fraction=0.0)
  assert [float(wsd(s)) for s in (5, 50, 79, 80, 90, 100)] == pytest.approx(
      [0.6, 1, 1, 1, 0.5, 0])


def test_ema_update_period():
  params, ema = {"w": np.ones(3, np.float32)}, {"w": np.zeros(3, np.float32)}
  assert float(optim.ema_update(ema, params, 2, 0.9, 2)["w"][0]) == pytest.approx(0.1)
  assert float(optim.ema_update(ema, params, 3, 0.9, 2)["w"][0]) == 0.0


def test_ema_warmup_caps_the_decay_early_and_not_late():
  params, ema = {"w": np.ones(3, np.float32)}, {"w": np.zeros(3, np.float32)}
  # step 1: decay min(0.998, 2 / 11) -> ema = 1 - 2/11
  early = float(optim.ema_update(ema, params, 1, 0.998, 1, warmup=True)["w"][0])
  assert early == pytest.approx(1.0 - 2.0 / 11.0, rel=1e-5)
  # step 10,000: (1 + s) / (10 + s) > 0.998, so the configured decay holds
  late = float(optim.ema_update(ema, params, 10_000, 0.998, 1, warmup=True)["w"][0])
  assert late == pytest.approx(0.002, rel=1e-4)
  assert float(optim.ema_update(ema, params, 1, 0.998, 1)["w"][0]) == pytest.approx(0.002, rel=1e-4)


def test_adamw_eps_and_clipping_come_from_the_config():
  c = config_lib.defaults().optimizer
  with c.unlocked():
    c.eps, c.grad_clip_norm = 1.0, 1.0
  tx = optim.make_optimizer(c)
  params = {"w": np.zeros(2, np.float32)}
  state = optim.with_learning_rate(tx.init(params), 0.5)
  updates, _ = tx.update({"w": np.array([30.0, 40.0], np.float32)}, state, params)
  # First AdamW step: -lr * g / (|g| + eps) on the clipped gradient g = (0.6, 0.8).
  np.testing.assert_allclose(updates["w"], [-0.5 * 0.6 / 1.6, -0.5 * 0.8 / 1.8], rtol=1e-4)


@pytest.fixture(scope="module")
def muon_runs(tmp_path_factory, start):
  """6 Muon steps of the tiny model, unsharded and FSDP-sharded over 8 devices."""
  out = {}
  for name in ("one_device", "fsdp8"):
    workdir = str(tmp_path_factory.mktemp("muon_" + name))
    out[name] = train.train(tiny(name, init_from=start, optimizer__name="muon"), workdir,
                            devices=devices(name))
  return out


def _muon_leaf(opt_state, *keys):
  """The Muon momentum of the parameter at `keys` (found by path, not by optax's layout)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if "muon" in names and "mu" in names and tuple(names[-len(keys):]) == keys:
      return leaf
  raise KeyError(keys)


def test_muon_sharded_equals_unsharded_and_its_state_follows_the_params(muon_runs):
  reference = [r["loss"] for r in muon_runs["one_device"].history]
  sharded = [r["loss"] for r in muon_runs["fsdp8"].history]
  assert len(reference) == 6 and all(np.isfinite(reference))
  np.testing.assert_allclose(sharded, reference, rtol=1e-5)
  assert max_abs_diff(muon_runs["fsdp8"].state.params,
                      muon_runs["one_device"].state.params) <= 1e-5
  mu = _muon_leaf(muon_runs["fsdp8"].state.opt_state, "blocks_0", "img_mlp", "fc1", "kernel")
  assert mu.shape == (1, 64, 256) and mu.sharding.spec[1] == "fsdp"


def test_muon_resume_is_exact(muon_runs, start, tmp_path):
  workdir = str(tmp_path)
  for steps in (3, 6):
    result = train.train(tiny("one_device", total_steps=steps, init_from=start,
                              optimizer__name="muon"), workdir, devices=devices("one_device"))
  straight = muon_runs["one_device"]
  assert [r["loss"] for r in result.history] == [r["loss"] for r in straight.history[3:]]
  assert max_abs_diff(result.state.params, straight.state.params) <= 1e-7
  assert max_abs_diff(result.state.opt_state, straight.state.opt_state) <= 1e-7


def test_muon_orthogonalises_the_blocks_matrices_and_adamw_steps_the_rest():
  c = config_lib.defaults().optimizer
  with c.unlocked():
    c.name, c.grad_clip_norm = "muon", 0.0
  rng = np.random.default_rng(0)
  params = {"blocks_0": {"fc": {"kernel": np.zeros((2, 8, 32), np.float32),
                                "bias": np.zeros((2, 32), np.float32)}},
            "patch_embed": {"kernel": np.zeros((8, 32), np.float32)}}
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
  tx = optim.make_optimizer(c)
  updates, _ = tx.update(grads, optim.with_learning_rate(tx.init(params), 1.0), params)
  for layer in np.asarray(updates["blocks_0"]["fc"]["kernel"]):  # depth is a batch axis
    # Newton-Schulz's quintic leaves singular values near 1 (0.7-1.2), scaled to AdamW's RMS.
    sv = np.linalg.svd(-layer, compute_uv=False) / (0.2 * np.sqrt(32))
    assert 0.6 < sv.min() and sv.max() < 1.25, sv
  for name, u in (("bias", updates["blocks_0"]["fc"]["bias"]),
                  ("embedder", updates["patch_embed"]["kernel"])):
    mags = np.abs(np.asarray(u))  # Adam's first step: one magnitude whatever the gradient
    np.testing.assert_allclose(mags, mags.flat[0], rtol=1e-4, err_msg=name)
  with pytest.raises(config_lib.ConfigError, match="optimizer.name='sgd'.*adamw"):
    config_lib.validate(tiny("one_device", optimizer__name="sgd"), 1)


def test_muon_ns_steps_sets_how_far_newton_schulz_flattens_the_spectrum():
  """A gradient with singular values from 1 down to 1e-2: one Newton-Schulz step leaves the
  small ones small; 4 (the shapes job's) and 5 (optax's default) bring all near 1."""
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.standard_normal((8, 8)))
  v, _ = np.linalg.qr(rng.standard_normal((32, 8)))
  grad = (u * np.geomspace(1.0, 1e-2, 8)) @ v.T
  params = {"blocks_0": {"fc": {"kernel": np.zeros((8, 32), np.float32)}}}
  spread = {}
  for steps in (1, 4, 5):
    c = config_lib.defaults().optimizer
    with c.unlocked():
      c.name, c.grad_clip_norm, c.muon_ns_steps = "muon", 0.0, steps
    tx = optim.make_optimizer(c)
    grads = {"blocks_0": {"fc": {"kernel": grad.astype(np.float32)}}}
    updates, _ = tx.update(grads, optim.with_learning_rate(tx.init(params), 1.0), params)
    sv = np.linalg.svd(-np.asarray(updates["blocks_0"]["fc"]["kernel"]),
                       compute_uv=False) / (0.2 * np.sqrt(32))
    spread[steps] = (sv.min(), sv.max())
  assert spread[1][0] < 0.1, spread
  for steps in (4, 5):
    assert 0.6 < spread[steps][0] and spread[steps][1] < 1.25, spread


@pytest.mark.parametrize("scan_layers", [True, False])
def test_muon_takes_every_block_matrix_in_either_layout(scan_layers):
  """Muon finds the MM-DiT's block kernels whether the blocks are scanned (blocks_S,
  (depth, in, out)) or not (block_I, (in, out)): the same matrices, and nothing outside."""
  cfg = mmdit.MMDiTConfig(depth=3, hidden_size=64, num_heads=2, joint_attention_dim=32,
                          pooled_projection_dim=32, pos_embed_max_size=16, sample_size=8,
                          scan_layers=scan_layers)
  params = nn.unbox(jax.eval_shape(lambda r: mmdit.init_params(cfg, r), jax.random.key(0)))
  dims = jax.tree_util.tree_leaves_with_path(
      optim._muon_dims(params), is_leaf=lambda x: x is None or hasattr(x, "reduction_axis"))
  shapes = {jax.tree_util.keystr(k): v.shape for k, v in
            jax.tree_util.tree_leaves_with_path(params)}
  taken = [jax.tree_util.keystr(k) for k, d in dims if d is not None]
  matrices = sum(shapes[k][0] if len(shapes[k]) == 3 else 1 for k in taken)
  # Per block: q, k, v, proj, fc1, fc2 and adaLN for both streams, the last block's context
  # stream keeping q, k, v and its adaLN only.
  assert matrices == 2 * 14 + 11, taken
  assert all("block" in k and k.endswith("['kernel']") for k in taken), taken
  assert not any("embed" in k or "norm_out" in k or "proj_out" in k for k in taken), taken


def test_peak_table():
  assert metrics_lib.peak_tflops("TPU v5 lite") == 197.0
  assert metrics_lib.peak_tflops("TPU v5") == 459.0
  assert metrics_lib.peak_tflops("TPU v4") == 275.0
  assert metrics_lib.peak_tflops("TPU v6 lite") == 918.0
  assert metrics_lib.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert metrics_lib.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert metrics_lib.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert metrics_lib.peak_tflops("NVIDIA H200") == 989.0
  assert metrics_lib.peak_tflops("cpu") is None
  speed = metrics_lib.Throughput(2e12, 16, 4, 100.0)
  speed.start(0)
  out = speed.update(4)
  assert out["examples_per_sec"] == pytest.approx(16 * out["steps_per_sec"])
  assert out["tflops_per_sec_per_device"] == pytest.approx(2.0 * out["steps_per_sec"] / 4)
  assert out["mfu"] == pytest.approx(out["tflops_per_sec_per_device"] / 100.0)


def test_synthetic_source_is_deterministic_and_resumable():
  config = tiny()
  a, b = synthetic.make_iterator(config), synthetic.make_iterator(config)
  first = [next(a) for _ in range(3)]
  b.set_state(json.loads(json.dumps(a.get_state())))
  np.testing.assert_array_equal(next(a)["latents"], next(b)["latents"])
  np.testing.assert_array_equal(first[1]["t5"], synthetic.make_iterator(config).batch(1)["t5"])
  assert first[0]["latents"].shape == (16, 8, 8, 16) and first[0]["clip_g"].shape == (16, 4, 24)
  assert not np.array_equal(first[0]["latents"], first[1]["latents"])
