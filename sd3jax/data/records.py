"""The sd3jax record format: ArrayRecord shards of msgpack dicts + a manifest.

One record set is a directory:

    manifest.json                  written last; its presence means "complete"
    shard-00000.array_record       ArrayRecord file (group_size 1: random access)
    shard-00000.array_record.json  sidecar: count and per-record index columns
    ...

A record is one example: a dict whose values are str, bytes, int, float, bool,
None, lists, nested dicts, or numpy arrays (any numeric dtype, bfloat16
included), serialised with msgpack (arrays as an extension type holding dtype
name, shape and raw little-endian bytes). Nothing is pickled.

Kinds of record sets (the manifest's "kind"):

  image_text   raw examples, written by `ingest` (one shard per work unit; or
               exported from shapes):
               {"key": str, "image": bytes (encoded, as found: JPEG/PNG/...),
                "image_format": str, "height": int, "width": int,
                "caption_original": str, "caption_synthetic": str ("" = none),
                "meta": dict (sidecar JSON fields, e.g. url)}
               index columns: height, width (so aspect-ratio buckets need no
               pass over the images).
  precomputed  written by the precompute stage: float arrays (VAE posterior
               moments, per-encoder text embeddings for both captions) in a
               storage dtype (bfloat16 / float32) plus "key"; the manifest's
               "producer" records what made them (weights hashes, dtype,
               resolution, sequence lengths) so a mismatched cache is an error.

Crash safety: a shard is written under a hidden temporary name and renamed to
its final name only after it is closed; a finished shard is therefore exactly
a file with the final name, and a half-written one is never mistaken for it
(`completed_shards`, `remove_incomplete`). Writers that work shard by shard
(resumable, any number of processes: ingest, precompute) use `ShardWriter` +
`shard_path` + `write_manifest`; `RecordWriter` / `write_records` is the
one-process convenience on top of them for small sets written in one go (the
shapes exports, tests): not resumable, it refuses a folder that holds records.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import uuid
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np

FORMAT = "sd3jax-records"
VERSION = 1
MANIFEST = "manifest.json"
KIND_IMAGE_TEXT = "image_text"
KIND_PRECOMPUTED = "precomputed"
DEFAULT_OPTIONS = "group_size:1"  # zstd:3 by default; group 1 for random access.
_EXT_NDARRAY = 1
_SHARD_RE = r"^{prefix}-(\d{{5,}})\.array_record$"  # shard 100000 on: 6 digits


# ----------------------------------------------------------------------------
# Serialisation.
# ----------------------------------------------------------------------------
def _dtype(name: str) -> np.dtype:
  try:
    return np.dtype(name)
  except TypeError:
    import ml_dtypes  # bfloat16, float8_*: numpy does not know them by name.
    return np.dtype(getattr(ml_dtypes, name))


def _default(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    if obj.dtype.kind in "OUS" or (obj.dtype.kind == "V" and obj.dtype.names):
      raise TypeError(f"Cannot store {obj.dtype} arrays; use a list of str/bytes.")
    arr = np.ascontiguousarray(obj)
    if arr.dtype.byteorder == ">":
      arr = arr.astype(arr.dtype.newbyteorder("<"))
    payload = msgpack.packb([arr.dtype.name, list(arr.shape), arr.tobytes()],
                            use_bin_type=True)
    return msgpack.ExtType(_EXT_NDARRAY, payload)
  if isinstance(obj, np.generic):  # numpy scalars: plain Python values.
    return obj.item()
  if isinstance(obj, tuple):
    return list(obj)
  raise TypeError(f"Cannot serialise {type(obj).__name__} in a record.")


def _ext_hook(code: int, data: bytes) -> Any:
  if code != _EXT_NDARRAY:
    return msgpack.ExtType(code, data)
  name, shape, raw = msgpack.unpackb(data, raw=False)
  # Copy: frombuffer views are read-only and pin the whole record's bytes.
  return np.frombuffer(raw, dtype=_dtype(name)).reshape(shape).copy()


def encode(example: Mapping[str, Any]) -> bytes:
  """Serialises one example dict to bytes (msgpack; arrays keep dtype/shape)."""
  return msgpack.packb(dict(example), default=_default, use_bin_type=True)


def decode(data: bytes) -> dict[str, Any]:
  """Inverse of `encode`."""
  return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def feature_spec(example: Mapping[str, Any]) -> dict[str, Any]:
  """A JSON description of an example's fields (dtype/shape of arrays)."""
  def spec(v):
    if isinstance(v, np.ndarray):
      return {"dtype": v.dtype.name, "shape": list(v.shape)}
    if isinstance(v, Mapping):
      return {k: spec(x) for k, x in v.items()}
    return type(v).__name__
  return {k: spec(v) for k, v in example.items()}


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------
def shard_name(index: int, prefix: str = "shard") -> str:
  """File name of shard `index`; order of names is the order of examples."""
  return f"{prefix}-{index:05d}.array_record"


def shard_path(out_dir: str, index: int, prefix: str = "shard") -> str:
  return os.path.join(out_dir, shard_name(index, prefix))


def _sidecar(path: str) -> str:
  return path + ".json"


def write_temp_text(path: str, text: str) -> str:
  """Writes `text` (flushed to disk) next to `path` under a hidden temporary name; returns it."""
  tmp = os.path.join(os.path.dirname(path) or ".",
                     f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  return tmp


def atomic_write_text(path: str, text: str) -> None:
  """`path` holds `text` or its old content, never a part: write aside, then rename."""
  os.replace(write_temp_text(path, text), path)


class ShardWriter:
  """Writes one shard; it appears under its final name only when closed.

  `columns` names scalar fields copied into the sidecar index (e.g. height,
  width) so readers can get them without decoding records. Used as a context
  manager, an exception aborts the shard (its temporary file is removed).
  """

  def __init__(self, path: str, *, columns: Sequence[str] = (),
               options: str = DEFAULT_OPTIONS):
    from array_record.python import array_record_module
    self.path = os.fspath(path)
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    self._tmp = os.path.join(
        os.path.dirname(self.path) or ".",
        f".{os.path.basename(self.path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    self._writer = array_record_module.ArrayRecordWriter(self._tmp, options)
    self._columns = {c: [] for c in columns}
    self.count = 0
    self.first_example: dict[str, Any] | None = None
    self.sidecar_extra: dict[str, Any] = {}  # more JSON for the sidecar (e.g. bad_records)

  def write(self, example: Mapping[str, Any]) -> None:
    for c, values in self._columns.items():
      v = example[c]
      values.append(v.item() if isinstance(v, np.generic) else v)
    if self.first_example is None:
      self.first_example = dict(example)
    self._writer.write(encode(example))
    self.count += 1

  def close(self) -> int:
    """Finishes the shard: close, sidecar, then the rename that publishes it."""
    self._writer.close()
    atomic_write_text(_sidecar(self.path), json.dumps(
        {"num_examples": self.count, "columns": self._columns, **self.sidecar_extra}))
    os.replace(self._tmp, self.path)
    return self.count

  def abort(self) -> None:
    try:
      self._writer.close()
    finally:
      if os.path.exists(self._tmp):
        os.remove(self._tmp)

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def completed_shards(out_dir: str, prefix: str = "shard") -> list[str]:
  """Sorted paths of finished shards (temporary files are never listed)."""
  if not os.path.isdir(out_dir):
    return []
  pattern = re.compile(_SHARD_RE.format(prefix=re.escape(prefix)))
  found = [(int(m.group(1)), n) for n in os.listdir(out_dir) if (m := pattern.match(n))]
  return [os.path.join(out_dir, n) for _, n in sorted(found)]  # By number: 99999 < 100000.


def remove_incomplete(out_dir: str) -> list[str]:
  """Deletes temporary files left by interrupted writers; returns their names."""
  if not os.path.isdir(out_dir):
    return []
  stale = [n for n in os.listdir(out_dir) if n.startswith(".") and ".tmp-" in n]
  for n in stale:
    os.remove(os.path.join(out_dir, n))
  return stale


_TEMP_SHARD_RE = re.compile(r"^\.shard-(\d{5,})\.array_record(\.json)?\.tmp-")


def remove_stale_shards(out_dir: str, shards: Sequence[int]) -> list[str]:
  """Deletes temporaries of half-written shards in `shards` only: in a multi-process writer,
  another process may be writing its own shards right now. Returns the names removed."""
  mine = set(int(s) for s in shards)
  stale = [n for n in os.listdir(out_dir)
           if (m := _TEMP_SHARD_RE.match(n)) and int(m.group(1)) in mine]
  for n in stale:
    os.remove(os.path.join(out_dir, n))
  return stale


def _num_records(path: str) -> int:
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return int(reader.num_records())
  finally:
    reader.close()


def first_record(path: str) -> dict[str, Any]:
  """The first example of a finished shard (a record set's feature spec comes from it)."""
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return decode(reader.read([0])[0])
  finally:
    reader.close()


def write_manifest(out_dir: str, *, kind: str, features: Mapping[str, Any] | None = None,
                   producer: Mapping[str, Any] | None = None,
                   expected_num_examples: int | None = None, prefix: str = "shard",
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Publishes a record set: verifies every finished shard, then the manifest.

  Shard counts are read from the ArrayRecord files and must match the
  sidecars (and `expected_num_examples` if given); the manifest is written
  atomically, last. Call it once (one host) after all shards are closed.
  """
  shards = []
  for path in completed_shards(out_dir, prefix):
    n = _num_records(path)
    side = _sidecar(path)
    if not os.path.exists(side):
      raise ValueError(f"{path} has no sidecar {side}; rewrite the shard.")
    with open(side) as f:
      n_side = json.load(f)["num_examples"]
    if n != n_side:
      raise ValueError(f"{path}: {n} records but its sidecar says {n_side}.")
    shards.append({"file": os.path.basename(path), "num_examples": n})
  total = sum(s["num_examples"] for s in shards)
  if expected_num_examples is not None and total != expected_num_examples:
    raise ValueError(f"{out_dir}: {total} examples in {len(shards)} shards, "
                     f"expected {expected_num_examples}.")
  manifest = {
      "format": FORMAT, "version": VERSION, "kind": kind,
      "num_examples": total, "num_shards": len(shards), "shards": shards,
      "features": dict(features or {}), "producer": dict(producer or {}),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      **dict(extra or {}),
  }
  atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=2))
  return manifest


class RecordWriter:
  """Writes a record set from one stream of examples, shard after shard.

  Shards roll over every `examples_per_shard` examples; `close()` writes the
  manifest. If the writer dies, finished shards stay finished and the
  unfinished one is a temporary file (no manifest is written).
  """

  def __init__(self, out_dir: str, *, kind: str, examples_per_shard: int = 1000,
               columns: Sequence[str] = (), features: Mapping[str, Any] | None = None,
               producer: Mapping[str, Any] | None = None,
               options: str = DEFAULT_OPTIONS, prefix: str = "shard"):
    if examples_per_shard < 1:
      raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}.")
    existing = completed_shards(out_dir, prefix)
    if existing or os.path.exists(os.path.join(out_dir, MANIFEST)):
      raise FileExistsError(f"{out_dir} already holds records; use a new directory.")
    os.makedirs(out_dir, exist_ok=True)
    remove_incomplete(out_dir)
    self.out_dir, self.kind, self.prefix = out_dir, kind, prefix
    self._per_shard, self._columns, self._options = examples_per_shard, tuple(columns), options
    self._features, self._producer = features, producer
    self._shard: ShardWriter | None = None
    self._num_shards = 0
    self.count = 0

  def write(self, example: Mapping[str, Any]) -> None:
    if self._shard is None:
      self._shard = ShardWriter(shard_path(self.out_dir, self._num_shards, self.prefix),
                                columns=self._columns, options=self._options)
      self._num_shards += 1
    if self._features is None:
      self._features = feature_spec(example)
    self._shard.write(example)
    self.count += 1
    if self._shard.count >= self._per_shard:
      self._shard.close()
      self._shard = None

  def close(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    if self._shard is not None:
      self._shard.close()
      self._shard = None
    return write_manifest(self.out_dir, kind=self.kind, features=self._features,
                          producer=self._producer, expected_num_examples=self.count,
                          prefix=self.prefix, extra=extra)

  def abort(self) -> None:
    if self._shard is not None:
      self._shard.abort()
      self._shard = None

  def __enter__(self) -> "RecordWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_records(out_dir: str, examples: Iterable[Mapping[str, Any]], **kwargs) -> dict[str, Any]:
  """Writes all `examples` as a record set; returns the manifest."""
  with RecordWriter(out_dir, **kwargs) as writer:
    for ex in examples:
      writer.write(ex)
    return writer.close()


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------
def read_manifest(path: str) -> dict[str, Any]:
  """The manifest of a complete record set (error if the set is unfinished)."""
  fname = os.path.join(path, MANIFEST)
  if not os.path.exists(fname):
    raise FileNotFoundError(
        f"{path} has no {MANIFEST}: the record set was not finished (rerun the "
        "writer, or records.write_manifest once all shards are written).")
  with open(fname) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ValueError(f"{fname} is not a {FORMAT} v{VERSION} manifest.")
  return manifest


class DataError(ValueError):
  """Data that cannot be used as it is; the message names where and what to do."""


class BadRecordError(DataError):
  """A record that cannot be read or decoded, named by shard, record and example index."""

  def __init__(self, shard: str, record: int, index: int, reason: str):
    self.shard, self.record, self.index, self.reason = shard, record, index, reason
    super().__init__(f"bad record in {shard}: record {record} of that shard (example {index} "
                     f"of the set): {reason}. Rewrite the shard (rerun the writer), or set "
                     "config.data.max_bad_records > 0 to skip and count such records.")


def _short(error: Exception) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")


class _FileInstruction:
  """Whole-shard read instruction (saves opening every file at start-up)."""

  def __init__(self, filename: str, n: int):
    self.filename, self.skip, self.take, self.examples_in_shard = filename, 0, n, n


class RecordSource:
  """Random-access source of decoded examples over a record set (grain-ready).

  `len(src)`, `src[i]` -> dict, picklable (grain worker processes reopen files
  lazily). `verify` checks every shard's record count against the manifest.
  """

  def __init__(self, path: str, *, verify: bool = True, kind: str | None = None):
    from array_record.python import array_record_data_source
    self.path = os.fspath(path)
    self.manifest = read_manifest(self.path)
    if kind is not None and self.manifest["kind"] != kind:
      raise ValueError(f"{path} holds {self.manifest['kind']!r} records, expected {kind!r}.")
    files = [os.path.join(self.path, s["file"]) for s in self.manifest["shards"]]
    counts = [s["num_examples"] for s in self.manifest["shards"]]
    if verify:
      for f, n in zip(files, counts):
        if not os.path.exists(f):
          raise FileNotFoundError(f"{f} is listed in the manifest but missing.")
        try:
          found = _num_records(f)
        except Exception as e:  # noqa: BLE001 -- Riegeli says what and at which byte
          raise ValueError(f"{f}: the shard's index cannot be read ({_short(e)}); the file is "
                           "damaged: rewrite it (rerun the writer).") from e
        if found != n:
          raise ValueError(f"{f} does not hold the {n} records its manifest lists.")
    self._counts = counts
    self._ends = np.cumsum(counts)
    self._files = files
    self._source = (array_record_data_source.ArrayRecordDataSource(
        [_FileInstruction(f, n) for f, n in zip(files, counts) if n > 0])
        if sum(counts) else [])

  @property
  def kind(self) -> str:
    return self.manifest["kind"]

  def __len__(self) -> int:
    return int(self.manifest["num_examples"])

  def locate(self, index: int) -> tuple[str, int]:
    """(shard file, record number within it) of example `index`."""
    shard = int(np.searchsorted(self._ends, index, side="right"))
    start = int(self._ends[shard - 1]) if shard else 0
    return self._files[shard], int(index) - start

  def _read(self, index: int) -> dict[str, Any]:
    try:
      return decode(self._source[index])
    except Exception as e:  # noqa: BLE001 -- named by place, raised as BadRecordError
      shard, record = self.locate(index)
      raise BadRecordError(shard, record, index, _short(e)) from e

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records.")
    return self._read(index)

  def read_many(self, indices: Sequence[int]) -> list[dict[str, Any] | BadRecordError]:
    """Decoded examples, with a BadRecordError in the place of each unreadable one."""
    indices = [int(i) for i in indices]
    try:
      return [decode(b) for b in self._source.__getitems__(indices)]
    except Exception:  # noqa: BLE001 -- find which ones, one by one
      out: list[dict[str, Any] | BadRecordError] = []
      for i in indices:
        try:
          out.append(self._read(i))
        except BadRecordError as e:
          out.append(e)
      return out

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    out = self.read_many(indices)
    bad = next((e for e in out if isinstance(e, BadRecordError)), None)
    if bad is not None:
      raise bad
    return out

  def column(self, name: str) -> np.ndarray:
    """An index column (e.g. "height") for all examples, in example order."""
    values = []
    for f in self._files:
      with open(_sidecar(f)) as fh:
        cols = json.load(fh)["columns"]
      if name not in cols:
        raise KeyError(f"{_sidecar(f)} has no index column {name!r} (has {list(cols)}).")
      values.extend(cols[name])
    return np.asarray(values)

  def image_sizes(self) -> np.ndarray:
    """int [N, 2] (height, width) of every image, from the sidecar index."""
    if len(self) == 0:
      return np.zeros((0, 2), np.int64)
    return np.stack([self.column("height"), self.column("width")], axis=1).astype(np.int64)

  def __repr__(self) -> str:
    return f"RecordSource({self.path!r}, kind={self.kind!r}, n={len(self)})"
