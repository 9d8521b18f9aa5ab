"""Text -> image sampling == diffusers' StableDiffusion3Pipeline; pipeline folders both ways."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch

from sd3jax import parallel, sample
from sd3jax.embedded_encoders import build_embedded_encoders
from sd3jax.interop import pipeline as pipeline_io
from sd3jax.interop.diffusers import load_pipeline, save_pipeline

WORDS = "a red green blue yellow circle square triangle star left of above below the".split()
CLIP_L, CLIP_G, T5_WIDTH, T5_LENGTH = 32, 64, 128, 24
SIZE, STEPS, GUIDANCE = 32, 4, 5.0  # VAE factor 4, patch 2: 8x8 latents, 16 image tokens.
PROMPTS = ["a red circle left of a blue square", "a green star"]
NEGATIVE = ["a blue triangle", "yellow"]
TOL = 2e-3  # Max abs pixel difference allowed (pixels in [0, 1]).


def _diffusers_pipeline(encoder_folder: str, with_t5: bool):
  """A tiny random SD3.5-style pipeline (QK-norm, one dual-attention block), seeded."""
  import transformers
  from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                         StableDiffusion3Pipeline)
  torch.manual_seed(0)
  transformer = SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
      caption_projection_dim=32, pooled_projection_dim=CLIP_L + CLIP_G, pos_embed_max_size=16,
      qk_norm="rms_norm", dual_attention_layers=(0,))
  vae = AutoencoderKL(
      block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
      up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=16, norm_num_groups=4,
      layers_per_block=1, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
      use_post_quant_conv=False)
  sub = lambda name: os.path.join(encoder_folder, name)
  clip = transformers.CLIPTextModelWithProjection
  parts = dict(text_encoder=clip.from_pretrained(sub("text_encoder")),
               text_encoder_2=clip.from_pretrained(sub("text_encoder_2")),
               tokenizer=transformers.AutoTokenizer.from_pretrained(sub("tokenizer")),
               tokenizer_2=transformers.AutoTokenizer.from_pretrained(sub("tokenizer_2")),
               text_encoder_3=None, tokenizer_3=None)
  if with_t5:
    parts.update(text_encoder_3=transformers.T5EncoderModel.from_pretrained(sub("text_encoder_3")),
                 tokenizer_3=transformers.AutoTokenizer.from_pretrained(sub("tokenizer_3")))
  return StableDiffusion3Pipeline(transformer=transformer.eval(), vae=vae.eval(),
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts)


def _from_pretrained(folder: str, with_t5: bool = True):
  from diffusers import StableDiffusion3Pipeline
  kw = {} if with_t5 else dict(text_encoder_3=None, tokenizer_3=None)  # diffusers' own rule.
  return StableDiffusion3Pipeline.from_pretrained(folder, **kw)


def _run_diffusers(pipe, latents_nhwc, prompts=PROMPTS, negative=NEGATIVE, steps=STEPS,
                   guidance=GUIDANCE) -> np.ndarray:
  latents = torch.from_numpy(np.ascontiguousarray(latents_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = pipe(prompt=prompts, negative_prompt=negative, height=SIZE, width=SIZE,
               num_inference_steps=steps, guidance_scale=guidance, latents=latents,
               output_type="np", max_sequence_length=T5_LENGTH)
  return np.asarray(out.images, np.float32)


def _max_abs(a, b) -> float:
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{"encoders", "t5", "no_t5"}: the embedded encoders and two saved diffusers pipelines."""
  root = tmp_path_factory.mktemp("sd3")
  enc = build_embedded_encoders(str(root / "encoders"), WORDS, seed=0, clip_l_width=CLIP_L,
                                clip_g_width=CLIP_G, t5_width=T5_WIDTH)
  out = {"encoders": enc}
  for name, with_t5 in (("t5", True), ("no_t5", False)):
    out[name] = str(root / name)
    _diffusers_pipeline(enc, with_t5).save_pretrained(out[name])
  return out


@pytest.fixture(scope="module")
def noise():
  return np.random.default_rng(0).standard_normal((len(PROMPTS), 8, 8, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def ours(folders):
  return load_pipeline(folders["t5"], t5_length=T5_LENGTH)


@pytest.fixture(scope="module")
def reference(folders, noise):
  """diffusers' images from the T5 folder (the parity target of several tests)."""
  return _run_diffusers(_from_pretrained(folders["t5"]), noise)


@pytest.fixture(scope="module")
def ours_images(ours, noise):
  return sample.generate(ours, PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                         steps=STEPS, guidance_scale=GUIDANCE, latents=noise)


def test_load_pipeline_components(ours):
  assert ours.shift == 3.0 and ours.latent_channels == 16
  assert ours.vae_scale_factor == 4 and ours.patch_size == 2 and ours.default_size == 32
  assert ours.text_encoders.encoders["t5"] is not None
  assert ours.text_encoders.context_shape == (77 + T5_LENGTH, T5_WIDTH)


def test_parity_with_t5(reference, ours_images):
  assert ours_images.shape == (2, SIZE, SIZE, 3) and ours_images.dtype == np.float32
  # The images carry information: not saturated, and they differ between prompts.
  assert np.mean((reference > 0.01) & (reference < 0.99)) > 0.8
  assert reference.std() > 0.05 and _max_abs(reference[0], reference[1]) > 0.1
  err = _max_abs(ours_images, reference)
  print(f"pipeline parity (T5, cfg {GUIDANCE}, {STEPS} steps): max abs {err:.2e}")
  assert err < TOL


def test_parity_without_t5(folders, noise, ours, ours_images):
  want = _run_diffusers(_from_pretrained(folders["no_t5"], with_t5=False), noise)
  no_t5 = load_pipeline(folders["no_t5"], t5_length=T5_LENGTH)
  assert no_t5.text_encoders.encoders["t5"] is None
  got = sample.generate(no_t5, PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                        steps=STEPS, latents=noise)
  err = _max_abs(got, want)
  print(f"pipeline parity (no T5): max abs {err:.2e}")
  assert err < TOL
  # use_t5=False on a pipeline with T5 is the same thing: zeros in T5's place.
  view = sample.generate(ours, PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                         steps=STEPS, latents=noise, use_t5=False)
  assert _max_abs(view, got) < 1e-5
  assert _max_abs(view, ours_images) > 1e-3  # T5 mattered.


def test_parity_other_shift_without_guidance(folders, noise, ours):
  """shift= overrides the scheduler's; guidance_scale <= 1 runs one unguided batch."""
  from diffusers import FlowMatchEulerDiscreteScheduler
  pipe = _from_pretrained(folders["t5"])
  pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.5)
  want = _run_diffusers(pipe, noise, negative=None, steps=3, guidance=1.0)
  got = sample.generate(ours, PROMPTS, steps=3, guidance_scale=1.0, shift=1.5, latents=noise,
                        height=SIZE, width=SIZE)
  err = _max_abs(got, want)
  print(f"pipeline parity (shift 1.5, no guidance, 3 steps): max abs {err:.2e}")
  assert err < TOL


def test_save_pipeline_round_trip(folders, noise, ours, reference, tmp_path):
  out = save_pipeline(ours, str(tmp_path / "export"))
  index = json.load(open(os.path.join(out, "model_index.json")))
  assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
  assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
  sched = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
  assert sched["shift"] == 3.0 and sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
  err = _max_abs(_run_diffusers(_from_pretrained(out), noise), reference)
  print(f"save_pipeline round trip, diffusers(export) vs diffusers(source): max abs {err:.2e}")
  assert err < 1e-5
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_pipeline(ours, out)


def test_export_changed_weights_matches_sd3jax(folders, noise, ours, tmp_path):
  """As after training: new transformer weights and a new shift, text encoders from a folder
  in the diffusers layout (no model_index.json), exported, then run by diffusers."""
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape)
                        .astype(np.float32), ours.transformer_params)
  trained = dataclasses.replace(ours, transformer_params=params, shift=2.0,
                                text_encoder_folder=None, scheduler_config=None)
  out = save_pipeline(trained, str(tmp_path / "trained"), text_encoder_folder=folders["encoders"])
  want = _run_diffusers(_from_pretrained(out), noise)
  got = sample.generate(trained, PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, latents=noise)
  err = _max_abs(got, want)
  print(f"export of changed weights, sd3jax vs diffusers(export): max abs {err:.2e}")
  assert err < TOL
  # Without any folder, the text encoders come from where the TextEncoders were loaded.
  again = save_pipeline(trained, str(tmp_path / "from_sources"))
  assert sorted(os.listdir(again)) == sorted(os.listdir(out))


def test_save_pipeline_without_t5(folders, noise, tmp_path):
  no_t5 = load_pipeline(folders["no_t5"], t5_length=T5_LENGTH)
  out = save_pipeline(no_t5, str(tmp_path / "no_t5"))
  index = json.load(open(os.path.join(out, "model_index.json")))
  assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
  assert not os.path.exists(os.path.join(out, "text_encoder_3"))
  want = _run_diffusers(_from_pretrained(folders["no_t5"], with_t5=False), noise)
  assert _max_abs(_run_diffusers(_from_pretrained(out, with_t5=False), noise), want) < 1e-5


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_other_samplers(ours, ours_images, sampler):
  # batch_size=1: two compiled calls of one image each (the progress-bar loop).
  got = sample.generate(ours, PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, sampler=sampler,
                        seed=3, batch_size=1)
  assert got.shape == (2, SIZE, SIZE, 3) and np.isfinite(got).all()
  assert got.min() >= 0.0 and got.max() <= 1.0 and got.std() > 0.05


def test_sharded_matches_single_device(folders, noise, ours_images):
  """Weights sharded by fsdp_tp over (fsdp 4, tensor 2); 2 images padded to the 4 shards."""
  assert jax.device_count() == 8
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  sharded = load_pipeline(folders["t5"], t5_length=T5_LENGTH, mesh=mesh, rules="fsdp_tp")
  kernel = sharded.transformer_params["context_embedder"]["kernel"]
  assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
  got = sample.generate(sharded, PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, latents=noise,
                        batch_sharding=parallel.batch_sharding(mesh, 4))
  err = _max_abs(got, ours_images)
  print(f"8-device mesh vs single device: max abs {err:.2e}")
  assert err < 1e-5


def test_the_sampler_compiles_with_xla_s_own_convolutions_on_cpu(ours, noise):
  """The denoise program (MM-DiT steps + VAE decode) asks XLA:CPU for its own convolution
  kernels (parallel.conv_compiler_options), as the VAE's train step does: no YNNPACK fusion
  is left in what XLA compiled."""
  run = sample._denoise_fn(ours, STEPS, "euler", ours.shift, True, 1.0, None)
  n = len(PROMPTS)
  context = np.zeros((2 * n,) + ours.text_encoders.context_shape, np.float32)
  pooled = np.zeros((2 * n, CLIP_L + CLIP_G), np.float32)
  compiled = run.lower(ours.transformer_params, ours.vae_params, None, noise, context, pooled,
                       np.float32(GUIDANCE), np.float32(1.0)).compile()
  assert parallel.conv_compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
  assert "__ynn_fusion" not in compiled.as_text()


def test_noise_depends_only_on_seed_and_index():
  full = sample.initial_noise(7, np.arange(3), (4, 4, 16))
  np.testing.assert_array_equal(sample.initial_noise(7, [2], (4, 4, 16))[0], full[2])
  assert float(np.abs(full[0] - full[1]).max()) > 0


def test_clear_errors(folders, ours, tmp_path):
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    load_pipeline(folders["encoders"])
  with pytest.raises(ValueError, match="multiples of vae_scale_factor \\* patch_size"):
    sample.generate(ours, "a red star", height=36, width=32)
  with pytest.raises(ValueError, match="sampler"):
    sample.generate(ours, "a red star", sampler="ddim")
  with pytest.raises(ValueError, match="negative_prompt has 1 entries for 2 prompts"):
    sample.generate(ours, PROMPTS, negative_prompt=["x"])
  with pytest.raises(ValueError, match="latents"):
    sample.generate(ours, PROMPTS, latents=np.zeros((2, 4, 4, 16), np.float32), height=SIZE)
  with pytest.raises(NotImplementedError, match="use_dynamic_shifting"):
    pipeline_io.scheduler_shift({"shift": 3.0, "use_dynamic_shifting": True})
  with pytest.raises(ValueError, match="rectified-flow"):
    save_pipeline(dataclasses.replace(ours, formulation="edm"), str(tmp_path / "edm"))


def test_save_images_and_grid(tmp_path):
  images = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32)
  paths = sample.save_images(images, str(tmp_path), ["a red star", "b", "c / d"])
  assert [os.path.basename(p) for p in paths] == ["0000_a_red_star.png", "0001_b.png",
                                                  "0002_c_d.png", "grid.png"]
  from PIL import Image
  np.testing.assert_array_equal(np.asarray(Image.open(paths[0])), sample.to_uint8(images[0]))
  grid = np.asarray(Image.open(paths[-1]))
  assert grid.shape == (2 * 10 + 2, 2 * 10 + 2, 3)  # 2 x 2 cells of 8 + 2 padding.
  np.testing.assert_array_equal(grid[2:10, 12:20], sample.to_uint8(images[1]))
