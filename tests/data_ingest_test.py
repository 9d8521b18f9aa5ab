"""Tests for ingest (folders, webdataset tars) and the record format."""
import io
import json
import os
import subprocess
import sys
import tarfile

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from sd3jax.data import ingest as I
from sd3jax.data import records as R


def _encode(h, w, seed, fmt="JPEG"):
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format=fmt)
  return buf.getvalue()


# name -> (image bytes, caption or None, synthetic caption or None).
def _dataset():
  good = {
      "a": (_encode(32, 48, 0), "a photo of a cat", "A tabby cat sits on a red sofa."),
      "b": (_encode(40, 40, 1, "PNG"), "a dog", None),
      "c": (_encode(64, 32, 2), "  mountains at dusk \n", "Snowy peaks under an orange sky."),
      "d": (_encode(20, 30, 3), "a boat", None),
      "e": (_encode(30, 30, 4, "PNG"), "a cup", "A white cup of coffee."),
  }
  truncated = _encode(64, 64, 5)
  bad = {
      "broken": (truncated[:len(truncated) // 2], "a truncated jpeg", None),
      "nocap": (_encode(16, 16, 6), None, None),
  }
  return good, bad


def _write_folder(root, items):
  for name, (img, cap, syn) in items.items():
    ext = ".png" if img.startswith(b"\x89PNG") else ".jpg"
    path = os.path.join(root, name + ext)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(img)
    if cap is not None:
      with open(os.path.join(root, name + ".txt"), "w") as f:
        f.write(cap)
    if syn is not None:
      with open(os.path.join(root, name + ".json"), "w") as f:
        json.dump({"url": f"http://example.com/{name}", "caption_synthetic": syn}, f)


def _write_tar(path, items):
  """img2dataset layout: key.jpg, key.txt, key.json consecutive in the tar."""
  with tarfile.open(path, "w") as tar:
    for name, (img, cap, syn) in items.items():
      ext = "png" if img.startswith(b"\x89PNG") else "jpg"
      meta = {"key": name, "status": "success"}
      if syn is not None:
        meta["caption_synthetic"] = syn
      files = [(ext, img)] + ([("txt", cap.encode())] if cap is not None else []) + \
          [("json", json.dumps(meta).encode())]
      for e, data in files:
        info = tarfile.TarInfo(f"{name}.{e}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _check_records(out_dir, good, key_of):
  src = R.RecordSource(out_dir, kind=R.KIND_IMAGE_TEXT)
  assert len(src) == len(good)
  by_key = {src[i]["key"]: src[i] for i in range(len(src))}
  assert set(by_key) == {key_of(n) for n in good}
  sizes = src.image_sizes()
  for i in range(len(src)):
    assert tuple(sizes[i]) == (src[i]["height"], src[i]["width"])
  for name, (img, cap, syn) in good.items():
    ex = by_key[key_of(name)]
    assert ex["image"] == img  # Stored as found, no re-encoding.
    assert ex["caption_original"] == cap.strip()
    assert ex["caption_synthetic"] == (syn or "")
    with Image.open(io.BytesIO(img)) as im:
      assert (ex["height"], ex["width"]) == (im.height, im.width)
      assert ex["image_format"] == im.format.lower()
  return src


def test_folder_ingest_keeps_good_pairs_and_reports_bad(tmp_path):
  good, bad = _dataset()
  good = {("sub/" + k if k in "de" else k): v for k, v in good.items()}  # Nested folder.
  _write_folder(str(tmp_path / "in"), {**good, **bad})
  out = str(tmp_path / "out")
  summary = I.ingest(str(tmp_path / "in"), out, examples_per_shard=2, progress=False)
  assert summary["source_kind"] == "folder"
  assert summary["num_ok"] == 5 and summary["num_skipped"] == 2
  assert summary["skipped"] == {"corrupt_image": ["broken"], "missing_caption": ["nocap"]}
  assert summary["num_skipped_by_reason"] == {"corrupt_image": 1, "missing_caption": 1}
  assert {e["name"] for e in summary["errors"]} == {"broken", "nocap"}
  assert "truncated" in next(e["detail"] for e in summary["errors"] if e["name"] == "broken")
  # One shard per unit of examples_per_shard=2 names, bad ones included: 7 names, 4 shards
  # (a, b | broken, c | nocap, sub/d | sub/e), so any process split writes the same layout.
  assert summary["num_with_synthetic_caption"] == 3 and summary["num_shards"] == 4
  assert summary["complete"] and summary["num_units"] == 4 and summary["process_count"] == 1
  with open(os.path.join(out, I.SUMMARY_FILE)) as f:
    assert json.load(f) == summary
  src = _check_records(out, good, key_of=lambda n: n)
  assert src.manifest["ingest"]["num_ok"] == 5
  meta = next(src[i]["meta"] for i in range(len(src)) if src[i]["key"] == "a")
  assert meta["url"] == "http://example.com/a"


def test_webdataset_tar_ingest_keeps_good_pairs_and_reports_bad(tmp_path):
  good, bad = _dataset()
  os.makedirs(tmp_path / "shards")
  names = list({**good, **bad})
  items = {**good, **bad}
  _write_tar(str(tmp_path / "shards" / "00000.tar"), {n: items[n] for n in names[:4]})
  _write_tar(str(tmp_path / "shards" / "00001.tar"), {n: items[n] for n in names[4:]})
  out = str(tmp_path / "out")
  summary = I.ingest(str(tmp_path / "shards"), out, progress=False)
  assert summary["source_kind"] == "webdataset"
  assert summary["num_ok"] == 5 and summary["num_skipped"] == 2
  assert summary["skipped"] == {"corrupt_image": ["00001/broken"],
                                "missing_caption": ["00001/nocap"]}
  key_of = lambda n: ("00000/" if n in names[:4] else "00001/") + n
  _check_records(out, good, key_of)


def test_truncated_tar_keeps_records_before_the_cut(tmp_path):
  good, _ = _dataset()
  path = str(tmp_path / "00000.tar")
  _write_tar(path, good)
  with open(path, "rb") as f:
    data = f.read()
  # Cut inside the last record's image: the first four stay intact.
  with tarfile.open(path) as tar:
    last_img = [m for m in tar.getmembers() if m.name.startswith("e.")][0]
  with open(path, "wb") as f:
    f.write(data[:last_img.offset_data + last_img.size // 2])
  summary = I.ingest(path, str(tmp_path / "out"), progress=False)
  assert summary["num_ok"] == 4
  assert summary["skipped"]["unreadable"] == ["00000/<rest of tar>"]
  assert summary["skipped"]["missing_image"] == ["00000/e"]
  _check_records(str(tmp_path / "out"), {k: v for k, v in good.items() if k != "e"},
                 key_of=lambda n: "00000/" + n)


def test_ingest_refuses_to_overwrite(tmp_path):
  good, _ = _dataset()
  _write_folder(str(tmp_path / "in"), good)
  I.ingest(str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
  with pytest.raises(FileExistsError):
    I.ingest(str(tmp_path / "in"), str(tmp_path / "out"), progress=False)


def test_record_encoding_round_trip():
  ex = {
      "key": "k", "image": b"\x00\xff", "n": 3, "x": 1.5, "ok": True, "none": None,
      "meta": {"url": "u", "list": [1, "a"]},
      "latent_moments": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
      "text": {"clip_l": {"hidden": np.linspace(-2, 2, 12).astype(ml_dtypes.bfloat16).reshape(3, 4),
                          "pooled": np.ones(4, np.float16)}},
      "scalar": np.int64(7), "empty": np.zeros((0, 5), np.int8),
  }
  got = R.decode(R.encode(ex))
  assert got["key"] == "k" and got["image"] == b"\x00\xff" and got["n"] == 3
  assert got["meta"] == ex["meta"] and got["none"] is None and got["scalar"] == 7
  for a, b in ((got["latent_moments"], ex["latent_moments"]),
               (got["text"]["clip_l"]["hidden"], ex["text"]["clip_l"]["hidden"]),
               (got["text"]["clip_l"]["pooled"], ex["text"]["clip_l"]["pooled"]),
               (got["empty"], ex["empty"])):
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
  assert got["latent_moments"].flags.writeable
  with pytest.raises(TypeError):
    R.encode({"s": np.asarray(["a", "b"])})
  spec = R.feature_spec(ex)
  assert spec["latent_moments"] == {"dtype": "float32", "shape": [2, 3, 4]}
  assert spec["text"]["clip_l"]["hidden"] == {"dtype": "bfloat16", "shape": [3, 4]}


def test_shard_writer_is_atomic_and_manifest_verifies(tmp_path):
  out = str(tmp_path / "pre")
  # Shard 0 finishes; shard 1 dies half-way (as an interrupted precompute would).
  with R.ShardWriter(R.shard_path(out, 0), columns=("i",)) as w:
    for i in range(3):
      w.write({"i": i, "z": np.full(2, i, np.float32)})
  with pytest.raises(RuntimeError):
    with R.ShardWriter(R.shard_path(out, 1)) as w:
      w.write({"i": 3, "z": np.zeros(2, np.float32)})
      raise RuntimeError("killed")
  assert R.completed_shards(out) == [R.shard_path(out, 0)]
  assert not [n for n in os.listdir(out) if ".tmp-" in n]  # Aborted: temp removed.
  # A crash that leaves a temp file behind (no abort): still never listed.
  stale = R.ShardWriter(R.shard_path(out, 1))
  stale.write({"i": 3, "z": np.zeros(2, np.float32)})
  assert R.completed_shards(out) == [R.shard_path(out, 0)]
  with pytest.raises(FileNotFoundError, match="not finished"):
    R.RecordSource(out)
  assert len(R.remove_incomplete(out)) == 1
  # Redo shard 1, then publish with a count check.
  with R.ShardWriter(R.shard_path(out, 1), columns=("i",)) as w:
    for i in (3, 4):
      w.write({"i": i, "z": np.full(2, i, np.float32)})
  with pytest.raises(ValueError, match="expected 6"):
    R.write_manifest(out, kind=R.KIND_PRECOMPUTED, expected_num_examples=6)
  manifest = R.write_manifest(out, kind=R.KIND_PRECOMPUTED, expected_num_examples=5,
                              producer={"vae": "sha256:abc", "dtype": "float32"})
  assert [s["num_examples"] for s in manifest["shards"]] == [3, 2]
  src = R.RecordSource(out, kind=R.KIND_PRECOMPUTED)
  assert [src[i]["i"] for i in range(len(src))] == [0, 1, 2, 3, 4]
  assert src.column("i").tolist() == [0, 1, 2, 3, 4]
  np.testing.assert_array_equal(src[4]["z"], [4, 4])
  assert src.manifest["producer"]["vae"] == "sha256:abc"
  with pytest.raises(ValueError, match="expected 'image_text'"):
    R.RecordSource(out, kind=R.KIND_IMAGE_TEXT)
  with pytest.raises(IndexError):
    src[5]
  # A shard that no longer matches its manifest is an error, not silent data.
  os.replace(R.shard_path(out, 1), R.shard_path(out, 1) + ".bak")
  with R.ShardWriter(R.shard_path(out, 1)) as w:
    w.write({"i": 3, "z": np.zeros(2, np.float32)})
  with pytest.raises(ValueError, match="does not hold"):
    R.RecordSource(out)


def test_captions_that_are_not_utf8_are_skipped_by_name_or_read_in_their_encoding(tmp_path):
  """No caption is stored with bytes replaced; an empty image file says so in plain words."""
  root = tmp_path / "in"
  root.mkdir()
  (root / "ok.jpg").write_bytes(_encode(8, 8, 0))
  (root / "ok.txt").write_text("a red circle")
  (root / "latin.jpg").write_bytes(_encode(8, 8, 1))
  (root / "latin.txt").write_bytes("a café".encode("latin-1"))  # 0xe9: not UTF-8
  (root / "empty.jpg").write_bytes(b"")
  (root / "empty.txt").write_text("nothing")
  summary = I.ingest(str(root), str(tmp_path / "strict"), progress=False)
  assert summary["num_ok"] == 1
  assert summary["skipped"] == {"bad_caption_encoding": ["latin"], "corrupt_image": ["empty"]}
  details = {e["name"]: e["detail"] for e in summary["errors"]}
  assert details["latin"].startswith("the caption is not valid utf-8 (byte 0xe9 at position 5)")
  assert "caption_encoding" in details["latin"]
  assert details["empty"] == "the image file is empty (0 bytes)"
  summary = I.ingest(str(root), str(tmp_path / "latin1"), progress=False,
                     caption_encoding="latin-1")
  assert summary["num_ok"] == 2
  src = R.RecordSource(str(tmp_path / "latin1"), kind=R.KIND_IMAGE_TEXT)
  assert sorted(src[i]["caption_original"] for i in range(len(src))) == ["a café", "a red circle"]


# ----------------------------------------------------------------------------
# Sharded ingest: processes, resume, refusals.
# ----------------------------------------------------------------------------
def _source(tmp_path, kind):
  """The good and bad pairs as a nested folder, or as three tars (the last cut short)."""
  good, bad = _dataset()
  items = {**good, **bad}
  if kind == "folder":
    _write_folder(str(tmp_path / "in"), {("sub/" + k if k in "de" else k): v
                                         for k, v in items.items()})
    return str(tmp_path / "in")
  os.makedirs(tmp_path / "in")
  for i, names in enumerate(["a b broken".split(), "c nocap".split(), "d e".split()]):
    _write_tar(str(tmp_path / "in" / f"{i:05d}.tar"), {n: items[n] for n in names})
  path = str(tmp_path / "in" / "00002.tar")
  with tarfile.open(path) as tar:
    cut = [m for m in tar.getmembers() if m.name.startswith("e.")][0]
  with open(path, "r+b") as f:
    f.truncate(cut.offset_data + cut.size // 2)
  return str(tmp_path / "in")


def _all_records(out_dir):
  src = R.RecordSource(out_dir, kind=R.KIND_IMAGE_TEXT)
  return [src[i] for i in range(len(src))]


def _same_set(a, b):
  """Two ingests of one source: same records in order, same summary (but for timing and who
  ran it), same shards."""
  drop = ("out_dir", "seconds", "process_count")
  with open(os.path.join(a, I.SUMMARY_FILE)) as fa, open(os.path.join(b, I.SUMMARY_FILE)) as fb:
    sa, sb = json.load(fa), json.load(fb)
  assert {k: v for k, v in sa.items() if k not in drop} == \
      {k: v for k, v in sb.items() if k not in drop}
  assert _all_records(a) == _all_records(b)
  ma, mb = R.read_manifest(a), R.read_manifest(b)
  for k in ("shards", "features", "producer", "ingest", "num_examples"):
    assert ma[k] == mb[k], k


@pytest.mark.parametrize("kind", ["folder", "webdataset"])
def test_two_processes_write_what_one_process_writes(tmp_path, kind):
  source = _source(tmp_path, kind)  # Folder: one name per unit, so some shards are empty.
  one = I.ingest(source, str(tmp_path / "one"), examples_per_shard=1, progress=False)
  two = str(tmp_path / "two")
  first = I.ingest(source, two, examples_per_shard=1, progress=False,
                   process_index=0, process_count=2)
  # Process 1 has not run: process 0 reports its own units and publishes nothing.
  mine = 4 if kind == "folder" else 2  # units 0, 2, ... of 7 names or 3 tars
  assert not first["complete"] and first["num_units_done"] == first["num_shards"] == mine
  assert not os.path.exists(os.path.join(two, R.MANIFEST))
  assert not os.path.exists(os.path.join(two, I.SUMMARY_FILE))
  second = I.ingest(source, two, examples_per_shard=1, progress=False,
                    process_index=1, process_count=2)
  assert second["complete"] and second["process_count"] == 2
  assert second["num_shards"] == second["num_units"] == one["num_units"]
  for key in ("num_ok", "num_skipped", "num_skipped_by_reason", "skipped", "errors",
              "num_with_synthetic_caption"):
    assert second[key] == one[key], key
  # The cut tar loses e (missing_image) and reports its unreadable rest.
  assert (one["num_ok"], one["num_skipped"]) == ((4, 4) if kind == "webdataset" else (5, 2))
  _same_set(str(tmp_path / "one"), two)
  # A late process of a multi-process run finds the set complete: its summary, no error.
  assert I.ingest(source, two, examples_per_shard=1, progress=False,
                  process_index=0, process_count=2) == second
  with pytest.raises(FileExistsError, match="complete"):  # One process: a fresh ingest, refused.
    I.ingest(source, two, examples_per_shard=1, progress=False)


def test_interrupted_ingest_resumes_without_redoing_finished_units(tmp_path, monkeypatch):
  source = _source(tmp_path, "folder")  # units: a b | broken c | nocap sub/d | sub/e
  I.ingest(source, str(tmp_path / "fresh"), examples_per_shard=2, progress=False)
  out = tmp_path / "out"
  out.mkdir()
  live = out / ".shard-00001.array_record.tmp-1-live"  # process 1's shard, being written
  live.write_bytes(b"...")
  I.ingest(source, str(out), examples_per_shard=2, progress=False,
           process_index=0, process_count=2)
  assert live.exists()  # Not process 0's to remove.
  candidate = I._candidate

  def dies_at_sub_e(name, *args):
    if name == "sub/e":
      raise RuntimeError("killed")
    return candidate(name, *args)
  monkeypatch.setattr(I, "_candidate", dies_at_sub_e)
  with pytest.raises(RuntimeError, match="killed"):
    I.ingest(source, str(out), examples_per_shard=2, progress=False,
             process_index=1, process_count=2)
  assert not live.exists()  # Process 1 cleared its own stale temporary.
  assert sorted(os.listdir(out)) == sorted(
      [I.PLAN_FILE] + [R.shard_name(u) + e for u in range(3) for e in ("", ".json")])
  (out / ".shard-00003.array_record.tmp-2-dead").write_bytes(b"...")  # as a kill leaves it
  mtimes = {p: os.stat(p).st_mtime_ns for p in R.completed_shards(str(out))}
  seen = []
  monkeypatch.setattr(I, "_candidate", lambda name, *a: seen.append(name) or candidate(name, *a))
  summary = I.ingest(source, str(out), examples_per_shard=2, progress=False)  # now 1 process
  assert summary["complete"] and seen == ["sub/e"]  # Only the unfinished unit is read.
  assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
  _same_set(str(tmp_path / "fresh"), str(out))


def test_rerun_with_other_arguments_or_into_other_records_is_refused(tmp_path):
  source = _source(tmp_path, "folder")
  out = str(tmp_path / "out")
  I.ingest(source, out, examples_per_shard=2, progress=False, process_index=0, process_count=2)
  with pytest.raises(I.IngestPlanError, match=r"\(its ingest_plan.json\): examples_per_shard 2 "
                     r"there, 3 now; num_units 4 there, 3 now\. Use a new out_dir or the same "
                     r"arguments\."):
    I.ingest(source, out, examples_per_shard=3, progress=False, process_index=1, process_count=2)
  with pytest.raises(I.IngestPlanError, match="caption_encoding None there, 'latin-1' now"):
    I.ingest(source, out, examples_per_shard=2, progress=False, caption_encoding="latin-1")
  (tmp_path / "in" / "new.txt").write_text("one more caption")  # moves the unit boundaries
  with pytest.raises(I.IngestPlanError, match="names_sha256"):
    I.ingest(source, out, examples_per_shard=2, progress=False, process_index=1, process_count=2)
  other = str(tmp_path / "other")
  R.write_records(other, [{"key": "k", "height": 1, "width": 1}], kind=R.KIND_IMAGE_TEXT)
  with pytest.raises(FileExistsError, match="not from this ingest"):
    I.ingest(source, other, progress=False)


def test_two_concurrent_processes_write_what_one_process_writes(tmp_path):
  """As two hosts would run it: `python -m sd3jax.data.ingest` twice at once, no coordinator."""
  source = _source(tmp_path, "webdataset")
  I.ingest(source, str(tmp_path / "one"), progress=False)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sd3jax.data.ingest", source, str(tmp_path / "two"), "--no_progress",
       "--process_index", str(i), "--process_count", "2"], cwd=root, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert sum('"complete": true' in out for out, _ in outs) >= 1  # The last one merged.
  _same_set(str(tmp_path / "one"), str(tmp_path / "two"))
