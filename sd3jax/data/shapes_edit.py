"""The embedded edit dataset: (source image, instruction, target image) triplets from shapes.

InstructPix2Pix (Brooks et al. 2023) trains an editing model on triplets; SD3's editing model
is the MM-DiT fine-tuned on such data. Here the triplets are exact: a source scene is a
`shapes` scene, one edit changes one thing in it, and both scenes are rendered by the same
code, so a checker can tell whether a model's result made the edit (success) and left the
rest alone (preservation).

Edit types (EDIT_TYPES), each with several phrasings (PHRASINGS):
  recolour      one object gets another colour             "make the red circle blue"
  move          one object goes to an empty cell          "move the red circle to the top"
  add           a new object in an empty cell             "add a blue square on the left"
  remove        one object of a 2-3 object scene goes     "remove the red circle"
  resize        small <-> large                           "make the red circle bigger"
  change_shape  one object gets another shape             "turn the red circle into a square"

An object is named by colour and shape, plus its position when another object of the scene
shares both ("the red circle in the top left").

Held out for evaluation: the scenes (the validation split's, as in shapes) and phrasings.
Training triplets use only the first phrasings of each type; half of the validation triplets
use the others. The text encoders of the embedded demo are random stand-ins with no notion
of synonyms, so the held-out phrasings recombine words the training phrasings use ("change
the red circle to blue" against "change the color of the red circle to blue" and "make the
red circle blue") rather than new verbs.

Everything is a pure function of (seed, split, index), like shapes; `Sd3jaxShapesEdit` is the
TFDS builder (ArrayRecord, no TensorFlow) and `load_edits` its random-access reader, which is
also what precompute reads (examples carry a "source_image").
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from sd3jax.data import shapes

EDIT_TYPES: tuple[str, ...] = ("recolour", "move", "add", "remove", "resize", "change_shape")

# (training phrasings, held-out phrasings) per edit type. Fields: {obj} the named object;
# {color} a colour; {where} a position phrase ("in the top left"); {to} "the top left";
# {new} the added object ("a blue square"); {shape} "a square"; {colored} "a red square";
# {bigger} bigger / smaller; {enlarge} enlarge / shrink; {size} large / small.
PHRASINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "recolour": (("make {obj} {color}", "turn {obj} {color}", "paint {obj} {color}",
                  "change the color of {obj} to {color}"),
                 ("change {obj} to {color}", "color {obj} {color}")),
    "move": (("move {obj} to {to}", "put {obj} {where}", "place {obj} {where}"),
             ("move {obj} {where}", "place {obj} to {to}")),
    "add": (("add {new} {where}", "draw {new} {where}", "insert {new} {where}"),
            ("add {new} to {to}", "draw {new} at {to}")),
    "remove": (("remove {obj}", "delete {obj}", "erase {obj}", "take away {obj}"),
               ("take {obj} away",)),
    "resize": (("make {obj} {bigger}", "{enlarge} {obj}"),
               ("make {obj} {size}",)),
    "change_shape": (("turn {obj} into {shape}", "make {obj} {shape}",
                      "replace {obj} with {colored}"),
                     ("change {obj} into {shape}", "change {obj} to {shape}")),
}
_SIZE_WORDS = {"bigger": ("bigger", "smaller"), "enlarge": ("enlarge", "shrink"),
               "size": ("large", "small")}
# Words the instructions use beyond the captions' VOCABULARY: the embedded text encoders
# add them after their other tokens (embedded_encoders.build_embedded_encoders(added_words)),
# so captions encode exactly as without them.
INSTRUCTION_WORDS: tuple[str, ...] = tuple(sorted(
    ({w for pair in PHRASINGS.values() for t in pair[0] + pair[1]
      for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t))}
     | {w for pair in _SIZE_WORDS.values() for w in pair}) - set(shapes.VOCABULARY)))
NAME = "sd3jax_shapes_edit"


# ----------------------------------------------------------------------------
# Triplets.
# ----------------------------------------------------------------------------
def _named(obj: dict[str, Any], objects: Sequence[dict[str, Any]]) -> str:
  """'the red circle', with its position when another object has its colour and shape."""
  same = [o for o in objects if (o["color"], o["shape"]) == (obj["color"], obj["shape"])]
  name = f"the {obj['color']} {obj['shape']}"
  return name if len(same) == 1 else f"{name} {shapes.POSITION_PHRASES[obj['position']]}"


def _new_object(rng: np.random.Generator, cell: int, **fields) -> dict[str, Any]:
  obj = {"color": str(rng.choice(list(shapes.COLORS))), "shape": str(rng.choice(shapes.SHAPES)),
         "size": str(rng.choice(shapes.SIZES)), "cell": int(cell),
         "position": shapes.POSITIONS[int(cell)],
         "jitter": [float(v) for v in rng.uniform(-1.0, 1.0, size=2)]}
  obj.update(fields)
  return obj


def valid_edit_types(objects: Sequence[dict[str, Any]]) -> list[str]:
  """Edits that make sense on a scene: add needs room for a fourth object to stay within
  shapes.MAX_OBJECTS; remove needs a second object (so the result is not empty)."""
  return [e for e in EDIT_TYPES
          if not (e == "add" and len(objects) >= shapes.MAX_OBJECTS)
          and not (e == "remove" and len(objects) < 2)]


def make_edit(index: int, *, split: str = "train", seed: int = 0,
              edit_type: str | None = None, held_out: bool | None = None) -> dict[str, Any]:
  """One triplet's description (no pixels): source and target objects, the instruction.

  `edit_type` / `held_out` force the edit type and the phrasing set (default: drawn; held-out
  phrasings only outside the training split, for half of the examples). Keys: index, split,
  edit_type, instruction, held_out_phrasing, background, source_objects, target_objects,
  edited (index of the changed object in source_objects; -1 for add), target_caption (the
  target scene's shapes caption with positions: the regeneration baseline's prompt).
  """
  scene = shapes.sample_scene(seed, split, index)
  rng = shapes._rng(seed, split, index, stream=7)  # pylint: disable=protected-access
  source = [dict(o) for o in scene["objects"]]
  valid = valid_edit_types(source)
  if edit_type is None:
    edit_type = str(rng.choice(valid))
  elif edit_type not in valid:
    raise ValueError(f"edit_type={edit_type!r} does not apply to a scene of {len(source)} "
                     f"objects; valid: {valid}.")
  if held_out is None:
    held_out = split != "train" and bool(rng.random() < 0.5)
  templates = PHRASINGS[edit_type][1 if held_out else 0]
  template = str(templates[int(rng.integers(len(templates)))])
  free = [c for c in range(9) if c not in {o["cell"] for o in source}]
  target = [dict(o) for o in source]
  edited = -1 if edit_type == "add" else int(rng.integers(len(source)))
  fields: dict[str, str] = {}
  if edited >= 0:
    obj = source[edited]
    fields["obj"] = _named(obj, source)
  if edit_type == "recolour":
    color = str(rng.choice([c for c in shapes.COLORS if c != obj["color"]]))
    target[edited]["color"] = fields["color"] = color
  elif edit_type == "change_shape":
    shape = str(rng.choice([s for s in shapes.SHAPES if s != obj["shape"]]))
    target[edited]["shape"] = shape
    fields["shape"] = f"a {shape}"
    fields["colored"] = f"a {obj['color']} {shape}"
  elif edit_type == "resize":
    grow = obj["size"] == "small"
    target[edited]["size"] = "large" if grow else "small"
    fields.update({k: words[0 if grow else 1] for k, words in _SIZE_WORDS.items()})
  elif edit_type in ("move", "add"):
    cell = int(rng.choice(free))
    fields["where"] = shapes.POSITION_PHRASES[shapes.POSITIONS[cell]]
    fields["to"] = f"the {shapes.POSITIONS[cell]}"
    if edit_type == "move":
      target[edited] = _new_object(rng, cell, color=obj["color"], shape=obj["shape"],
                                   size=obj["size"])
    else:
      new = _new_object(rng, cell)
      target.append(new)
      fields["new"] = f"a {new['color']} {new['shape']}"
  elif edit_type == "remove":
    del target[edited]
  target.sort(key=lambda o: o["cell"])
  return {"index": index, "split": split, "edit_type": edit_type,
          "instruction": template.format(**fields), "held_out_phrasing": bool(held_out),
          "background": scene["background"], "source_objects": source,
          "target_objects": target, "edited": edited,
          "target_caption": shapes.original_caption(target, style=1)}


def render_edit(edit: dict[str, Any], height: int = 64, width: int = 64
                ) -> tuple[np.ndarray, np.ndarray]:
  """(source, target) uint8 images of a triplet."""
  draw = lambda objs: shapes.render(objs, height, width, edit["background"])
  return draw(edit["source_objects"]), draw(edit["target_objects"])


# ----------------------------------------------------------------------------
# TFDS builder and reader.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class ShapesEditConfig(tfds.core.BuilderConfig):
  """Size of the rendered edit dataset. The name encodes every field."""
  height: int = 64
  width: int = 64
  num_train: int = 6_000
  num_val: int = 512
  seed: int = 0


def config_name(height: int, width: int, num_train: int, num_val: int, seed: int) -> str:
  return f"r{height}x{width}_n{num_train}_v{num_val}_s{seed}"


def make_config(resolution: int = 64, num_train: int = 6_000, num_val: int = 512,
                seed: int = 0) -> ShapesEditConfig:
  return ShapesEditConfig(
      name=config_name(resolution, resolution, num_train, num_val, seed), height=resolution,
      width=resolution, num_train=num_train, num_val=num_val, seed=seed,
      description=f"{resolution}x{resolution} shapes edit triplets, {num_train} train / "
                  f"{num_val} validation, seed {seed}.")


class Sd3jaxShapesEdit(tfds.core.GeneratorBasedBuilder):
  """Shapes edit triplets: source, instruction, target, and the edit's description."""

  name = NAME
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Small objects 0.65 of a cell instead of 0.5 (shapes 1.1.0)."}
  BUILDER_CONFIGS = [make_config()]
  BUILDER_CONFIG_CLASS = ShapesEditConfig

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # as shapes_tfds: TFDS's default needs a backport
    return epath.Path(__file__)

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg, F = self.builder_config, tfds.features
    image = lambda: F.Image(shape=(cfg.height, cfg.width, 3), encoding_format="png")
    return tfds.core.DatasetInfo(
        builder=self,
        description="Instruction edits of procedural shapes scenes (sd3jax): source image, "
                    "instruction, target image, and the edit as JSON.",
        features=F.FeaturesDict({
            "index": F.Scalar(dtype=np.int64),
            "source": image(), "target": image(),
            "instruction": F.Text(), "target_caption": F.Text(),
            "edit_type": F.ClassLabel(names=list(EDIT_TYPES)),
            "held_out_phrasing": F.Scalar(dtype=np.bool_),
            "edit": F.Text(),  # make_edit's dict as JSON: objects, edited index, background
        }),
        disable_shuffling=True)  # record i is triplet i

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_val)}

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    for i in range(num):
      edit = make_edit(i, split=split, seed=cfg.seed)
      source, target = render_edit(edit, cfg.height, cfg.width)
      yield i, {"index": i, "source": shapes.encode_png(source),
                "target": shapes.encode_png(target), "instruction": edit["instruction"],
                "target_caption": edit["target_caption"], "edit_type": edit["edit_type"],
                "held_out_phrasing": edit["held_out_phrasing"], "edit": json.dumps(edit)}


def build_edits(data_dir: str, resolution: int = 64, num_train: int = 6_000,
                num_val: int = 512, seed: int = 0) -> str:
  """Renders and writes the edit dataset (a no-op when built); returns its directory."""
  from sd3jax.data import shapes_tfds
  return shapes_tfds.prepare(Sd3jaxShapesEdit, data_dir,
                             make_config(resolution, num_train, num_val, seed))

class EditSource:
  """Random-access triplets as precompute reads them: "image" is the target (what the model
  learns to produce), "source_image" the image it edits, "caption_original" the instruction
  (no synthetic caption). "edit" holds make_edit's description. Picklable."""

  has_source_image = True

  def __init__(self, dataset_dir: str, split: str):
    self.dataset_dir, self.split = dataset_dir, {"val": "validation"}.get(split, split)
    builder = tfds.builder_from_directory(dataset_dir)
    self._source = builder.as_data_source(split=self.split)
    self._types = builder.info.features["edit_type"].names

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._convert(self._source[int(index)])

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    return [self._convert(ex) for ex in self._source.__getitems__([int(i) for i in indices])]

  def _convert(self, ex: dict[str, Any]) -> dict[str, Any]:
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return {"index": int(ex["index"]), "image": ex["target"], "source_image": ex["source"],
            "caption_original": text(ex["instruction"]), "caption_synthetic": "",
            "target_caption": text(ex["target_caption"]),
            "edit_type": self._types[int(ex["edit_type"])],
            "held_out_phrasing": bool(ex["held_out_phrasing"]),
            "edit": json.loads(text(ex["edit"]))}

  def __repr__(self) -> str:
    return f"EditSource({self.dataset_dir!r}, split={self.split!r}, n={len(self)})"


def dataset_dir(data_dir: str, name: str) -> str:
  """Where `build_edits(data_dir, ...)` puts the build called `name` (config_name)."""
  return os.path.join(data_dir, NAME, name, str(Sd3jaxShapesEdit.VERSION))


def load_edits(path: str, split: str = "train") -> EditSource:
  """The triplets of a build: `path` is the directory build_edits returned."""
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"{path} is not a built {NAME} dataset (no dataset_info.json); "
                            "build it with shapes_edit.build_edits.")
  return EditSource(path, split)
