"""The main job: SD3's recipe end to end on the embedded shapes data, sized for 2 CPU cores.

  sd3jax run --config experiments/shapes.py --workdir runs/shapes
  sd3jax run --config experiments/shapes.py:smoke --workdir /tmp/smoke   # CI: a few minutes
  sd3jax run --config experiments/shapes.py:aspect --workdir runs/shapes_aspect

`aspect`: the multi-aspect variant. Each scene is rendered at 64x64, 48x80 or 80x48 (one
third each); precompute encodes every image at its bucket, every training batch comes from
one bucket, the trainer compiles the three steps before step 1, and the timestep shift
follows the resolution rule per bucket (6 at 64x64, 5.81 at 48x80 and 80x48). Evals sample
each prompt at one bucket (in turn) and report the checker per bucket.

Stages (sd3jax.job; each resumable, skipped once done):
  data        procedural shapes, 64x64: `num_train` train / 512 validation scenes (TFDS build)
  encoders    tiny random stand-ins for CLIP-L / CLIP-G / T5 (sd3jax.embedded_encoders)
  vae         an f4, 16-channel KL autoencoder (64x64 -> 16x16x16), then SD3's latent
              scaling / shift factors fitted to its latents
  precompute  VAE posterior moments + embeddings of both captions -> records (bf16)
  weak        (with weak_steps=N only) the same MM-DiT trained for N steps: the weak model
              of the sampler's autoguidance; off by default (the docstring)
  train       the MM-DiT on the records: rectified flow, logit-normal(0, 1) timesteps shifted
              by 6, 50% synthetic captions, each text encoder dropped with p = 0.2 (SD3 uses
              0.464; fewer drops waste less of a short run)
  sample      a grid of fixed prompts with the run's own sampler settings (Euler, 28 steps,
              CFG 7 at t <= 0.85, no guidance above, shift 6)
  evaluate    validation loss at 8 fixed t and the conditioning gap on held-out records,
              prompt following by the shapes checker (colour, shape, position, count, two
              objects), the checker's ceiling through the VAE, the time-to-quality plot

Model: MM-DiT depth 4, width 128 (2 heads of 64), patch 2 on the 16x16x16 latent -> 64
image tokens; context 16 CLIP + 16 T5 tokens of width 256, pooled 64 + 128 = 192.
Muon (4 Newton-Schulz steps) on the blocks' matrices and AdamW (b2 0.99) on the rest, lr
6e-3 (warmup 100, cosine to 10%), 4,200 steps at batch 16, EMA 0.998 (with warmup).

Why this sizing (each line measured on this 2-core CPU; README "diagnostic ladder"; all on
the shapes release 1.0.0 but the first):
  - small objects 0.65 of a cell, not 0.5 (shapes 1.1.0, `shapes.SIZE_FRACTION`): shape on
    1,000 other prompts 0.72 -> 0.80 (seed 0) and 0.68 -> 0.72 (seed 1); the default job
    then scored 1.00 / 0.83 / 1.00 on its own eval (Xeon, 12 min 31 s).
  - f4, not f8: at f8 the objects were 1.3 / 2.3 latent pixels and 16 image tokens; an f8
    VAE reached a checker ceiling of 0.07 (400 steps) / 0.27 (600), f4 0.99.
  - the VAE's residual branches start at zero and its posterior log-variance at -6:
    with diffusers' default init 400 steps gave PSNR 21.8 and ceiling 0.10 (colours lost);
    with both, PSNR 30.6 and ceiling 0.99. KL weight 1e-4, not LDM's 1e-6: at 3e-4 the
    posterior std was 0.06-0.10 (0.016 at 1e-6) and MM-DiT samples had visibly fewer stray
    specks, but the ceiling fell to 0.94; 1e-4 keeps it at 0.99.
  - timestep shift 6 in training and sampling: layout and colour are decided at high noise,
    which logit-normal(0, 1) alone rarely samples. 5,000 steps (a ladder run with larger
    objects), single-object position: 0.67 at shift 3, 0.97 at shift 6 (colour 0.90 / 0.88,
    shape 0.56 / 0.63); shift 1 -> 3 had moved it from 0.30 to 0.60 at 2,000 steps.
  - 16 + 16 text tokens (the original captions have a median of 9, at most 25 tokens): 33%
    more steps per second than 24 + 40.
  - CFG 7 at t <= 0.85 and no guidance above (`eval.sample_cfg_max_t`, a guidance
    interval): guidance at the highest noise levels, where the layout is decided, multiplies
    the objects the model places. Against CFG 5 at every step, on 1,000 other prompts (200
    per category) of set 201 / of set 401, training seeds 0 and 1: counts 0.18 -> 0.27 /
    0.15 -> 0.30 and 0.13 -> 0.27 / 0.19 -> 0.36; objects drawn beyond those asked on count
    and pair prompts +0.62 -> +0.29 / +0.56 -> +0.33 and +0.88 -> +0.47 / +0.83 -> +0.40;
    shape 0.80 -> 0.84 / 0.80 -> 0.84 and 0.78 -> 0.83 / 0.82 -> 0.80; two objects 0.01-0.04
    lower; overall 0.02-0.05 higher. Chosen among CFG 7 / 9 and t <= 0.85 / 0.9 on the
    first 100 prompts per category of set 201 (seed-0 weights); set 401 was not looked at
    before the choice.
  - 4,200 steps and no autoguidance: the weak stage's 2 minutes buy more as training
    steps. 4,400 steps without it against 3,600 with it / without it (seed 0, same records
    and VAE), on 1,000 other prompts of sets 201 / 401 / 501: shape 0.852 / 0.858 / 0.850
    against 0.847 / 0.818 / 0.815 and 0.807 / 0.802 / 0.802; overall 0.634 / 0.621 / 0.656
    against 0.607 / 0.605 / 0.616 and 0.599 / 0.596 / 0.602; validation loss 0.2501
    against 0.2525. On the slower Xeon of that run (a compiled step 133 ms, 117 on the
    first) 4,400 steps made 15 min 24 s of stages, so the default is 4,200; its
    fresh-clone run took 15 min 28 s on a still slower hour of that day (still over) and
    scored 0.87 on its own eval, 0.833 / 0.837 / 0.812 on those sets: shape moves by
    0.02-0.04 between two runs so alike. Seed 1 of it: 0.75 on its own eval, 0.792 /
    0.810 / 0.810 on those sets (validation loss 0.2636 against 0.2471).
  - the VAE trains on whole images, not on random 32x32 windows at batch 16
    (`--config.job.vae.vae.train_crop=32 --config.job.vae.batch_size=16`: half the pixels a
    step). Windows made the stage 141 s instead of 237 s (AMD EPYC with AVX2 only, nothing
    else running) with the same checker ceiling (1.00; PSNR 29.3 against 31.5 dB), but the
    MM-DiT on its latents (seed 0, one run each) lost counts and pairs on 1,000 other prompts
    of sets 201 / 401 / 501: counts 0.265 / 0.275 / 0.27 against 0.43 / 0.385 / 0.47, two
    objects 0.23 / 0.245 / 0.265 against 0.36 / 0.315 / 0.38, overall 0.586 / 0.576 / 0.581
    against 0.630 / 0.616 / 0.645; shape 0.805 / 0.778 / 0.787 against 0.787 / 0.792 / 0.788.
  - autoguidance (`weak_steps=800`; off by default since the line above): 2 above t = 0.85,
    where CFG is off (Karras et al. 2024; `flow.autoguide`, `eval.sample_autoguidance`):
    weak + 2 (model - weak), the weak model being this MM-DiT trained for 800 steps (the
    `weak` stage, about 2 minutes), with 3,600 main steps. A quarter of the shape-only
    prompts ("a triangle") came out as empty backgrounds, with or without CFG; the model
    then drew the asked shape for 0.61 of them against 0.86 with a colour named and 0.96
    with a position too (100 each, set 201). Autoguidance pushes away from the weaker
    model's drift to empty images. On 300 single-object prompts of sets 201 / 401, shape
    0.81 -> 0.85 / 0.82 -> 0.84 (seed 0) and 0.79 -> 0.80 / 0.81 -> 0.85 (seed 1). At
    scale 4, the main run's own checkpoints of steps 1,000 / 2,000 as the weak model gave
    0.84 / 0.83 and 0.85 / 0.82 (the 800-step run: 0.84 / 0.87, seed 0), and seed 1 lost
    (0.78 / 0.80). On 1,000 prompts of set 501, which played no part in the choice, the gain
    is small: shape 0.802 -> 0.815 and 0.802 -> 0.808, overall 0.602 -> 0.616 and 0.607 ->
    0.615 (seeds 0 / 1); the default job's own eval: shape 0.83 -> 0.85.
  - CFG 5 at every step (before the interval): on 1,000 other prompts (5 sets of 40 per
    category; same prompts and noise) the lr 6e-3 weights drew the asked shape in 0.72 of
    single objects at CFG 3, 0.81 at CFG 4, 0.83 at CFG 5 (colour and position 0.99-1.00). Counts fell (0.28 -> 0.24) and
    two objects rose (0.23 -> 0.29). The AdamW job had preferred CFG 3 (shape 0.69 vs 0.66),
    and so did the Muon lr 4e-3 weights (0.70 at CFG 3; 0.63 / 0.65 at 4 / 5 on 400 of the
    prompts): how much guidance helps depends on the weights, not only on the recipe.
  - batch 16 at lr 2e-3 beat batch 32 / half the steps and batch 8 / twice the steps at
    the same wall time (AdamW); AdamW at lr 4e-3 collapsed to empty images.
  - Muon instead of AdamW (`optimizer.name`): a step costs 1.4x on the CPU (Newton-Schulz),
    so 3,600 Muon steps take the time of 4,800 AdamW steps. Same records and VAE, scored on
    1,000 other prompts (same prompts and noise), colour / shape / position, overall:
    AdamW lr 2e-3 (4,800 steps) 0.86 / 0.52 / 0.90, 0.37; Muon lr 2e-3 0.86 / 0.63 / 0.93,
    0.44; Muon lr 4e-3 0.98 / 0.70 / 0.99, 0.52; Muon lr 6e-3 0.99 / 0.72 / 1.00, 0.56
    (validation loss 0.293 / 0.265 / 0.262 / 0.261; all at CFG 3). With Muon the
    embedders' AdamW also runs at lr 6e-3; at 4e-3 alone (AdamW everywhere) it had
    collapsed. Muon lr 8e-3 fell back: shape 0.70 against 0.83 at CFG 5 (400 prompts).
  - 4 Newton-Schulz steps, not optax's 5 (`optimizer.muon_ns_steps`): the step costs 99
    instead of 108 ms (3 steps: 98), and on both training seeds the run scored as well or
    better on 1,000 other prompts: shape 0.80 / 0.78 against 0.78 / 0.77, counts 0.18 /
    0.13 against 0.10 / 0.07, validation loss 0.253 / 0.262 against 0.260 / 0.267 (seeds
    0 / 1; AMD EPYC with AVX-512, train 435 / 423 s against 461 / 459 s). On the job's own
    60 shape prompts seed 1 went the other way (0.72 against 0.80; seed 0: 0.72 for both).
  - Seeds: with `--config.seed=1` shape fell to 0.65 on the job's own eval (seed 0: 0.87)
    and 0.75 on 400 other prompts (seed 0 on the same prompts: 0.825), so the shape target
    is met narrowly and not for every seed. The earlier AdamW recipe with twice its steps
    (`steps=9600 --config.optimizer.name=adamw --config.optimizer.learning_rate=2e-3`, about
    25 minutes of stages on the faster machine) reached colour / shape / position 1.00 /
    0.88 / 1.00. Shape is learned last: a circle -> square swap moves the latent a fifth as
    far as a colour change does, so it is a fifth as loud in the loss
    (`python -m sd3jax.evals.decision`).

Real data and weights: set precompute.vae / precompute.text_encoders to diffusers folders
(the vae / encoders stages are then skipped) and job.data to a records folder of images
with captions (sd3jax.data.ingest); see experiments/sd3_medium.py for a pod-sized model.

`arg` = "[smoke][,aspect][,key=value...]" with keys steps, vae_steps, num_train, batch,
depth, width, weak_steps.
"""
import os

from ml_collections import ConfigDict

_HERE = os.path.dirname(os.path.abspath(__file__))


def _parse(arg: str | None) -> dict:
  out = dict(steps=4200, vae_steps=400, num_train=6000, batch=16, depth=4, width=128,
             weak_steps=0)
  parts = [p for p in (arg or "").split(",") if p]
  smoke = "smoke" in parts
  aspect = "aspect" in parts
  parts = [p for p in parts if p not in ("smoke", "aspect")]
  if smoke:
    out.update(steps=30, vae_steps=20, num_train=256, batch=16, depth=2, width=64)
  for p in parts:
    key, sep, value = p.partition("=")
    if not sep or key not in out:
      raise ValueError(f"experiments/shapes.py:ARG: {p!r}; use [smoke][,aspect][,key=value] "
                       f"with keys "
                       f"{sorted(out)}.")
    out[key] = int(value)
  out["smoke"], out["aspect"] = smoke, aspect
  return out


# The multi-aspect variant's buckets (pixels): ~4,000 pixels each, multiples of 8 (f4 x
# patch 2); the square one is the reference size of the shift rule.
ASPECT_BUCKETS = ((64, 64), (48, 80), (80, 48))


def _vae_config(a: dict) -> ConfigDict:
  """The autoencoder stage: experiments/vae_f8.py at 16 channels, made f4 (its data path is
  set by the job to the shapes build)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("_vae_f8", os.path.join(_HERE, "vae_f8.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"16,steps={a['vae_steps']},eval={a['vae_steps']}")
  c.data.update(shapes_num_train=a["num_train"], shapes_num_val=512, vae_factor=4)
  c.schedule.warmup_steps = min(50, a["vae_steps"] // 4)
  c.vae.channel_mult = (1, 2, 4)  # f4: 64x64 -> 16x16x16
  # L2, not L1: in a few hundred steps L1 reconstructs the background and loses the
  # objects' colours (H100, 2000 steps: PSNR 23.8 L1 vs 32.7 L2; the checker on round trips
  # 0.48 vs 0.90); b2 0.99 adapts faster early (1000 steps: 27.0 vs 26.1 dB).
  c.vae.rec_loss = "l2"
  c.optimizer.b2 = 0.99
  # Every residual branch starts at zero (each block the identity) and the posterior
  # log-variance at -6: 400 steps give PSNR 30.6 / ceiling 0.99 instead of 21.8 / 0.10.
  c.vae.zero_init_residual = True
  c.vae.init_logvar = -6.0
  # KL 1e-4 (LDM: 1e-6): a wider posterior gives the MM-DiT cleaner latents (fewer stray
  # specks seen at 3e-4); ceiling 0.99, PSNR 30.4 (3e-4: 0.94).
  c.vae.kl_weight = 1e-4
  c.vae.fit_examples = 512  # SD3's scaling / shift factors fitted on 512 training images
  c.vae.eval_examples = 64
  c.checkpoint.every_steps = 100
  c.log.progress_bar = True
  return c


def get_config(arg: str | None = None) -> ConfigDict:
  a = _parse(arg)
  c = ConfigDict()
  c.task = "mmdit"
  c.seed = 0
  c.total_steps = a["steps"]
  c.batch_size = a["batch"]
  c.microbatches = 1
  c.init_from = ""
  c.init_from_ema = True
  c.compilation_cache_dir = ""

  # The job's stages and their own settings (sd3jax.job).
  c.job = ConfigDict(dict(
      data="",                 # "": render shapes into WORKDIR/data; or a records folder
      shapes=dict(resolution=64, num_train=a["num_train"], num_val=512, seed=0,
                  sizes=ASPECT_BUCKETS if a["aspect"] else ()),
      encoders=dict(clip_l_width=64, clip_g_width=128, t5_width=256, clip_max_length=16,
                    seed=0),
      vae=_vae_config(a),
      sample_prompts=(
          "a red circle", "a blue square", "a green triangle", "a yellow circle",
          "a purple square in the top left", "a cyan triangle at the bottom",
          "a black circle on the right", "a red square in the center",
          "two blue circles", "three yellow squares",
          "a red circle and a blue square", "a green triangle and a purple circle"),
      sample_seed=0,           # sampler settings: config.eval's, as every eval uses
      weak_steps=a["weak_steps"],  # > 0: a weak model for the sampler's autoguidance
      ceiling_examples=64,     # the checker on VAE round trips of ground truth: its ceiling
  ))

  # MM-DiT (Esser et al. 2024, Sec. 4) at CPU size.
  c.model = ConfigDict(dict(
      depth=a["depth"], hidden_size=a["width"], num_heads=max(1, a["width"] // 64),
      patch_size=2, in_channels=16, out_channels=16,
      joint_attention_dim=256,  # = T5 width; CLIP-L + CLIP-G (64 + 128) padded to it
      pooled_projection_dim=192,
      pos_embed_max_size=16, sample_size=16,
      qk_norm="rms_norm", dual_attention_layers=(),
      dtype="float32", scan_layers=True, remat_policy="none", attention_impl="auto",
  ))

  # Data: precomputed records (written by the precompute stage; paths set by the job).
  c.data = ConfigDict(dict(source="records", path="", image_size=64, vae_factor=4,
                           buckets=ASPECT_BUCKETS if a["aspect"] else (),
                           synthetic_period=0, p_synthetic=0.5, producer_key="",
                           workers=0, threads=2, prefetch=4))
  c.conditioning = ConfigDict(dict(
      clip_l_dim=64, clip_g_dim=128, t5_dim=256, clip_tokens=16, t5_tokens=16,
      drop_prob=0.2))
  c.precompute = ConfigDict(dict(
      source="", vae="", text_encoders="",  # "": the job's own stages provide them
      batch_size=128, examples_per_shard=2000, storage_dtype="bfloat16"))

  # Objective: rectified flow, logit-normal(0, 1) timesteps shifted by 6 (SD3 uses 3 at
  # 1024^2): at this size the layout is decided at high noise (see the docstring).
  c.flow = ConfigDict(dict(formulation="rf", density="logit_normal", logit_mean=0.0,
                           logit_std=1.0, mode_scale=1.29, shift=6.0,
                           shift_rule="resolution" if a["aspect"] else "fixed"))

  c.optimizer = ConfigDict(dict(name="muon", muon_ns_steps=4, learning_rate=6e-3, b1=0.9,
                                b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
                                max_nonfinite_steps=20))
  c.schedule = ConfigDict(dict(name="cosine", warmup_steps=min(100, a["steps"] // 5),
                               decay_steps=0, final_fraction=0.1))
  # EMA warmup (decay min(0.998, (1 + s) / (10 + s))): the early evals see trained weights.
  c.ema = ConfigDict(dict(decay=0.998 if not a["smoke"] else 0.9, every_steps=1, warmup=True))

  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.mesh_dcn = ConfigDict(dict(data=1, fsdp=1, tensor=1))
  c.sharding_rules = "dp"

  c.checkpoint = ConfigDict(dict(every_steps=500, keep_last=2, keep_every=0, async_save=True))
  c.log = ConfigDict(dict(every_steps=5 if a["smoke"] else 50, progress_bar=True,
                          tensorboard=True, peak_tflops_per_device=0.0))
  c.eval = ConfigDict(dict(
      # Three evals feed the time-to-quality plot; the last one is the job's score.
      every_steps=max(1, a["steps"] // (2 if a["smoke"] else 3)), batches=2, fid_network="",
      clip_network="", conditioning_gap=True,
      path="",                 # the job sets it to the held-out records
      num_examples=256 if not a["smoke"] else 16, num_timesteps=8, per_device_batch=8, seed=0,
      prompts_per_category=20 if not a["smoke"] else 2,
      # Guidance only at t <= 0.85 (a guidance interval): above it CFG multiplies the
      # objects the model places. Autoguidance by the weak model there only with
      # weak_steps=N: the 2 minutes buy more as training steps (the docstring).
      sample_steps=28 if not a["smoke"] else 8, sample_cfg=7.0, sample_cfg_max_t=0.85,
      sample_autoguidance=2.0 if a["weak_steps"] else 1.0, sample_shift=6.0))
  return c
