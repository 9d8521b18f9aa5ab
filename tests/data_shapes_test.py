"""Tests for the shapes renderer, captions, eval prompts and the TFDS builder."""
import hashlib
import importlib
import importlib.abc
import itertools
import sys

import numpy as np
import pytest

from sd3jax.data import shapes as S
from sd3jax.evals.shapes_checker import detect_objects


def _bg_distance(img, background):
  return np.abs(img.astype(np.int32) - np.asarray(S.BACKGROUNDS[background])).sum(-1)


def test_renderer_is_deterministic_and_sized():
  for i in range(5):
    a = S.make_example(i, seed=3)
    b = S.make_example(i, seed=3)
    assert np.array_equal(a["image"], b["image"])
    assert a["caption_original"] == b["caption_original"]
    assert a["caption_synthetic"] == b["caption_synthetic"]
  assert not np.array_equal(S.make_example(0, seed=3)["image"], S.make_example(0, seed=4)["image"])
  ex = S.make_example(7, height=48, width=80)
  assert ex["image"].shape == (48, 80, 3) and ex["image"].dtype == np.uint8
  # The same scene at two sizes: same objects, geometry scaled.
  big = S.make_example(7, height=96, width=160)
  assert [o["position"] for o in big["objects"]] == [o["position"] for o in ex["objects"]]
  np.testing.assert_allclose(np.asarray(big["objects"][0]["bbox"]),
                             2 * np.asarray(ex["objects"][0]["bbox"]), rtol=1e-6)


@pytest.mark.parametrize("hw", [(64, 64), (64, 96), (32, 32)])
def test_objects_disjoint_and_recoverable_by_pixels(hw):
  h, w = hw
  n_checked = 0
  for i in range(150):
    ex = S.make_example(i, height=h, width=w)
    objs = ex["objects"]
    assert 1 <= len(objs) <= S.MAX_OBJECTS
    assert len({o["cell"] for o in objs}) == len(objs)
    for o in objs:
      y0, x0, y1, x1 = o["bbox"]
      assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
      row, col = divmod(o["cell"], 3)  # Inside its own grid cell.
      assert row * h / 3 <= y0 and y1 <= (row + 1) * h / 3
      assert col * w / 3 <= x0 and x1 <= (col + 1) * w / 3
    for a, b in itertools.combinations(objs, 2):
      ay0, ax0, ay1, ax1 = a["bbox"]
      by0, bx0, by1, bx1 = b["bbox"]
      assert ay1 <= by0 or by1 <= ay0 or ax1 <= bx0 or bx1 <= ax0
    # Every non-background pixel lies within one pixel of some object box.
    far = _bg_distance(ex["image"], ex["background"]) > 0
    covered = np.zeros_like(far)
    for o in objs:
      y0, x0, y1, x1 = o["bbox"]
      covered[max(0, int(y0) - 1):int(np.ceil(y1)) + 1,
              max(0, int(x0) - 1):int(np.ceil(x1)) + 1] = True
    assert not (far & ~covered).any()
    # Centre pixel of squares and circles has the exact object colour.
    for o in objs:
      if o["shape"] != "triangle":
        cy, cx = (int(v) for v in o["center"])
        assert tuple(ex["image"][cy, cx]) == S.COLORS[o["color"]]
    # The prompt-following checker recovers every object (from 32 px up).
    found = detect_objects(ex["image"], ex["background"])
    assert sorted((d["color"], d["shape"], d["position"]) for d in found) == sorted(
        (o["color"], o["shape"], o["position"]) for o in objs), (i, found)
    n_checked += len(objs)
  assert n_checked > 200


def test_captions_match_objects_and_vocabulary():
  assert list(S.VOCABULARY) == sorted(set(S.VOCABULARY))
  styles = set()
  for i in range(300):
    ex = S.make_example(i, height=32, width=32)
    objs, syn, orig = ex["objects"], ex["caption_synthetic"], ex["caption_original"]
    for o in objs:  # Every object fully described in the synthetic caption.
      phrase = f"{o['size']} {o['color']} {o['shape']} {S.POSITION_PHRASES[o['position']]}"
      assert phrase in syn.lower(), (phrase, syn)
    assert f"plain {ex['background']} background" in syn
    if len(objs) > 1:
      assert f"with {S.NUMBER_WORDS[len(objs)]} shapes" in syn
      for shape in {o["shape"] for o in objs}:
        n = sum(o["shape"] == shape for o in objs)
        noun = shape if n == 1 else shape + "s"
        assert f"{S.NUMBER_WORDS[n]} {noun}" in syn
    # The original caption names only present colours/shapes and every shape.
    ow = S.words(orig)
    assert {w for w in ow if w in S.COLORS} <= {o["color"] for o in objs}
    assert {w.rstrip("s") for w in ow if w.rstrip("s") in S.SHAPES} == {o["shape"] for o in objs}
    styles.add("position" if any(w in ("left", "right", "top", "bottom", "center") for w in ow)
               else "color" if any(w in S.COLORS for w in ow) else "shape")
    for text in (orig, syn):
      assert set(S.words(text)) <= set(S.VOCABULARY), text
    # Captions are a function of the object list (+ style).
    o2, s2 = S.make_captions(objs, ex["background"])
    assert s2 == syn and o2 == S.original_caption(objs, 0)
  assert styles == {"position", "color", "shape"}


def test_validation_split_disjoint_from_train():
  def digest(split, i):
    image = S.make_example(i, split=split, height=32, width=32)["image"]
    return hashlib.sha1(image.tobytes()).hexdigest()
  train = {digest("train", i) for i in range(300)}
  val = {digest("validation", i) for i in range(150)}
  assert len(train) == 300 and len(val) == 150
  assert not train & val
  # Same index, different split: different scene (split is part of the seed).
  assert S.sample_scene(0, "train", 5) != S.sample_scene(0, "validation", 5)
  with pytest.raises(ValueError):
    S.make_example(0, split="dev")


def test_eval_prompts():
  for cat in S.EVAL_CATEGORIES:
    items = S.sample_eval_prompts(cat, 40, seed=1)
    assert items == S.sample_eval_prompts(cat, 40, seed=1)
    for it in items:
      assert it["category"] == cat
      assert set(S.words(it["prompt"])) <= set(S.VOCABULARY)
      assert it["count"] == len(it["objects"])
      for o in it["objects"]:
        assert o["shape"] in it["prompt"]
        if o["color"] is not None:
          assert o["color"] in it["prompt"]
        if o["position"] is not None:
          assert it["prompt"].endswith(S.POSITION_PHRASES[o["position"]])
    if cat == "count":
      assert {it["count"] for it in items} == {2, 3}
      assert all(it["prompt"].startswith(S.NUMBER_WORDS[it["count"]]) for it in items)
    if cat == "two_objects":
      assert all(it["objects"][0] != it["objects"][1] for it in items)
    if cat == "single_object":
      assert all(it["objects"][0]["color"] is None for it in items)
  with pytest.raises(ValueError):
    S.sample_eval_prompts("relation", 1)


class _TensorFlowImportSpy(importlib.abc.MetaPathFinder):
  """Records attempts to import tensorflow (not tensorflow_datasets).

  A real import goes through importlib's `_find_and_load`; a presence probe
  (`importlib.util.find_spec("tensorflow")`, which etils.epath does to pick a
  file-system backend) does not, and is recorded separately.
  """

  def __init__(self):
    self.imports, self.probes = [], []

  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      frame, importing = sys._getframe(1), False
      while frame is not None and not importing:
        importing = frame.f_code.co_name == "_find_and_load"
        frame = frame.f_back
      (self.imports if importing else self.probes).append(name)
    return None


def test_tfds_builder_builds_and_reads_without_tensorflow(tmp_path):
  spy = _TensorFlowImportSpy()
  sys.meta_path.insert(0, spy)
  try:  # The spy sees a real import attempt (tensorflow is not installed).
    with pytest.raises(ImportError):
      importlib.import_module("tensorflow")
  finally:
    sys.meta_path.remove(spy)
  assert spy.imports == ["tensorflow"]
  spy = _TensorFlowImportSpy()
  sys.meta_path.insert(0, spy)
  try:
    from sd3jax.data import shapes_tfds as T
    out = T.build_shapes(str(tmp_path), resolution=32, num_train=32, num_val=16, seed=0)
    assert T.build_shapes(str(tmp_path), 32, 32, 16, 0) == out  # Rebuild: reused.
    train = T.load_shapes(str(tmp_path), "train")
    val = T.load_shapes(str(tmp_path), "validation")
    assert len(train) == 32 and len(val) == 16
    for split, src in (("train", train), ("validation", val)):
      for i in range(len(src)):
        ex, ref = src[i], S.make_example(i, split=split, seed=0, height=32, width=32)
        assert ex["index"] == i
        assert ex["image"].dtype == np.uint8 and np.array_equal(ex["image"], ref["image"])
        assert ex["caption_original"] == ref["caption_original"]
        assert ex["caption_synthetic"] == ref["caption_synthetic"]
        assert ex["background"] == ref["background"]
        assert [(o["color"], o["shape"], o["size"], o["position"]) for o in ex["objects"]] == \
            [(o["color"], o["shape"], o["size"], o["position"]) for o in ref["objects"]]
        np.testing.assert_allclose([o["bbox"] for o in ex["objects"]],
                                   [o["bbox"] for o in ref["objects"]], rtol=1e-5)
    np.testing.assert_array_equal(train.image_sizes(), np.tile([[32, 32]], (32, 1)))
    # A second, non-square config in the same data_dir: load needs its name.
    T.build_shapes(str(tmp_path), resolution=(24, 40), num_train=4, num_val=2, seed=1)
    with pytest.raises(ValueError, match="pass config"):
      T.load_shapes(str(tmp_path), "train")
    wide = T.load_shapes(str(tmp_path), "train", config=T.config_name(24, 40, 4, 2, 1))
    assert wide[3]["image"].shape == (24, 40, 3)
    assert np.array_equal(wide[3]["image"], S.make_example(3, seed=1, height=24, width=40)["image"])
    assert T.load_shapes(out, "validation")[0]["index"] == 0  # The returned dir works too.
  finally:
    sys.meta_path.remove(spy)
  # Verified: building and reading never tried to import tensorflow (etils
  # only probes whether it is installed).
  assert spy.imports == []
  assert set(spy.probes) <= {"tensorflow"}
  assert "tensorflow" not in sys.modules
