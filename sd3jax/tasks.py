"""Trainer tasks beyond the MM-DiT: the KL autoencoder (config.task = "vae").

A task is what differs between models; the loop, mesh, sharded state, optimizer schedule,
EMA, checkpoints, metrics and the non-finite guard are sd3jax.train's, shared. The VAE task:

- params = {"vae": AutoencoderKL params, "disc": PatchDiscriminator params}, one state;
- one optimizer: optax.multi_transform of AdamW for "vae" and AdamW (taming's betas) for
  "disc", inside the trainer's injected learning rate (the disc's LR is a ratio of it);
- loss = sd3jax.vae_losses.vae_train_losses (L1/L2 + KL + optional LPIPS + PatchGAN hinge
  from vae.disc_start on), on whole images or, with vae.train_crop > 0, on one random
  window of that side per image (evals still see whole images); before disc_start the
  disc's gradient is exactly zero, so Adam (no weight decay) leaves its params unchanged;
- data: "image" batches of make_image_text_pipeline over a shapes TFDS build (built on
  the fly) or an ingested records folder; resumable like every trainer iterator;
- eval: held-out PSNR / SSIM of the EMA weights (posterior mode) -> eval/psnr, eval/ssim,
  and a grid samples/recon_step_N.png (originals above, reconstructions below); with
  config.eval.fid_network set, also eval/rfid (reconstruction FID, sd3jax.evals.features);
- finish: the EMA autoencoder exported as a diffusers AutoencoderKL folder WORKDIR/vae/.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from sd3jax import config as config_lib
from sd3jax import optim
from sd3jax import parallel
from sd3jax import train
from sd3jax import vae_losses
from sd3jax.evals import features
from sd3jax.models import vae as vae_lib

IMAGE_KEYS = ("image",)


# =============================================================================================
# Model and losses
# =============================================================================================

def vae_model(config: ConfigDict) -> vae_lib.AutoencoderKL:
  v = config.vae
  cfg = vae_lib.vae_config(int(v.latent_channels), int(v.width), int(v.layers_per_block),
                           norm_num_groups=int(v.get("norm_groups", 0)) or None,
                           sample_size=int(config.data.image_size),
                           channel_mult=tuple(v.get("channel_mult", (1, 2, 4, 4))))
  return vae_lib.AutoencoderKL(cfg, dtype=jnp.dtype(v.dtype), remat=bool(v.remat))


def zero_residual_branches(params: Any) -> Any:
  """The last conv of every ResNet block and the attention's output projection set to zero.

  Every residual block then starts as the identity, so the autoencoder starts as a short,
  almost linear network (convs in / out, resampling convs) that learns colours and layout in
  a few hundred steps; the blocks grow in from there (the zero-init of guided-diffusion's
  U-Net and of "Fixup"). From diffusers' torch init the same network first spends hundreds
  of steps on grey blobs (measured: see experiments/shapes.py).
  """
  def visit(tree):
    if not isinstance(tree, Mapping):
      return tree
    return {k: jax.tree.map(jnp.zeros_like, v)
            if k in ("conv2", "to_out_0") and isinstance(v, Mapping) else visit(v)
            for k, v in tree.items()}
  return visit(params)


def with_initial_logvar(params: Any, logvar: float) -> Any:
  """The encoder's log-variance outputs start at `logvar` (its conv_out bias, second half).

  diffusers' init starts the posterior at std 1, which buries a fresh encoder's small means
  in noise until the bias has walked down (Adam moves it ~lr per step); SD3-class VAEs end
  near std 0.05 anyway, so starting there skips that walk.
  """
  conv_out = params["encoder"]["conv_out"]
  bias = conv_out["bias"]
  value = getattr(bias, "value", bias)
  half = value.shape[-1] // 2
  value = value.at[half:].set(logvar)
  bias = bias.replace_boxed(value) if hasattr(bias, "replace_boxed") else value
  return {**params, "encoder": {**params["encoder"], "conv_out": {**conv_out, "bias": bias}}}


def disc_model(config: ConfigDict) -> vae_losses.PatchDiscriminator:
  v = config.vae
  return vae_losses.PatchDiscriminator(ndf=int(v.disc_ndf), n_layers=int(v.disc_layers),
                                       dtype=jnp.dtype(v.dtype))


def loss_config(config: ConfigDict) -> vae_losses.VAELossConfig:
  v = config.vae
  return vae_losses.VAELossConfig(
      rec_loss=v.rec_loss, kl_weight=float(v.kl_weight),
      perceptual_weight=float(v.perceptual_weight), disc_weight=float(v.disc_weight),
      disc_factor=float(v.disc_factor), disc_start=int(v.disc_start), disc_loss=v.disc_loss,
      sample_posterior=bool(v.sample_posterior))


def make_optimizer(config: ConfigDict) -> optax.GradientTransformation:
  """AdamW on "vae", AdamW(disc_b1, disc_b2) at lr * disc_lr_ratio on "disc"; clipped apart."""
  opt, v = config.optimizer, config.vae
  if opt.get("name", "adamw") != "adamw":  # Muon's split is written for the MM-DiT's blocks
    raise ValueError(f"config.optimizer.name={opt.name!r}: the VAE task trains with AdamW "
                     "only; set --config.optimizer.name=adamw.")

  def build(learning_rate):
    def adamw(lr, b1, b2, wd):
      parts = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
      parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=opt.eps, weight_decay=wd,
                               mask=optim._decay_mask))  # pylint: disable=protected-access
      return optax.chain(*parts)
    return optax.multi_transform(
        {"vae": adamw(learning_rate, opt.b1, opt.b2, opt.weight_decay),
         "disc": adamw(learning_rate * float(v.disc_lr_ratio), v.disc_b1, v.disc_b2, 0.0)},
        lambda params: {k: k for k in params})
  return optax.inject_hyperparams(build)(learning_rate=float(opt.learning_rate))


def make_perceptual(config: ConfigDict):
  path = config.vae.perceptual_path
  if float(config.vae.perceptual_weight) <= 0:
    return None
  if not path:
    raise config_lib.ConfigError("config.vae.perceptual_weight > 0 needs config.vae."
                                 "perceptual_path (a local LPIPS / VGG16 safetensors).")
  return vae_losses.load_lpips_vgg16(path)


def random_crops(images: jax.Array, size: int, rng: jax.Array) -> jax.Array:
  """One size x size window of each NHWC image, at offsets drawn from rng.

  The step's key draws the offsets, so a resumed run crops the same windows. The
  autoencoder is convolutional (its attention sees the smaller latent too), so it trains on
  windows and still encodes whole images; SD's VAEs trained on 256^2 crops of larger images.
  """
  n, h, w, c = images.shape
  ky, kx = jax.random.split(rng)
  ys = jax.random.randint(ky, (n,), 0, h - size + 1)
  xs = jax.random.randint(kx, (n,), 0, w - size + 1)
  window = lambda image, y, x: jax.lax.dynamic_slice(image, (y, x, 0), (size, size, c))
  return jax.vmap(window)(images, ys, xs)


def forward_flops(model: vae_lib.AutoencoderKL, image_size: int) -> float:
  """XLA's FLOPs of encode + decode for one image (the VAE has no scanned layers)."""
  params = jax.eval_shape(lambda: model.init_params(jax.random.key(0)))
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  fwd = lambda p, x: model.apply({"params": p}, x)[0]
  try:
    lowered = jax.jit(fwd).lower(jax.tree.map(lambda a: getattr(a, "value", a), params,
                                              is_leaf=lambda a: hasattr(a, "value")), x)
    # XLA:CPU answers before compiling; the GPU backend only for the compiled executable.
    cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))
  except Exception as e:  # noqa: BLE001 -- throughput only; never fail a run on it
    logging.warning("VAE FLOPs estimate failed (%r); MFU will read 0.", e)
    return 0.0


# =============================================================================================
# Data
# =============================================================================================

class _Subset:
  """A view of examples [start, stop) of a random-access source."""

  def __init__(self, source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, i: int):
    return self.source[self.start + int(i)]

  def __getitems__(self, idx):
    return [self[i] for i in idx]


def image_sources(config: ConfigDict) -> tuple[Any, Any]:
  """(train, held-out) random-access image sources of config.data.

  shapes: the TFDS build at data.path (rendered first if missing), splits train /
  validation. records: an ingested folder; its last vae.eval_examples records are held
  out (never trained on).
  """
  d = config.data
  if not d.path:
    raise config_lib.ConfigError(f"config.data.source={d.source!r} needs config.data.path.")
  if d.source == "shapes":
    from sd3jax.data import shapes_tfds
    size = int(d.image_size)
    name = shapes_tfds.config_name(size, size, int(d.shapes_num_train), int(d.shapes_num_val),
                                   int(d.shapes_seed))
    if jax.process_index() == 0:
      shapes_tfds.build_shapes(d.path, size, int(d.shapes_num_train), int(d.shapes_num_val),
                    int(d.shapes_seed))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("sd3jax_shapes_built")
    return (shapes_tfds.load_shapes(d.path, "train", name),
            shapes_tfds.load_shapes(d.path, "validation", name))
  if d.source == "records":
    from sd3jax.data.producer import open_source
    source = open_source(d.path, filter=d.get("filter", ""))  # dedup filter, if any
    n, held = len(source), int(config.vae.eval_examples)
    if n <= held:
      raise config_lib.ConfigError(f"config.data.path={d.path!r} has {n} records, not more "
                                   f"than config.vae.eval_examples={held} held out.")
    return _Subset(source, 0, n - held), _Subset(source, n - held, n)
  raise config_lib.ConfigError(f"config.data.source={d.source!r} with config.task='vae'; use "
                               "'shapes' or 'records' (ingested images).")


def make_data(config: ConfigDict) -> Iterator[dict[str, np.ndarray]]:
  """The resumable iterator of local {"image": [B, H, W, 3] in [-1, 1]} batches."""
  from sd3jax.data import pipeline
  train_source, _ = image_sources(config)
  d = config.data
  pipe = pipeline.make_image_text_pipeline(
      train_source, global_batch=int(config.batch_size), resolution=int(d.image_size),
      seed=int(config.seed), p_synthetic=0.0, workers=int(d.workers), threads=int(d.threads),
      prefetch=int(d.prefetch))
  pipe.batcher = pipeline._SelectKeys(pipe.batcher, IMAGE_KEYS)  # pylint: disable=protected-access
  return pipe.iterator()


def first_images(source: Any, start: int, stop: int, size: int) -> np.ndarray:
  """Images start..stop-1 of an image source, center-cropped to size^2, float32 NHWC in
  [-1, 1]."""
  from sd3jax.data import pipeline
  return np.stack([pipeline.to_float(pipeline.resize_and_crop(ex["image"], size, size,
                                                              crop="center")[0])
                   for ex in source.__getitems__(list(range(start, stop)))])


def held_out_images(config: ConfigDict) -> np.ndarray:
  """The first vae.eval_examples held-out images, float32 NHWC in [-1, 1] (all processes)."""
  _, source = image_sources(config)
  n = min(int(config.vae.eval_examples), len(source))
  return first_images(source, 0, n, int(config.data.image_size))


# =============================================================================================
# Eval and export
# =============================================================================================

def save_grid(path: str, originals: np.ndarray, recons: np.ndarray) -> None:
  """Originals in the top row, reconstructions below; images in [-1, 1]."""
  from PIL import Image
  to_u8 = lambda x: np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)
  grid = np.concatenate([np.concatenate(list(to_u8(originals)), axis=1),
                         np.concatenate(list(to_u8(recons)), axis=1)], axis=0)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(grid).save(path)


def _unit_np(x: Any) -> np.ndarray:
  """[-1, 1] -> float32 [0, 1] on the host: what a features.FeatureNetwork takes."""
  return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def make_reconstruction_eval(config: ConfigDict, model: vae_lib.AutoencoderKL, mesh: Mesh,
                             workdir: str) -> train.EvalFn:
  """Held-out PSNR / SSIM of the EMA autoencoder (posterior mode) and a recon grid.

  With config.eval.fid_network set (a features.FeatureNetwork, as for MM-DiT FID), also
  rfid: the Frechet distance between that network's features of the held-out originals
  and of their reconstructions. The originals' statistics are computed once, here; without
  a network the key is absent.
  """
  images = held_out_images(config)
  per_process = int(config.batch_size) // jax.process_count()
  rules = parallel.get_rules(config.sharding_rules)
  axes = train.batch_axes(rules)
  fid_spec = config.eval.get("fid_network", "")
  network = features.load_feature_network(fid_spec, "config.eval.fid_network")
  reference = None
  if network is not None:
    reference = features.feature_stats(np.concatenate(
        [np.asarray(network(_unit_np(images[i:i + per_process])), np.float64)
         for i in range(0, len(images), per_process)]))
    logging.info("rFID: feature network %s (config.eval.fid_network), %d-dim features of "
                 "%d held-out images.", fid_spec, reference[0].shape[0], len(images))

  @functools.partial(jax.jit, compiler_options=parallel.conv_compiler_options(mesh))
  def metrics_of(params, x):
    recon, _ = model.apply({"params": params}, x)
    a, b = vae_losses.to_unit(x), vae_losses.to_unit(recon)
    return vae_losses.psnr(a, b), vae_losses.ssim(a, b), recon

  def evaluate(step: int, state: train.TrainState) -> dict[str, float]:
    psnrs, ssims, feats, first = [], [], [], None
    with jax.set_mesh(mesh):
      for i in range(0, len(images), per_process):
        chunk = images[i:i + per_process]
        valid = len(chunk)
        if valid < per_process:  # pad the last batch; padding is not counted
          chunk = np.concatenate([chunk, np.repeat(chunk[-1:], per_process - valid, 0)])
        batch = train.shard_batch({"image": chunk}, mesh, axes)["image"]
        p, s, r = metrics_of(state.ema_params["vae"], batch)
        p, s = np.asarray(jax.device_get(p))[:valid], np.asarray(jax.device_get(s))[:valid]
        psnrs.append(p)
        ssims.append(s)
        if network is not None:
          recon = np.asarray(jax.device_get(r))[:valid]
          feats.append(np.asarray(network(_unit_np(recon)), np.float64))
        if first is None and jax.process_index() == 0:
          first = (chunk[:8], np.asarray(jax.device_get(r))[:8])
    if first is not None:
      save_grid(os.path.join(workdir, "samples", f"recon_step_{step}.png"), *first)
    out = {"psnr": float(np.mean(np.concatenate(psnrs))),
           "ssim": float(np.mean(np.concatenate(ssims)))}
    if network is not None:
      out["rfid"] = features.fid_from_stats(*features.feature_stats(np.concatenate(feats)),
                                            *reference)
    return out
  return evaluate


def fit_latent_normalization(config: ConfigDict, model: vae_lib.AutoencoderKL, params: Any,
                             examples: int) -> tuple[float, float]:
  """(scaling_factor, shift_factor) fitted as SD3 fitted its 1.5305 / 0.0609: posterior
  samples of the first `examples` training images, shifted and scaled to mean 0, std 1."""
  source, _ = image_sources(config)
  n, size = min(int(examples), len(source)), int(config.data.image_size)
  encode = jax.jit(lambda p, x, rng: model.apply({"params": p}, x,
                                                 method=vae_lib.AutoencoderKL.encode).sample(rng),
                   compiler_options=parallel.conv_compiler_options())
  latents = []
  for start in range(0, n, 64):
    images = first_images(source, start, min(n, start + 64), size)
    latents.append(np.asarray(encode(params, images, jax.random.key(start))))
  return vae_lib.latent_scale_shift(np.concatenate(latents))


def export_vae(config: ConfigDict, model: vae_lib.AutoencoderKL, workdir: str,
               state: train.TrainState) -> None:
  """The EMA autoencoder as a diffusers AutoencoderKL folder WORKDIR/vae/ (process 0), with
  its latent scaling / shift factors fitted to the training images (vae.fit_examples)."""
  params = jax.device_get(state.ema_params["vae"])
  if jax.process_index() != 0:
    return
  from sd3jax.interop import diffusers_vae
  examples = int(config.vae.get("fit_examples", 0))
  if examples > 0:
    scale, shift = fit_latent_normalization(config, model, params, examples)
    model = model.clone(config=dataclasses.replace(model.config, scaling_factor=scale,
                                                   shift_factor=shift))
    logging.info("Latent normalisation fitted on %d training images: scaling_factor %.4f, "
                 "shift_factor %.4f.", examples, scale, shift)
  folder = os.path.join(workdir, "vae")
  diffusers_vae.save_vae(model, params, folder)
  logging.info("Exported the EMA autoencoder to %s.", folder)


# =============================================================================================
# The task
# =============================================================================================

def vae_task(config: ConfigDict, mesh: Mesh, workdir: str) -> train.Task:
  """config.task = "vae": the KL autoencoder + PatchGAN discriminator, in one train state."""
  model, disc, cfg = vae_model(config), disc_model(config), loss_config(config)
  perceptual = make_perceptual(config)
  size = int(config.data.image_size)
  crop = int(config.vae.get("train_crop", 0))

  def init_params(rng):
    vae_rng, disc_rng = jax.random.split(rng)
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    vae_params = model.init_params(vae_rng, size)
    if bool(config.vae.get("zero_init_residual", False)):
      vae_params = zero_residual_branches(vae_params)
    if float(config.vae.get("init_logvar", 0.0)):
      vae_params = with_initial_logvar(vae_params, float(config.vae.init_logvar))
    return {"vae": vae_params, "disc": disc.init(disc_rng, x)["params"]}

  def loss(params, batch: Mapping[str, jax.Array], rng, step):
    images = batch["image"].astype(jnp.float32)
    if crop:
      rng, crop_rng = jax.random.split(rng)
      images = random_crops(images, crop, crop_rng)
    total, metrics = vae_losses.vae_train_losses(
        model, disc, params, images, rng, step, cfg, perceptual)
    metrics.pop("loss", None)
    return total, metrics

  flops = 3.0 * forward_flops(model, crop or size) * int(config.batch_size)
  return train.Task(
      name="vae", init_params=init_params,
      loss_and_grads=train.grads_of(loss, int(config.microbatches), mesh,
                                    train.batch_axes(config.sharding_rules)),
      make_data=make_data, tx=make_optimizer(config), flops_per_step=flops,
      make_evals=lambda: [make_reconstruction_eval(config, model, mesh, workdir)],
      finish=lambda wd, state: export_vae(config, model, wd, state),
      compiler_options=parallel.conv_compiler_options(mesh))
