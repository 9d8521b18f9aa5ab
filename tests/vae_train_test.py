"""The VAE task through the shared trainer: steps, resume, discriminator start, eval, export."""
import importlib.util
import json
import os
import textwrap
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
import scipy.linalg

from sd3jax import config as config_lib
from sd3jax import tasks, train
from sd3jax.data import pipeline

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "vae_f8.py")
DISC_START = 3


def tiny_vae(data_dir, **overrides):
  """experiments/vae_f8.py at toy size: 32x32 shapes, width 8, discriminator from step 3."""
  config = config_lib.load(f"{EXPERIMENT}:4,steps=6,batch=4,width=8,disc={DISC_START},eval=6,"
                           f"data={data_dir}")
  with config.unlocked():
    config.data.image_size = 32
    config.data.shapes_num_train = 32
    config.data.shapes_num_val = 8
    config.vae.eval_examples = 6
    config.vae.disc_ndf = 8
    config.schedule.name = "warmup_constant"  # independent of total_steps: one compile
    config.schedule.warmup_steps = 1
    config.checkpoint.every_steps = 3
    config.log.every_steps = 1
    config.mesh.data = 2
    for key, value in overrides.items():
      config_lib.set_key(config, key.replace("__", "."), value)
  return config


DEVICES = jax.devices()[:2]


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(a, b):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("shapes"))


# A tiny feature network for rFID, in the "file.py:factory" form features.py loads: a fixed
# random projection of 8x8-average-pooled images to 4 dims (fewer than the 6 held-out
# images, so the covariances are not singular).
FEATURE_NET = textwrap.dedent("""
    import numpy as np

    def tiny_features():
      w = np.random.RandomState(0).randn(4 * 4 * 3, 4) / 7.0
      def net(images):  # [N, 32, 32, 3] in [0, 1] -> [N, 4]
        x = np.asarray(images, np.float64)
        pooled = x.reshape(len(x), 4, 8, 4, 8, 3).mean((2, 4)).reshape(len(x), -1)
        return np.tanh((pooled - 0.5) @ w)
      return net
""")


@pytest.fixture(scope="module")
def fid_network(tmp_path_factory):
  """(spec for config.eval.fid_network, the same network loaded independently)."""
  path = tmp_path_factory.mktemp("fid") / "nets.py"
  path.write_text(FEATURE_NET)
  spec = importlib.util.spec_from_file_location("_test_fid_nets", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return f"{path}:tiny_features", module.tiny_features()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir, fid_network):
  """6 steps in one go, with an rFID feature network configured."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  config = tiny_vae(data_dir, eval__fid_network=fid_network[0])
  return workdir, train.train(config, workdir, devices=DEVICES)


def test_steps_run_with_finite_metrics(straight):
  _, result = straight
  assert result.step == 6 and [h["step"] for h in result.history] == list(range(1, 7))
  for h in result.history:
    for key in ("loss", "rec_loss", "kl", "grad_norm", "d_loss", "g_loss"):
      assert np.isfinite(h[key]), (key, h)
  # The GAN terms are gated: zero before DISC_START, on from it (step s runs at state.step s-1).
  assert all(h["disc_factor"] == 0.0 for h in result.history[:DISC_START])
  assert all(h["disc_factor"] == 1.0 for h in result.history[DISC_START:])
  assert result.history[-1]["d_loss"] > 0


class FixedBatch:
  """The same batch every step (resumable, trivially)."""

  def __init__(self, batch):
    self.batch = batch

  def __next__(self):
    return self.batch

  def get_state(self):
    return {}

  def set_state(self, state):
    del state


RECONSTRUCTION = dict(total_steps=12, vae__disc_start=10**6, eval__every_steps=0,
                      optimizer__learning_rate=3e-3)


def test_reconstruction_loss_decreases_on_a_fixed_batch(data_dir, tmp_path):
  config = tiny_vae(data_dir, **RECONSTRUCTION)
  batch = next(tasks.make_data(config_lib.validate(config, 2)))
  result = train.train(config, str(tmp_path), data=FixedBatch(batch), devices=DEVICES)
  rec = [h["rec_loss"] for h in result.history]
  assert np.all(np.isfinite(rec))
  assert np.mean(rec[-3:]) < 0.8 * np.mean(rec[:3]), rec


def test_resume_is_exact_and_disc_waits_for_disc_start(straight, data_dir, tmp_path):
  workdir = str(tmp_path)
  first = train.train(tiny_vae(data_dir, total_steps=3), workdir, devices=DEVICES)
  assert first.step == 3

  # Before disc_start the discriminator never saw a gradient: its Adam moments are exactly
  # zero and its params are its initial values (init alone here vs init within the whole
  # state in the trainer may be compiled differently in the last bit, hence atol).
  config = config_lib.validate(tiny_vae(data_dir), 2)
  mesh = train.make_mesh(config, DEVICES)
  task = tasks.vae_task(config, mesh, workdir)
  init = jax.jit(lambda r: nn.unbox(task.init_params(r)))(
      jax.random.split(jax.random.PRNGKey(config.seed))[0])
  disc_adam = first.state.opt_state.inner_state.inner_states["disc"].inner_state[-1][0]
  assert all(not np.any(x) for x in leaves((disc_adam.mu, disc_adam.nu)))
  for x, y in zip(leaves(first.state.params["disc"]), leaves(init["disc"]), strict=True):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-8)
  vae_moved = [not np.array_equal(a, b) for a, b in
               zip(leaves(first.state.params["vae"]), leaves(init["vae"]))]
  assert any(vae_moved)

  second = train.train(tiny_vae(data_dir), workdir, devices=DEVICES)
  assert second.step == 6
  assert [h["step"] for h in second.history] == [4, 5, 6]
  _, full = straight
  assert_trees_equal(second.state.params, full.state.params)
  assert_trees_equal(second.state.ema_params, full.state.ema_params)
  assert_trees_equal(second.state.opt_state, full.state.opt_state)
  # ... and once it started, the discriminator learns.
  assert not all(np.array_equal(a, b) for a, b in
                 zip(leaves(second.state.params["disc"]), leaves(init["disc"])))


def test_eval_writes_psnr_ssim_and_grid(straight):
  workdir, result = straight
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if "eval/psnr" in r]
  assert [r["step"] for r in evals] == [6]
  assert np.isfinite(evals[0]["eval/psnr"]) and 0 < evals[0]["eval/psnr"] < 100
  assert -1 <= evals[0]["eval/ssim"] <= 1
  from PIL import Image
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "recon_step_6.png")))
  assert grid.shape == (2 * 32, 4 * 32, 3)  # 4 = the per-process eval batch


def frechet_distance(a, b):
  """The FID formula from scratch (float64, scipy sqrtm), independent of sd3jax."""
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * covmean))


def test_eval_rfid_matches_an_independent_frechet_distance(straight, data_dir, fid_network):
  workdir, result = straight
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "eval/psnr" in r]
  rfid = evals[-1]["eval/rfid"]
  assert np.isfinite(rfid) and rfid >= 0
  config = config_lib.validate(tiny_vae(data_dir), 2)
  images = tasks.held_out_images(config)
  assert len(images) == 6
  model = tasks.vae_model(config)
  recon, _ = jax.jit(model.apply)({"params": result.state.ema_params["vae"]}, images)
  unit = lambda x: np.clip((np.asarray(x, np.float64) + 1) / 2, 0, 1)
  _, net = fid_network
  want = frechet_distance(net(unit(images)), net(unit(recon)))
  print(f"rfid {rfid:.6g}, independent {want:.6g}")
  assert want > 1e-2  # an untrained-ish autoencoder: far from its originals
  np.testing.assert_allclose(rfid, want, rtol=1e-3)


class IdentityAutoencoder:
  """Reconstructions = the originals."""

  def apply(self, variables, x):
    del variables
    return x, None


def test_rfid_is_zero_for_perfect_reconstructions_and_absent_unconfigured(
    straight, data_dir, fid_network, tmp_path):
  state = types.SimpleNamespace(ema_params={"vae": {}})
  config = config_lib.validate(tiny_vae(data_dir, eval__fid_network=fid_network[0]), 2)
  mesh = train.make_mesh(config, DEVICES)
  out = tasks.make_reconstruction_eval(config, IdentityAutoencoder(), mesh, str(tmp_path))(0, state)
  assert out["psnr"] == pytest.approx(100.0) and 0 <= out["rfid"] < 1e-3
  config = config_lib.validate(tiny_vae(data_dir), 2)
  out = tasks.make_reconstruction_eval(config, IdentityAutoencoder(), mesh, str(tmp_path))(0, state)
  assert set(out) == {"psnr", "ssim"}  # absent, not 0 or NaN


def test_exported_folder_loads_in_diffusers(straight, data_dir):
  torch = pytest.importorskip("torch")
  from diffusers import AutoencoderKL
  workdir, result = straight
  folder = os.path.join(workdir, "vae")
  ref = AutoencoderKL.from_pretrained(folder).eval()
  config = config_lib.validate(tiny_vae(data_dir), 2)
  model = tasks.vae_model(config)
  assert ref.config.latent_channels == 4
  images = tasks.held_out_images(config)[:2]
  ours, _ = model.apply({"params": jax.device_get(result.state.ema_params["vae"])}, images)
  with torch.no_grad():
    theirs = ref(torch.from_numpy(images).permute(0, 3, 1, 2), sample_posterior=False).sample
  theirs = theirs.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)


def test_export_fits_the_latent_normalisation(straight, data_dir):
  """The exported config's scaling / shift factors standardise the training images' latents,
  as SD3 fitted 1.5305 / 0.0609: checked against diffusers' own posterior moments (sampled
  latents have mean E[mu] and variance E[mu^2 + sigma^2] - E[mu]^2)."""
  torch = pytest.importorskip("torch")
  from diffusers import AutoencoderKL
  workdir, _ = straight
  ref = AutoencoderKL.from_pretrained(os.path.join(workdir, "vae")).eval()
  scale, shift = ref.config.scaling_factor, ref.config.shift_factor
  assert scale != 1.0 and shift not in (None, 0.0)
  config = config_lib.validate(tiny_vae(data_dir), 2)
  source, _ = tasks.image_sources(config)
  assert len(source) == 32 < config.vae.fit_examples  # so every training image is used
  images = np.stack([pipeline.to_float(pipeline.resize_and_crop(source[i]["image"], 32, 32)[0])
                     for i in range(len(source))])
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
  mu, var = dist.mean.double().numpy(), dist.var.double().numpy()
  mean = mu.mean()
  std = np.sqrt((mu ** 2 + var).mean() - mean ** 2)
  # One posterior sample per element (32 x 4 x 4 x 4 = 2048 of them) in the fit.
  assert shift == pytest.approx(mean, abs=0.05 * std)
  assert 1.0 / scale == pytest.approx(std, rel=0.05)


def test_zero_init_makes_every_residual_block_the_identity():
  """vae.zero_init_residual: conv2 of every ResNet block and the attention's output projection
  start at zero (nothing else changes), so each block passes its input through unchanged;
  vae.init_logvar sets the encoder's log-variance outputs."""
  from sd3jax.models import vae as vae_lib
  model = vae_lib.AutoencoderKL(vae_lib.vae_config(4, width=8, channel_mult=(1, 2, 4)))
  params = jax.jit(lambda r: nn.unbox(model.init_params(r, 16)))(jax.random.key(0))
  zeroed = tasks.zero_residual_branches(params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_zeroed = dict(jax.tree_util.tree_flatten_with_path(zeroed)[0])
  changed = 0
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    if "conv2" in name or "to_out_0" in name:
      assert not np.any(np.asarray(flat_zeroed[path])), name
      changed += 1
    else:
      np.testing.assert_array_equal(np.asarray(flat_zeroed[path]), np.asarray(leaf))
  assert changed == 2 * (3 + 2 + 3 * 2 + 2) + 2 * 2  # conv2 kernel+bias per block; attn x2
  block = vae_lib.ResnetBlock(8, 2)
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
  p = tasks.zero_residual_branches(nn.unbox(jax.jit(block.init)(jax.random.key(2), x))["params"])
  np.testing.assert_array_equal(np.asarray(block.apply({"params": p}, x)), np.asarray(x))
  with_logvar = tasks.with_initial_logvar(zeroed, -6.0)
  bias = np.asarray(with_logvar["encoder"]["conv_out"]["bias"])
  assert bias.shape == (8,) and np.all(bias[4:] == -6.0)
  np.testing.assert_array_equal(bias[:4], np.asarray(zeroed["encoder"]["conv_out"]["bias"])[:4])


def test_data_is_images_from_the_shapes_pipeline(data_dir):
  config = config_lib.validate(tiny_vae(data_dir), 2)
  it = tasks.make_data(config)
  first = next(it)
  assert set(first) == {"image"} and first["image"].shape == (4, 32, 32, 3)
  assert first["image"].min() >= -1 and first["image"].max() <= 1
  state = it.get_state()
  second = next(it)
  again = tasks.make_data(config)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["image"], second["image"])
  assert isinstance(it, pipeline.PipelineIterator)


def test_unknown_task_is_a_config_error(data_dir):
  config = tiny_vae(data_dir, task="gan")
  with pytest.raises(config_lib.ConfigError, match="config.task"):
    config_lib.validate(config, 2)


def test_the_vae_task_refuses_muon():
  config = config_lib.load(f"{EXPERIMENT}:4")
  with config.unlocked():
    config.optimizer.name = "muon"
  with pytest.raises(ValueError, match="optimizer.name='muon'.*AdamW only"):
    tasks.make_optimizer(config)


def test_random_crops_are_windows_of_each_image():
  images = jax.numpy.arange(6 * 12 * 10 * 2, dtype=jax.numpy.float32).reshape(6, 12, 10, 2)
  rng = jax.random.PRNGKey(3)
  crops = np.asarray(tasks.random_crops(images, 4, rng))
  assert crops.shape == (6, 4, 4, 2)
  images = np.asarray(images)
  offsets = set()
  for image, crop in zip(images, crops):
    # Values are unique, so the first one places the window; all of it must match there.
    y, x, _ = (int(i[0]) for i in np.nonzero(image == crop[0, 0, 0]))
    assert y + 4 <= 12 and x + 4 <= 10
    np.testing.assert_array_equal(crop, image[y:y + 4, x:x + 4])
    offsets.add((y, x))
  assert len(offsets) > 1  # drawn per image, not one window for the batch
  np.testing.assert_array_equal(crops, tasks.random_crops(images, 4, rng))  # resumable


def test_train_crop_trains_on_windows_and_evaluates_whole_images(data_dir, tmp_path):
  crop = dict(vae__train_crop=16, eval__every_steps=4)
  config = tiny_vae(data_dir, total_steps=4, **crop)
  whole = config_lib.validate(tiny_vae(data_dir), 2)
  cropped = config_lib.validate(config, 2)
  mesh = train.make_mesh(whole, DEVICES)
  # 16^2 windows: a quarter of the convolutions; the mid-block attention shrinks 16-fold.
  ratio = (tasks.vae_task(cropped, mesh, str(tmp_path)).flops_per_step
           / tasks.vae_task(whole, mesh, str(tmp_path)).flops_per_step)
  assert 0.2 < ratio < 0.25, ratio

  straight = train.train(config, str(tmp_path / "straight"), devices=DEVICES)
  assert all(np.isfinite(h["rec_loss"]) for h in straight.history)
  with open(tmp_path / "straight" / "metrics.jsonl") as f:
    evals = [r for r in map(json.loads, f) if "eval/psnr" in r]
  assert [r["step"] for r in evals] == [4] and np.isfinite(evals[0]["eval/psnr"])
  from PIL import Image  # the eval reconstructs whole 32^2 images, not windows
  grid = Image.open(tmp_path / "straight" / "samples" / "recon_step_4.png")
  assert grid.size == (4 * 32, 2 * 32)

  # The windows come from the step's key: stopping at step 2 and resuming is exact.
  resumed_dir = str(tmp_path / "resumed")
  train.train(tiny_vae(data_dir, total_steps=2, **crop), resumed_dir, devices=DEVICES)
  resumed = train.train(config, resumed_dir, devices=DEVICES)
  assert [h["step"] for h in resumed.history] == [3, 4]
  assert_trees_equal(resumed.state.params, straight.state.params)


@pytest.mark.parametrize("crop", [12, 40, -8])
def test_train_crop_must_fit_the_downsampling(data_dir, crop):
  config = tiny_vae(data_dir, vae__train_crop=crop)
  with pytest.raises(config_lib.ConfigError, match=r"vae.train_crop=.*multiple of the VAE's "
                     r"downsampling factor 8 and at most config.data.image_size=32"):
    config_lib.validate(config, 2)


def test_train_crop_follows_the_configured_downsampling(data_dir):
  # Three levels downsample by 4 (not the default 8), so a 12^2 window fits there.
  f4 = tiny_vae(data_dir, vae__train_crop=12)
  with f4.unlocked():
    f4.vae.channel_mult = (1, 2, 4)  # as experiments/shapes.py sets it
  assert config_lib.validate(f4, 2).vae.train_crop == 12


def test_the_vae_step_compiles_with_xla_s_own_convolutions_on_cpu(data_dir):
  """The VAE task asks for parallel.conv_compiler_options (YNNPACK fusions off on CPU: 1.7x
  faster on the shapes VAE step); XLA gets them, and the step computes the same loss."""
  from sd3jax import bench, optim, parallel
  # The trainer's step with the task's options; the reconstruction test's settings, so that
  # XLA's persistent cache already holds this program when that test ran first.
  built = bench.build_jax_step(tiny_vae(data_dir, **RECONSTRUCTION), DEVICES)
  assert parallel.conv_compiler_options(DEVICES) == {"xla_cpu_experimental_ynn_fusion_type": ""}
  text = built["compiled"].as_text()  # from the cache too: the optimised HLO
  assert "__ynn_fusion" not in text and text.count(" convolution(") > 10, text[:2000]

  config = built["config"]
  mesh = train.make_mesh(config, DEVICES)
  task = train.make_task(config, mesh, "")
  assert task.compiler_options == parallel.conv_compiler_options(DEVICES)
  schedule = optim.make_schedule(config.schedule, config.optimizer.learning_rate,
                                 config.total_steps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.get_rules(config.sharding_rules)):
    default = jax.jit(train.make_train_step(config, task, schedule))  # YNNPACK where it applies
    _, want = default(built["state"], built["batch"])
  _, got = built["compiled"](built["state"], built["batch"])  # donates the state: last
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
