"""TFDS builder for `shapes` (ArrayRecord files; builds and reads without TF).

tensorflow-datasets 4.9 works without TensorFlow for this path:
  * building: `GeneratorBasedBuilder.download_and_prepare` with
    file_format="array_record" serialises examples with TFDS's vendored
    tf.train.Example protos. The one TF-only piece on the way is encoding a
    numpy image inside `features.Image` (it runs tf.image.encode_png), so the
    generator yields PNG bytes encoded with PIL instead.
  * `dataset_info_from_configs` is avoided: it reads metadata files from the
    builder's package directory; `_info` builds a `DatasetInfo` directly.
  * reading: `builder.as_data_source()` / `tfds.data_source` give a
    random-access ArrayRecordDataSource that decodes with numpy (PIL for PNG).
  * not available without TF: `as_dataset` / `tfds.load` (tf.data pipelines)
    and Beam-based generation.

Examples are written in index order (`disable_shuffling`), so
`load_shapes(...)[i]` is example i of the split, bit-identical to
`shapes.make_example(i, split=..., seed=..., height=..., width=...)`.

Multi-aspect builds (`sizes`, e.g. ((64, 64), (48, 80), (80, 48))) render example i at
`shapes.example_size(seed, split, i, sizes)`: the same scenes, each at one of the sizes, for
aspect-ratio bucketing. The config name lists the sizes ("r64x64-48x80-80x48_..."), so a
source knows every example's size without decoding it (`ShapesSource.image_sizes`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
from typing import Any, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from sd3jax.data import shapes

NAME = "sd3jax_shapes"
_SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation"}


def _hw(resolution: int | tuple[int, int] | list[int]) -> tuple[int, int]:
  if isinstance(resolution, int):
    return resolution, resolution
  h, w = resolution
  return int(h), int(w)


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Size of the rendered dataset. The name encodes every field."""
  height: int = 64
  width: int = 64
  num_train: int = 10_000
  num_val: int = 1_000
  seed: int = 0
  sizes: tuple[tuple[int, int], ...] = ()  # several: each example at one (multi-aspect)


def config_name(height: int, width: int, num_train: int, num_val: int, seed: int,
                sizes: Sequence[tuple[int, int]] = ()) -> str:
  res = "-".join(f"{h}x{w}" for h, w in sizes) if len(sizes) > 1 else f"{height}x{width}"
  return f"r{res}_n{num_train}_v{num_val}_s{seed}"


def sizes_from_name(name: str) -> list[tuple[int, int]]:
  """The image sizes a config name lists (one for a single-size build)."""
  m = re.match(r"r([\dx-]+)_n", name)
  if not m:
    raise ValueError(f"{name!r} is not an {NAME} config name (r<H>x<W>[-<H>x<W>...]_n...).")
  return [tuple(int(v) for v in hw.split("x")) for hw in m.group(1).split("-")]


def make_config(resolution: int | tuple[int, int] = 64, num_train: int = 10_000,
                num_val: int = 1_000, seed: int = 0,
                sizes: Sequence[tuple[int, int]] = ()) -> ShapesConfig:
  """`resolution` for one size; `sizes` (several (h, w)) for a multi-aspect build."""
  sizes = tuple(_hw(s) for s in sizes)
  h, w = sizes[0] if sizes else _hw(resolution)
  sizes = sizes if len(sizes) > 1 else ()
  what = " / ".join(f"{a}x{b}" for a, b in sizes) if sizes else f"{h}x{w}"
  return ShapesConfig(name=config_name(h, w, num_train, num_val, seed, sizes), height=h,
                      width=w, num_train=num_train, num_val=num_val, seed=seed, sizes=sizes,
                      description=f"{what} shapes, {num_train} train / {num_val} "
                                  f"validation examples, seed {seed}.")


class Sd3jaxShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes with original/synthetic captions and object lists."""

  name = NAME
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Small objects 0.65 of a cell instead of 0.5."}
  BUILDER_CONFIGS = [make_config(64, 10_000, 1_000, 0)]
  BUILDER_CONFIG_CLASS = ShapesConfig

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default resolves the package via `importlib_resources` (a
    # backport it does not install); this file is the answer anyway.
    return epath.Path(__file__)

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    F = tfds.features
    return tfds.core.DatasetInfo(
        builder=self,
        description="Procedural 1-3 coloured shapes on a plain background, with "
                    "short/long captions and ground-truth objects (sd3jax).",
        features=F.FeaturesDict({
            "index": F.Scalar(dtype=np.int64),
            "image": F.Image(shape=(None, None, 3) if cfg.sizes else (cfg.height, cfg.width, 3),
                             encoding_format="png"),
            "caption_original": F.Text(),
            "caption_synthetic": F.Text(),
            "background": F.ClassLabel(names=list(shapes.BACKGROUNDS)),
            "objects": F.Sequence({
                "color": F.ClassLabel(names=list(shapes.COLORS)),
                "shape": F.ClassLabel(names=list(shapes.SHAPES)),
                "size": F.ClassLabel(names=list(shapes.SIZES)),
                "position": F.ClassLabel(names=[p.replace(" ", "_") for p in shapes.POSITIONS]),
                "jitter": F.Tensor(shape=(2,), dtype=np.float32),
                "center": F.Tensor(shape=(2,), dtype=np.float32),
                "bbox": F.Tensor(shape=(4,), dtype=np.float32),
            }),
        }),
        disable_shuffling=True,  # Keep index order: record i is example i.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_val)}

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    for i in range(num):
      h, w = shapes.example_size(cfg.seed, split, i, cfg.sizes or [(cfg.height, cfg.width)])
      ex = shapes.make_example(i, split=split, seed=cfg.seed, height=h, width=w)
      yield i, {
          "index": i,
          "image": shapes.encode_png(ex["image"]),  # PIL: no tf.image needed.
          "caption_original": ex["caption_original"],
          "caption_synthetic": ex["caption_synthetic"],
          "background": ex["background"],
          "objects": [{
              "color": o["color"], "shape": o["shape"], "size": o["size"],
              "position": o["position"].replace(" ", "_"),
              "jitter": np.asarray(o["jitter"], np.float32),
              "center": np.asarray(o["center"], np.float32),
              "bbox": np.asarray(o["bbox"], np.float32),
          } for o in ex["objects"]],
      }


def build_shapes(data_dir: str, resolution: int | tuple[int, int] = 64, num_train: int = 10_000,
                 num_val: int = 1_000, seed: int = 0,
                 sizes: Sequence[tuple[int, int]] = ()) -> str:
  """Renders and writes the dataset (no-op if already built); returns its directory."""
  return prepare(Sd3jaxShapes, data_dir, make_config(resolution, num_train, num_val, seed, sizes))


def prepare(builder_class, data_dir: str, config) -> str:
  """Builds `config` of a generator builder in data_dir (a no-op when built), quietly; returns
  the build's directory. Shared by the shapes and shapes_edit builders."""
  if any(c.name == config.name for c in builder_class.BUILDER_CONFIGS):
    config = config.name  # TFDS refuses a custom config named as a predefined one
  builder = builder_class(data_dir=data_dir, config=config)
  # TFDS prints "Downloading and preparing dataset ..." to stdout; nothing is downloaded.
  with contextlib.redirect_stdout(io.StringIO()) as said:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False))
  if said.getvalue().strip():
    logging.info("TFDS: %s", said.getvalue().strip())
  return os.fspath(builder.data_dir)


def dataset_dir(data_dir: str, config_name_: str) -> str:
  """Where `build_shapes(data_dir, ...)` puts the build named `config_name_`."""
  return os.path.join(data_dir, NAME, config_name_, str(Sd3jaxShapes.VERSION))


def _find_dataset_dir(data_dir: str, config: str | None) -> str:
  """The built version directory: data_dir itself, or data_dir/NAME/config/version."""
  if os.path.exists(os.path.join(data_dir, "dataset_info.json")):
    return data_dir
  root = os.path.join(data_dir, NAME)
  built = sorted(c for c in (os.listdir(root) if os.path.isdir(root) else [])
                 if os.path.exists(os.path.join(root, c, str(Sd3jaxShapes.VERSION),
                                                "dataset_info.json")))
  if config is None:
    if len(built) != 1:
      raise ValueError(f"{data_dir} holds {len(built)} built {NAME} configs {built}; "
                       "pass config=<one of them> (or build one with build_shapes).")
    config = built[0]
  elif config not in built:
    raise FileNotFoundError(f"{NAME}/{config} is not built in {data_dir} (built: {built}).")
  return os.path.join(root, config, str(Sd3jaxShapes.VERSION))


class ShapesSource:
  """Random-access shapes examples as plain dicts (str captions, named objects).

  Each item: {"index", "image" uint8 HWC, "caption_original",
  "caption_synthetic", "background", "objects": [{"color", "shape", "size",
  "position", "jitter", "center", "bbox"}]}. Picklable, for grain workers.
  """

  def __init__(self, dataset_dir: str, split: str):
    self.dataset_dir, self.split = dataset_dir, _SPLIT_NAMES.get(split, split)
    builder = tfds.builder_from_directory(dataset_dir)
    self._source = builder.as_data_source(split=self.split)
    feats = builder.info.features
    self._names = {k: feats["objects"].feature[k].names
                   for k in ("color", "shape", "size", "position")}
    self._backgrounds = feats["background"].names
    self.height, self.width = feats["image"].shape[:2]  # None, None: mixed sizes
    self.seed = int(re.search(r"_s(\d+)$", builder.info.config_name).group(1))
    self.sizes = sizes_from_name(builder.info.config_name)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._convert(self._source[int(index)])

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    return [self._convert(ex) for ex in self._source.__getitems__([int(i) for i in indices])]

  def _convert(self, ex: dict[str, Any]) -> dict[str, Any]:
    objs = ex["objects"]
    objects = []
    for j in range(len(objs["color"])):
      o = {k: self._names[k][int(objs[k][j])] for k in self._names}
      o["position"] = o["position"].replace("_", " ")
      for k in ("jitter", "center", "bbox"):
        o[k] = [float(v) for v in np.asarray(objs[k][j])]
      o["cell"] = shapes.POSITIONS.index(o["position"])
      objects.append(o)
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return {
        "index": int(ex["index"]), "image": ex["image"],
        "caption_original": text(ex["caption_original"]),
        "caption_synthetic": text(ex["caption_synthetic"]),
        "background": self._backgrounds[int(ex["background"])],
        "objects": objects,
    }

  def image_sizes(self) -> np.ndarray:
    """int [N, 2] (height, width) of every example, from the build's config (no decoding)."""
    if len(self.sizes) == 1:
      return np.tile(np.asarray(self.sizes, np.int64), (len(self), 1))
    return np.asarray([shapes.example_size(self.seed, self.split, i, self.sizes)
                       for i in range(len(self))], np.int64)

  def __repr__(self) -> str:
    return f"ShapesSource({self.dataset_dir!r}, split={self.split!r}, n={len(self)})"


def load_shapes(data_dir: str, split: str = "train", config: str | None = None) -> ShapesSource:
  """Random-access source of a built split ("train" / "validation").

  `data_dir` is what was given to `build_shapes` (with `config` naming the
  build if there are several) or the directory `build_shapes` returned.
  """
  return ShapesSource(_find_dataset_dir(data_dir, config), split)
