"""Dedup: descriptors, sharded resumable embedding, clustering, the filter, the CLI.

The quality numbers (precision / recall on injected copies, throughput) come from
`sd3jax dedup demo` and `python -m sd3jax.dedup.bench`, reported in the README; these tests
check the machinery on small sets.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sd3jax.data import pipeline, records
from sd3jax.data.producer import open_source, source_identity
from sd3jax.dedup import cluster, copy_net, descriptors, embed, filter as filter_lib
from sd3jax.dedup import shapes_duplicates

import subprocess_env

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def dup_records(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("dups") / "records")
  shapes_duplicates.build(path, num_unique=90, copy_fraction=0.2, examples_per_shard=40,
                          progress=False)
  return path


def _part_bytes(path):
  return {n: open(os.path.join(path, n), "rb").read()
          for n in sorted(os.listdir(path)) if n.startswith("part-")}


def test_injected_set_truth_and_distinct_scenes(dup_records):
  src = records.RecordSource(dup_records)
  truth = shapes_duplicates.truth_groups(src)
  assert len(src) == 90 + 18 and len(np.unique(truth)) == 90
  edits = [src[i]["meta"]["edits"] for i in range(len(src))]
  assert sum(bool(e) for e in edits) == 18  # every copy has at least one edit
  scenes = shapes_duplicates.unique_scenes(90)
  assert len({shapes_duplicates._signature(s) for s in scenes}) == 90


def test_embed_two_processes_x_4_devices_equals_one_x_8_and_resumes(dup_records, tmp_path):
  src = open_source(dup_records)
  desc = descriptors.thumbnail()
  one = embed.embed(src, str(tmp_path / "one"), desc, part_size=32, per_device_batch=4,
                    progress=False)
  assert one["complete"] and one["parts_written"] == 4
  devices = jax.devices()
  first = embed.embed(src, str(tmp_path / "two"), desc, part_size=32, per_device_batch=4,
                      process_index=0, process_count=2, devices=devices[:4], progress=False)
  assert not first["complete"] and first["parts_written"] == 2
  second = embed.embed(src, str(tmp_path / "two"), desc, part_size=32, per_device_batch=4,
                       process_index=1, process_count=2, devices=devices[4:], progress=False)
  assert second["complete"]
  assert _part_bytes(one["path"]) == _part_bytes(second["path"])
  x, manifest = embed.load_descriptors(one["path"])
  assert x.shape == (len(src), desc.dims) and manifest["storage_dtype"] == "float16"
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
  # Resume: a lost part is recomputed, the others are kept.
  os.remove(os.path.join(one["path"], "part-00002.npy"))
  again = embed.embed(src, str(tmp_path / "one"), desc, part_size=32, per_device_batch=4,
                      progress=False)
  assert (again["parts_written"], again["parts_skipped"]) == (1, 3)
  assert _part_bytes(again["path"]) == _part_bytes(second["path"])
  with pytest.raises(ValueError, match="storage_dtype"):
    embed.embed(src, str(tmp_path / "one"), desc, part_size=32, per_device_batch=4,
                storage_dtype="float32", progress=False)


def test_cluster_keep_rule_components_and_pair_scores():
  labels = cluster.components(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
  assert labels[0] == labels[1] == labels[2] != labels[3] and labels[4] == labels[5]
  keep = cluster.keep_one(labels, areas=np.array([10, 40, 40, 5, 1, 1]))
  assert keep.tolist() == [False, True, False, True, True, False]  # largest, then lowest
  s = cluster.pair_scores(labels, np.array([0, 0, 1, 2, 3, 3]))
  assert (s["true_pairs"], s["predicted_pairs"], s["correct_pairs"]) == (2, 4, 2)
  assert s["precision"] == 0.5 and s["recall"] == 1.0


def _planted(n=3000, d=64, groups=100, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  truth = np.arange(n)
  for g in range(groups):  # rows 2g, 2g+1 are near-copies
    x[2 * g + 1] = x[2 * g] + 0.05 * rng.normal(size=d)
    truth[2 * g + 1] = 2 * g
  return x / np.linalg.norm(x, axis=1, keepdims=True), truth


def test_exact_and_ivf_pq_search_find_planted_copies():
  x, truth = _planted()
  for kwargs in ({}, {"exact_limit": 0, "nlist": 16, "pq_bytes": 16, "nprobe": 16}):  # flat, IVF-PQ
    ids, sims, info = cluster.neighbours(x, 5, progress=False, **kwargs)
    assert not np.any(ids == np.arange(len(x))[:, None])  # never itself
    i, j, _ = cluster.pairs_at(ids, sims, 0.9)
    scores = cluster.pair_scores(cluster.components(len(x), i, j), truth)
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0, (info, scores)
  assert info["type"].startswith("IVF16,PQ16")


def test_cluster_writes_filter_that_precompute_and_pipelines_honour(dup_records, tmp_path):
  src = open_source(dup_records)
  res = embed.embed(src, str(tmp_path / "emb"), descriptors.thumbnail(), part_size=64,
                    per_device_batch=4, progress=False)
  out = str(tmp_path / "filter")
  report = cluster.cluster(res["path"], out, threshold=0.99, source=src, progress=False)
  for name in ("filter.json", "drop.npy", "report.json", "similarity_hist.png", "pairs.png"):
    assert os.path.exists(os.path.join(out, name)), name
  meta, drop = filter_lib.load_filter(out)
  assert report["num_dropped"] == len(drop) == meta["num_dropped"] > 0
  filtered = open_source(dup_records, filter=out)
  assert len(filtered) == len(src) - len(drop)
  kept_keys = {filtered[i]["key"] for i in range(len(filtered))}
  assert kept_keys == {src[i]["key"] for i in range(len(src)) if i not in set(drop.tolist())}
  # The producer identity differs, so precomputed sets with / without the filter never mix.
  assert source_identity(filtered) != source_identity(src)
  assert source_identity(filtered)["filter"] == meta["drop_sha256"][:16]
  # The training pipeline draws only kept examples.
  pipe = pipeline.make_sequential_pipeline(filtered, global_batch=8, resolution=64,
                                           process_index=0, process_count=1)
  seen = {str(k) for b in pipe.iterator() for k, v in zip(b["key"], b["valid"]) if v}
  assert seen == kept_keys
  # A filter made for another source is refused, naming the fix.
  other = str(tmp_path / "other")
  shapes_duplicates.build(other, num_unique=30, copy_fraction=0.0, progress=False)
  with pytest.raises(ValueError, match="made for another source.*dedup embed"):
    open_source(other, filter=out)
  with pytest.raises(FileNotFoundError, match="filter.json"):
    open_source(dup_records, filter=str(tmp_path))


def test_copy_net_trains_saves_loads_and_calibrates(tmp_path):
  cfg = copy_net.CopyNetConfig(size=32, widths=(8, 16), hidden=32, dims=16)
  images = np.stack([s["image"] for s in shapes_duplicates.unique_scenes(64, seed=1,
                                                                          height=32, width=32)])
  params, losses = copy_net.train(images, config=cfg, steps=6, batch=16, mine_every=3,
                                  progress=False)
  assert len(losses) == 6 and all(np.isfinite(losses))
  cal = copy_net.calibrate(copy_net.CopyNet(cfg), params, images[:24])
  assert -1.0 <= cal["threshold"] <= 1.0
  copy_net.save(str(tmp_path / "net"), params, cfg, cal)
  desc = descriptors.load_descriptor(str(tmp_path / "net"))
  assert desc.threshold == cal["threshold"] and desc.dims == 16
  x = np.asarray(desc.fn(images[:4].astype(np.float32) / 255.0))
  direct = np.asarray(copy_net.CopyNet(cfg).apply({"params": params},
                                                  images[:4].astype(np.float32) / 255.0))
  np.testing.assert_allclose(x, direct, atol=1e-6)
  assert descriptors.load_descriptor(str(tmp_path / "net")).fingerprint == desc.fingerprint


def test_train_on_a_too_small_source_names_the_minimum(dup_records, tmp_path):
  with pytest.raises(ValueError, match="at least 320"):
    copy_net.train_on_source(open_source(dup_records), str(tmp_path / "net"), steps=1,
                             progress=False)
  assert not os.path.exists(tmp_path / "net")


def test_factory_descriptor_embeds_on_the_host(dup_records, tmp_path):
  """FILE.py:factory, as the FID hook takes one: any callable with size and dims."""
  path = tmp_path / "mine.py"
  path.write_text("import numpy as np\n\n\nclass Mean:\n  size, dims = 16, 3\n\n"
                  "  def __call__(self, x):\n    m = x.mean((1, 2)) + 1e-3\n"
                  "    return m / np.linalg.norm(m, axis=1, keepdims=True)\n\n\n"
                  "def make():\n  return Mean()\n")
  desc = descriptors.load_descriptor(f"{path}:make")
  assert not desc.jittable and (desc.size, desc.dims) == (16, 3)
  res = embed.embed(open_source(dup_records), str(tmp_path / "e"), desc, part_size=64,
                    per_device_batch=4, progress=False)
  x, manifest = embed.load_descriptors(res["path"])
  assert x.shape == (108, 3) and manifest["descriptor"]["name"] == "factory:make"
  (tmp_path / "bad.py").write_text("def make():\n  return 3\n")
  with pytest.raises(ValueError, match="needs `size`, `dims`"):
    descriptors.load_descriptor(f"{tmp_path / 'bad.py'}:make")


def test_descriptor_spec_errors(tmp_path):
  with pytest.raises(ValueError, match="--descriptor DIR"):
    descriptors.load_descriptor("")
  with pytest.raises(FileNotFoundError, match="copy_net.json"):
    descriptors.load_descriptor(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a folder"):
    descriptors.load_descriptor("no_such_thing")


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "sd3jax.cli", *args], capture_output=True,
                        text=True, cwd=ROOT, env=subprocess_env.env(), timeout=300)


def test_cli_dedup_embed_and_cluster_and_usage_errors(dup_records, tmp_path):
  r = _cli("dedup", "embed", dup_records, str(tmp_path / "d"), "--descriptor", "thumbnail")
  assert r.returncode == 0, r.stderr[-2000:]
  path = json.loads(r.stdout[r.stdout.index("{"):])["path"]
  r = _cli("dedup", "cluster", path, str(tmp_path / "f"), "--source", dup_records)
  assert r.returncode == 2 and "--threshold" in r.stderr  # thumbnail has no measured one
  r = _cli("dedup", "cluster", path, str(tmp_path / "f"), "--source", dup_records,
           "--threshold", "0.99")
  assert r.returncode == 0, r.stderr[-2000:]
  assert os.path.exists(tmp_path / "f" / "filter.json")
  r = _cli("dedup", "frobnicate")
  assert r.returncode == 2 and "usage: sd3jax dedup embed" in r.stderr


def test_real_two_process_embed_equals_one_process(dup_records, tmp_path):
  """`sd3jax dedup embed` as 2 processes x 4 devices joined by jax.distributed (launch/local.sh)
  writes the same bytes as 1 process x 8 devices, with a small CopyNet (a jitted network)."""
  import multihost_test
  cfg = copy_net.CopyNetConfig(size=32, widths=(8, 16, 16), hidden=32, dims=16)
  model = copy_net.CopyNet(cfg)
  params = jax.jit(model.init)(jax.random.key(1), np.zeros((1, 32, 32, 3), np.float32))["params"]
  net = str(tmp_path / "net")
  copy_net.save(net, params, cfg, {})
  paths = {}
  for n in (1, 2):
    out, logs = str(tmp_path / f"p{n}"), str(tmp_path / f"logs{n}")
    cmd = [multihost_test.LOCAL, "-n", str(n), "-d", str(8 // n), "-l", logs, "--", "dedup",
           "embed", dup_records, out, "--descriptor", net, "--part_size", "32"]
    assert multihost_test.run_command(cmd, n, logs) == 0, multihost_test._logs(logs)
    (paths[n],) = [os.path.join(out, d) for d in os.listdir(out)]
  assert len(_part_bytes(paths[1])) == 4
  assert _part_bytes(paths[1]) == _part_bytes(paths[2])
  assert os.path.exists(os.path.join(paths[2], "descriptors.json"))
