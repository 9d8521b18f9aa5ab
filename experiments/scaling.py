"""The MM-DiT depth family of the scaling study (Esser et al. 2024, Sec. 5.3), at equal data.

  sd3jax train --config experiments/scaling.py:depth=2 --workdir runs/scaling/d2
  python -m sd3jax.scaling sweep --depths 1,2,3,4 --root runs/scaling --arg steps=300
  sd3jax scaling runs/scaling/d1 runs/scaling/d2 runs/scaling/d3 runs/scaling/d4 \
      --out runs/scaling/report [--eval-checkpoints] [--target-flops 1e15]

Model family. One knob, the depth d: hidden size = head_dim x d, d attention heads of
head_dim, MLP 4x, patch 2 on a 16-channel latent, so width / depth = head_dim is fixed
and parameters grow as ~d^3. The paper's family has head_dim = 64 (hidden 64 d; d = 24 is
SD3-medium, 2B; d = 38 is 8B). On a CPU, head_dim = 16 makes depths 1-4 tiny (hidden
16-64) while keeping the family's shape; it is the `cpu` preset's default.

Training. Every depth sees the same data: the same steps x batch from the same stream
(seed), rectified flow with logit-normal(0, 1) timesteps, AdamW at a constant learning
rate after a linear warmup, text encoders dropped independently with p = 0.464. Only the
model changes, so differences in loss at equal steps are the model's, and training FLOPs
(3 x forward x batch x steps, `sd3jax.scaling.training_flops`) grow with its size.

Evaluation. Every `eval_every` steps the trainer writes the validation loss (fixed noise
and timesteps on held-out batches, no encoder dropout) to WORKDIR/eval/step_N.json and to
metrics.jsonl; a checkpoint is saved at the same steps and all of them are kept
(checkpoint.keep_every), so `sd3jax scaling --eval-checkpoints` can re-evaluate each one.
The cpu preset sets ema=0 (validation loss of the weights at that step): in a few-hundred
step run an EMA of 0.99 still holds 78% of the initial weights at step 25.

Presets (columns: cpu | paper):
  head_dim              16        | 64
  image_size            64 (8x8 latent, 16 patches) | 256 (32x32 latent, 256 patches)
  text                  77 CLIP + 77 T5 tokens, widths 64 / 128 / 256 (the embedded
                        encoders) | 77 + 77 tokens, CLIP-L 768, CLIP-G 1280, T5 4096
  batch x steps         16 x 300  | 4096 x 500k
  lr, warmup            1e-3, 20  | 1e-4, 1000
  ema                   0         | 0.9999
  eval / checkpoint     every 25 steps, 4 batches | every 10k steps, 8 batches
  dtype, mesh           float32, dp | bfloat16, fsdp
The paper preset's batch, steps, learning rate and warmup are SD3's 256^2 pretraining
recipe as we read the paper; check them against it before quoting results.

Arguments (`:KEY=VALUE,KEY=VALUE`; all optional): preset, depth, head_dim, steps, batch,
lr, warmup, ema, eval_every, eval_batches, ckpt_every (0: = eval_every), log_every,
image_size, data (synthetic | records), path (records folder), seed, qk_norm ("" or
rms_norm), dtype. Anything else: --config.KEY=VALUE. For data=records the conditioning
widths and token counts must match the precomputed set (the pipeline checks and names the
key); override them with --config.conditioning.* and --config.model.joint_attention_dim /
pooled_projection_dim.
"""
import difflib

from ml_collections import ConfigDict

PRESETS = {
    "cpu": dict(depth=2, head_dim=16, steps=300, batch=16, lr=1e-3, warmup=20, ema=0.0,
                eval_every=25, eval_batches=4, ckpt_every=0, log_every=5, image_size=64,
                data="synthetic", path="", seed=0, qk_norm="", dtype="float32"),
    "paper": dict(depth=24, head_dim=64, steps=500_000, batch=4096, lr=1e-4, warmup=1000,
                  ema=0.9999, eval_every=10_000, eval_batches=8, ckpt_every=0, log_every=100,
                  image_size=256, data="synthetic", path="", seed=0, qk_norm="",
                  dtype="bfloat16"),
}
TEXT = {  # clip_l_dim, clip_g_dim, t5_dim, clip_tokens, t5_tokens
    "cpu": (64, 128, 256, 77, 77),
    "paper": (768, 1280, 4096, 77, 77),
}


def parse_args(arg: str | None) -> dict:
  """`KEY=VALUE,...` -> the preset's arguments updated; unknown or malformed args raise."""
  items = [s.strip() for s in (arg or "").split(",") if s.strip()]
  given = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
      raise ValueError(f"experiments/scaling.py: argument {item!r} must look like KEY=VALUE "
                       f"(e.g. depth=2,steps=300).")
    if key in given:
      raise ValueError(f"experiments/scaling.py: argument {key!r} given twice.")
    given[key] = value.strip()
  preset = given.pop("preset", "cpu")
  if preset not in PRESETS:
    raise ValueError(f"experiments/scaling.py: preset={preset!r}; choose one of {sorted(PRESETS)}.")
  args = dict(PRESETS[preset], preset=preset)
  for key, text in given.items():
    if key not in args:
      close = difflib.get_close_matches(key, list(args), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"experiments/scaling.py: unknown argument {key!r}.{hint} Known: "
                       f"{', '.join(sorted(args))}. Other keys: --config.KEY=VALUE.")
    try:
      args[key] = _parse_like(text, args[key])
    except ValueError:
      raise ValueError(f"experiments/scaling.py: {key}={text!r} is not a valid "
                       f"{type(args[key]).__name__}.") from None
  if args["depth"] < 1 or args["head_dim"] < 1:
    raise ValueError(f"experiments/scaling.py: depth={args['depth']} and "
                     f"head_dim={args['head_dim']} must be >= 1.")
  if (args["depth"] * args["head_dim"]) % 4:
    raise ValueError(f"experiments/scaling.py: hidden = head_dim x depth = {args['head_dim']} x "
                     f"{args['depth']} must be divisible by 4 (2-D sin-cos position table); "
                     "use a head_dim divisible by 4.")
  if args["data"] not in ("synthetic", "records"):
    raise ValueError(f"experiments/scaling.py: data={args['data']!r}; use synthetic or records.")
  return args


def _parse_like(text: str, like):
  """`text` as the type of the preset's value (ints accept 5e5, not 2.5)."""
  if isinstance(like, str):
    return text
  value = float(text)
  if isinstance(like, float):
    return value
  if not value.is_integer():
    raise ValueError(text)
  return int(value)


def get_config(arg: str | None = None) -> ConfigDict:
  a = parse_args(arg)
  d, head = a["depth"], a["head_dim"]
  clip_l, clip_g, t5, clip_tokens, t5_tokens = TEXT[a["preset"]]
  latent = a["image_size"] // 8
  side = latent // 2

  c = ConfigDict()
  c.seed = a["seed"]
  c.total_steps = a["steps"]
  c.batch_size = a["batch"]    # global; equal across depths (same data)
  c.microbatches = 1
  c.init_from = ""
  c.init_from_ema = True
  c.compilation_cache_dir = ""

  # Model: depth d, hidden head_dim x d, d heads (Esser et al. 2024, Sec. 5.3).
  c.model = ConfigDict(dict(
      depth=d, hidden_size=head * d, num_heads=d,
      patch_size=2, in_channels=16, out_channels=16,
      joint_attention_dim=t5,  # = T5 width; CLIP-L ++ CLIP-G padded to it
      pooled_projection_dim=clip_l + clip_g,
      # Position table: SD3's 192-side table over a 64-patch base grid (3x), or 3x this grid.
      pos_embed_max_size=192 if a["preset"] == "paper" else 3 * side,
      sample_size=128 if a["preset"] == "paper" else latent,
      qk_norm=a["qk_norm"], dual_attention_layers=(), dtype=a["dtype"],
      # CPU: unrolled layers (depth <= 4 compiles fast; measured 4% faster than a scan) and
      # the hand-written-backward attention. Accelerators: one scanned segment (compile time
      # flat in depth) and XLA's attention.
      scan_layers=a["preset"] == "paper", remat_policy="none",
      attention_impl="auto",   # splash on TPU, cuDNN on GPU (bf16), einsum on CPU
  ))

  # Data: the same stream for every depth.
  c.data = ConfigDict(dict(source=a["data"], path=a["path"], image_size=a["image_size"],
                           buckets=(), vae_factor=8, synthetic_period=0))
  c.conditioning = ConfigDict(dict(clip_l_dim=clip_l, clip_g_dim=clip_g, t5_dim=t5,
                                   clip_tokens=clip_tokens, t5_tokens=t5_tokens,
                                   drop_prob=0.464))

  # Objective: rectified flow, logit-normal(0, 1) timesteps, no shift at these sizes.
  c.flow = ConfigDict(dict(formulation="rf", density="logit_normal", logit_mean=0.0,
                           logit_std=1.0, mode_scale=1.29, shift=1.0, shift_rule="fixed"))

  # Optimisation: AdamW, constant learning rate after warmup, clipping at norm 1.
  c.optimizer = ConfigDict(dict(learning_rate=a["lr"], b1=0.9, b2=0.999, eps=1e-8,
                                weight_decay=0.0, grad_clip_norm=1.0, max_nonfinite_steps=20))
  c.schedule = ConfigDict(dict(name="warmup_constant", warmup_steps=a["warmup"], decay_steps=0,
                               final_fraction=0.0))
  c.ema = ConfigDict(dict(decay=a["ema"], every_steps=1))

  # Parallelism.
  if a["preset"] == "paper":
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sharding_rules = "fsdp"
  else:
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = "dp"
  c.mesh_dcn = ConfigDict(dict(data=1, fsdp=1, tensor=1))

  # Evaluation every k steps; a checkpoint at the same steps, all kept.
  every = a["ckpt_every"] or a["eval_every"]
  c.checkpoint = ConfigDict(dict(every_steps=every, keep_last=2, keep_every=every,
                                 async_save=True))
  c.log = ConfigDict(dict(every_steps=a["log_every"], progress_bar=a["preset"] == "paper",
                          tensorboard=True, peak_tflops_per_device=0.0))
  c.eval = ConfigDict(dict(every_steps=a["eval_every"], batches=a["eval_batches"],
                           path=""))  # held-out precomputed records ("": synthetic, seed + 1)
  return c
