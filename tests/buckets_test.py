"""Aspect-ratio buckets end to end on the CPU: a shapes build at three sizes, precomputed at
its buckets, trained with one compiled step per bucket (all before step 1), per-bucket shift,
per-bucket validation loss, exact resume, and 2 processes x 4 devices against 1 x 8.

Tiny everything: 48 scenes at 32x32 / 32x48 / 48x32 (a third each), a random f8 VAE, the
embedded random text encoders; an MM-DiT of depth 1, width 64.
"""
import collections
import json
import math
import os

import jax
import numpy as np
import pytest

from sd3jax import buckets as buckets_lib
from sd3jax import conditioning
from sd3jax import config as config_lib
from sd3jax import embedded_encoders
from sd3jax import train
from sd3jax.data import latent_pipeline as LP
from sd3jax.data import precompute as pc
from sd3jax.data import records, shapes, shapes_tfds

from precompute_test import random_vae  # pylint: disable=g-bad-import-order
import multihost_test  # pylint: disable=g-bad-import-order

SIZES = [(32, 32), (32, 48), (48, 32)]   # pixels; f8 latents 4x4, 4x6, 6x4
NAMES = ["32x32", "32x48", "48x32"]
N_TRAIN, N_VAL, BATCH, T5_LEN = 48, 12, 8, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("buckets")
  enc = embedded_encoders.build_embedded_encoders(str(root / "enc"), shapes.VOCABULARY)
  build = shapes_tfds.build_shapes(str(root / "shapes"), 32, N_TRAIN, N_VAL, seed=0, sizes=SIZES)
  te = conditioning.TextEncoders.from_pipeline_folder(enc, t5_length=T5_LEN)
  vae = random_vae(8, 0)
  out = {"root": root, "build": build}
  for split in ("train", "validation"):
    out[split] = str(root / "records" / split)
    r = pc.precompute(shapes_tfds.load_shapes(build, split), out[split], vae, te,
                      global_batch=BATCH, buckets=SIZES, examples_per_shard=16,
                      storage_dtype="float32", progress=False)
    assert r.complete
  return out


def bucket_config(d, **overrides):
  c = config_lib.defaults()
  c.seed, c.batch_size, c.total_steps = 0, BATCH, 8
  c.data.update(source="records", path=d["train"], image_size=32, vae_factor=8, buckets=SIZES)
  c.model.update(depth=1, hidden_size=64, num_heads=2, in_channels=16, out_channels=16,
                 joint_attention_dim=256, pooled_projection_dim=192, pos_embed_max_size=8,
                 sample_size=4, dtype="float32")
  c.conditioning.update(clip_l_dim=64, clip_g_dim=128, t5_dim=256, clip_tokens=77,
                        t5_tokens=T5_LEN)
  c.flow.update(shift=3.0, shift_rule="resolution")
  c.optimizer.learning_rate = 1e-3
  c.schedule.warmup_steps = 2
  c.mesh.update(data=8, fsdp=1, tensor=1)
  c.sharding_rules = "dp"
  c.checkpoint.update(every_steps=4, async_save=False)
  c.log.update(every_steps=1, progress_bar=False, tensorboard=False)
  c.eval.update(every_steps=8, path=d["validation"], num_examples=N_VAL, per_device_batch=1,
                prompts_per_category=0)
  for key, value in overrides.items():
    config_lib.set_key(c, key.replace("__", "."), value)
  return c


def step_buckets(history):
  """The bucket of every logged step: its one loss/<bucket> key."""
  out = {}
  for r in history:
    keys = [k for k in r if k.startswith("loss/")]
    assert len(keys) == 1, r
    out[r["step"]] = keys[0][len("loss/"):]
  return out


# ------------------------------------------------------------------------------------------
# Config, shift and crop maths.
# ------------------------------------------------------------------------------------------
def test_bucket_config_errors_name_the_fix(data):
  for buckets, match in [([(32, 32), (32, 40)], "multiple of patch_size x vae_factor = 16"),
                         ([(32, 32), (32, 32)], "twice"),
                         ([(32, 160)], "larger than config.model.pos_embed_max_size=8")]:
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(bucket_config(data, data__buckets=buckets), 8)
  with pytest.raises(config_lib.ConfigError, match="shift_rule"):
    config_lib.validate(bucket_config(data, flow__shift_rule="sqrt"), 8)
  # Records precomputed at other buckets than the config lists: refused, naming both.
  with pytest.raises(LP.PrecomputeMismatchError, match="data.buckets"):
    LP.make_train_iterator(bucket_config(data, data__buckets=[(32, 32), (16, 64)]),
                          process_index=0, process_count=1)
  with pytest.raises(LP.PrecomputeMismatchError, match="data.image_size"):
    LP.make_train_iterator(bucket_config(data, data__buckets=[]), process_index=0,
                          process_count=1)


def test_shift_rule_per_bucket():
  c = config_lib.defaults()
  c.data.image_size, c.flow.shift, c.eval.sample_shift = 1024, 3.0, 3.0
  assert buckets_lib.train_shift(c, 832, 1216) == 3.0  # "fixed": one shift for all
  c.flow.shift_rule = "resolution"
  assert buckets_lib.train_shift(c, 1024, 1024) == 3.0
  assert buckets_lib.train_shift(c, 832, 1216) == pytest.approx(3.0 * math.sqrt(832 * 1216) / 1024)
  assert buckets_lib.train_shift(c, 512, 512) == pytest.approx(1.5)
  assert buckets_lib.sample_shift(c, 832, 1216) == buckets_lib.train_shift(c, 832, 1216)
  assert buckets_lib.largest([(1024, 1024), (832, 1216), (1216, 832)]) == (1024, 1024)


def test_crop_statistics():
  sizes = np.array([[64, 64], [64, 128], [100, 100], [48, 80], [30, 50]])
  ids = np.array([0, 1, 0, 1, 1])
  rows = buckets_lib.crop_stats(sizes, ids, [(64, 64), (48, 80)])
  assert [r["count"] for r in rows] == [2, 3]
  assert rows[0]["cropped_max"] == 0.0 and rows[0]["upsampled"] == 0
  # 64x128 -> 48x80: scale 0.75 to 48x96, then 16 of 96 columns cut: 1/6 of the area.
  assert rows[1]["cropped_max"] == pytest.approx(1 / 6, abs=1e-4)
  assert rows[1]["upsampled"] == 1 and rows[1]["cropped_over_10pct"] == 1


# ------------------------------------------------------------------------------------------
# Data: the multi-size build and its bucketed records.
# ------------------------------------------------------------------------------------------
def test_multi_size_build_and_bucketed_records(data):
  src = shapes_tfds.load_shapes(data["build"], "train")
  sizes = src.image_sizes()
  for i in range(0, N_TRAIN, 7):  # every example rendered at its size, the scene unchanged
    h, w = sizes[i]
    want = shapes.make_example(i, split="train", seed=0, height=int(h), width=int(w))
    np.testing.assert_array_equal(src[i]["image"], want["image"])
  counts = collections.Counter(map(tuple, sizes.tolist()))
  assert set(counts) == set(SIZES) and sum(counts.values()) == N_TRAIN
  m = records.read_manifest(data["train"])
  stats = {r["bucket"]: r for r in m["precompute"]["bucket_stats"]}
  assert {b: stats[b]["count"] for b in NAMES} == {
      buckets_lib.name(*s): counts[s] for s in SIZES}
  assert all(stats[b]["cropped_max"] == 0.0 and stats[b]["upsampled"] == 0 for b in NAMES)
  assert m["producer"]["shapes"]["latent_buckets"] == [[4, 4], [4, 6], [6, 4]]


# ------------------------------------------------------------------------------------------
# Training.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, train.train(bucket_config(data), workdir, devices=jax.devices()[:8])


def test_one_compile_per_bucket_before_step_1(straight):
  workdir, result = straight
  assert [c["bucket"] for c in result.compiles] == NAMES
  assert all(c["step"] == 0 and c["seconds"] > 0 for c in result.compiles)
  logged = [json.loads(line) for line in open(os.path.join(workdir, "compiles.jsonl"))]
  assert logged == result.compiles


def test_bucket_sequence_follows_the_data(data, straight):
  """Each bucket's share of an epoch is ceil(examples / batch) steps, in the order the
  pipeline's plan (seeded by (seed, epoch)) gives, and every step logs its bucket's loss."""
  _, result = straight
  seen = step_buckets(result.history)
  assert sorted(seen) == list(range(1, 9))
  pipe = LP.make_precomputed_pipeline(data["train"], global_batch=BATCH, seed=0,
                                     process_index=0, process_count=1)
  names = {(h // 8, w // 8): buckets_lib.name(h, w) for h, w in SIZES}
  assert [seen[s] for s in range(1, 9)] == [names[pipe.buckets[pipe.bucket_of_step(s)]]
                                            for s in range(8)]
  sizes = collections.Counter(map(tuple, shapes_tfds.load_shapes(
      data["build"], "train").image_sizes().tolist()))
  epoch = collections.Counter(names[pipe.buckets[pipe.bucket_of_step(s)]]
                              for s in range(pipe.steps_per_epoch))
  assert epoch == {buckets_lib.name(*s): math.ceil(sizes[s] / BATCH) for s in SIZES}
  assert set(seen.values()) == set(NAMES)


def test_validation_loss_per_bucket(data, straight):
  workdir, _ = straight
  r = json.load(open(os.path.join(workdir, "eval", "step_8.json")))
  per = {b: r[f"val_loss/{b}"] for b in NAMES}
  val = records.RecordSource(data["validation"])
  n = collections.Counter(f"{int(val[i]['height'])}x{int(val[i]['width'])}"
                          for i in range(len(val)))
  assert sum(n.values()) == N_VAL and set(n) == set(NAMES)
  # The overall loss is the example-weighted mean of the buckets'.
  assert r["val_loss"] == pytest.approx(sum(per[b] * n[b] for b in NAMES) / N_VAL, rel=1e-6)


def test_resume_continues_the_bucket_sequence_exactly(data, straight, tmp_path):
  _, full = straight
  workdir = str(tmp_path)
  first = train.train(bucket_config(data, total_steps=4, eval__every_steps=0), workdir,
                      devices=jax.devices()[:8])
  second = train.train(bucket_config(data, eval__every_steps=0), workdir,
                       devices=jax.devices()[:8])
  assert [c["step"] for c in second.compiles] == [4, 4, 4]  # again all before its first step
  assert step_buckets(first.history + second.history) == step_buckets(full.history)
  assert [r["loss"] for r in first.history + second.history] == [r["loss"] for r in full.history]
  for a, b in zip(jax.tree.leaves(jax.device_get(second.state.params)),
                  jax.tree.leaves(jax.device_get(full.state.params))):
    np.testing.assert_array_equal(a, b)


def test_two_processes_agree_with_one_on_buckets_and_losses(data, straight, tmp_path):
  """`sd3jax train` as 2 processes x 4 devices against the 1 x 8 run in this process, on the
  bucketed records (evals and checkpoints do not change the losses)."""
  _, full = straight
  config = bucket_config(data, eval__every_steps=0, checkpoint__every_steps=8)
  path = str(tmp_path / "buckets_config.py")
  with open(path[:-3] + ".json", "w") as f:
    json.dump(config.to_dict(), f)
  with open(path, "w") as f:
    f.write("import json\nfrom ml_collections import ConfigDict\n\n\n"
            "def get_config(arg=None):\n"
            "  return ConfigDict(json.load(open(__file__[:-3] + '.json')))\n")
  workdir, logs = str(tmp_path / "p2"), str(tmp_path / "p2_logs")
  cmd = multihost_test._command(2, workdir, logs, str(tmp_path / "cache"))
  cmd[cmd.index(multihost_test.EXPERIMENT)] = path
  assert multihost_test.run_command(cmd, 2, logs) == 0, multihost_test._logs(logs)
  history = list(multihost_test.metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")))
  assert step_buckets(history) == step_buckets(full.history)
  one, two = [r["loss"] for r in full.history], [r["loss"] for r in history]
  print("bucketed losses 1x8:", one, "\n                2x4:", two,
        "\nmax rel difference:", max(abs(a - b) / abs(a) for a, b in zip(one, two)))
  np.testing.assert_allclose(two, one, rtol=1e-5)
  compiles = [json.loads(line) for line in open(os.path.join(workdir, "compiles.jsonl"))]
  assert [c["bucket"] for c in compiles] == NAMES and {c["step"] for c in compiles} == {0}
