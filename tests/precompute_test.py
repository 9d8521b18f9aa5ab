"""Tests for the precompute stage and the precomputed-records pipeline.

Tiny everything: 24 shapes examples at 32x32, the embedded random text encoders (T5 16
tokens), a random f8 VAE of width 8 (4x4x16 latents).
"""
import filecmp
import json
import os
import shutil

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest

from sd3jax import conditioning
from sd3jax import config as config_lib
from sd3jax import embedded_encoders
from sd3jax.data import latent_pipeline as LP
from sd3jax.data import pipeline as P
from sd3jax.data import precompute as pc
from sd3jax.data import records, shapes, shapes_tfds, synthetic
from sd3jax.models import vae as vae_lib

N, RES, T5_LEN, PER_SHARD, BATCH = 24, 32, 16, 5, 4


def random_vae(width, seed):
  """A random f8 VAE; params drawn in numpy (compiling the VAE's init takes ~40 s here)."""
  model = vae_lib.AutoencoderKL(vae_lib.vae_config(16, width=width))
  abstract = nn.unbox(jax.eval_shape(model.init_params, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if leaf.ndim == 1:
      base = 1.0 if "norm" in name and "scale" in name else 0.0
      return (base + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
  return model, jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Data, encoders, VAE, and one uninterrupted reference run (bfloat16)."""
  root = tmp_path_factory.mktemp("precompute")
  enc_dir = embedded_encoders.build_embedded_encoders(str(root / "enc"), shapes.VOCABULARY)
  data_dir = str(root / "shapes")
  shapes_tfds.build_shapes(data_dir, resolution=RES, num_train=N, num_val=4)
  te = conditioning.TextEncoders.from_pipeline_folder(enc_dir, t5_length=T5_LEN)
  s = dict(root=root, data_dir=data_dir, te=te, vae=random_vae(8, 0),
           source=shapes_tfds.load_shapes(data_dir, "train"))
  s["ref"] = str(root / "ref")
  s["ref_result"] = run(s, s["ref"])
  return s


def run(s, out, **kw):
  kw = {"global_batch": BATCH, "resolution": RES, "examples_per_shard": PER_SHARD,
        "progress": False, **kw}
  return pc.precompute(s["source"], out, s["vae"], s["te"], **kw)


def same_records(a, b, tol=None):
  """Every record equal: bit for bit (tol=None) or within tol (float32 storage)."""
  ra, rb = records.RecordSource(a), records.RecordSource(b)
  assert len(ra) == len(rb) == N
  for i in range(N):
    x, y = ra[i], rb[i]
    assert x.keys() == y.keys()
    for k in x:
      if k in ("original", "synthetic"):
        assert x[k].keys() == y[k].keys()
        pairs = [(x[k][e], y[k][e]) for e in x[k]]
      else:
        pairs = [(x[k], y[k])]
      for u, v in pairs:
        if not isinstance(u, np.ndarray):
          assert u == v, k
        elif tol is None:
          assert u.dtype == v.dtype and u.tobytes() == v.tobytes(), k
        else:
          np.testing.assert_allclose(u.astype(np.float32), v.astype(np.float32), atol=tol,
                                     rtol=tol, err_msg=k)


def shard_files(path):
  return sorted(n for n in os.listdir(path) if n.startswith("shard-"))


def test_reference_run_layout_and_counts(setup):
  r = setup["ref_result"]
  assert r.complete and r.shards_written == [0, 1, 2, 3, 4] and r.examples_written == N
  assert r.compiled_shapes == [(RES, RES)]
  m = records.read_manifest(setup["ref"])
  assert m["kind"] == records.KIND_PRECOMPUTED and m["num_examples"] == N
  assert [sh["num_examples"] for sh in m["shards"]] == [5, 5, 5, 5, 4]
  assert m["producer_key"] == r.producer_key == pc.producer_key(m["producer"])
  prod = m["producer"]
  assert prod["storage_dtype"] == "bfloat16" and prod["moments"] == "mean_std"
  assert prod["text_encoders"] == setup["te"].cache_key()
  assert prod["shapes"]["latent_buckets"] == [[4, 4]] and prod["shapes"]["t5_length"] == T5_LEN
  # Record i is example i (one bucket); embeddings are those of TextEncoders.encode.
  src = records.RecordSource(setup["ref"])
  ex, raw = src[7], setup["source"][7]
  assert ex["index"] == 7 and ex["caption_synthetic"] == raw["caption_synthetic"]
  assert ex["vae_mean"].shape == (4, 4, 16) and ex["vae_mean"].dtype == ml_dtypes.bfloat16
  want = setup["te"].encode([raw["caption_original"], raw["caption_synthetic"]])
  for k, v in want.items():
    for j, cap in enumerate(("original", "synthetic")):
      got = ex[cap][k].astype(np.float32)
      np.testing.assert_allclose(got, np.asarray(v[j]), rtol=1e-2, atol=1e-2)
  model, params = setup["vae"]
  post = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode))(
      params, P.to_float(raw["image"])[None])
  np.testing.assert_allclose(ex["vae_mean"].astype(np.float32), post.mean[0], rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(ex["vae_std"].astype(np.float32), post.std[0], rtol=1e-2, atol=1e-2)


def test_interrupted_then_rerun_is_bitwise_identical(setup):
  out = str(setup["root"] / "interrupted")
  first = run(setup, out, max_shards=2)
  assert not first.complete and first.manifest is None and first.shards_written == [0, 1]
  assert not os.path.exists(os.path.join(out, records.MANIFEST))
  # A crash while writing shard 2 leaves its temporary file; one between the sidecar and
  # the rename of shard 3 leaves a sidecar without its data file.
  w = records.ShardWriter(records.shard_path(out, 2), columns=pc.COLUMNS)
  w.write({"index": 10, "latent_height": 4, "latent_width": 4, "junk": np.zeros(3)})
  w._writer.close()
  with open(records.shard_path(out, 3) + ".json", "w") as f:
    json.dump({"num_examples": 1, "columns": {"index": [15]}}, f)
  assert any(".tmp-" in n for n in os.listdir(out))
  inode = os.stat(records.shard_path(out, 0)).st_ino

  second = run(setup, out)
  assert second.complete and second.shards_skipped == [0, 1] and second.shards_written == [2, 3, 4]
  assert second.examples_written == N - 2 * PER_SHARD
  assert os.stat(records.shard_path(out, 0)).st_ino == inode  # Finished shards untouched.
  assert not any(".tmp-" in n for n in os.listdir(out))
  assert shard_files(out) == shard_files(setup["ref"])
  for name in shard_files(out):  # Bitwise: data files and their index sidecars.
    assert filecmp.cmp(os.path.join(out, name), os.path.join(setup["ref"], name), shallow=False)
  same_records(out, setup["ref"])
  # A finished set is not recomputed.
  third = run(setup, out)
  assert third.complete and third.examples_written == 0 and third.manifest["num_examples"] == N


def test_wrong_shard_is_redone_and_missing_shards_hold_the_manifest(setup):
  out = str(setup["root"] / "tampered")
  shutil.copytree(setup["ref"], out)
  os.remove(os.path.join(out, records.MANIFEST))
  side = records.shard_path(out, 1) + ".json"
  with open(side) as f:
    meta = json.load(f)
  meta["columns"]["index"][0] = 99  # Not the planned examples: must be rewritten.
  with open(side, "w") as f:
    json.dump(meta, f)
  r = run(setup, out)
  assert r.complete and r.shards_written == [1]
  same_records(out, setup["ref"])
  # Simulated two-process run: process 1 writes only its (odd) shards; process 0, whose
  # turn comes second here, verifies every shard and publishes the manifest.
  out2 = str(setup["root"] / "two_processes")
  p1 = run(setup, out2, global_batch=2 * BATCH, process_index=1, process_count=2)
  assert p1.shards_written == [1, 3] and p1.manifest is None
  assert shard_files(out2) == ["shard-00001.array_record", "shard-00001.array_record.json",
                               "shard-00003.array_record", "shard-00003.array_record.json"]
  p0 = run(setup, out2, global_batch=2 * BATCH, process_index=0, process_count=2)
  assert p0.shards_written == [0, 2, 4] and p0.complete
  same_records(out2, setup["ref"])  # Same per-process batch: bitwise the same records.


def test_bfloat16_storage_is_half_the_size(setup):
  out = str(setup["root"] / "f32")
  r = run(setup, out, storage_dtype="float32")
  ratio = pc.dir_size(setup["ref"]) / pc.dir_size(out)
  print(f"\nprecomputed shard bytes: bfloat16 {pc.dir_size(setup['ref'])}, float32 "
        f"{pc.dir_size(out)}, ratio {ratio:.3f}")
  assert 0.4 < ratio < 0.6
  assert r.producer_key != setup["ref_result"].producer_key
  a, b = records.RecordSource(setup["ref"])[3], records.RecordSource(out)[3]
  assert b["vae_mean"].dtype == np.float32 and b["original"]["t5"].dtype == np.float32
  # The bfloat16 set is the float32 one rounded (to nearest even), bit for bit.
  for x, y in [(a["vae_mean"], b["vae_mean"]), (a["vae_std"], b["vae_std"]),
               (a["synthetic"]["clip_g"], b["synthetic"]["clip_g"])]:
    assert np.array_equal(x.view(np.uint16), y.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_sharded_over_8_devices_equals_single_device(setup):
  assert jax.device_count() == 8
  single = str(setup["root"] / "single8")
  sharded = str(setup["root"] / "sharded8")
  kw = dict(global_batch=8, storage_dtype="float32")  # float32: compare at full precision.
  run(setup, single, **kw)
  r = run(setup, sharded, mesh=pc.local_mesh(jax.devices()), **kw)
  assert r.complete and r.manifest["precompute"]["mesh"]["data"] == 8
  # One example per device: equal up to float32 rounding (measured max |diff| ~4e-6).
  same_records(sharded, single, tol=1e-4)


def test_aspect_ratio_buckets_one_program_each_and_one_shape_per_batch(setup, tmp_path):
  """image_text records at three aspect ratios: one VAE program per bucket, bucket-major."""
  import io
  from PIL import Image
  sizes = [(48, 96), (96, 48), (64, 64), (50, 100)] * 3

  def examples():
    for i, (h, w) in enumerate(sizes):
      buf = io.BytesIO()
      Image.fromarray(np.full((h, w, 3), 10 * i, np.uint8)).save(buf, format="PNG")
      yield {"key": f"k{i}", "image": buf.getvalue(), "image_format": "png", "height": h,
             "width": w, "caption_original": "a red circle",
             "caption_synthetic": "" if i % 3 else "a red circle in the center", "meta": {}}
  records.write_records(str(tmp_path / "raw"), examples(), kind=records.KIND_IMAGE_TEXT,
                        examples_per_shard=5, columns=("height", "width"))
  buckets = [(16, 32), (24, 24), (32, 16)]
  out = str(tmp_path / "out")
  r = pc.precompute(str(tmp_path / "raw"), out, setup["vae"], setup["te"], global_batch=BATCH,
                    buckets=buckets, examples_per_shard=5, progress=False)
  assert r.complete and sorted(r.compiled_shapes) == sorted(buckets)
  src = records.RecordSource(out)
  got = [(src[i]["index"], src[i]["height"], src[i]["width"]) for i in range(len(sizes))]
  bucket_of = {(48, 96): (16, 32), (50, 100): (16, 32), (64, 64): (24, 24), (96, 48): (32, 16)}
  want = sorted(((i,) + bucket_of[hw] for i, hw in enumerate(sizes)),
                key=lambda x: buckets.index(x[1:]))
  assert got == want  # Bucket-major, source order within a bucket.
  assert all(("synthetic" in src[i]) == (src[i]["index"] % 3 == 0) for i in range(len(sizes)))
  pipe = LP.make_precomputed_pipeline(out, global_batch=2, seed=0, p_synthetic=1.0,
                                     process_index=0, process_count=1)
  assert pipe.buckets == [(2, 4), (3, 3), (4, 2)]
  for step in range(pipe.steps_per_epoch):
    b = pipe.batch(step)
    assert b["latents"].shape[1:3] == pipe.buckets[int(b["bucket"][0])]
    # Without a synthetic caption the original one is used, whatever p_synthetic says.
    assert all(bool(s) == ("synthetic" in src[int(i)]) for s, i in
               zip(b["caption_is_synthetic"], b["index"]))


def test_precompute_command(setup, tmp_path):
  """precompute_main: the `sd3jax precompute` path, folders named by the config."""
  from ml_collections import ConfigDict
  from sd3jax.interop import diffusers_vae
  model, params = setup["vae"]
  diffusers_vae.save_vae(model, params, str(tmp_path / "vae"))
  c = ConfigDict()
  c.sharding_rules = "fsdp"
  c.data = ConfigDict(dict(image_size=RES))
  c.conditioning = ConfigDict(dict(t5_tokens=T5_LEN, t5_dim=256))
  c.precompute = ConfigDict(dict(
      source=setup["data_dir"], text_encoders=str(setup["root"] / "enc"),
      vae=str(tmp_path / "vae"), batch_size=8, storage_dtype="float32",
      examples_per_shard=PER_SHARD, mesh=dict(data=8, fsdp=1, tensor=1)))
  c.lock()
  out = str(tmp_path / "out")
  assert pc.precompute_main(c, out) == 0
  m = records.read_manifest(out)
  assert m["num_examples"] == N and m["precompute"]["mesh"]["data"] == 8
  assert m["producer"]["vae"]["weights"] == conditioning.folder_fingerprint(str(tmp_path / "vae"))
  same_records(out, setup["ref"], tol=2e-2)  # float32 vs the bfloat16 reference.
  with c.unlocked():
    c.precompute.vae = ""
  with pytest.raises(ValueError, match="config.precompute.vae is empty"):
    pc.precompute_main(c, out)


def _train_config(path, **conditioning):
  c = config_lib.defaults()
  c.batch_size, c.seed = BATCH, 3
  c.data.source, c.data.path, c.data.image_size, c.data.vae_factor = "records", path, RES, 8
  c.model.in_channels, c.model.pooled_projection_dim, c.model.joint_attention_dim = 16, 192, 256
  c.mesh.data = 4
  c.conditioning.update({**dict(clip_l_dim=64, clip_g_dim=128, t5_dim=256, clip_tokens=77,
                                t5_tokens=T5_LEN), **conditioning})
  return c


def test_pipeline_batches_match_the_trainer_layout_and_resume(setup):
  config = _train_config(setup["ref"])
  it = LP.make_train_iterator(config, process_index=0, process_count=1)
  want = synthetic.batch_shapes(config, BATCH)
  want_batch = synthetic.make_iterator(config).batch(0)
  batches = [next(it) for _ in range(3)]
  for b in batches:
    assert set(b) == set(want) == set(want_batch)
    for k, v in b.items():
      assert v.shape == want[k] == want_batch[k].shape and v.dtype == want_batch[k].dtype, k
  # Resume: a fresh iterator restored from the state continues with the very next batch.
  state = it.get_state()
  nxt = next(it)
  it2 = LP.make_train_iterator(config, process_index=0, process_count=1)
  it2.set_state(json.loads(json.dumps(state)))
  assert all(np.array_equal(nxt[k], v) for k, v in next(it2).items())
  # The trainer's own code takes these batches (sharding over 8 devices + conditioning).
  from sd3jax import train
  mesh = train.make_mesh(config_lib.validate(config, 4), jax.devices()[:4])
  device_batch = train.shard_batch(nxt, mesh)
  context, pooled = train.text_conditioning(jax.random.key(0), device_batch, 0.5, 256)
  assert context.shape == (BATCH, 77 + T5_LEN, 256) and pooled.shape == (BATCH, 192)


def test_latents_sampled_from_moments_and_caption_choice(setup):
  src = records.RecordSource(setup["ref"])
  norm = src.manifest["producer"]["latent_normalization"]
  kw = dict(global_batch=BATCH, seed=5, process_index=0, process_count=1)
  pipe = LP.make_precomputed_pipeline(setup["ref"], p_synthetic=0.5, **kw)
  b = pipe.batch(0)
  for j in range(BATCH):
    i, e = int(b["index"][j]), int(b["epoch"][j])
    ex = src[i]
    rng = np.random.default_rng([5, 5, i, e])
    syn = rng.random() < 0.5
    assert bool(b["caption_is_synthetic"][j]) == syn
    eps = rng.standard_normal(ex["vae_mean"].shape, dtype=np.float32)
    z = ex["vae_mean"].astype(np.float32) + ex["vae_std"].astype(np.float32) * eps
    np.testing.assert_array_equal(b["latents"][j], (z - norm["shift"]) * norm["scale"])
    emb = ex["synthetic" if syn else "original"]
    np.testing.assert_array_equal(b["t5"][j], emb["t5"].astype(np.float32))
  # Fresh noise every epoch, same on every rerun; p_synthetic 0 / 1 pick one caption.
  steps = pipe.steps_per_epoch
  first = {int(i): l for i, l in zip(b["index"], b["latents"])}
  later = [pipe.batch(s) for s in range(steps, 2 * steps)]
  again = {int(i): l for x in later for i, l in zip(x["index"], x["latents"])}
  assert all(not np.array_equal(first[i], again[i]) for i in first)
  for p, flag in ((0.0, False), (1.0, True)):
    x = LP.make_precomputed_pipeline(setup["ref"], p_synthetic=p, **kw).batch(1)
    assert (x["caption_is_synthetic"] == flag).all()
    for j, i in enumerate(x["index"]):
      want = src[int(i)]["synthetic" if flag else "original"]["clip_l_pooled"]
      np.testing.assert_array_equal(x["clip_l_pooled"][j], want.astype(np.float32))
  mixed = np.concatenate([pipe.batch(s)["caption_is_synthetic"] for s in range(4 * steps)])
  assert 0.3 < mixed.mean() < 0.7


def test_mismatched_producer_or_config_is_a_clear_error(setup):
  kw = dict(global_batch=BATCH, process_index=0, process_count=1)
  with pytest.raises(LP.PrecomputeMismatchError, match="producer_key"):
    LP.make_precomputed_pipeline(setup["ref"], producer_key="0123456789abcdef", **kw)
  with pytest.raises(LP.PrecomputeMismatchError, match="storage_dtype: \"float32\" != \"bfloat16\""):
    LP.make_precomputed_pipeline(setup["ref"], expected_producer={"storage_dtype": "float32"}, **kw)
  other = {"text_encoders": {"clip_l": {"files": ["another-weights-hash"]}}}
  with pytest.raises(LP.PrecomputeMismatchError, match="text_encoders.clip_l.files"):
    LP.make_precomputed_pipeline(setup["ref"], expected_producer=other, **kw)
  with pytest.raises(LP.PrecomputeMismatchError, match=r"config.conditioning.clip_l_dim=8"):
    LP.make_train_iterator(_train_config(setup["ref"], clip_l_dim=8), process_index=0,
                          process_count=1)
  config = _train_config(setup["ref"])
  with config.data.unlocked():
    config.data.producer_key = "0123456789abcdef"
  with pytest.raises(LP.PrecomputeMismatchError, match="producer_key"):
    LP.make_train_iterator(config, process_index=0, process_count=1)
  # Writing into a folder made by another producer is refused before any work.
  with pytest.raises(pc.PrecomputeMismatchError, match="storage_dtype"):
    run(setup, setup["ref"], storage_dtype="float32")


def test_precompute_throughput_64x64(setup, tmp_path):
  """64x64 shapes, embedded encoders, vae_config(16) (width 32): measured, not asserted."""
  shapes_tfds.build_shapes(str(tmp_path / "s64"), resolution=64, num_train=64, num_val=4)
  src = shapes_tfds.load_shapes(str(tmp_path / "s64"), "train")
  vae = random_vae(32, 1)
  kw = dict(global_batch=16, resolution=64, examples_per_shard=16, progress=False)
  out = str(tmp_path / "out")
  warm = pc.precompute(src, out, vae, setup["te"], max_shards=1, **kw)  # Compiles.
  r = pc.precompute(src, out, vae, setup["te"], **kw)
  assert r.complete and r.examples_written == 64 - 16
  print(f"\nprecompute 64x64 (embedded encoders, both captions, vae_config(16), 1 CPU device, "
        f"batch 16): {r.examples_per_sec:.1f} examples/s steady state; first shard incl. "
        f"compile {warm.seconds:.1f} s")


class _Damaged:
  """The shapes source with some examples unreadable, as a damaged record shard reads."""

  def __init__(self, source, bad):
    self.source, self.bad = source, set(bad)

  def __len__(self):
    return len(self.source)

  def __getattr__(self, name):
    return getattr(self.source, name)

  def read_many(self, indices):
    return [records.BadRecordError("shard-00000.array_record", i, i, "chunk data hash "
                                   "mismatch at byte 1234") if i in self.bad else self.source[i]
            for i in indices]


def test_bad_source_records_stop_by_name_or_are_skipped_and_counted(setup, tmp_path):
  damaged = _Damaged(setup["source"], bad=[3, 11])
  with pytest.raises(records.BadRecordError, match=r"shard-00000.array_record: record 3"):
    pc.precompute(damaged, str(tmp_path / "strict"), setup["vae"], setup["te"],
                  global_batch=BATCH, resolution=RES, examples_per_shard=PER_SHARD,
                  progress=False)
  with pytest.raises(records.DataError, match="2 unreadable source records, more than "
                     "max_bad_records=1"):
    pc.precompute(damaged, str(tmp_path / "one"), setup["vae"], setup["te"],
                  global_batch=BATCH, resolution=RES, examples_per_shard=PER_SHARD,
                  progress=False, max_bad_records=1)
  out = str(tmp_path / "skip")
  result = pc.precompute(damaged, out, setup["vae"], setup["te"], global_batch=BATCH,
                         resolution=RES, examples_per_shard=PER_SHARD, progress=False,
                         max_bad_records=2)
  assert result.complete
  manifest = records.read_manifest(out)
  assert manifest["num_examples"] == N - 2 and manifest["bad_records"]["count"] == 2
  assert sorted(b["index"] for b in manifest["bad_records"]["first"]) == [3, 11]
  src, ref = records.RecordSource(out), records.RecordSource(setup["ref"])
  kept = [src[i]["index"] for i in range(len(src))]
  assert sorted(kept) == [i for i in range(N) if i not in (3, 11)]
  by_index = {ref[i]["index"]: ref[i] for i in range(len(ref))}
  for i in range(len(src)):  # the good examples are exactly the reference run's
    assert src[i]["vae_mean"].tobytes() == by_index[src[i]["index"]]["vae_mean"].tobytes()
  # A rerun finds every shard complete (the skipped records are part of the plan's record).
  again = pc.precompute(damaged, out, setup["vae"], setup["te"], global_batch=BATCH,
                        resolution=RES, examples_per_shard=PER_SHARD, progress=False,
                        max_bad_records=2)
  assert again.complete and not again.shards_written
