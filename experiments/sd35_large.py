"""SD3.5-large (MM-DiT d 38 with QK RMS-norm, 8.06B parameters): experiments/sd3_medium.py's
two-stage recipe and data, with the larger model.

  sd3jax run --config experiments/sd35_large.py:256 --workdir gs://BUCKET/runs/sd35l_256 \
      --config.job.data=/data/train_records --config.job.data_val=/data/val_records \
      --config.precompute.vae=/data/sd35/vae --config.precompute.text_encoders=/data/sd35
  sd3jax run --config experiments/sd35_large.py:1024 --workdir gs://BUCKET/runs/sd35l_1024 \
      ... --config.init_from=gs://BUCKET/runs/sd35l_256/mmdit

Model: depth 38, hidden 64 x 38 = 2432, 38 heads of 64, RMS-norm on queries and keys (what
keeps the attention logits of the 8B model stable in bf16, Sec. 5.3.3). Memory (sd3jax compile
--topology v5p:4x4x4, README table): at 256^2, FSDP over 64 chips with remat "full" uses
20.3 GiB per chip (bf16 compute, float32 params and AdamW state).
"""
import importlib.util
import os

from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd3_medium.py")
  spec = importlib.util.spec_from_file_location("_sd3_medium", path)
  medium = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(medium)
  c = medium.get_config(arg)
  c.model.update(depth=38, hidden_size=2432, num_heads=38, qk_norm="rms_norm")
  return c
