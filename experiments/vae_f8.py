"""A CPU-sized f8 KL autoencoder on 64x64 shapes: SD3's latent-channel study (4 / 8 / 16).

  sd3jax train --config experiments/vae_f8.py:16 --workdir runs/vae16
  sd3jax train --config experiments/vae_f8.py:4,steps=300 --workdir runs/vae4

Architecture (Esser et al. 2024, Sec. 5.2.1 / Table 3: reconstruction improves with the
number of latent channels): the SDXL-style KL autoencoder with 4 levels (8x
downsampling, 64x64 images -> 8x8 latents), widths w, 2w, 4w, 4w with w = 16 (1.1M
parameters at 4 channels), one ResNet block per level (the decoder has one more), a
single-head attention mid block, GroupNorm of w / 4 groups, no quant convs; `latent_channels` in {4, 8, 16} is the argument.

Objective (LDM's KL-f8 recipe): L1 reconstruction + 1e-6 x KL (KL summed per image over
latent elements, divided by the pixel values per image), posterior sampled in training.
A PatchGAN discriminator with hinge loss and the adaptive generator weight is part of the
state but starts at step `disc_start`; on CPU it is off by default (disc_start beyond
the run); set e.g. `disc=200` to switch it on at step 200.

Optimisation: AdamW(0.9, 0.999, no weight decay), lr 1e-3 after 50 warmup steps, then
cosine to 10% over 300 steps; batch 8; EMA 0.99 of the weights (the exported and evaluated ones).
The discriminator: AdamW(0.5, 0.9), same LR.

Evaluation: every `eval` steps (and at the end) PSNR / SSIM of the EMA autoencoder on the
first 64 validation images (posterior mode), in metrics.jsonl as eval/psnr, eval/ssim,
and samples/recon_step_N.png; eval/rfid (reconstruction FID) too when
--config.eval.fid_network names a local feature network (sd3jax.evals.features). The
final VAE is exported to WORKDIR/vae/ (diffusers).

`arg` = "C[,key=value...]": C latent channels; keys steps, batch, lr, width, disc (the
discriminator's start step), eval (eval period), data (the TFDS dir).
"""
from ml_collections import ConfigDict


def _parse(arg: str | None) -> dict:
  out = dict(channels=16, steps=300, batch=8, lr=1e-3, width=16, disc=10**9, eval=100,
             data="/tmp/sd3jax_shapes_tfds")
  parts = [p for p in (arg or "").split(",") if p]
  if parts and "=" not in parts[0]:
    out["channels"] = int(parts.pop(0))
  for p in parts:
    key, sep, value = p.partition("=")
    if not sep or key not in out:
      raise ValueError(f"experiments/vae_f8.py:ARG: {p!r}; use C[,key=value] with keys "
                       f"{sorted(k for k in out if k != 'channels')}.")
    out[key] = type(out[key])(float(value)) if isinstance(out[key], (int, float)) else value
  if out["channels"] not in (4, 8, 16):
    raise ValueError(f"experiments/vae_f8.py:{arg}: latent channels must be 4, 8 or 16.")
  return out


def get_config(arg: str | None = None) -> ConfigDict:
  a = _parse(arg)
  c = ConfigDict()
  c.task = "vae"
  c.seed = 0
  c.total_steps = a["steps"]
  c.batch_size = a["batch"]
  c.microbatches = 1

  # Model: f8 KL autoencoder, 4 levels (w, 2w, 4w, 4w), the latent width under study.
  c.vae = ConfigDict(dict(
      latent_channels=a["channels"], width=a["width"], layers_per_block=1,
      dtype="float32", remat=False,
      rec_loss="l1", kl_weight=1e-6, sample_posterior=True,
      perceptual_weight=0.0, perceptual_path="",
      disc_start=a["disc"], disc_weight=0.5, disc_factor=1.0, disc_loss="hinge",
      disc_ndf=32, disc_layers=2, disc_lr_ratio=1.0, disc_b1=0.5, disc_b2=0.9,
      eval_examples=64,
      train_crop=0,  # > 0: train on a random window of this side of each image
  ))

  # Data: procedural shapes (sd3jax.data.shapes), 64x64, rendered into a TFDS build.
  c.data = ConfigDict(dict(source="shapes", path=a["data"], image_size=64, vae_factor=8,
                           shapes_num_train=10_000, shapes_num_val=1_000, shapes_seed=0,
                           workers=0, threads=2, prefetch=4))

  # Optimisation: AdamW, clipped at global norm 1, warmup then cosine; EMA of the weights.
  c.optimizer = ConfigDict(dict(learning_rate=a["lr"], b1=0.9, b2=0.999, eps=1e-8,
                                weight_decay=0.0, grad_clip_norm=1.0, max_nonfinite_steps=20))
  c.schedule = ConfigDict(dict(name="cosine", warmup_steps=50, decay_steps=0,
                               final_fraction=0.1))
  c.ema = ConfigDict(dict(decay=0.99, every_steps=1))

  # Parallelism: data parallel over whatever devices there are.
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = "dp"

  # Checkpointing, logging, evaluation.
  c.checkpoint = ConfigDict(dict(every_steps=200, keep_last=2, keep_every=0, async_save=True))
  c.log = ConfigDict(dict(every_steps=20, progress_bar=False, tensorboard=False,
                          peak_tflops_per_device=0.0))
  c.eval = ConfigDict(dict(every_steps=a["eval"], fid_network=""))  # "": no eval/rfid
  return c
