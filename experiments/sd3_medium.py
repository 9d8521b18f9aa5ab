"""SD3-medium (MM-DiT d 24, 2.03B parameters) pretraining on your data, for a v5p slice.

  sd3jax run --config experiments/sd3_medium.py:256 --workdir gs://BUCKET/runs/sd3m_256 \
      --config.job.data=/data/train_records --config.job.data_val=/data/val_records \
      --config.precompute.vae=/data/sd3/vae --config.precompute.text_encoders=/data/sd3
  sd3jax run --config experiments/sd3_medium.py:1024 --workdir gs://BUCKET/runs/sd3m_1024 \
      ... --config.init_from=gs://BUCKET/runs/sd3m_256/mmdit

(On a pod every worker runs the same command: launch/tpu_pod.sh run ...)

The two stages of Esser et al. 2024 (Sec. 5.3): pretraining at 256^2 (shift 1), then
1024^2 on mixed aspect ratios, initialised from the 256^2 weights (init_from). The 1024 stage
has three buckets of about a megapixel, 1024x1024, 832x1216 and 1216x832 (every global
batch from one bucket; one compiled step per bucket, all before step 1), and the
resolution-dependent shift: 3.0 at 1024^2 (the paper's choice), 3.0 x sqrt(h w) / 1024 per
bucket (2.96 at 832x1216), in training and sampling. More buckets: list them in
data.buckets; precompute encodes each image at its nearest-aspect bucket, so precompute
and train must list the same set (a mismatch is refused). Data: `job.data` is an image_text records folder (sd3jax.data.ingest); the
precompute stage encodes it with the released VAE and text encoders (the diffusers folders
in precompute.vae / precompute.text_encoders; the vae and encoders stages are then skipped).
To train on an existing precomputed set instead: `sd3jax train` with
--config.data.path=RECORDS.

Recipe: rectified flow, logit-normal(0, 1) timesteps, 50% synthetic captions, each text
encoder dropped with p = 0.464; AdamW lr 1e-4 after 1000 warmup steps, batch 4096 at 256^2
(512 at 1024^2), EMA 0.9999; bf16 compute with float32 params and optimizer state.

Memory (sd3jax compile --topology v5p:4x4x4, README table): at 256^2, FSDP over 64 chips
with remat "full" uses 9.2 GiB per chip (without remat the temporaries need 122 GiB).
"""
from ml_collections import ConfigDict

STAGES = {  # image size, aspect buckets (pixels), global batch, shift (rule), steps
    "256": dict(image_size=256, buckets=(), batch=4096, shift=1.0, shift_rule="fixed",
                steps=500_000),
    "1024": dict(image_size=1024, buckets=((1024, 1024), (832, 1216), (1216, 832)), batch=512,
                 shift=3.0, shift_rule="resolution", steps=100_000),
}


def get_config(arg: str | None = None) -> ConfigDict:
  stage = arg or "256"
  if stage not in STAGES:
    raise ValueError(f"experiments/sd3_medium.py:ARG is the stage, one of {sorted(STAGES)}; "
                     f"got {stage!r}.")
  s = STAGES[stage]
  c = ConfigDict()
  c.task = "mmdit"
  c.seed = 0
  c.total_steps = s["steps"]
  c.batch_size = s["batch"]
  c.microbatches = 1
  c.init_from = ""             # 1024: the 256^2 run's mmdit folder
  c.init_from_ema = True
  c.compilation_cache_dir = ""

  c.job = ConfigDict(dict(
      data="",                 # REQUIRED: image_text records (sd3jax.data.ingest)
      data_val="",             # held-out image_text records for the validation loss
      sample_prompts=("a photo of a red apple on a wooden table",
                      "an astronaut riding a horse on the moon, digital art"),
      sample_seed=0,           # the sample stage uses config.eval's sampling settings
      ceiling_examples=0))

  c.model = ConfigDict(dict(
      depth=24, hidden_size=1536, num_heads=24, patch_size=2, in_channels=16, out_channels=16,
      joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192,
      sample_size=128, qk_norm="", dual_attention_layers=(), dtype="bfloat16",
      scan_layers=True, remat_policy="full", attention_impl="auto"))
  c.data = ConfigDict(dict(source="records", path="", image_size=s["image_size"],
                           buckets=s["buckets"], vae_factor=8,
                           synthetic_period=0, p_synthetic=0.5, producer_key="",
                           workers=8, threads=16, prefetch=8))
  c.conditioning = ConfigDict(dict(clip_l_dim=768, clip_g_dim=1280, t5_dim=4096,
                                   clip_tokens=77, t5_tokens=77, drop_prob=0.464))
  c.precompute = ConfigDict(dict(
      source="", vae="", text_encoders="",  # REQUIRED: vae, text_encoders (diffusers folders)
      batch_size=512, examples_per_shard=10_000, storage_dtype="bfloat16",
      vae_dtype="bfloat16", text_dtype="bfloat16",
      mesh={"data": 1, "fsdp": -1, "tensor": 1}))  # T5-XXL sharded over each host's chips
  c.flow = ConfigDict(dict(formulation="rf", density="logit_normal", logit_mean=0.0,
                           logit_std=1.0, mode_scale=1.29, shift=s["shift"],
                           shift_rule=s["shift_rule"]))
  c.optimizer = ConfigDict(dict(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8,
                                weight_decay=0.0, grad_clip_norm=1.0, max_nonfinite_steps=20))
  c.schedule = ConfigDict(dict(name="warmup_constant", warmup_steps=1000, decay_steps=0,
                               final_fraction=0.0))
  c.ema = ConfigDict(dict(decay=0.9999, every_steps=1))
  c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.mesh_dcn = ConfigDict(dict(data=1, fsdp=1, tensor=1))   # multi-slice: data=NUM_SLICES
  c.sharding_rules = "fsdp"
  c.checkpoint = ConfigDict(dict(every_steps=2000, keep_last=3, keep_every=50_000,
                                 async_save=True))
  c.log = ConfigDict(dict(every_steps=50, progress_bar=False, tensorboard=True,
                          peak_tflops_per_device=0.0))
  c.eval = ConfigDict(dict(every_steps=10_000, batches=2, fid_network="", clip_network="",
                           path="", num_examples=4096, num_timesteps=8, per_device_batch=8,
                           seed=0, prompts_per_category=0, sample_steps=28, sample_cfg=7.0,
                           sample_shift=s["shift"]))
  return c
