"""Tests for the shapes prompt-following checker and the FID / CLIP-score hooks.

Chance level of a category = the score of a prompt-blind generator: random
validation-split scenes scored against the prompts. Measured with 200 prompts
per category at 64 px: single_object 0.42, color 0.12, position 0.01, count
0.00, two_objects 0.005 (attributes: colour 0.16, shape 0.35, position 0.12;
a blind guess is 1/7, 1/3, 1/9). The tests measure it again on their own
prompts, and noise images must not score above it (+ 0.05).
"""
import logging

import numpy as np
import pytest
import scipy.linalg
from PIL import Image
from scipy import ndimage

from sd3jax import job
from sd3jax.data import shapes as S
from sd3jax.evals import features as F
from sd3jax.evals import shapes_checker as C

N_PER_CATEGORY = 40


def _specs(n=N_PER_CATEGORY, seed=0):
  return [s for cat in S.EVAL_CATEGORIES for s in S.sample_eval_prompts(cat, n, seed=seed)]


def _perturb(image, noise, blur, rng):
  x = image.astype(np.float32) / 255.0
  if blur:
    x = ndimage.gaussian_filter(x, (blur, blur, 0))
  if noise:
    x = x + rng.normal(0.0, noise, x.shape)
  return np.clip(x, 0.0, 1.0)


def _scene(objs, background="white", size=64):
  objects = [dict(o, size=o.get("size", "large"), position=S.POSITIONS[o["cell"]],
                  jitter=[0.0, 0.0]) for o in objs]
  objects = [dict(o, **S.object_geometry(o, size, size)) for o in objects]
  return S.render(objects, size, size, background)


def _spec(category, *objs):
  return {"category": category, "prompt": "", "count": len(objs),
          "objects": [dict(shape=o[0], color=o[1], position=o[2]) for o in objs]}


def _assert_all_at_least(scores, bound, label):
  keys = list(S.EVAL_CATEGORIES) + ["attribute_color", "attribute_shape", "attribute_position"]
  low = {k: scores[k] for k in keys if scores[k] < bound}
  assert not low, f"{label}: {low} below {bound} (all: {scores})"


# ----------------------------------------------------------------------------
# Ground truth: renders of prompts and of the validation split.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("hw,distractors", [((64, 64), 0), ((64, 64), 2), ((32, 32), 0),
                                            ((32, 32), 2), ((48, 80), 1)])
def test_oracle_renders_score_at_least_98_percent(hw, distractors):
  specs = _specs()
  images = []
  for i, spec in enumerate(specs):
    image, objects = C.render_prompt(spec, seed=i, height=hw[0], width=hw[1],
                                     distractors=distractors)
    assert len(objects) == spec["count"] + distractors
    images.append(image)
  scores = C.score_images(images, specs)
  assert scores["n"] == len(specs) and scores[f"n_{S.EVAL_CATEGORIES[0]}"] == N_PER_CATEGORY
  # Denominators of the single-object attributes: see the shapes_checker docstring.
  assert scores["n_attribute_shape"] == 3 * N_PER_CATEGORY
  assert scores["n_attribute_color"] == 2 * N_PER_CATEGORY
  assert scores["n_attribute_position"] == N_PER_CATEGORY
  _assert_all_at_least(scores, 0.98, f"renders {hw} distractors={distractors}")
  assert scores["overall"] >= 0.98


@pytest.mark.parametrize("hw", [(64, 64), (32, 32), (64, 96)])
def test_validation_split_objects_recovered(hw):
  n, exact = 100, 0
  for i in range(n):
    ex = S.make_example(i, split="validation", height=hw[0], width=hw[1])
    truth = sorted((o["color"], o["shape"], o["position"]) for o in ex["objects"])
    # Background estimated from the border, and given by name: same answer.
    for background in (None, ex["background"]):
      found = C.detect_objects(ex["image"], background)
      exact += sorted((d["color"], d["shape"], d["position"]) for d in found) == truth
  assert exact / (2 * n) >= 0.98, exact


def test_detections_geometry_and_inputs():
  ex = S.make_example(5, split="validation", height=64, width=64)
  found = C.detect_objects(ex["image"])
  assert len(found) == len(ex["objects"])
  for d, o in zip(found, sorted(ex["objects"], key=lambda o: o["cell"])):
    assert d["cell"] == o["cell"] and d["position"] == S.POSITIONS[o["cell"]]
    y0, x0, y1, x1 = o["bbox"]
    assert y0 - 1 <= d["bbox"][0] and d["bbox"][2] <= y1 + 1
    assert x0 - 1 <= d["bbox"][1] and d["bbox"][3] <= x1 + 1
    true_area = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[o["shape"]] * (y1 - y0) ** 2
    assert d["area"] == pytest.approx(true_area, rel=0.1)
    if o["shape"] != "triangle":  # Centroid = box centre.
      np.testing.assert_allclose(d["center"], o["center"], atol=0.3)
  # float [0, 1], HW4 and a given RGB background: same detections.
  as_float = C.detect_objects(ex["image"].astype(np.float32) / 255.0)
  rgba = np.concatenate([ex["image"], np.full(ex["image"].shape[:2] + (1,), 255, np.uint8)], -1)
  for other in (as_float, C.detect_objects(rgba, S.BACKGROUNDS[ex["background"]])):
    assert [(d["color"], d["shape"], d["cell"]) for d in other] == \
        [(d["color"], d["shape"], d["cell"]) for d in found]
  blank = np.full((64, 64, 3), 250, np.uint8)
  assert C.detect_objects(blank) == []
  with pytest.raises(ValueError):
    C.detect_objects(np.zeros((8, 8, 2), np.uint8))
  with pytest.raises(ValueError):
    C.detect_objects(blank, background="pink")


def test_split_object_is_merged_and_speckle_ignored():
  spec = _spec("color", ("square", "blue", "center"))
  image, objects = C.render_prompt(spec, seed=3, height=64, width=64, background="white")
  y0, x0, y1, x1 = objects[0]["bbox"]
  cut = image.copy()
  cut[int((y0 + y1) / 2), :] = S.BACKGROUNDS["white"]  # A 1-pixel seam across the square.
  rng = np.random.default_rng(0)
  for y, x in rng.integers(0, 64, size=(12, 2)):  # Isolated palette-coloured pixels.
    cut[y, x] = S.COLORS["red"]
  found = C.detect_objects(cut)
  assert [(d["color"], d["shape"], d["position"]) for d in found] == [("blue", "square", "center")]
  assert C.detect_objects(cut, merge_gap=0) != found  # The merge is what restores it.


# ----------------------------------------------------------------------------
# Robustness and chance.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("hw,noise,blur", [(64, 0.05, 1.0), (64, 0.1, 1.0), (32, 0.05, 0.5)])
def test_robust_to_noise_and_blur(hw, noise, blur):
  specs = _specs()
  rng = np.random.default_rng(1)
  images = [_perturb(C.render_prompt(s, seed=i, height=hw, width=hw)[0], noise, blur, rng)
            for i, s in enumerate(specs)]
  scores = C.score_images(images, specs)
  _assert_all_at_least(scores, 0.90, f"{hw} px, noise {noise}, blur {blur}")


def test_robust_to_off_palette_colours(monkeypatch):
  """A model's colours are near, not on, the palette: shift each by 40 (RGB L2)."""
  rng = np.random.default_rng(3)
  for name, rgb in list(S.COLORS.items()):
    d = rng.normal(size=3)
    shifted = np.clip(np.asarray(rgb) + 40.0 * d / np.linalg.norm(d), 0, 255)
    monkeypatch.setitem(S.COLORS, name, tuple(int(v) for v in shifted))
  specs = _specs()
  images = [_perturb(C.render_prompt(s, seed=i)[0], 0.03, 0.7, rng) for i, s in enumerate(specs)]
  _assert_all_at_least(C.score_images(images, specs), 0.90, "shifted colours")


def _blob_noise(rng, size):
  """Smooth random colour fields: the hardest noise for a colour-region detector."""
  small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
  return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR))


@pytest.mark.parametrize("size", [64, 32])
def test_noise_images_score_at_most_chance(size):
  specs = _specs()
  chance = C.score_images(
      [S.make_example(i, split="validation", height=size, width=size)["image"]
       for i in range(len(specs))], specs)
  # The prompt-blind generator: above zero where a random scene can satisfy a prompt.
  assert 0.3 <= chance["single_object"] <= 0.65 and chance["color"] <= 0.25
  rng = np.random.default_rng(2)
  shape = (size, size, 3)
  noises = {
      "uniform": lambda: rng.random(shape),
      "blurred_1": lambda: ndimage.gaussian_filter(rng.random(shape), (1, 1, 0)),
      "blurred_2": lambda: ndimage.gaussian_filter(rng.random(shape), (2, 2, 0)),
      "blobs": lambda: _blob_noise(rng, size),
  }
  for name, make in noises.items():
    scores = C.score_images([make() for _ in specs], specs)
    for cat in S.EVAL_CATEGORIES:
      assert scores[cat] <= chance[cat] + 0.05, (name, cat, scores, chance)
    for key, guess in (("color", 1 / 7), ("shape", 1 / 3), ("position", 1 / 9)):
      assert scores[f"attribute_{key}"] <= guess + 0.05, (name, key, scores)
    if name != "blobs":  # Nothing object-like in pixel noise at all.
      assert scores["overall"] <= 0.02, (name, scores)


# ----------------------------------------------------------------------------
# Scoring rules.
# ----------------------------------------------------------------------------
def test_scoring_rules_per_category():
  img = _scene([{"shape": "circle", "color": "red", "cell": 0},
                {"shape": "circle", "color": "red", "cell": 4},
                {"shape": "square", "color": "blue", "cell": 8, "size": "small"}])
  cases = [
      (_spec("single_object", ("circle", None, None)), True),
      (_spec("single_object", ("triangle", None, None)), False),
      (_spec("color", ("square", "blue", None)), True),
      (_spec("color", ("square", "red", None)), False),
      (_spec("position", ("circle", "red", "center")), True),
      (_spec("position", ("circle", "red", "bottom right")), False),
      (_spec("position", ("square", "blue", "bottom right")), True),
      (_spec("count", *[("circle", "red", None)] * 2), True),
      (_spec("count", *[("circle", "red", None)] * 3), False),  # Exactly N.
      (_spec("count", *[("square", "blue", None)] * 2), False),
      (_spec("two_objects", ("circle", "red", None), ("square", "blue", None)), True),
      (_spec("two_objects", ("circle", "red", None), ("square", "green", None)), False),
  ]
  for spec, expected in cases:
    result = C.score_prompt(img, spec)
    assert result["correct"] is expected, (spec, result["details"])
  # Two objects must be two distinct detections.
  one = _scene([{"shape": "circle", "color": "red", "cell": 0}])
  assert not C.score_prompt(one, _spec("two_objects", ("circle", "red", None),
                                       ("circle", None, None)))["correct"]
  with pytest.raises(ValueError):
    C.score_prompt(img, _spec("relation", ("circle", None, None)))


def test_single_object_attributes_use_the_dominant_object():
  # A large green triangle (dominant) and a small red circle, for "a red circle on the left".
  img = _scene([{"shape": "triangle", "color": "green", "cell": 3},
                {"shape": "circle", "color": "red", "cell": 8, "size": "small"}])
  result = C.score_prompt(img, _spec("position", ("circle", "red", "left")))
  assert not result["correct"]
  d = result["details"]
  assert d["dominant"] == {"color": "green", "shape": "triangle", "position": "left"}
  assert [d[f"attribute_{k}"] for k in ("color", "shape", "position")] == [False, False, True]
  blank = np.full((64, 64, 3), 250, np.uint8)  # No detection: wrong on every attribute.
  r = C.score_prompt(blank, _spec("color", ("square", "blue", None)))
  assert r["details"]["attribute_color"] is False and "attribute_position" not in r["details"]
  # Attributes no prompt names are absent from the summary, not 0.
  s = C.score_images([img], [_spec("single_object", ("triangle", None, None))])
  assert s["attribute_shape"] == 1.0
  assert "attribute_color" not in s and "attribute_position" not in s
  assert s["overall"] == s["single_object"] == 1.0 and "count" not in s
  with pytest.raises(ValueError):
    C.score_images([img, img], [_spec("color", ("square", "blue", None))])


def test_objects_drawn_against_asked():
  three = _scene([{"shape": "circle", "color": "red", "cell": 0},
                  {"shape": "circle", "color": "red", "cell": 4},
                  {"shape": "square", "color": "blue", "cell": 8}])
  two = _scene([{"shape": "circle", "color": "red", "cell": 2},
                {"shape": "triangle", "color": "green", "cell": 6}])
  specs = [_spec("color", ("circle", "red", None)),                      # 3 drawn, 1 asked
           _spec("single_object", ("triangle", None, None)),             # 2 drawn, 1 asked
           _spec("count", *[("circle", "red", None)] * 2),               # 3 drawn, 2 asked
           _spec("two_objects", ("circle", "red", None), ("triangle", "green", None))]
  s = C.score_images([three, two, three, two], specs)
  assert s["count"] == 1.0 and s["two_objects"] == 1.0  # other objects are allowed there
  assert s["extra_objects_single"] == pytest.approx(1.5)  # (2 + 1) / 2
  assert s["extra_objects_multi"] == pytest.approx(0.5)   # (1 + 0) / 2
  assert s["exact_objects_multi"] == pytest.approx(0.5)
  only_single = C.score_images([two], specs[1:2])
  assert "extra_objects_multi" not in only_single and "exact_objects_multi" not in only_single
  assert s["empty_single"] == 0.0


def test_shape_by_prompt_kind_and_empty_images():
  """Shape accuracy per single-object category, and the one-object images with nothing in
  them: a blank image is a missed shape of its category and counts as empty."""
  triangle = _scene([{"shape": "triangle", "color": "green", "cell": 4}])
  blank = np.full((64, 64, 3), 250, np.uint8)
  specs = [_spec("single_object", ("triangle", None, None)),
           _spec("single_object", ("circle", None, None)),     # blank: missed, empty
           _spec("color", ("triangle", "green", None)),
           _spec("color", ("square", "green", None)),          # a triangle: wrong, not empty
           _spec("position", ("triangle", "green", "center")),
           _spec("count", *[("circle", "red", None)] * 2)]     # blank, but not one-object
  s = C.score_images([triangle, blank, triangle, triangle, triangle, blank], specs)
  assert s["attribute_shape_single_object"] == 0.5
  assert s["attribute_shape_color"] == 0.5
  assert s["attribute_shape_position"] == 1.0
  assert s["attribute_shape"] == pytest.approx(3 / 5)
  assert s["empty_single"] == pytest.approx(1 / 5)
  line = job.shape_by_prompt_line(s)
  assert line == ("shape by prompt: shape only 0.50, with colour 0.50, with colour and "
                  "position 1.00; no object drawn for 20% of one-object prompts")
  only = C.score_images([triangle], specs[2:3])
  assert set(k for k in only if k.startswith("attribute_shape_")) == {"attribute_shape_color"}
  assert job.shape_by_prompt_line({"overall": 1.0}) == ""


# ----------------------------------------------------------------------------
# FID and CLIP score.
# ----------------------------------------------------------------------------
def _exact_samples(rng, n, mean, cov):
  """Samples whose empirical mean and covariance are exactly `mean` and `cov`."""
  z = rng.normal(size=(n, len(mean)))
  z -= z.mean(0)
  z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # Whitened.
  return z @ np.linalg.cholesky(cov).T + mean


def test_fid_closed_forms():
  rng = np.random.default_rng(0)
  d = 16
  a = rng.normal(size=(400, d))
  assert F.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
  # Shifted Gaussians with one covariance: FID = |mu1 - mu2|^2.
  q = np.linalg.qr(rng.normal(size=(d, d)))[0]
  cov = q @ np.diag(rng.uniform(0.5, 2.0, d)) @ q.T
  shift = rng.normal(size=d)
  x = _exact_samples(rng, 500, np.zeros(d), cov)
  y = _exact_samples(rng, 700, shift, cov)
  assert F.fid_from_features(x, y) == pytest.approx(shift @ shift, rel=1e-6)
  # Diagonal covariances: FID = |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2.
  s1, s2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
  expected = shift @ shift + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
  assert F.fid_from_stats(np.zeros(d), np.diag(s1), shift, np.diag(s2)) == pytest.approx(expected)
  # General covariances: the symmetric form tr((S1^1/2 S2 S1^1/2)^1/2).
  m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  c1, c2 = m1 @ m1.T / d + 0.1 * np.eye(d), m2 @ m2.T / d + 0.1 * np.eye(d)
  r1 = scipy.linalg.sqrtm(c1).real
  tr = np.trace(scipy.linalg.sqrtm(r1 @ c2 @ r1).real)
  assert F.fid_from_stats(np.zeros(d), c1, np.zeros(d), c2) == pytest.approx(
      np.trace(c1) + np.trace(c2) - 2 * tr, rel=1e-6)
  # Fewer samples than dimensions: singular covariances, still finite and >= 0.
  few = F.fid_from_features(rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.5)
  assert np.isfinite(few) and few > 0
  with pytest.raises(ValueError):
    F.fid_from_features(a, a[:, :3])
  with pytest.raises(ValueError):
    F.fid_from_features(a[:1], a)


def test_clip_score():
  img = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  txt = np.array([[3.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
  # cos = 1, -1 (clamped to 0), 1/sqrt(2).
  assert F.clip_score(img, txt) == pytest.approx(100.0 * (1.0 + 0.0 + 2 ** -0.5) / 3)
  with pytest.raises(ValueError):
    F.clip_score(img, txt[:2])


def test_networks_absent_unless_configured(tmp_path, caplog):
  with caplog.at_level(logging.INFO):
    assert F.load_feature_network("") is None
    assert F.load_clip_network(None) is None
  assert "FID: not computed (config.eval.fid_network is empty)" in caplog.text
  assert "CLIP score: not computed (config.eval.clip_network is empty)" in caplog.text
  images = np.random.default_rng(0).random((6, 16, 16, 3)).astype(np.float32)
  assert F.compute_fid(None, images, images) is None
  assert F.compute_clip_score(None, images, ["a"] * 6) is None
  assert F.present({"fid": None, "clip_score": None, "loss": 0.5}) == {"loss": 0.5}
  # A configured local factory ("bring a callable").
  (tmp_path / "nets.py").write_text(
      "import numpy as np\n"
      "def mean_color():\n"
      "  return lambda images: np.asarray(images).reshape(len(images), -1, 3).mean(1)\n"
      "class _Clip:\n"
      "  def embed_images(self, images):\n"
      "    return np.asarray(images).reshape(len(images), -1, 3).mean(1)\n"
      "  def embed_texts(self, texts):\n"
      "    return np.ones((len(texts), 3))\n"
      "def clip():\n"
      "  return _Clip()\n"
      "def not_a_clip():\n"
      "  return 3\n")
  net = F.load_feature_network(f"{tmp_path}/nets.py:mean_color")
  fid = F.compute_fid(net, images, images[::-1], batch_size=4)
  assert fid == pytest.approx(0.0, abs=1e-9)
  shifted = F.compute_fid(net, images, F.feature_stats(net(images) + 0.25))  # Cached stats.
  assert shifted == pytest.approx(3 * 0.25 ** 2, rel=1e-6)
  uint8 = (images * 255).astype(np.uint8)  # uint8 images are scaled to [0, 1].
  assert F.compute_fid(net, uint8, images) == pytest.approx(0.0, abs=1e-4)
  cnet = F.load_clip_network(f"{tmp_path}/nets.py:clip")
  assert 0.0 < F.compute_clip_score(cnet, images, ["a red circle"] * 6, batch_size=4) <= 100.0
  with pytest.raises(TypeError):
    F.load_clip_network(f"{tmp_path}/nets.py:not_a_clip")
  with pytest.raises(ValueError, match="factory"):
    F.load_feature_network(str(tmp_path))  # A bare folder: weight loading is not implemented.
  with pytest.raises(FileNotFoundError):
    F.load_feature_network(f"{tmp_path}/missing.py:f")
  fid_net, clip_net = F.networks_from_config({"every_steps": 0})
  assert fid_net is None and clip_net is None
