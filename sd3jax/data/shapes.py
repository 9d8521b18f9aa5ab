"""The embedded `shapes` dataset: procedural scenes, captions and eval prompts.

A scene is 1-3 flat-coloured objects (circle, square, triangle) on a plain
light background. The image is split into a 3x3 grid of cells; every object
sits inside its own cell, so objects never overlap and each object's position
has a name ("top left", "center", ...). Colours are far apart in RGB and no
object colour is near a background colour, so a checker can recover colour,
shape (fill ratio of the bounding box: square 1.0, circle 0.79, triangle 0.5),
position (cell of the centroid) and count by pixel analysis of a generated
image.

Everything is a pure function of (seed, split, index): the scene is sampled in
resolution-independent units (cell, size class, jitter in the cell), and pixel
geometry is derived for the requested (height, width), so the same scene can be
rendered at any size, square or not.

Captions: a short "original" caption in one of a few alt-text styles
("a red circle on the left", "two blue squares", "a circle and a triangle") and
a long "synthetic" caption naming every object's size, colour, shape and
position, the counts and the background. Eval prompts use the same phrasing.
"""
from __future__ import annotations

import io
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Object colours, far apart in RGB (min pairwise distance ~140) and far from
# every background (> 170).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 160),
    "cyan": (20, 200, 210),
    "black": (25, 25, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (205, 205, 205),
    "cream": (245, 235, 205),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Side of an object as a fraction of min(cell height, cell width). Small objects were 0.5
# (shapes 1.0.0): at 0.65 the main job drew the asked shape more often (README ladder).
SIZE_FRACTION: dict[str, float] = {"small": 0.65, "large": 0.85}
# Cells of the 3x3 grid, row-major; POSITIONS[cell] is the caption name.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left", "top": "at the top",
    "top right": "in the top right", "left": "on the left",
    "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
SPLITS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}
MAX_OBJECTS = 3
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
EVAL_CATEGORIES: tuple[str, ...] = (
    "single_object",  # "a circle": shape only.
    "color",          # "a red circle": colour + shape.
    "position",       # "a red circle on the left": colour + shape + position.
    "count",          # "two red circles": count of identical objects.
    "two_objects",    # "a red circle and a blue square": composition.
)
_SUPERSAMPLE = 4  # Draw at 4x and box-filter down: anti-aliased, deterministic.
_MARGIN = 0.06  # Fraction of the cell kept free at its border.

_TEMPLATE_WORDS = (
    "a", "an", "and", "image", "with", "shapes", "on", "plain", "background",
    "of", "the", "in", "at", "total",
)


def _plural(shape: str) -> str:
  return shape + "s"


def words(text: str) -> list[str]:
  """Lower-case word tokens of a caption (punctuation dropped)."""
  return re.findall(r"[a-z]+", text.lower())


VOCABULARY: tuple[str, ...] = tuple(sorted(set(
    list(_TEMPLATE_WORDS) + list(COLORS) + list(BACKGROUNDS) + list(SHAPES)
    + [_plural(s) for s in SHAPES] + list(SIZES) + list(NUMBER_WORDS[1:])
    + [w for p in POSITION_PHRASES.values() for w in p.split()]
    + [w for p in POSITIONS for w in p.split()])))


# ----------------------------------------------------------------------------
# Scenes.
# ----------------------------------------------------------------------------
def _rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
  if index < 0:
    raise ValueError(f"index must be >= 0, got {index}.")
  return np.random.default_rng([seed, SPLITS[split], index, stream])


def example_size(seed: int, split: str, index: int,
                 sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """The (height, width) example `index` is rendered at when a build mixes sizes: uniform
  over `sizes`, from its own stream of (seed, split, index), so scenes do not change."""
  if len(sizes) == 1:
    return tuple(int(v) for v in sizes[0])
  h, w = sizes[int(_rng(seed, split, index, stream=2).integers(len(sizes)))]
  return int(h), int(w)


def sample_scene(seed: int, split: str, index: int) -> dict[str, Any]:
  """Samples a resolution-independent scene for (seed, split, index).

  Splits use disjoint random streams (the split id is part of the seed).
  About a quarter of multi-object scenes repeat one colour+shape so that
  counting captions ("two red circles") appear in training.
  """
  rng = _rng(seed, split, index)
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  cells = rng.choice(len(POSITIONS), size=n, replace=False)
  colors, shapes = list(COLORS), list(SHAPES)
  same = n > 1 and rng.random() < 0.25
  base_color, base_shape = rng.choice(colors), rng.choice(shapes)
  objects = []
  for cell in sorted(int(c) for c in cells):
    if same:
      color, shape = base_color, base_shape
    else:
      color, shape = rng.choice(colors), rng.choice(shapes)
    objects.append({
        "color": str(color), "shape": str(shape),
        "size": str(rng.choice(SIZES)), "cell": cell,
        "position": POSITIONS[cell],
        "jitter": [float(v) for v in rng.uniform(-1.0, 1.0, size=2)],
    })
  background = str(rng.choice(list(BACKGROUNDS)))
  return {"objects": objects, "background": background}


def object_geometry(obj: dict[str, Any], height: int, width: int) -> dict[str, Any]:
  """Pixel centre and bounding box (y0, x0, y1, x1; exclusive ends, float).

  The object's square box of side SIZE_FRACTION * min(cell side) is placed in
  its cell, moved by `jitter` within the free room, never past the cell
  margin: objects in different cells cannot touch.
  """
  row, col = divmod(int(obj["cell"]), 3)
  ch, cw = height / 3.0, width / 3.0
  side = SIZE_FRACTION[obj["size"]] * min(ch, cw)
  jy, jx = obj.get("jitter", (0.0, 0.0))
  room_y = max(0.0, (ch - side) / 2.0 - _MARGIN * ch)
  room_x = max(0.0, (cw - side) / 2.0 - _MARGIN * cw)
  cy = (row + 0.5) * ch + float(jy) * room_y
  cx = (col + 0.5) * cw + float(jx) * room_x
  h = side / 2.0
  return {"center": [cy, cx], "bbox": [cy - h, cx - h, cy + h, cx + h]}


def render(objects: Sequence[dict[str, Any]], height: int, width: int,
           background: str = "white") -> np.ndarray:
  """Renders objects (with cell/size/jitter) into a uint8 [height, width, 3]."""
  s = _SUPERSAMPLE
  img = Image.new("RGB", (width * s, height * s), BACKGROUNDS[background])
  draw = ImageDraw.Draw(img)
  for obj in objects:
    y0, x0, y1, x1 = (v * s for v in object_geometry(obj, height, width)["bbox"])
    color = COLORS[obj["color"]]
    # PIL boxes are inclusive of the end pixel: subtract one supersample px.
    box = [x0, y0, x1 - 1, y1 - 1]
    if obj["shape"] == "circle":
      draw.ellipse(box, fill=color)
    elif obj["shape"] == "square":
      draw.rectangle(box, fill=color)
    elif obj["shape"] == "triangle":
      draw.polygon([((x0 + x1) / 2.0, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=color)
    else:
      raise ValueError(f"Unknown shape {obj['shape']!r}; known: {SHAPES}.")
  return np.asarray(img.resize((width, height), Image.BOX), dtype=np.uint8)


# ----------------------------------------------------------------------------
# Captions.
# ----------------------------------------------------------------------------
def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _join(parts: Sequence[str]) -> str:
  if len(parts) <= 2:
    return " and ".join(parts)
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def _noun_phrase(count: int, adjectives: Sequence[str], shape: str) -> str:
  adj = " ".join(a for a in adjectives if a)
  noun = shape if count == 1 else _plural(shape)
  head = f"{adj} {noun}" if adj else noun
  if count == 1:
    return f"{_article(head)} {head}"
  return f"{NUMBER_WORDS[count]} {head}"


def _groups(objects: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[tuple[tuple, int]]:
  """(key values, count) groups in first-appearance order."""
  out: dict[tuple, int] = {}
  for o in objects:
    k = tuple(o[key] for key in keys)
    out[k] = out.get(k, 0) + 1
  return list(out.items())


def original_caption(objects: Sequence[dict[str, Any]], style: int = 0) -> str:
  """Short alt-text-like caption. Styles: 0 colour+shape, 1 +position, 2 shape only."""
  if style == 0:
    parts = [_noun_phrase(c, [color], shape) for (color, shape), c in
             _groups(objects, ("color", "shape"))]
  elif style == 1:
    parts = [f"{_noun_phrase(1, [o['color']], o['shape'])} {POSITION_PHRASES[o['position']]}"
             for o in objects]
  elif style == 2:
    parts = [_noun_phrase(c, [], shape) for (shape,), c in _groups(objects, ("shape",))]
  else:
    raise ValueError(f"style must be 0, 1 or 2, got {style}.")
  return _join(parts)


def synthetic_caption(objects: Sequence[dict[str, Any]], background: str) -> str:
  """Long descriptive caption: every object with size, colour, shape, position."""
  described = [
      f"{_noun_phrase(1, [o['size'], o['color']], o['shape'])} "
      f"{POSITION_PHRASES[o['position']]}" for o in objects]
  if len(objects) == 1:
    first = described[0][0].upper() + described[0][1:]
    return f"{first} of the image, on a plain {background} background."
  counts = [_noun_phrase(c, [], shape) for (shape,), c in _groups(objects, ("shape",))]
  counts = [c.replace("a ", "one ", 1) if c.startswith("a ") else c for c in counts]
  return (f"An image with {NUMBER_WORDS[len(objects)]} shapes on a plain {background} "
          f"background: {_join(described)}. In total: {_join(counts)}.")


def make_captions(objects: Sequence[dict[str, Any]], background: str,
                  rng: np.random.Generator | None = None) -> tuple[str, str]:
  """(original, synthetic) captions of an object list; rng picks the short style."""
  style = 0 if rng is None else int(rng.choice(3, p=[0.4, 0.4, 0.2]))
  return original_caption(objects, style), synthetic_caption(objects, background)


# ----------------------------------------------------------------------------
# Examples.
# ----------------------------------------------------------------------------
def make_example(index: int, *, split: str = "train", seed: int = 0,
                 height: int = 64, width: int = 64) -> dict[str, Any]:
  """One example: uint8 image, both captions, and the ground-truth objects.

  Each object carries colour, shape, size, position (name), cell, jitter and
  pixel center/bbox for this (height, width).
  """
  if height < 12 or width < 12:
    raise ValueError(f"shapes needs height, width >= 12, got {(height, width)}.")
  scene = sample_scene(seed, split, index)
  objects = [dict(o, **object_geometry(o, height, width)) for o in scene["objects"]]
  original, synthetic = make_captions(objects, scene["background"],
                                      _rng(seed, split, index, stream=1))
  return {
      "index": index, "split": split,
      "image": render(objects, height, width, scene["background"]),
      "background": scene["background"], "objects": objects,
      "caption_original": original, "caption_synthetic": synthetic,
  }


def encode_png(image: np.ndarray) -> bytes:
  """Lossless PNG bytes of a uint8 HWC image (pure PIL, no TensorFlow)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


# ----------------------------------------------------------------------------
# Evaluation prompts.
# ----------------------------------------------------------------------------
def sample_eval_prompts(category: str, num: int, seed: int = 0) -> list[dict[str, Any]]:
  """Deterministic evaluation prompts of one category with ground-truth specs.

  Each item: {"category", "prompt", "count", "objects"}; "objects" lists the
  expected objects as {"shape", "color" (None = any), "position" (None = any)}
  and "count" is the total number of objects the image should contain.
  """
  if category not in EVAL_CATEGORIES:
    raise ValueError(f"category must be one of {EVAL_CATEGORIES}, got {category!r}.")
  rng = np.random.default_rng([seed, 7, EVAL_CATEGORIES.index(category)])
  colors, shapes = list(COLORS), list(SHAPES)
  out = []
  for _ in range(num):
    color, shape = str(rng.choice(colors)), str(rng.choice(shapes))
    if category == "single_object":
      objs = [{"shape": shape, "color": None, "position": None}]
      prompt = _noun_phrase(1, [], shape)
    elif category == "color":
      objs = [{"shape": shape, "color": color, "position": None}]
      prompt = _noun_phrase(1, [color], shape)
    elif category == "position":
      position = str(rng.choice(POSITIONS))
      objs = [{"shape": shape, "color": color, "position": position}]
      prompt = f"{_noun_phrase(1, [color], shape)} {POSITION_PHRASES[position]}"
    elif category == "count":
      count = int(rng.integers(2, MAX_OBJECTS + 1))
      objs = [{"shape": shape, "color": color, "position": None}] * count
      prompt = _noun_phrase(count, [color], shape)
    else:  # two_objects: two different (colour, shape) pairs.
      while True:
        color2, shape2 = str(rng.choice(colors)), str(rng.choice(shapes))
        if (color2, shape2) != (color, shape):
          break
      objs = [{"shape": shape, "color": color, "position": None},
              {"shape": shape2, "color": color2, "position": None}]
      prompt = f"{_noun_phrase(1, [color], shape)} and {_noun_phrase(1, [color2], shape2)}"
    out.append({"category": category, "prompt": prompt, "count": len(objs),
                "objects": [dict(o) for o in objs]})
  return out
