"""Image + instruction -> edited image, with InstructPix2Pix's dual guidance.

  source latent  c_I = normalise(VAE posterior mean of the image)      (as in training)
  instruction    c_T = the text encoders' (context, pooled)
  per step       e = e(z, ∅, ∅) + s_I (e(z, c_I, ∅) - e(z, ∅, ∅)) + s_T (e(z, c_I, c_T) - e(z, c_I, ∅))

(Brooks et al. 2023, eq. 3), one batched network call on [z; z; z] (sd3jax.flow.cfg). An
absent condition is zeros, as the trainer drops it (sd3jax.conditioning.drop_edit_conditions),
not the encoding of "". s_I = image_cfg weighs faithfulness to the source, s_T = text_cfg the
instruction; both 1 is the plain conditional prediction (one call, no guidance).

The noise of image i is fold_in(key(seed), i), as in sd3jax.sample: a result does not change
with the batch size, the padding or the mesh.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sd3jax import flow, parallel
from sd3jax import sample as sample_lib
from sd3jax.models import vae as vae_lib


def _edit_fn(pipe: sample_lib.Pipeline, steps: int, shift: float, guided: bool, mesh):
  """jit(tparams, vparams, z1, images, context, pooled, text_cfg, image_cfg) -> [0, 1]."""
  key = ("edit", steps, float(shift), guided, pipe.formulation, mesh)
  if key in pipe._cache:  # pylint: disable=protected-access
    return pipe._cache[key]  # pylint: disable=protected-access
  model, vae = pipe.transformer, pipe.vae

  def run(tparams, vparams, z1, images, context, pooled, text_cfg, image_cfg):
    post = vae.apply({"params": vparams}, images * 2.0 - 1.0, method=type(vae).encode)
    source = vae_lib.normalize_latents(post.mean, vae.config.scaling_factor,
                                       vae.config.shift_factor)
    if guided:  # [full; image only; none], as flow.cfg reads them
      zeros = jnp.zeros_like
      context = jnp.concatenate([context, zeros(context), zeros(context)])
      pooled = jnp.concatenate([pooled, zeros(pooled), zeros(pooled)])
      source = jnp.concatenate([source, source, zeros(source)])

    def velocity(z, t):
      return model.apply({"params": tparams}, jnp.concatenate([z, source], axis=-1), t,
                         context, pooled)
    model_fn = flow.cfg(velocity, text_cfg, image_cfg) if guided else velocity
    latents = flow.sample(model_fn, z1, steps, "euler", shift, pipe.formulation)
    return jnp.clip(vae.decode_latents(vparams, latents) / 2 + 0.5, 0.0, 1.0)

  # XLA's own kernels on CPU: faster for this program (parallel.conv_compiler_options).
  pipe._cache[key] = jax.jit(  # pylint: disable=protected-access
      run, compiler_options=parallel.conv_compiler_options(mesh))
  return pipe._cache[key]  # pylint: disable=protected-access


def as_unit_images(images: Any) -> np.ndarray:
  """uint8 or float [0, 1] NHWC (or one HWC image) -> float32 NHWC in [0, 1]."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"Expected RGB images NHWC (or one HWC image), got shape {x.shape}.")
  return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def edit(pipe: sample_lib.Pipeline, images: Any, instructions: str | Sequence[str], *,
         image_cfg: float = 1.5, text_cfg: float = 5.0, steps: int = 28,
         shift: float | None = None, seed: int = 0, batch_size: int | None = None,
         progress: bool = True) -> np.ndarray:
  """Edited images, float32 (B, H, W, 3) in [0, 1]; `images` uint8 or [0, 1] floats, one
  instruction per image (or one for all). H and W must suit the VAE and patch size."""
  images = as_unit_images(images)
  n = len(images)
  instructions = [instructions] * n if isinstance(instructions, str) else list(instructions)
  if len(instructions) != n:
    raise ValueError(f"{len(instructions)} instructions for {n} images; pass one per image.")
  want = 2 * pipe.vae.config.latent_channels
  if pipe.transformer.cfg.in_channels != want:
    raise ValueError(f"This MM-DiT takes {pipe.transformer.cfg.in_channels} input channels, not "
                     f"{want}: it is not an editing model (train one with "
                     "experiments/shapes_edit.py).")
  h, w = images.shape[1:3]
  shape = sample_lib.latent_shape(pipe, h, w)[:2] + (pipe.vae.config.latent_channels,)
  shift = pipe.shift if shift is None else float(shift)
  guided = not (image_cfg == 1.0 and text_cfg == 1.0)
  mesh = pipe.mesh
  spec, shards = (None, 1)
  if mesh is not None:
    spec, shards = sample_lib._batch_axes(parallel.batch_sharding(mesh, 4))  # pylint: disable=protected-access
  chunk = -(-(batch_size or n) // shards) * shards
  tparams, vparams, _ = sample_lib._params_for(pipe, mesh)  # pylint: disable=protected-access
  run = _edit_fn(pipe, int(steps), shift, guided, mesh)

  def place(x):
    x = jnp.asarray(x)
    return x if mesh is None else jax.device_put(
        x, NamedSharding(mesh, P(spec, *[None] * (x.ndim - 1))))

  from tqdm.auto import tqdm
  out = []
  for start in tqdm(range(0, n, chunk), desc="editing", unit="batch", disable=not progress):
    index = np.minimum(np.arange(start, start + chunk), n - 1)  # padding repeats the last
    context, pooled = pipe.encoders()([instructions[i] for i in index])
    z1 = sample_lib.initial_noise(seed, index, shape)
    with sample_lib._mesh_context(pipe, mesh):  # pylint: disable=protected-access
      result = run(tparams, vparams, place(z1), place(images[index]), place(context),
                   place(pooled), jnp.float32(text_cfg), jnp.float32(image_cfg))
    out.append(np.asarray(jax.device_get(result))[:min(chunk, n - start)])
  return np.concatenate(out).astype(np.float32)


def read_image(path: str, size: int | tuple[int, int] | None = None) -> np.ndarray:
  """An RGB image file as uint8 HWC, resized (bicubic) and centre-cropped to `size` (h, w)."""
  from PIL import Image
  from sd3jax.data import pipeline as pipeline_lib
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--image {path}: no such file.")
  try:
    image = np.asarray(Image.open(path).convert("RGB"))
  except Exception as e:  # noqa: BLE001 -- any undecodable file gets the same message
    from sd3jax.data.records import DataError
    raise DataError(f"--image {path} is not an image PIL can read ({e}).") from e
  if size is None:
    return image
  h, w = (size, size) if isinstance(size, int) else size
  return np.asarray(pipeline_lib.resize_and_crop(image, h, w, crop="center")[0], np.uint8)


def resolve_edit_run(workdir: str) -> str:
  """The editing run behind `workdir`: itself, or a job folder's edit/ run."""
  edit_run = os.path.join(workdir or "", "edit")
  if workdir and os.path.isdir(os.path.join(workdir, "job")) and not os.path.exists(
      os.path.join(workdir, "config.json")):
    if not os.path.exists(os.path.join(edit_run, "config.json")):
      raise FileNotFoundError(f"The job in {workdir} has no editing model yet: run `sd3jax run "
                              f"--config experiments/shapes_edit.py --workdir {workdir}`.")
    return sample_lib.resolve_run_dir(edit_run)
  return sample_lib.resolve_run_dir(workdir)


def edit_main(config: Any, workdir: str, images: Sequence[str], instruction: str, *,
              image_cfg: float | None = None, text_cfg: float | None = None,
              steps: int | None = None, shift: float | None = None, seed: int = 0,
              out: str | None = None, use_ema: bool = True, step: int | None = None
              ) -> list[str]:
  """`sd3jax edit`: each --image edited by --instruction, saved as PNGs (+ a side-by-side
  grid) in `out` (default RUN/edited). Defaults are the run's own (config.edit_eval)."""
  from sd3jax.config import ConfigError
  if not images:
    raise ConfigError("sd3jax edit needs --image FILE (repeatable).")
  if not instruction or not instruction.strip():
    raise ConfigError('sd3jax edit needs --instruction TEXT, e.g. "make the red circle blue".')
  run_dir = resolve_edit_run(workdir)
  config = sample_lib.run_config(config, run_dir)
  if int(config.model.in_channels) != 2 * int(config.model.out_channels):
    raise ConfigError(f"{run_dir} is a text-to-image run (in_channels "
                      f"{config.model.in_channels}); `sd3jax edit` needs an editing run "
                      "(experiments/shapes_edit.py).")
  settings = run_edit_settings(config)
  size = int(config.data.image_size)
  pipe = sample_lib.pipeline_from_run(config, run_dir, step=step, use_ema=use_ema)
  pixels = np.stack([read_image(p, size) for p in images])
  result = edit(pipe, pixels, instruction.strip(),
                image_cfg=settings["image_cfg"] if image_cfg is None else float(image_cfg),
                text_cfg=settings["text_cfg"] if text_cfg is None else float(text_cfg),
                steps=settings["steps"] if steps is None else int(steps),
                shift=settings["shift"] if shift is None else float(shift), seed=seed)
  out = out or os.path.join(run_dir, "edited")
  names = [os.path.splitext(os.path.basename(p))[0] + " " + instruction for p in images]
  pairs = [np.concatenate([a.astype(np.float32) / 255.0, b], axis=1)
           for a, b in zip(pixels, result)]
  return sample_lib.save_images(pairs, out, names, cols=1)


def run_edit_settings(config: Any) -> dict[str, Any]:
  """An editing run's sampling settings (config.edit_eval, else the run's text-to-image ones
  with InstructPix2Pix's image_cfg 1.5)."""
  base = sample_lib.run_sampling_settings(config)
  ev = config.get("edit_eval", {}) or {}
  return {"steps": int(ev.get("steps", base["steps"])),
          "shift": float(ev.get("shift", base["shift"])),
          "text_cfg": float(ev.get("text_cfg", base["cfg"])),
          "image_cfg": float(ev.get("image_cfg", 1.5))}
