"""Pair verification (sd3jax.dedup.verify) and its place in `dedup cluster`.

How well it separates copies from distinct scenes is measured by `sd3jax dedup demo` on
thousands of pairs (README, "Deduplication"). These tests check that the alignment finds
a known edit, that a copy scores below a one-object change, and that `cluster` joins
exactly the candidates that verification accepts.
"""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from sd3jax.data import records, shapes
from sd3jax.data.producer import open_source
from sd3jax.dedup import DedupError, cluster, descriptors, embed, filter as filter_lib, verify

import subprocess_env

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OBJECTS = [{"cell": 0, "color": "blue", "shape": "circle", "size": "small", "jitter": (0.3, 0.0)},
           {"cell": 4, "color": "red", "shape": "triangle", "size": "large", "jitter": (0.0, 0.0)},
           {"cell": 8, "color": "green", "shape": "square", "size": "small", "jitter": (0.0, -0.4)}]


def _scene(objects=OBJECTS, background="white"):
  return shapes.render(objects, 64, 64, background)


def _shape_swapped():
  """The same scene with the small blue circle drawn as a square: a distinct image."""
  return _scene([dict(OBJECTS[0], shape="square")] + OBJECTS[1:])


def _crop(image, keep_y, keep_x, y0, x0):
  h, w = image.shape[:2]
  ch, cw = round(h * keep_y), round(w * keep_x)
  im = Image.fromarray(image).crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
  return np.asarray(im), (ch, cw)


def _edited(image):
  """Crop + colour + JPEG: every kind of edit the demo's copies get, at once."""
  im = Image.fromarray(_crop(image, 0.93, 0.96, 3, 1)[0])
  for enhance, f in ((ImageEnhance.Brightness, 1.08), (ImageEnhance.Contrast, 0.92),
                     (ImageEnhance.Color, 1.07)):
    im = enhance(im).enhance(f)
  buf = io.BytesIO()
  im.save(buf, format="JPEG", quality=70)
  return np.asarray(Image.open(buf).convert("RGB"))


def _verify(pairs):
  """verify_images on a list of (a, b), padded to 8 pairs: one compiled shape for the tests."""
  a = np.zeros((8, 64, 64, 3), np.uint8)
  b = np.zeros((8, 64, 64, 3), np.uint8)
  for k, (x, y) in enumerate(pairs):
    a[k], b[k] = x, y
  return {key: v[:len(pairs)] for key, v in verify.verify_images(a, b).items()}


def test_alignment_recovers_a_known_crop():
  a = _scene()
  b, (ch, cw) = _crop(a, 0.92, 0.95, 2, 1)
  out = _verify([(a, b)])
  sy, sx, ty, tx = out["theta"][0]
  # b's frame coordinate of a's: u_b = (u_a + 0.5 - offset / 64) * 64 / kept - 0.5.
  np.testing.assert_allclose([sy, sx], [64 / ch, 64 / cw], atol=0.01)
  np.testing.assert_allclose([ty, tx], [(0.5 - 2 / 64) * 64 / ch - 0.5,
                                        (0.5 - 1 / 64) * 64 / cw - 0.5], atol=0.3 / 64)
  assert out["overlap"][0] > 0.85


def test_a_copy_scores_below_a_one_object_change():
  a = _scene()
  pairs = [(a, a), (a, _edited(a)), (a, _shape_swapped()),
           (a, _scene(OBJECTS[:2])), (a, _scene([dict(OBJECTS[0], color="red")] + OBJECTS[1:]))]
  s = _verify(pairs)
  same, copy, swap, removed, recoloured = s["score"]
  assert same < 0.01  # 2.5 / 255: the fit lands within a hair of the identity
  assert copy < min(swap, removed, recoloured)
  # The shape swap is the hardest: a few corner pixels; still twice the copy's score.
  assert swap > 2 * copy, s["score"]


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
  """Records: a scene, an edited copy of it, its shape-swapped twin, and other scenes."""
  path = str(tmp_path_factory.mktemp("verify") / "records")
  images = [_scene(), _edited(_scene()), _shape_swapped()]
  images += [shapes.make_example(i, seed=5)["image"] for i in range(13)]

  def examples():
    for k, im in enumerate(images):
      yield {"key": f"img-{k:03d}", "image": shapes.encode_png(im), "image_format": "png",
             "height": 64, "width": 64, "caption_original": "", "caption_synthetic": "",
             "meta": {}}
  records.write_records(path, examples(), kind=records.KIND_IMAGE_TEXT, examples_per_shard=8,
                        columns=("height", "width"))
  return path


def test_cluster_joins_exactly_the_verified_candidates(trio, tmp_path):
  src = open_source(trio)
  emb = embed.embed(src, str(tmp_path / "emb"), descriptors.thumbnail(), part_size=8,
                    per_device_batch=2, progress=False)
  x, _ = embed.load_descriptors(emb["path"])
  # The thumbnail puts the twin as close as the copy (or closer): both are candidates.
  threshold = float(min(x[0] @ x[1], x[0] @ x[2])) - 1e-3
  truth = _verify([(_scene(), descriptors.prepare(src[k]["image"], 64)) for k in (1, 2)])["score"]
  cut = float(truth.mean())  # between the copy's score and the twin's
  out = str(tmp_path / "filter")
  report = cluster.cluster(emb["path"], out, threshold=threshold, source=src,
                           verify_threshold=cut, progress=False)
  cand = np.load(os.path.join(out, cluster.CANDIDATES))
  assert report["num_candidates"] == len(cand["i"]) >= 2
  pairs = {(int(i), int(j)): float(v) for i, j, v in zip(cand["i"], cand["j"], cand["verify_score"])}
  np.testing.assert_allclose([pairs[(0, 1)], pairs[(0, 2)]], truth, rtol=1e-4, atol=1e-5)
  assert report["num_pairs"] == sum(v <= cut for v in pairs.values())
  _, drop = filter_lib.load_filter(out)
  assert 1 in drop.tolist() or 0 in drop.tolist()  # the copy pair is one cluster ...
  assert 2 not in drop.tolist()  # ... and the twin stays
  assert report["verify"]["threshold"] == cut and os.path.exists(os.path.join(out, "pairs.png"))
  # Without verification the same candidates all join.
  plain = cluster.cluster(emb["path"], str(tmp_path / "plain"), threshold=threshold, source=src,
                          plots=False, progress=False)
  assert plain["num_pairs"] == report["num_candidates"] and plain["verify"] is None


def test_verification_without_the_images_or_a_threshold_is_refused(trio, tmp_path):
  src = open_source(trio)
  emb = embed.embed(src, str(tmp_path / "emb"), descriptors.thumbnail(), part_size=8,
                    per_device_batch=2, progress=False)
  with pytest.raises(DedupError, match="no measured verification threshold"):
    cluster.cluster(emb["path"], str(tmp_path / "f"), threshold=0.9, source=src, verify=True)
  r = subprocess.run([sys.executable, "-m", "sd3jax.cli", "dedup", "cluster", emb["path"],
                      str(tmp_path / "f"), "--threshold", "0.9", "--verify_threshold", "0.1"],
                     capture_output=True, text=True, cwd=ROOT, env=subprocess_env.env(),
                     timeout=300)
  assert r.returncode == 2 and "give --source" in r.stderr, r.stderr
  assert not os.path.exists(tmp_path / "f")  # nothing half-written


def test_stored_settings_round_trip_and_older_ones_keep_full_chroma_weight():
  cfg = verify.VerifyConfig()
  assert verify.config_from_dict(verify.config_dict(cfg)) == cfg
  older = {k: v for k, v in verify.config_dict(cfg).items() if k != "chroma_weight"}
  assert verify.config_from_dict(older).chroma_weight == 1.0 != cfg.chroma_weight
