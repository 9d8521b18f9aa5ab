"""Dedup: descriptors, sharded resumable embedding, clustering, the filter, the CLI.

The quality numbers (precision / recall on injected copies, throughput) come from
`sd3jax dedup demo` and `python -m sd3jax.dedup.bench`, reported in the README; these tests
check the machinery on small sets.
"""
import dataclasses
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
from sd3jax.dedup import score_norm, shapes_duplicates

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


def _dense_and_sparse(seed=0, d=32):
  """Distinct near-identical images in a dense region (pairwise ~0.95) and edited copies in a
  sparse one (~0.92): no raw threshold separates them; the background (dense where the data
  is dense) does."""
  rng = np.random.default_rng(seed)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
  centre = unit(rng.normal(size=d))
  dense = unit(centre + 0.2 * unit(rng.normal(size=(40, d))))     # 40 distinct images
  originals = unit(rng.normal(size=(20, d)))
  copies = unit(originals + 0.4 * unit(rng.normal(size=(20, d))))
  x = np.concatenate([dense, originals, copies]).astype(np.float32)
  truth = np.concatenate([np.arange(40), 40 + np.arange(20), 40 + np.arange(20)])
  background = np.concatenate([unit(centre + 0.2 * unit(rng.normal(size=(200, d)))),
                               unit(rng.normal(size=(200, d)))]).astype(np.float32)
  return x, truth, background


def test_score_normalisation_separates_dense_distinct_images_from_sparse_copies():
  x, truth, background = _dense_and_sparse()
  ids, sims, _ = cluster.neighbours(x, 5, progress=False)
  raw = cluster.pr_curve(ids, sims, truth, np.arange(0.5, 1.0, 0.005))
  assert not any(r["precision"] == 1.0 and r["recall"] == 1.0 for r in raw)
  norm = score_norm.settings(background)
  assert norm == {"beta": 1.0, "neighbours": 10, "background_size": 400}
  n = score_norm.background_similarity(x, background, norm["neighbours"])
  brute = np.sort(x @ background.T, axis=1)[:, -10:].mean(1)
  np.testing.assert_allclose(n, brute, atol=1e-5)
  normalised = score_norm.normalise(x, ids, sims, background, norm)
  np.testing.assert_allclose(normalised[ids >= 0],
                             (sims - 0.5 * (n[:, None] + n[ids]))[ids >= 0], atol=1e-6)
  i, j, _ = cluster.pairs_at(ids, normalised, 0.3)
  scores = cluster.pair_scores(cluster.components(len(x), i, j), truth)
  assert scores["precision"] == 1.0 and scores["recall"] == 1.0, scores
  with pytest.raises(ValueError, match="holds 400 descriptors"):
    score_norm.settings(background, neighbours=401)


def test_a_copy_net_carries_its_background_through_embed_and_cluster(dup_records, tmp_path):
  cfg = copy_net.CopyNetConfig(size=32, widths=(8, 16), hidden=32, dims=16)
  images = np.stack([s["image"] for s in shapes_duplicates.unique_scenes(48, seed=1,
                                                                          height=32, width=32)])
  params, _ = copy_net.train(images, config=cfg, steps=2, batch=16, mine_every=0,
                             progress=False)
  background = copy_net._embed_pool(copy_net.CopyNet(cfg), params, images)
  norm = score_norm.settings(background)
  cal = copy_net.calibrate(copy_net.CopyNet(cfg), params, images[:16], 0, background, norm)
  net = str(tmp_path / "net")
  copy_net.save(net, params, cfg, {"score_norm": norm, **cal}, background)
  desc = descriptors.load_descriptor(net)
  assert desc.score_norm == norm and desc.background.shape == (48, 16)
  assert desc.info()["score_norm"] == norm
  src = open_source(dup_records)
  res = embed.embed(src, str(tmp_path / "emb"), desc, part_size=64, per_device_batch=4,
                    progress=False)
  np.testing.assert_allclose(score_norm.load_background(res["path"]), background, atol=2e-3)
  report = cluster.cluster(res["path"], str(tmp_path / "f"), source=src, plots=False,
                           progress=False)
  assert report["score_norm"] == norm and report["threshold"] == cal["threshold"]
  # The scores it thresholds are the normalised ones.
  x, _ = embed.load_descriptors(res["path"])
  ids, sims, _ = cluster.neighbours(x, 10, progress=False)
  expect = score_norm.normalise(x, ids, sims, score_norm.load_background(res["path"]), norm)
  assert report["num_pairs"] == len(cluster.pairs_at(ids, expect, cal["threshold"])[0])
  # Without its background the threshold means nothing: refused, naming the file.
  os.remove(os.path.join(res["path"], score_norm.BACKGROUND_FILE))
  with pytest.raises(FileNotFoundError, match="background.npy is missing"):
    cluster.cluster(res["path"], str(tmp_path / "f2"), progress=False)
  os.remove(os.path.join(net, score_norm.BACKGROUND_FILE))
  with pytest.raises(FileNotFoundError, match="background.npy is missing"):
    descriptors.load_descriptor(net)


def test_memorisation_scores_nearest_training_images_with_the_descriptor_background():
  from sd3jax.dedup import memorisation
  x, _, background = _dense_and_sparse()
  desc = dataclasses.replace(descriptors.thumbnail(), background=background,
                             score_norm=score_norm.settings(background))
  train_x, queries = x[:60], x[60:]  # the copies query their originals among the rest
  nearest = memorisation._Nearest(train_x, desc)
  scores, ids = nearest(queries)
  n_train = score_norm.background_similarity(train_x, background, 10)
  n_query = score_norm.background_similarity(queries, background, 10)
  brute = queries @ train_x.T - 0.5 * (n_query[:, None] + n_train[None, :])
  assert ids.tolist() == brute.argmax(1).tolist() == list(range(40, 60))
  np.testing.assert_allclose(scores, brute.max(1), atol=1e-5)
  np.testing.assert_allclose(nearest.score(queries, np.arange(40, 60)), brute.max(1),
                             atol=1e-5)
  raw = memorisation._Nearest(train_x, descriptors.thumbnail())  # no background: similarity
  np.testing.assert_allclose(raw(queries)[0], (queries @ train_x.T).max(1), atol=1e-5)


def test_cluster_with_a_background_of_another_descriptor_is_refused(dup_records, tmp_path):
  src = open_source(dup_records)
  raw_threshold = dataclasses.replace(descriptors.thumbnail(), threshold=0.9)
  mine = embed.embed(src, str(tmp_path / "a"), raw_threshold, part_size=64,
                     per_device_batch=4, progress=False)
  other = embed.embed(src, str(tmp_path / "b"), descriptors.thumbnail(cells=8), part_size=64,
                      per_device_batch=4, progress=False)
  with pytest.raises(ValueError, match="embed the background images with the same"):
    cluster.cluster(mine["path"], str(tmp_path / "f"), threshold=0.5,
                    background=other["path"], progress=False)
  with pytest.raises(ValueError, match="give --threshold on normalised scores"):
    cluster.cluster(mine["path"], str(tmp_path / "f"), background=mine["path"],
                    progress=False)
  report = cluster.cluster(mine["path"], str(tmp_path / "f"), threshold=0.2,
                           background=mine["path"], plots=False, progress=False)
  assert report["score_norm"] == {"beta": 1.0, "neighbours": 10, "background_size": len(src)}


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
  r = _cli("dedup", "cluster", path, str(tmp_path / "g"), "--background", path)
  assert r.returncode == 2 and "give --threshold on normalised scores" in r.stderr
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
