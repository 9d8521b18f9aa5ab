"""Validation loss, standalone evaluation, sampling and export of a trained run.

One tiny run (2 steps on synthetic data) whose MM-DiT fits a tiny f8 VAE and the embedded
text encoders, so the same run is evaluated, sampled from the CLI and exported to diffusers.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from ml_collections import ConfigDict

from sd3jax import config as config_lib
from sd3jax import parallel, sample, train
from sd3jax.data import shapes
from sd3jax.embedded_encoders import build_embedded_encoders
from sd3jax.evals import run as eval_run
from sd3jax.evals import validation
from sd3jax.interop import diffusers_vae
from sd3jax.models import vae as vae_lib

import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_L, CLIP_G, T5_WIDTH, T5_TOKENS = 16, 16, 64, 8
SIZE, STEPS, GUIDANCE, SHIFT = 32, 3, 5.0, 3.0  # f8 VAE, patch 2: 4x4 latents, 4 image tokens.
TOL = 2e-3


# SD3-style latent normalisation that is not the identity, so every path that must apply it
# (records, training, sampling, evaluation, export to diffusers) is shown to apply it alike.
SCALE, SHIFT_FACTOR = 1.7, 0.3


def _random_vae(seed: int = 0):
  """A random vae_config(16, width=8) with scale / shift factors (SCALE, SHIFT_FACTOR); params
  drawn in numpy (its jitted init is slow on CPU)."""
  import dataclasses
  cfg = dataclasses.replace(vae_lib.vae_config(16, width=8), scaling_factor=SCALE,
                            shift_factor=SHIFT_FACTOR)
  model = vae_lib.AutoencoderKL(cfg)
  abstract = nn.unbox(jax.eval_shape(model.init_params, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if leaf.ndim == 1:
      base = 1.0 if "norm" in jax.tree_util.keystr(path) and "scale" in jax.tree_util.keystr(
          path) else 0.0
      return (base + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(
        np.float32)
  return model, jax.tree_util.tree_map_with_path(draw, abstract)


def _config(folders: dict | None) -> ConfigDict:
  spec = importlib.util.spec_from_file_location("_tiny", os.path.join(ROOT, "experiments",
                                                                      "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  with c.unlocked():
    c.total_steps, c.batch_size = 2, 8
    c.model.update(depth=2, hidden_size=32, num_heads=2, joint_attention_dim=T5_WIDTH,
                   pooled_projection_dim=CLIP_L + CLIP_G, pos_embed_max_size=8, sample_size=4)
    c.data.update(image_size=SIZE, vae_factor=8)
    c.conditioning.update(clip_l_dim=CLIP_L, clip_g_dim=CLIP_G, t5_dim=T5_WIDTH, clip_tokens=77,
                          t5_tokens=T5_TOKENS)
    c.optimizer.learning_rate = 1e-2
    c.schedule.warmup_steps = 1
    c.ema.decay = 0.5
    c.checkpoint.update(every_steps=1, keep_last=3, async_save=False)
    c.log.update(progress_bar=False, tensorboard=True)
    c.eval = ConfigDict(dict(every_steps=2, batches=2, fid_network="", clip_network="",
                             num_examples=12, num_timesteps=8, per_device_batch=2, seed=0,
                             prompts_per_category=1, sample_steps=2, sample_cfg=5.0,
                             sample_cfg_max_t=0.6, sample_shift=3.0))
    if folders is not None:
      c.precompute = ConfigDict(dict(vae=folders["vae"], text_encoders=folders["encoders"]))
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """{"config", "workdir", "encoders", "vae"}: a 2-step run with its VAE and encoders."""
  root = tmp_path_factory.mktemp("run")
  encoders = build_embedded_encoders(str(root / "encoders"), list(shapes.VOCABULARY), seed=0,
                                     clip_l_width=CLIP_L, clip_g_width=CLIP_G, t5_width=T5_WIDTH)
  model, params = _random_vae()
  diffusers_vae.save_vae(model, params, str(root / "vae"))
  folders = {"encoders": encoders, "vae": str(root / "vae")}
  config = _config(folders)
  workdir = str(root / "workdir")
  result = train.train(config, workdir)
  assert result.step == 2
  return {"config": config, "workdir": workdir, **folders}


def _mesh(devices):
  return parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, None, devices)


def test_validation_loss_bitwise_same_on_1_and_8_devices(run):
  config = sample.run_config(run["config"], run["workdir"])
  losses, results = [], []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = _mesh(devices)
    model, params = sample.load_run_params(config, run["workdir"], mesh, step=2)
    val = validation.ValidationLoss(config, model, mesh)
    assert val.shards == len(devices)
    losses.append(val.per_example_losses(params))
    results.append(val(params))
  assert losses[0].shape == (8, 12)
  assert np.array_equal(losses[0], losses[1])  # bitwise, every example and t
  assert results[0] == results[1]
  assert len(results[0]["per_t"]) == 8 and np.isfinite(results[0]["val_loss"])
  assert len(set(results[0]["per_t"].values())) > 1  # a trained model's loss depends on t
  # Deterministic: the same again on a fresh 8-device evaluator.
  val = validation.ValidationLoss(config, model, _mesh(jax.devices()[:8]))
  assert val(params) == results[1]


def test_training_writes_eval_metrics(run):
  with open(os.path.join(run["workdir"], "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if "eval/val_loss" in r]
  assert evals and evals[-1]["step"] == 2
  assert sum(k.startswith("eval/val_loss_t") for k in evals[-1]) == 8
  assert os.listdir(os.path.join(run["workdir"], "tensorboard"))


def _tensorboard_images(logdir: str) -> dict[str, list[tuple[int, tuple[int, int]]]]:
  """{tag: [(step, (height, width))]} of the image summaries in the event files (TFRecords of
  tensorboardX's Event protos: length, crc, data, crc)."""
  import struct
  from tensorboardX.proto import event_pb2
  out: dict = {}
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 16 + length
      for value in event.summary.value:
        if value.HasField("image"):
          out.setdefault(value.tag, []).append(
              (event.step, (value.image.height, value.image.width)))
  return out


def test_training_writes_prompt_following_and_sample_grids(run, monkeypatch):
  """Every eval.every_steps: shapes scores (eval/shapes/...) and a sample grid, equal to what
  `sd3jax evaluate` measures from the checkpoint of the same step."""
  from PIL import Image
  workdir = run["workdir"]
  n = len(shapes.EVAL_CATEGORIES)  # prompts_per_category=1: one column, a row per category
  grid = Image.open(os.path.join(workdir, "samples", "step_2.png"))
  assert grid.size == (SIZE + 4, n * (SIZE + 2) + 2) and grid.mode == "RGB"
  assert np.asarray(grid).std() > 1.0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  trained = {k[len("eval/"):]: v for r in records if r["step"] == 2 and "eval/shapes/overall" in r
             for k, v in r.items() if k.startswith("eval/shapes/")}
  assert 0.0 <= trained["shapes/overall"] <= 1.0 and trained["shapes/n"] == n
  assert not any("samples" in k for r in records for k in r)  # the grid is not a metric
  with open(os.path.join(workdir, "eval", "step_2.json")) as f:
    assert "shapes/overall" in json.load(f)
  assert _tensorboard_images(os.path.join(workdir, "tensorboard")) == {
      "eval/samples": [(2, (n * (SIZE + 2) + 2, SIZE + 4))]}
  sampled = []  # A 2-step model scores 0 everywhere, so the pixels are compared too.
  eval_images = eval_run.eval_images

  def recording(*args):
    sampled.append(eval_images(*args))
    return sampled[-1]
  monkeypatch.setattr(eval_run, "eval_images", recording)
  standalone = eval_run.evaluate_checkpoint(run["config"], workdir, 2)  # same EMA weights, seeds
  assert {k: v for k, v in standalone.items() if k.startswith("shapes/")} == trained
  assert np.array_equal(np.asarray(grid), sample.make_grid(sample.to_uint8(sampled[0][1]), cols=1))


def test_metrics_writer_skips_non_scalars(tmp_path):
  from sd3jax import metrics as metrics_lib
  writer = metrics_lib.MetricsWriter(str(tmp_path), total_steps=1, tensorboard=False,
                                     progress_bar=False)
  writer.write(1, {"a": np.float32(0.5), "n": 3, "grid": np.zeros((2, 2, 3), np.uint8),
                   "nan": float("nan")})
  writer.write_image(1, "grid", np.zeros((2, 2, 3), np.uint8))  # no TensorBoard: a no-op
  writer.close()
  (record,) = metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert abs(record.pop("time") - time.time()) < 60  # wall clock, for time-to-quality plots
  assert record == {"step": 1, "a": 0.5, "n": 3, "nan": "nan"}


def test_evaluate_writes_step_json(run):
  results = eval_run.evaluate_main(None, run["workdir"], step=2)  # the config from config.json
  with open(os.path.join(run["workdir"], "eval", "step_2.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(results[0]))
  assert saved["step"] == 2 and saved["weights"] == "ema" and saved["n"] == 12
  assert set(saved["per_t"]) == {validation.t_key(t) for t in validation.fixed_timesteps(8)}
  assert saved["val_loss"] == pytest.approx(np.mean(list(saved["per_t"].values())), rel=1e-12)
  assert 0.0 <= saved["shapes/overall"] <= 1.0 and saved["shapes/n"] == 5
  assert "fid" not in saved and "clip_score" not in saved  # no networks configured: absent
  # Without a VAE and text encoders: validation loss only, prompt following absent (not 0).
  bare = eval_run.evaluate_checkpoint(_config(None), run["workdir"], 1, use_ema=False)
  assert bare["step"] == 1 and bare["weights"] == "raw"
  assert not any(k.startswith("shapes/") for k in bare)
  assert bare["val_loss"] != saved["val_loss"]
  # Other eval settings (here other prompts) are written beside the run's own eval, not over it.
  config = sample.run_config(None, run["workdir"])
  with config.unlocked():
    config.eval.seed = 7
  other = eval_run.evaluate_main(config, run["workdir"], step=2)[0]
  assert other["eval_changed"] == {"seed": 7}
  with open(os.path.join(run["workdir"], "eval", "step_2.json")) as f:
    assert json.load(f) == saved
  beside = [n for n in os.listdir(os.path.join(run["workdir"], "eval"))
            if n.startswith("step_2_")]
  assert len(beside) == 1
  with open(os.path.join(run["workdir"], "eval", beside[0])) as f:
    assert json.load(f)["eval_changed"] == {"seed": 7}


def test_evaluate_all_steps_loads_and_compiles_once(run, monkeypatch):
  singles = [eval_run.evaluate_checkpoint(run["config"], run["workdir"], s) for s in (1, 2)]
  loads, denoisers = [], []
  load, denoise_fn = sample.load_run_components, sample._denoise_fn

  def counting_load(*args, **kwargs):
    loads.append(args)
    return load(*args, **kwargs)

  def recording_denoise_fn(*args, **kwargs):
    denoisers.append(denoise_fn(*args, **kwargs))
    return denoisers[-1]
  monkeypatch.setattr(sample, "load_run_components", counting_load)
  monkeypatch.setattr(sample, "_denoise_fn", recording_denoise_fn)
  results = eval_run.evaluate_main(None, run["workdir"], all_steps=True)
  assert [r["step"] for r in results] == [1, 2]
  assert len(loads) == 1  # the VAE and text encoders, once for both checkpoints
  assert len(denoisers) >= 2 and all(d is denoisers[0] for d in denoisers)  # one compile
  # ... and each step scores as it does alone (its own weights, not the first step's).
  for single, result in zip(singles, results, strict=True):
    assert json.loads(json.dumps(result)) == json.loads(json.dumps(single))


def test_export_round_trip_matches_diffusers(run, tmp_path):
  from diffusers import StableDiffusion3Pipeline
  prompts = ["a red circle on the left", "two blue squares"]
  negative = ["a green triangle", "yellow"]
  pipe = sample.pipeline_from_run(run["config"], run["workdir"], shift=SHIFT)
  out = sample.export_main(run["config"], run["workdir"], str(tmp_path / "export"), shift=SHIFT)
  noise = np.asarray(sample.initial_noise(3, range(2), (SIZE // 8, SIZE // 8, 16)))
  ours = sample.generate(pipe, prompts, negative_prompt=negative, latents=noise, steps=STEPS,
                         guidance_scale=GUIDANCE, progress=False)
  reference = StableDiffusion3Pipeline.from_pretrained(out)
  assert (reference.vae.config.scaling_factor, reference.vae.config.shift_factor) == (
      SCALE, SHIFT_FACTOR)
  with torch.no_grad():
    theirs = reference(prompt=prompts, negative_prompt=negative, height=SIZE, width=SIZE,
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))),
                       output_type="np", max_sequence_length=T5_TOKENS).images
  diff = float(np.abs(np.asarray(theirs, np.float64) - ours).max())
  print(f"\nexport round trip: max abs pixel difference sd3jax vs diffusers {diff:.2e}")
  assert ours.shape == (2, SIZE, SIZE, 3) and ours.std() > 1e-3
  assert diff <= TOL, diff
  # `sd3jax sample --pipeline DIR` (no config, no workdir) samples the exported folder alike.
  paths = sample.sample_main(None, None, prompts, negative=negative[0], steps=STEPS,
                             cfg=GUIDANCE, shift=None, seed=3, out=str(tmp_path / "from_dir"),
                             pipeline=out)
  assert [os.path.basename(p) for p in paths] == [
      "0000_a_red_circle_on_the_left.png", "0001_two_blue_squares.png", "grid.png"]


def test_cli_parse_config_optional_only_where_declared():
  from absl import flags
  from sd3jax import cli
  fv = flags.FlagValues()
  name, config, workdir, _ = cli.parse(["sd3jax", "sample", "--pipeline", "/x", "--prompt", "a",
                                        "--steps", "4", "--no-t5", "--noema"], fv)
  assert (name, config, workdir) == ("sample", None, None)
  assert fv.pipeline == "/x" and fv.prompt == ["a"] and fv.steps == 4 and fv.no_t5
  # Unset sampling flags are None: sample_main fills in the run's own (or the pipeline's).
  assert not fv.ema and fv.cfg is None and fv.shift is None and fv.sampler == "euler"
  with pytest.raises(cli.UsageError, match="--config"):
    cli.parse(["sd3jax", "train", "--workdir", "/tmp/x"], flags.FlagValues())


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "sd3jax.cli", *args], capture_output=True,
                        text=True, env=subprocess_env.env(), cwd=ROOT, timeout=300)


def test_sample_cli_from_workdir_writes_pngs_and_grid(run, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("two blue squares\n\na green triangle at the top\n")
  out = tmp_path / "samples"
  proc = _cli("sample", "--workdir", run["workdir"], "--prompt", "a red circle",
              "--prompts", str(prompts), "--steps", "2", "--cfg", "3.0", "--sampler", "heun",
              "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(os.listdir(out))
  assert names == ["0000_a_red_circle.png", "0001_two_blue_squares.png",
                   "0002_a_green_triangle_at_the_top.png", "grid.png"], names
  from PIL import Image
  assert Image.open(out / "0000_a_red_circle.png").size == (SIZE, SIZE)


def test_sample_defaults_to_the_runs_own_sampling_settings(run, tmp_path):
  """No --steps / --cfg / --cfg-max-t / --shift: the run's config.eval settings (what its
  in-training evals used), not the flags' old fixed defaults."""
  config = sample.run_config(None, run["workdir"])
  settings = sample.run_sampling_settings(config)
  assert settings == {"steps": 2, "cfg": 5.0, "cfg_max_t": 0.6, "autoguidance": 1.0,
                      "shift": 3.0}
  assert float(config.flow.shift) != settings["shift"]  # so the test tells the two apart
  paths = sample.sample_main(None, run["workdir"], ["a red circle"], seed=1,
                             out=str(tmp_path / "default"))
  pipe = sample.pipeline_from_run(config, run["workdir"])
  kw = dict(height=SIZE, width=SIZE, steps=2, guidance_scale=5.0, shift=3.0, seed=1,
            progress=False)
  expected = sample.generate(pipe, ["a red circle"], guidance_max_t=0.6, **kw)
  from PIL import Image
  assert np.array_equal(np.asarray(Image.open(paths[0])), sample.to_uint8(expected)[0])
  # The interval matters here: the first of the two steps (t = 1) runs unguided.
  assert not np.allclose(expected, sample.generate(pipe, ["a red circle"], **kw), atol=1e-3)


def test_autoguidance_by_a_weak_run(run):
  """eval.sample_autoguidance_run loads the weak model into the pipeline; with the run's own
  weights as the weak model autoguidance is the conditional prediction above max_t (the
  images without it), with an earlier checkpoint it changes them; bad settings fail clearly."""
  import dataclasses
  config = sample.run_config(None, run["workdir"])
  kw = dict(height=SIZE, width=SIZE, steps=2, guidance_scale=5.0, guidance_max_t=0.6,
            shift=3.0, seed=1, progress=False)
  plain_pipe = sample.pipeline_from_run(config, run["workdir"])
  assert plain_pipe.weak_transformer_params is None
  plain = sample.generate(plain_pipe, ["a red circle"], **kw)
  with config.unlocked():
    config.eval.update(sample_autoguidance=3.0, sample_autoguidance_run=run["workdir"])
  config_lib.validate(config)
  assert sample.run_sampling_settings(config)["autoguidance"] == 3.0
  pipe = sample.pipeline_from_run(config, run["workdir"])
  same = sample.generate(pipe, ["a red circle"], autoguidance=3.0, **kw)
  np.testing.assert_allclose(same, plain, atol=1e-5)
  mesh = parallel.make_mesh(*config_lib.mesh_sizes(config))
  _, earlier = sample.load_run_params(config, run["workdir"], mesh, step=1)
  weak_pipe = dataclasses.replace(pipe, weak_transformer_params=earlier)
  guided = sample.generate(weak_pipe, ["a red circle"], autoguidance=3.0, **kw)
  assert np.isfinite(guided).all() and not np.allclose(guided, plain, atol=1e-3)
  with pytest.raises(ValueError, match="guidance_max_t < 1"):
    sample.generate(pipe, ["a red circle"], autoguidance=3.0, **{**kw, "guidance_max_t": 1.0})
  with pytest.raises(ValueError, match="weak_transformer_params"):
    sample.generate(plain_pipe, ["a red circle"], autoguidance=3.0, **kw)
  with config.unlocked():
    config.eval.sample_autoguidance_run = ""
  with pytest.raises(config_lib.ConfigError, match="sample_autoguidance_run"):
    config_lib.validate(config)
  with config.unlocked():
    config.eval.sample_autoguidance_run = run["workdir"]
    config.model.depth = 3
  with pytest.raises(ValueError, match="another MM-DiT"):
    sample.weak_params(config, mesh)


def test_sample_cli_needs_a_source(tmp_path):
  proc = _cli("sample", "--prompt", "a red circle", "--out", str(tmp_path))
  assert proc.returncode == 2 and "--workdir RUN or --pipeline DIR" in proc.stderr


def test_validation_loss_on_held_out_records(run, tmp_path):
  """config.eval.path: the first num_examples records in index order, original captions."""
  from sd3jax import conditioning
  from sd3jax.data import precompute, shapes_tfds
  data_dir = str(tmp_path / "shapes")
  shapes_tfds.build_shapes(data_dir, resolution=SIZE, num_train=2, num_val=6)
  te = conditioning.TextEncoders.from_pipeline_folder(run["encoders"], t5_length=T5_TOKENS,
                                                      t5_width=T5_WIDTH)
  records = str(tmp_path / "val_records")
  precompute.precompute(shapes_tfds.load_shapes(data_dir, "validation"), records,
                        diffusers_vae.load_vae(run["vae"]), te, global_batch=2, resolution=SIZE,
                        examples_per_shard=4, split="validation", progress=False)
  config = _config(None)
  with config.unlocked():
    config.eval.path, config.eval.num_examples = records, 5
  config = config_lib.complete(config)
  examples = validation.held_out_examples(config)
  assert examples["latents"].shape == (5, SIZE // 8, SIZE // 8, 16)
  assert examples["t5"].shape == (5, T5_TOKENS, T5_WIDTH)
  again = validation.held_out_examples(config)
  assert all(np.array_equal(examples[k], again[k]) for k in examples)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = _mesh(devices)
    model, params = sample.load_run_params(config, run["workdir"], mesh, step=2)
    results.append(validation.ValidationLoss(config, model, mesh, examples)(params))
  assert results[0] == results[1] and results[0]["n"] == 5


def test_caption_flip_starts_as_the_sampler_and_the_vae_round_trip(run):
  """The caption-flip diagnostic from t0 = 1 is the run's own Euler sampler on the same noise,
  and from t0 = 0 the VAE round trip of the scenes; bad levels and attributes are refused."""
  from sd3jax.evals import decision
  config = sample.run_config(None, run["workdir"])
  pipe = sample.pipeline_from_run(config, run["workdir"])
  objs = decision.scenes(3, seed=4)
  images = np.stack([shapes.render([o], SIZE, SIZE, "white") for o in objs])
  x0 = pipe.vae.encode_to_latents(pipe.vae_params, images.astype(np.float32) / 127.5 - 1.0)
  prompts = ["a red circle", "two blue squares", "a green triangle at the top"]
  kwargs = dict(steps=3, guidance=GUIDANCE, shift=SHIFT)
  from_noise = decision.denoise_from(pipe, x0, 1.0, prompts, seed=2, **kwargs)
  expected = sample.generate(pipe, prompts, height=SIZE, width=SIZE, steps=3,
                             guidance_scale=GUIDANCE, shift=SHIFT, seed=2, progress=False)
  np.testing.assert_allclose(from_noise, expected, atol=TOL)
  unchanged = decision.denoise_from(pipe, x0, 0.0, prompts, **kwargs)
  round_trip = np.clip(np.asarray(pipe.vae.decode_latents(pipe.vae_params, x0)) / 2 + 0.5, 0, 1)
  np.testing.assert_allclose(unchanged, round_trip, atol=1e-6)
  with pytest.raises(ValueError, match=r"t0 must be in \[0, 1\]"):
    decision.denoise_from(pipe, x0, 1.5, prompts, **kwargs)
  with pytest.raises(ValueError, match="Unknown attributes"):
    decision.caption_flip(pipe, attributes=("size",))
  result = decision.caption_flip(pipe, t0s=(0.0, 1.0), num=2, steps=2, size=SIZE,
                                 attributes=("shape",))
  assert result["t0"] == [0.0, 1.0] and set(result["shape"]) == {
      "kept", "follows_flip", "keeps_original"}
  assert all(len(v) == 2 and all(0.0 <= x <= 1.0 for x in v) for v in result["shape"].values())
  loud = decision.salience(pipe, num=4, size=SIZE)
  assert set(loud) >= {"shape", "color", "position", "size", "shape circle / square"}
  # In pixels a square differs from the circle it encloses by its corners, a triangle by more.
  assert 0 < loud["shape circle / square"]["pixels"] < loud["shape triangle / circle"]["pixels"]
  assert all(r["latents"] > 0 for r in loud.values())
