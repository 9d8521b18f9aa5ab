"""Text -> image: what diffusers' `StableDiffusion3Pipeline.__call__` does, in JAX.

  prompts --TextEncoders--> (context, pooled), and the negative ones for guidance
  z1 ~ N(0, I) latents (B, H / f, W / f, C), one key per image: fold_in(key(seed), index)
  flow.sample over flow.sigmas(steps, shift) with the guided velocity
      uncond + g (cond - uncond) (one batched network call on [cond; uncond]; g > 1 only)
  images = (vae.decode(latents / scaling_factor + shift_factor) / 2 + 0.5).clip(0, 1)

The network is called with sigma in [0, 1] (diffusers passes sigma * 1000; our MM-DiT
scales inside). Denoising and decoding are one jitted function per (steps, sampler, shift,
guidance on/off, mesh); the batch is split over the mesh's ("data", "fsdp") axes, padded to
a multiple of the shards. Noise depends only on (seed, image index), so an image does not
change with the batch size, the padding or the mesh.

`Pipeline` bundles the components; `sd3jax.interop.diffusers.load_pipeline` builds one from
a diffusers folder and `save_pipeline` writes one back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sd3jax import buckets as buckets_lib
from sd3jax import flow, parallel
from sd3jax.conditioning import TextEncoders
from sd3jax.models import mmdit
from sd3jax.models.vae import AutoencoderKL

SAMPLERS = ("euler", "heun", "dpmpp_2m")


@dataclasses.dataclass
class Pipeline:
  """The components of SD3 text -> image sampling.

  Params may be host numpy, device arrays, or arrays sharded over `mesh` (load_pipeline with
  a mesh places them by `rules`). `text_encoder_folder` is a diffusers-layout folder holding
  text_encoder{,_2,_3} and tokenizer{,_2,_3}: what `save_pipeline` copies (the encoders are
  frozen). `shift` is the sampling shift (the scheduler's); `formulation` is what the
  transformer predicts (only "rf" exports to diffusers).
  """
  transformer: mmdit.MMDiT
  transformer_params: Any
  vae: AutoencoderKL
  vae_params: Any
  text_encoders: TextEncoders | None
  shift: float = 3.0
  formulation: str = "rf"
  text_encoder_folder: str | None = None
  scheduler_config: dict | None = None  # The source's scheduler_config.json, kept for export.
  mesh: Mesh | None = None
  rules: Any = "fsdp_tp"
  # A weaker version of the same MM-DiT (a shorter run), for generate's `autoguidance`.
  weak_transformer_params: Any = None
  # Compiled functions and derived views; not an init field, so dataclasses.replace starts afresh.
  _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

  @property
  def latent_channels(self) -> int:
    return self.transformer.cfg.in_channels

  @property
  def vae_scale_factor(self) -> int:
    return self.vae.config.downsample_factor

  @property
  def patch_size(self) -> int:
    return self.transformer.cfg.patch_size

  @property
  def default_size(self) -> int:
    """diffusers' default height and width: transformer sample_size * vae_scale_factor."""
    return self.transformer.cfg.sample_size * self.vae_scale_factor

  def encoders(self, use_t5: bool = True) -> TextEncoders:
    """The text encoders, or a view of them without T5 (its part zeros, as diffusers)."""
    te = self.text_encoders
    if te is None:
      raise ValueError("This Pipeline has no text encoders; build it with TextEncoders "
                       "(e.g. TextEncoders.from_pipeline_folder(folder)) to sample from prompts.")
    if use_t5 or te.encoders["t5"] is None:
      return te
    if "no_t5" not in self._cache:
      self._cache["no_t5"] = TextEncoders(
          te.encoders["clip_l"], te.encoders["clip_g"], None, t5_length=te.t5_length,
          t5_width=te.t5_width, clip_skip=te.clip_skip, t5_attention_mask=te.t5_attention_mask,
          mesh=te.mesh, rules=te.rules)
    return self._cache["no_t5"]


# ------------------------------------------------------------------------------------------------
# Checks and helpers.
# ------------------------------------------------------------------------------------------------
def latent_shape(pipeline: Pipeline, height: int, width: int) -> tuple[int, int, int]:
  """(H / f, W / f, C); fails like diffusers' check_inputs when the size does not fit."""
  multiple = pipeline.vae_scale_factor * pipeline.patch_size
  if height % multiple or width % multiple or height <= 0 or width <= 0:
    raise ValueError(
        f"height and width must be positive multiples of vae_scale_factor * patch_size = "
        f"{pipeline.vae_scale_factor} * {pipeline.patch_size} = {multiple}; got "
        f"{height}x{width}. Use e.g. {max(multiple, height // multiple * multiple)}x"
        f"{max(multiple, width // multiple * multiple)}.")
  f = pipeline.vae_scale_factor
  return height // f, width // f, pipeline.latent_channels


def initial_noise(seed: int, indices: Sequence[int] | np.ndarray,
                  shape: tuple[int, ...]) -> jax.Array:
  """N(0, I) latents, image i from fold_in(key(seed), i): independent of batching."""
  return _noise(jax.random.key(seed), jnp.asarray(np.asarray(indices, np.int32)), tuple(shape))


@functools.partial(jax.jit, static_argnums=2)
def _noise(key: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(
      indices)


def _batch_axes(sharding: NamedSharding) -> tuple[Any, int]:
  """(the spec entry of the batch axis, how many shards it makes)."""
  if not isinstance(sharding, NamedSharding):
    raise TypeError(f"batch_sharding must be a jax.sharding.NamedSharding (e.g. "
                    f"parallel.batch_sharding(mesh, 4)), got {type(sharding).__name__}.")
  spec = sharding.spec[0] if len(sharding.spec) else None
  names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return spec, math.prod(sharding.mesh.shape[n] for n in names)


def _on_mesh(tree: Any, mesh: Mesh) -> bool:
  leaves = jax.tree.leaves(tree)
  return bool(leaves) and all(isinstance(getattr(x, "sharding", None), NamedSharding)
                              and x.sharding.mesh == mesh for x in leaves)


def _params_for(pipeline: Pipeline, mesh: Mesh | None) -> tuple[Any, Any, Any]:
  """(MM-DiT, VAE, weak MM-DiT or None) params as the jitted call needs them: replicated once
  on a foreign mesh, cached."""
  params = (pipeline.transformer_params, pipeline.vae_params, pipeline.weak_transformer_params)
  if mesh is None or _on_mesh(params, mesh):
    return params
  key = ("params", mesh)
  if key not in pipeline._cache:
    pipeline._cache[key] = jax.device_put(params, NamedSharding(mesh, P()))
  return pipeline._cache[key]


def _mesh_context(pipeline: Pipeline, mesh: Mesh | None):
  if mesh is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  # jax.set_mesh, not `with mesh:`: flax's logical constraints only see the former.
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(parallel.get_rules(pipeline.rules or "fsdp_tp")))
  return stack


def _denoise_fn(pipeline: Pipeline, steps: int, sampler: str, shift: float, guided: bool,
                max_t: float, mesh: Mesh | None, autoguided: bool = False):
  """jit(params, weak params, z1, context, pooled, guidance, autoguidance) -> images in
  [0, 1]; one per static setting."""
  key = ("denoise", steps, sampler, float(shift), guided, float(max_t), pipeline.formulation,
         mesh, autoguided)
  if key in pipeline._cache:
    return pipeline._cache[key]
  model, vae = pipeline.transformer, pipeline.vae

  def run(tparams, vparams, wparams, z1, context, pooled, guidance, autoguidance):
    def velocity(z, t):
      return model.apply({"params": tparams}, z, t, context, pooled)
    n = z1.shape[0]
    text, text_pooled = context[:n], pooled[:n]  # the prompts' half of [text; negative]

    def cond(z, t):
      return model.apply({"params": tparams}, z, t, text, text_pooled)
    model_fn = flow.cfg(velocity, guidance, max_t=max_t, cond_fn=cond) if guided else velocity
    if autoguided:  # above max_t: the weak model conditioned on the prompt, not on ""
      model_fn = flow.autoguide(
          model_fn, cond, lambda z, t: model.apply({"params": wparams}, z, t, text, text_pooled),
          autoguidance, max_t)
    latents = flow.sample(model_fn, z1, steps, sampler, shift, pipeline.formulation)
    images = vae.decode_latents(vparams, latents)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

  # XLA's own kernels on CPU: faster for this program (parallel.conv_compiler_options).
  pipeline._cache[key] = jax.jit(run, compiler_options=parallel.conv_compiler_options(mesh))
  return pipeline._cache[key]


def _as_list(prompts: str | Sequence[str], what: str) -> list[str]:
  if isinstance(prompts, str):
    return [prompts]
  out = list(prompts)
  if not out or not all(isinstance(p, str) for p in out):
    raise ValueError(f"{what} must be a string or a non-empty list of strings.")
  return out


# ------------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------------
def generate(pipeline: Pipeline, prompts: str | Sequence[str], *,
             negative_prompt: str | Sequence[str] | None = None, height: int | None = None,
             width: int | None = None, steps: int = 28, guidance_scale: float = 5.0,
             shift: float | None = None, sampler: str = "euler", seed: int = 0,
             guidance_max_t: float = 1.0, autoguidance: float = 1.0,
             use_t5: bool = True, clip_skip: int | None = None, latents: Any = None,
             batch_sharding: NamedSharding | None = None, batch_size: int | None = None,
             progress: bool = True) -> np.ndarray:
  """Images float32 (B, H, W, 3) in [0, 1], as StableDiffusion3Pipeline.__call__ makes them.

  height / width default to diffusers' (sample_size * vae_scale_factor, or the size of
  `latents`). `latents`: the initial noise, NHWC (B, H / f, W / f, C), instead of drawing it
  from `seed`. Guidance runs when guidance_scale > 1 (diffusers' rule); a missing negative
  prompt is "". `guidance_max_t` < 1 guides only the steps at t <= guidance_max_t (a guidance
  interval, flow.cfg; diffusers has none, so 1.0 is its sampler). `autoguidance` > 1 guides
  the steps above guidance_max_t with the pipeline's weak_transformer_params (a weaker
  version of the same MM-DiT, flow.autoguide; 1 = none). `shift` defaults to the
  pipeline's (the scheduler's). `use_t5=False` replaces
  T5 by zeros; `clip_skip` applies to the positive prompt only (as in diffusers).
  `batch_sharding`: a NamedSharding whose first spec entry splits the batch (default:
  ("data", "fsdp") of the pipeline's mesh, if any). `batch_size`: images per compiled call
  (default all); a progress bar runs over the calls.
  """
  prompts = _as_list(prompts, "prompts")
  n = len(prompts)
  negatives = None
  if negative_prompt is not None:
    negatives = (n * [negative_prompt] if isinstance(negative_prompt, str)
                 else _as_list(negative_prompt, "negative_prompt"))
    if len(negatives) != n:
      raise ValueError(f"negative_prompt has {len(negatives)} entries for {n} prompts; pass "
                       "one per prompt or a single string.")
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
  if int(steps) < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  if latents is not None:
    latents = np.asarray(latents, np.float32)
    f = pipeline.vae_scale_factor
    if latents.ndim != 4 or latents.shape[0] != n:
      raise ValueError(f"latents must be NHWC (batch {n}, H / {f}, W / {f}, "
                       f"{pipeline.latent_channels}), got shape {latents.shape}.")
    height = height or latents.shape[1] * f
    width = width or latents.shape[2] * f
  height, width = height or pipeline.default_size, width or pipeline.default_size
  shape = latent_shape(pipeline, height, width)
  if latents is not None and latents.shape[1:] != shape:
    raise ValueError(f"latents have shape {latents.shape[1:]} per image but {height}x{width} "
                     f"needs {shape} (NHWC: height / f, width / f, channels).")
  shift = pipeline.shift if shift is None else float(shift)
  guided = guidance_scale > 1.0

  if batch_sharding is None and pipeline.mesh is not None:
    batch_sharding = parallel.batch_sharding(pipeline.mesh, 4)
  mesh, spec, shards = None, None, 1
  if batch_sharding is not None:
    spec, shards = _batch_axes(batch_sharding)
    mesh = batch_sharding.mesh
  chunk = -(-(batch_size or n) // shards) * shards  # Rounded up to whole shards.
  encoders = pipeline.encoders(use_t5)
  tparams, vparams, wparams = _params_for(pipeline, mesh)
  if not 0.0 < float(guidance_max_t) <= 1.0:
    raise ValueError(f"guidance_max_t must be in (0, 1] (1: guide every step), got "
                     f"{guidance_max_t}.")
  autoguided = float(autoguidance) != 1.0
  if autoguided and (float(autoguidance) < 1.0 or float(guidance_max_t) >= 1.0
                     or pipeline.weak_transformer_params is None):
    raise ValueError(
        f"autoguidance={autoguidance} needs a scale > 1, guidance_max_t < 1 (it guides the steps "
        f"above it; got {guidance_max_t}) and the pipeline's weak_transformer_params (a run "
        "configured with eval.sample_autoguidance_run loads them); 1 turns it off.")
  run = _denoise_fn(pipeline, int(steps), sampler, shift, guided, float(guidance_max_t), mesh,
                    autoguided)

  def place(x):
    x = jnp.asarray(x)
    if mesh is None:
      return x
    return jax.device_put(x, NamedSharding(mesh, P(spec, *[None] * (x.ndim - 1))))

  from tqdm.auto import tqdm  # Local: a light import for users who only load pipelines.
  out = []
  starts = range(0, n, chunk)
  for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
    index = np.arange(start, start + chunk)
    real = index < n
    index = np.minimum(index, n - 1)  # Pad by repeating the last image; dropped below.
    batch_prompts = [prompts[i] for i in index]
    context, neg_context, pooled, neg_pooled = encoders.encode_prompt(
        batch_prompts, do_classifier_free_guidance=guided, clip_skip=clip_skip,
        negative_prompt=None if negatives is None else [negatives[i] for i in index])
    if guided:  # flow.cfg calls the model on [z; z] and reads [cond; uncond].
      context = jnp.concatenate([context, neg_context], axis=0)
      pooled = jnp.concatenate([pooled, neg_pooled], axis=0)
    z1 = latents[index] if latents is not None else initial_noise(seed, index, shape)
    with _mesh_context(pipeline, mesh):
      images = run(tparams, vparams, wparams, place(z1), place(context), place(pooled),
                   jnp.float32(guidance_scale), jnp.float32(autoguidance))
    out.append(np.asarray(jax.device_get(images))[real])
  return np.concatenate(out, axis=0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Writing images.
# ------------------------------------------------------------------------------------------------
def to_uint8(images: np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8, rounded as diffusers' numpy_to_pil."""
  return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def make_grid(images: np.ndarray | Sequence[np.ndarray], cols: int | None = None, pad: int = 2,
              background: float = 1.0) -> np.ndarray:
  """(B, H, W, 3), or B images of several sizes (aspect-ratio buckets) -> one image of
  rows x cols cells, each as large as the largest image; smaller ones sit in its centre."""
  images = [np.asarray(im) for im in images]
  if not images or any(im.ndim != 3 for im in images):
    raise ValueError("make_grid expects (B, H, W, C) images or a list of (H, W, C) images, got "
                     f"shapes {[im.shape for im in images]}.")
  b, c = len(images), images[0].shape[-1]
  h, w = max(im.shape[0] for im in images), max(im.shape[1] for im in images)
  cols = cols or math.ceil(math.sqrt(b))
  rows = math.ceil(b / cols)
  fill = 255 * background if images[0].dtype == np.uint8 else background
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, images[0].dtype)
  for i, image in enumerate(images):
    r, q = divmod(i, cols)
    y = pad + r * (h + pad) + (h - image.shape[0]) // 2
    x = pad + q * (w + pad) + (w - image.shape[1]) // 2
    grid[y:y + image.shape[0], x:x + image.shape[1]] = image
  return grid


def _slug(text: str, limit: int = 48) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "image"


def save_image(path: str, image: np.ndarray) -> str:
  """Writes one (H, W, 3) image ([0, 1] floats or uint8) as a PNG, creating its folder."""
  from PIL import Image  # Local: only needed when writing files.
  image = np.asarray(image)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(image if image.dtype == np.uint8 else to_uint8(image)).save(path)
  return path


def save_images(images: np.ndarray | Sequence[np.ndarray], out_dir: str,
                prompts: Sequence[str] | None = None, *, cols: int | None = None,
                grid_name: str = "grid.png") -> list[str]:
  """Writes NNNN_<prompt>.png per image and a grid; returns the paths, the grid last.
  `images`: (B, H, W, 3) in [0, 1], or a list of such (H, W, 3) of several sizes."""
  images = [to_uint8(im) for im in images]
  if prompts is not None:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, image in enumerate(images):
    name = f"{i:04d}" + (f"_{_slug(prompts[i])}" if prompts else "") + ".png"
    paths.append(save_image(os.path.join(out_dir, name), image))
  paths.append(save_image(os.path.join(out_dir, grid_name), make_grid(images, cols)))
  return paths


# ------------------------------------------------------------------------------------------------
# From a training run: `sd3jax sample` and `sd3jax export`.
# ------------------------------------------------------------------------------------------------
def resolve_run_dir(workdir: str) -> str:
  """The trainer run folder behind `workdir`: itself when it holds a config.json, or the
  MM-DiT run (WORKDIR/mmdit) of a job folder written by `sd3jax run`. Raises
  FileNotFoundError naming what is missing."""
  if not workdir:
    raise FileNotFoundError("No --workdir: pass a run folder (`sd3jax train --workdir`) or a "
                            "job folder (`sd3jax run --workdir`).")
  if os.path.exists(os.path.join(workdir, "config.json")):
    folder = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder))):
      raise FileNotFoundError(f"The run in {workdir} has not saved a checkpoint yet; train it "
                              "further (rerun its command) first.")
    return workdir
  if not os.path.exists(workdir):
    raise FileNotFoundError(f"--workdir {workdir} does not exist.")
  if not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a run folder.")
  if os.path.isdir(os.path.join(workdir, "job")):
    mmdit_run = os.path.join(workdir, "mmdit")
    if os.path.exists(os.path.join(mmdit_run, "config.json")):
      return resolve_run_dir(mmdit_run)
    raise FileNotFoundError(f"The job in {workdir} has not started training its MM-DiT yet; "
                            "rerun the same `sd3jax run` command to finish it.")
  raise FileNotFoundError(f"{workdir} is not a run folder: it has no config.json (written by "
                          "`sd3jax train`) and no job/ (written by `sd3jax run`).")


def run_config(config: Any, workdir: str | None) -> Any:
  """`config`, else the workdir's config.json (what the run trained with), completed."""
  from ml_collections import ConfigDict
  from sd3jax import config as config_lib
  if config is None:
    path = os.path.join(workdir or "", "config.json")
    if not workdir or not os.path.exists(path):
      raise FileNotFoundError(f"No --config and no {path}: pass --config experiments/FILE.py or a "
                       "--workdir that a run wrote.")
    with open(path) as f:
      config = ConfigDict(json.load(f))
  return config_lib.complete(config)


def _precompute_setting(config: Any, key: str, default: Any = "") -> Any:
  section = config.get("precompute", None)
  return section.get(key, default) if section is not None else default


def run_components_configured(config: Any) -> bool:
  """Whether the run names a VAE and text encoders (config.precompute.vae / .text_encoders)."""
  return bool(_precompute_setting(config, "vae")) and bool(
      _precompute_setting(config, "text_encoders"))


def load_run_params(config: Any, workdir: str, mesh: Mesh, *, step: int | None = None,
                    use_ema: bool = True) -> tuple[mmdit.MMDiT, Any]:
  """(model, params) of a run's checkpoint (latest or `step`), restored into their shards."""
  from sd3jax import checkpoint as ckpt_lib
  from sd3jax import config as config_lib
  cfg = config_lib.model_config(config)
  boxed = jax.eval_shape(lambda r: mmdit.init_params(cfg, r), jax.random.key(0))
  shardings = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh,
                                           config.sharding_rules)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          nn.unbox(boxed), shardings)
  path = workdir if step is None else os.path.join(workdir, "checkpoints", str(int(step)))
  if step is not None and not os.path.isdir(path):
    raise FileNotFoundError(f"{workdir} has no checkpoint of step {step} ({path}).")
  return mmdit.MMDiT(cfg), ckpt_lib.load_weights(path, abstract, config, use_ema=use_ema)


@dataclasses.dataclass
class RunComponents:
  """The frozen parts of a run's Pipeline: its VAE and text encoders, loaded once."""
  vae: AutoencoderKL
  vae_params: Any
  text_encoders: TextEncoders
  text_encoder_folder: str


def load_run_components(config: Any, mesh: Mesh, *, use_t5: bool = True) -> RunComponents:
  """config.precompute.vae (a diffusers AutoencoderKL folder) and .text_encoders (a folder in
  the SD3 pipeline layout): the model trained on their latents and embeddings, so it samples
  with them. The VAE params are replicated over `mesh`."""
  from sd3jax import config as config_lib
  from sd3jax.interop.diffusers_vae import load_vae
  if not run_components_configured(config):
    raise ValueError("Sampling a run needs config.precompute.vae and "
                     "config.precompute.text_encoders (the folders its latents and embeddings "
                     "came from); set them, or sample an exported folder with --pipeline DIR.")
  vae, vparams = load_vae(_precompute_setting(config, "vae"))
  out_channels = config_lib.model_config(config).out_channels  # an editing model takes 2x in
  if vae.config.latent_channels != out_channels:
    raise ValueError(f"config.precompute.vae has {vae.config.latent_channels} latent channels "
                     f"but config.model.out_channels={out_channels}.")
  folder = _precompute_setting(config, "text_encoders")
  encoders = TextEncoders.from_pipeline_folder(
      folder, t5_length=int(config.conditioning.t5_tokens),
      use_t5=use_t5 and bool(_precompute_setting(config, "use_t5", True)),
      t5_width=int(config.conditioning.t5_dim), mesh=mesh, rules=config.sharding_rules)
  return RunComponents(vae=vae, vae_params=jax.device_put(vparams, NamedSharding(mesh, P())),
                       text_encoders=encoders, text_encoder_folder=os.path.abspath(folder))


def pipeline_from_params(config: Any, model: mmdit.MMDiT, params: Any,
                         components: RunComponents, mesh: Mesh, *,
                         shift: float | None = None) -> Pipeline:
  """A Pipeline of in-memory MM-DiT params (e.g. the EMA params during training) + the run's
  components; no checkpoint is read, but the weak model of config.eval's autoguidance
  (`weak_params`). `shift` defaults to config.flow.shift."""
  return Pipeline(transformer=model, transformer_params=params, vae=components.vae,
                  vae_params=components.vae_params, text_encoders=components.text_encoders,
                  shift=float(config.flow.shift if shift is None else shift),
                  formulation=config.flow.formulation,
                  text_encoder_folder=components.text_encoder_folder, mesh=mesh,
                  rules=config.sharding_rules, weak_transformer_params=weak_params(config, mesh))


def weak_params(config: Any, mesh: Mesh) -> Any:
  """The EMA weights of config.eval.sample_autoguidance_run (latest checkpoint) when the run
  samples with autoguidance; else None. That run must be the same MM-DiT (config.model)."""
  ev = config.get("eval", {}) or {}
  run = ev.get("sample_autoguidance_run", "")
  if float(ev.get("sample_autoguidance", 1.0)) == 1.0 or not run:
    return None
  try:
    weak = run_config(None, resolve_run_dir(run))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.eval.sample_autoguidance_run: {e} Train the weak run "
                            "(`sd3jax run` does: its `weak` stage), or set "
                            "config.eval.sample_autoguidance=1.") from e
  same = lambda c: json.loads(json.dumps(c.model.to_dict()))  # tuples and lists alike
  if same(weak) != same(config):
    raise ValueError(f"config.eval.sample_autoguidance_run={run} is another MM-DiT "
                     f"({weak.model.to_dict()}); autoguidance needs the run's own "
                     f"({config.model.to_dict()}).")
  return load_run_params(weak, resolve_run_dir(run), mesh, use_ema=True)[1]


def with_transformer_params(pipeline: Pipeline, params: Any) -> Pipeline:
  """`pipeline` with other MM-DiT weights (same shapes and shardings), keeping its compiled
  sampling functions: what an eval every k steps needs so that it does not recompile."""
  new = dataclasses.replace(pipeline, transformer_params=params)
  new._cache.update({k: v for k, v in pipeline._cache.items()
                     if not (isinstance(k, tuple) and k[0] == "params")})  # Old weights.
  return new


def pipeline_from_run(config: Any, workdir: str, *, step: int | None = None,
                      use_ema: bool = True, shift: float | None = None, use_t5: bool = True,
                      mesh: Mesh | None = None) -> Pipeline:
  """A Pipeline of a run's checkpoint (latest or `step`) + its VAE and text encoders
  (`load_run_components`)."""
  from sd3jax import config as config_lib
  if mesh is None:
    mesh = parallel.make_mesh(*config_lib.mesh_sizes(config))
  components = load_run_components(config, mesh, use_t5=use_t5)  # Checks the config first.
  model, params = load_run_params(config, workdir, mesh, step=step, use_ema=use_ema)
  return pipeline_from_params(config, model, params, components, mesh, shift=shift)


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
  """--prompt values plus the non-empty lines of --prompts FILE."""
  out = list(prompts or [])
  if prompts_file:
    with open(prompts_file) as f:
      out += [line.strip() for line in f if line.strip()]
  if not out:
    raise ValueError("No prompts: pass --prompt TEXT (repeatable) or --prompts FILE.")
  return out


def run_sampling_settings(config: Any) -> dict[str, Any]:
  """The run's own sampling settings (config.eval: what its in-training evals and the job's
  sample stage use): steps, cfg, cfg_max_t (guidance only at t <= it), autoguidance (above
  it), shift."""
  ev = config.get("eval", {}) or {}
  return {"steps": int(ev.get("sample_steps", 28)), "cfg": float(ev.get("sample_cfg", 5.0)),
          "cfg_max_t": float(ev.get("sample_cfg_max_t", 1.0)),
          "autoguidance": float(ev.get("sample_autoguidance", 1.0)),
          "shift": float(ev.get("sample_shift", config.flow.shift))}


def sample_main(config: Any, workdir: str | None, prompts: Sequence[str], *,
                negative: str | None = None, steps: int | None = None, cfg: float | None = None,
                shift: float | None = None, cfg_max_t: float | None = None,
                autoguidance: float | None = None, sampler: str = "euler", seed: int = 0,
                no_t5: bool = False, use_ema: bool = True, out: str | None = None,
                pipeline: str | None = None, step: int | None = None,
                height: int | None = None, width: int | None = None) -> list[str]:
  """`sd3jax sample`: PNGs + grid of a run (EMA or raw weights) or of a pipeline folder.

  steps / cfg / cfg_max_t / autoguidance / shift left as None are the run's own
  (`run_sampling_settings`), so a run's first samples look like its in-training ones; for a
  pipeline folder 28, 5.0, 1.0, 1.0 and the scheduler's shift (diffusers' defaults). height / width: any multiple of VAE factor x
  patch size (a run's default: config.data.image_size); a run's shift then follows its
  config.flow.shift_rule at that size, as in training.
  """
  if pipeline:
    from sd3jax.interop.pipeline import load_pipeline
    pipe = load_pipeline(pipeline, use_t5=not no_t5)
    defaults = {"steps": 28, "cfg": 5.0, "cfg_max_t": 1.0, "autoguidance": 1.0,
                "shift": pipe.shift}
    out = out or os.path.join(".", "generated")
  else:
    # Default: next to the run, apart from the trainer's own samples/step_N.png grids.
    out = out or os.path.join(workdir or ".", "generated")
    workdir = resolve_run_dir(workdir)  # a job folder means its MM-DiT run
    config = run_config(config, workdir)
    height = int(height or config.data.image_size)
    width = int(width or height)
    defaults = run_sampling_settings(config)
    defaults["shift"] = buckets_lib.sample_shift(config, height, width, defaults["shift"])
    pipe = pipeline_from_run(config, workdir, step=step, use_ema=use_ema,
                             shift=defaults["shift"] if shift is None else shift,
                             use_t5=not no_t5)
  steps = defaults["steps"] if steps is None else int(steps)
  cfg = defaults["cfg"] if cfg is None else float(cfg)
  shift = defaults["shift"] if shift is None else float(shift)
  cfg_max_t = defaults["cfg_max_t"] if cfg_max_t is None else float(cfg_max_t)
  autoguidance = defaults["autoguidance"] if autoguidance is None else float(autoguidance)
  images = generate(pipe, list(prompts), negative_prompt=negative, height=height, width=width,
                    steps=steps, guidance_scale=cfg, guidance_max_t=cfg_max_t,
                    autoguidance=autoguidance, shift=shift, sampler=sampler, seed=seed,
                    use_t5=not no_t5)
  return save_images(images, out, list(prompts))


def export_main(config: Any, workdir: str, out: str, *, use_ema: bool = True,
                step: int | None = None, shift: float | None = None,
                overwrite: bool = False) -> str:
  """`sd3jax export`: the run as a diffusers StableDiffusion3Pipeline folder."""
  from sd3jax.interop.pipeline import save_pipeline
  workdir = resolve_run_dir(workdir)
  config = run_config(config, workdir)
  pipe = pipeline_from_run(config, workdir, step=step, use_ema=use_ema, shift=shift)
  if pipe.vae.config.shift_factor is None:
    # diffusers' SD3 pipeline adds vae.config.shift_factor unconditionally; None means 0.
    vae = type(pipe.vae)(dataclasses.replace(pipe.vae.config, shift_factor=0.0))
    pipe = dataclasses.replace(pipe, vae=vae)
  return save_pipeline(pipe, out, overwrite=overwrite)


__all__ = ["Pipeline", "RunComponents", "SAMPLERS", "export_main", "resolve_run_dir", "generate", "initial_noise",
           "latent_shape", "load_run_components", "load_run_params", "make_grid",
           "pipeline_from_params", "pipeline_from_run", "read_prompts", "run_config",
           "run_components_configured", "run_sampling_settings", "sample_main", "save_image",
           "save_images", "to_uint8",
           "with_transformer_params"]
