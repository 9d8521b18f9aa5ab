"""The dedup filter: which examples of a source training skips, without rewriting the data.

`sd3jax dedup cluster` writes a filter folder:

  filter.json   what it filters (the source's identity and size), why (descriptor, threshold,
                rule), and counts
  drop.npy      int64, sorted: the example indices left out (one per duplicate beyond the
                kept member of its cluster)

`config.data.filter` names such a folder; precompute and the image-text pipelines then read
`FilteredSource(source, ...)`, which re-indexes the kept examples 0..n-1. A filter made for
another source (other size or identity) is refused, with the fix named.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from sd3jax.dedup import DedupError

FORMAT = "sd3jax-dedup-filter"
FILTER_FILE = "filter.json"
DROP_FILE = "drop.npy"


def write_filter(out_dir: str, *, source_identity: Mapping[str, Any], num_examples: int,
                 drop: np.ndarray, info: Mapping[str, Any]) -> dict[str, Any]:
  """Writes drop.npy, then filter.json (last: its presence means the filter is complete)."""
  from sd3jax.data.records import atomic_write_text
  os.makedirs(out_dir, exist_ok=True)
  drop = np.unique(np.asarray(drop, np.int64))
  tmp = os.path.join(out_dir, f".{DROP_FILE}.tmp-{os.getpid()}.npy")
  np.save(tmp, drop)
  os.replace(tmp, os.path.join(out_dir, DROP_FILE))
  meta = {"format": FORMAT, "source": dict(source_identity), "num_examples": int(num_examples),
          "num_dropped": int(len(drop)), "num_kept": int(num_examples - len(drop)),
          "drop_sha256": hashlib.sha256(drop.tobytes()).hexdigest(), **dict(info)}
  atomic_write_text(os.path.join(out_dir, FILTER_FILE), json.dumps(meta, indent=2))
  return meta


def load_filter(path: str) -> tuple[dict[str, Any], np.ndarray]:
  """(filter.json, drop indices) of a filter folder; clear errors when it is not one."""
  fname = os.path.join(path, FILTER_FILE)
  if not os.path.exists(fname):
    raise FileNotFoundError(
        f"config.data.filter={path!r} has no {FILTER_FILE}: give the --out folder of "
        "`sd3jax dedup cluster` (or set config.data.filter='' to train on every example).")
  with open(fname) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise DedupError(f"{fname} is not a {FORMAT} file.")
  drop = np.load(os.path.join(path, DROP_FILE))
  if hashlib.sha256(drop.tobytes()).hexdigest() != meta["drop_sha256"]:
    raise DedupError(f"{path}/{DROP_FILE} does not match {FILTER_FILE} (a partial copy?); "
                     "rerun `sd3jax dedup cluster`.")
  return meta, drop


class FilteredSource:
  """A random-access source without the filter's dropped examples (same item format).

  Index i of the filtered source is example `kept[i]` of the wrapped one. The identity
  (what precompute records in its producer) is the wrapped source's plus the filter's hash,
  so records precomputed with and without a filter never mix.
  """

  def __init__(self, source, path: str):
    from sd3jax.data.producer import source_identity
    self.source, self.path = source, os.fspath(path)
    self.meta, drop = load_filter(self.path)
    ident = source_identity(source)
    if int(self.meta["num_examples"]) != len(source) or self.meta["source"] != ident:
      raise DedupError(
          f"the dedup filter {self.path} was made for another source ({self.meta['source']}, "
          f"{self.meta['num_examples']} examples), not {ident}: rerun `sd3jax dedup embed` and "
          "`sd3jax dedup cluster` on this source, or set config.data.filter=''.")
    keep = np.ones(len(source), bool)
    keep[drop] = False
    self.kept = np.flatnonzero(keep)

  def identity(self) -> dict[str, Any]:
    from sd3jax.data.producer import source_identity
    return {**source_identity(self.source), "num_examples": len(self),
            "filter": self.meta["drop_sha256"][:16]}

  def __len__(self) -> int:
    return len(self.kept)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(self.kept[int(index)])]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    outer = [int(self.kept[int(i)]) for i in indices]
    if hasattr(self.source, "__getitems__"):
      return self.source.__getitems__(outer)
    return [self.source[i] for i in outer]

  def read_many(self, indices: Sequence[int]) -> list[Any]:
    """The wrapped source's read_many (bad records in place) where it has one."""
    if hasattr(self.source, "read_many"):
      return self.source.read_many([int(self.kept[int(i)]) for i in indices])
    return self.__getitems__(indices)

  def locate(self, index: int) -> tuple[str, int]:
    outer = int(self.kept[int(index)])
    if hasattr(self.source, "locate"):
      return self.source.locate(outer)
    return getattr(self.source, "path", type(self.source).__name__), outer

  def image_sizes(self) -> np.ndarray:
    return np.asarray(self.source.image_sizes())[self.kept]

  def __getattr__(self, name: str) -> Any:  # manifest, dataset_dir, kind, ...: the wrapped one's
    if name in ("source", "kept", "meta", "path"):
      raise AttributeError(name)
    return getattr(self.source, name)

  def __repr__(self) -> str:
    return f"FilteredSource({self.source!r}, kept {len(self)} of {len(self.source)})"
