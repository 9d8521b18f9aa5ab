"""A tiny MM-DiT on synthetic data: the trainer's CPU test bed, in seconds per step.

  sd3jax train --config experiments/tiny.py --workdir /tmp/tiny
  sd3jax train --config experiments/tiny.py:fsdp_tp --workdir /tmp/tiny_tp

The recipe is SD3's (rectified flow, logit-normal(0, 1) timesteps, per-encoder text
dropout, AdamW, EMA) at toy size: depth 2, width 64, a 64x64 "image" (8x8 latent, 16
channels, patch 2 -> 16 image tokens) and 8 text tokens (4 CLIP + 4 T5).
`arg` picks the parallelism: dp (default), fsdp or fsdp_tp.
"""
from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
  parallelism = arg or "dp"
  c = ConfigDict()
  c.seed = 0
  c.total_steps = 20
  c.batch_size = 16            # global batch; must divide by data x fsdp x microbatches
  c.microbatches = 1
  c.init_from = ""
  c.init_from_ema = True
  c.compilation_cache_dir = ""  # e.g. /tmp/jax_cache: restarts skip XLA compiles

  # Model: MM-DiT (Esser et al. 2024, Sec. 4), depth 2 of the d -> 64 d family.
  c.model = ConfigDict(dict(
      depth=2, hidden_size=64, num_heads=2,  # head size 32
      patch_size=2, in_channels=16, out_channels=16,
      joint_attention_dim=32,  # = T5 width; CLIP-L + CLIP-G (8 + 24) padded to it
      pooled_projection_dim=32,  # CLIP-L pooled ++ CLIP-G pooled
      pos_embed_max_size=16, sample_size=8,
      qk_norm="",              # "" or "rms_norm"
      dual_attention_layers=(),
      dtype="float32",         # compute dtype ("bfloat16" on accelerators)
      scan_layers=True, remat_policy="none", attention_impl="auto",
  ))

  # Data: synthetic latents and per-encoder text embeddings of these shapes.
  c.data = ConfigDict(dict(source="synthetic", path="", image_size=64, buckets=(), vae_factor=8,
                           synthetic_period=0, p_synthetic=0.5, producer_key="",
                           workers=0, threads=2, prefetch=4))
  c.conditioning = ConfigDict(dict(
      clip_l_dim=8, clip_g_dim=24, t5_dim=32, clip_tokens=4, t5_tokens=4,
      drop_prob=0.464,         # each of the three encoders zeroed independently
  ))

  # Objective: rectified flow, logit-normal(0, 1) timesteps, no resolution shift.
  c.flow = ConfigDict(dict(formulation="rf", density="logit_normal", logit_mean=0.0,
                           logit_std=1.0, mode_scale=1.29, shift=1.0, shift_rule="fixed"))

  # Optimisation: AdamW, clipped at global norm 1, warmup then constant; EMA of the weights.
  c.optimizer = ConfigDict(dict(name="adamw", learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8,
                                weight_decay=0.0, grad_clip_norm=1.0, max_nonfinite_steps=3))
  c.schedule = ConfigDict(dict(name="warmup_constant", warmup_steps=2, decay_steps=0,
                               final_fraction=0.0))
  c.ema = ConfigDict(dict(decay=0.99, every_steps=1))

  # Parallelism: mesh axes data / fsdp / tensor and the logical-axis rules.
  meshes = {"dp": dict(data=-1, fsdp=1, tensor=1),
            "fsdp": dict(data=1, fsdp=-1, tensor=1),
            "fsdp_tp": dict(data=1, fsdp=-1, tensor=2)}
  if parallelism not in meshes:
    raise ValueError(f"experiments/tiny.py:ARG is one of {sorted(meshes)}, got {parallelism!r}.")
  c.mesh = ConfigDict(meshes[parallelism])
  c.mesh_dcn = ConfigDict(dict(data=1, fsdp=1, tensor=1))
  c.sharding_rules = parallelism

  # Checkpointing, logging, evaluation.
  c.checkpoint = ConfigDict(dict(every_steps=10, keep_last=2, keep_every=0, async_save=True))
  c.log = ConfigDict(dict(every_steps=1, progress_bar=False, tensorboard=True,
                          peak_tflops_per_device=0.0))
  c.eval = ConfigDict(dict(every_steps=0, batches=2, fid_network="", clip_network=""))
  return c
