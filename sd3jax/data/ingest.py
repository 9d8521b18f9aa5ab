"""Ingest user image-text data into sd3jax `image_text` records.

Sources:
  * an image folder (searched recursively): `a/b/img.jpg` + `a/b/img.txt`
    (original caption) + optional `a/b/img.json` (synthetic caption under
    one of `synthetic_keys`, other fields kept as metadata);
  * webdataset tar shards as img2dataset writes them (`key.jpg`, `key.txt`,
    `key.json` as consecutive members): a .tar path, a directory of .tar
    files, or a list of paths.

Every image is fully decoded to verify it (a truncated JPEG fails there, not
at training time) but stored as the original bytes. Captions must be valid
UTF-8 unless `caption_encoding` names their encoding; a caption is never
stored with bytes replaced. Bad records (undecodable image, missing, empty or
undecodable caption, caption without image, unreadable member) are skipped,
counted and listed by name with the reason in plain words; one bad record, or a
truncated tar, never stops the run, and every good pair is kept. The summary
is returned and written to `out_dir/ingest_summary.json`.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
import zlib
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image, ImageFile
from tqdm import tqdm

from sd3jax.data import records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SYNTHETIC_KEYS = ("caption_synthetic", "synthetic_caption", "recaption", "long_caption")
SUMMARY_FILE = "ingest_summary.json"

# Skip reasons (keys of the summary's "skipped").
CORRUPT_IMAGE = "corrupt_image"
MISSING_CAPTION = "missing_caption"
MISSING_IMAGE = "missing_image"
UNREADABLE = "unreadable"
BAD_CAPTION_ENCODING = "bad_caption_encoding"


def _read_text(data: bytes, encoding: str | None = None) -> str:
  """The caption text; raises _Skip when the bytes are not valid in `encoding` (UTF-8)."""
  try:
    return data.decode(encoding or "utf-8").strip()
  except UnicodeDecodeError as e:
    hint = ("; if the captions use another encoding, ingest with caption_encoding set to it "
            "(e.g. --caption_encoding latin-1)") if encoding is None else ""
    raise _Skip(BAD_CAPTION_ENCODING,
                f"the caption is not valid {e.encoding} (byte 0x{data[e.start]:02x} at position "
                f"{e.start}){hint}") from None


def _image_problem(data: bytes, error: Exception) -> str:
  """Why an image did not decode, in plain words."""
  from PIL import UnidentifiedImageError
  if not data:
    return "the image file is empty (0 bytes)"
  if isinstance(error, UnidentifiedImageError):
    return (f"the file is not an image PIL can read ({len(data)} bytes, starting "
            f"{data[:8].hex(' ')})")
  if isinstance(error, OSError) and "truncated" in str(error).lower():
    return f"the image data is cut short ({len(data)} bytes; {error})"
  return f"the image does not decode ({type(error).__name__}: {error})"


def _verify_image(data: bytes) -> tuple[str, int, int]:
  """Fully decodes the image; returns (format, height, width) or raises."""
  # Some libraries set this global to accept truncated files; not here.
  tolerant, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt = (im.format or "unknown").lower()
      im.load()  # Full decode: truncated data raises here (OSError).
      if im.width < 1 or im.height < 1:
        raise ValueError("empty image")
      im.convert("RGB")  # Exotic modes must be convertible for the pipeline.
      return fmt, im.height, im.width
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


def _candidate(name: str, files: dict[str, bytes | None], synthetic_keys: Sequence[str],
               caption_encoding: str | None = None) -> dict[str, Any]:
  """Turns one key's files into an example, or raises _Skip with a reason."""
  image_ext = next((e for e in IMAGE_EXTENSIONS if e[1:] in files), None)
  if image_ext is None:
    raise _Skip(MISSING_IMAGE, "there is a caption but no image file")
  caption = files.get("txt")
  if caption is None:
    raise _Skip(MISSING_CAPTION, "there is an image but no caption file (.txt)")
  text = _read_text(caption, caption_encoding)
  if not text:
    raise _Skip(MISSING_CAPTION, "the caption file is empty")
  data = files[image_ext[1:]]
  try:
    fmt, h, w = _verify_image(data)
  except Exception as e:  # PIL raises many types for bad data.
    raise _Skip(CORRUPT_IMAGE, _image_problem(data, e)) from None
  meta, synthetic = {}, ""
  if files.get("json") is not None:
    try:
      meta = json.loads(files["json"].decode("utf-8"))
      if not isinstance(meta, dict):
        meta = {"json": meta}
    except Exception as e:  # A bad sidecar JSON loses metadata, not the pair.
      meta = {"json_error": f"{type(e).__name__}: {e}"}
    for k in synthetic_keys:
      if isinstance(meta.get(k), str) and meta[k].strip():
        synthetic = meta[k].strip()
        break
  return {
      "key": name, "image": data, "image_format": fmt, "height": h, "width": w,
      "caption_original": text, "caption_synthetic": synthetic,
      "meta": meta,
  }


class _Skip(Exception):

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------
# Sources: yield (name, {extension: bytes}) groups, or (name, _Skip).
# ----------------------------------------------------------------------------
def _folder_groups(root: str) -> Iterator[tuple[str, dict[str, bytes] | _Skip]]:
  groups: dict[str, dict[str, str]] = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for fn in filenames:
      if fn.startswith("."):
        continue
      stem, ext = os.path.splitext(fn)
      ext = ext.lower()
      if ext in IMAGE_EXTENSIONS or ext in (".txt", ".json"):
        rel = os.path.relpath(os.path.join(dirpath, stem), root)
        groups.setdefault(rel, {})[ext[1:]] = os.path.join(dirpath, fn)
  for name in sorted(groups):
    files = {}
    try:
      for ext, path in groups[name].items():
        with open(path, "rb") as f:
          files[ext] = f.read()
    except OSError as e:
      yield name, _Skip(UNREADABLE, f"{type(e).__name__}: {e}")
      continue
    yield name, files


def _wds_key(member_name: str) -> tuple[str, str]:
  """webdataset convention: key = path up to the first '.' of the basename."""
  d, base = os.path.split(member_name)
  stem, _, ext = base.partition(".")
  return os.path.join(d, stem) if d else stem, ext.lower()


def _tar_groups(path: str) -> Iterator[tuple[str, dict[str, bytes] | _Skip]]:
  prefix = os.path.splitext(os.path.basename(path))[0]
  key, files = None, {}
  try:
    with tarfile.open(path, "r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        k, ext = _wds_key(member.name)
        if k != key:
          if key is not None:
            yield f"{prefix}/{key}", files
          key, files = k, {}
        f = tar.extractfile(member)
        files[ext] = f.read() if f is not None else b""
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    # A truncated/corrupt tar: the pending record keeps the members read in
    # full (it is verified like any other); the unreadable rest is reported.
    if key is not None:
      yield f"{prefix}/{key}", files
      key = None
    yield f"{prefix}/<rest of tar>", _Skip(UNREADABLE, f"{type(e).__name__}: {e}")
  if key is not None:
    yield f"{prefix}/{key}", files


def _resolve(source: str | Sequence[str]) -> tuple[str, list[str]]:
  """('folder', [root]) or ('webdataset', [tar paths])."""
  if not isinstance(source, (str, os.PathLike)):
    paths = [os.fspath(p) for p in source]
    if not all(p.endswith(".tar") or p.endswith((".tar.gz", ".tgz")) for p in paths):
      raise ValueError("A list source must hold webdataset .tar paths.")
    return "webdataset", paths
  source = os.fspath(source)
  if os.path.isfile(source):
    return "webdataset", [source]
  if not os.path.isdir(source):
    raise FileNotFoundError(f"ingest source {source} does not exist.")
  tars = sorted(os.path.join(source, n) for n in os.listdir(source)
                if n.endswith((".tar", ".tar.gz", ".tgz")))
  return ("webdataset", tars) if tars else ("folder", [source])


def ingest(source: str | Sequence[str], out_dir: str, *, examples_per_shard: int = 1000,
           synthetic_keys: Sequence[str] = SYNTHETIC_KEYS, progress: bool = True,
           max_listed: int = 10_000, caption_encoding: str | None = None) -> dict[str, Any]:
  """Writes every good image-caption pair of `source` to records in `out_dir`.

  Captions are decoded as UTF-8, or as `caption_encoding` when given; a caption that
  does not decode is skipped with the reason (its bytes are never replaced).

  Returns the summary: counts, skipped names per reason (`errors` gives the
  detail of each), shard count, timing. At most `max_listed` bad names are
  listed per reason (all are counted).
  """
  kind, paths = _resolve(source)
  groups: Iterable = (_folder_groups(paths[0]) if kind == "folder"
                      else (g for p in paths for g in _tar_groups(p)))
  start = time.time()
  skipped: dict[str, list[str]] = {}
  num_skipped: dict[str, int] = {}
  errors: list[dict[str, str]] = []
  num_ok = num_synthetic = 0
  writer = records.RecordWriter(
      out_dir, kind=records.KIND_IMAGE_TEXT, examples_per_shard=examples_per_shard,
      columns=("height", "width"),
      producer={"tool": "sd3jax.data.ingest", "source_kind": kind, "source": paths})
  bar = tqdm(groups, desc=f"ingest {kind}", unit="rec", disable=not progress)
  for name, files in bar:
    try:
      if isinstance(files, _Skip):
        raise files
      example = _candidate(name, files, synthetic_keys, caption_encoding)
    except _Skip as s:
      num_skipped[s.reason] = num_skipped.get(s.reason, 0) + 1
      if len(skipped.setdefault(s.reason, [])) < max_listed:
        skipped[s.reason].append(name)
        errors.append({"name": name, "reason": s.reason, "detail": s.detail})
      bar.set_postfix(ok=num_ok, skipped=sum(num_skipped.values()))
      continue
    writer.write(example)
    num_ok += 1
    num_synthetic += bool(example["caption_synthetic"])
  bar.close()
  summary = {
      "source": paths if kind == "webdataset" else paths[0], "source_kind": kind,
      "out_dir": out_dir, "num_ok": num_ok, "num_with_synthetic_caption": num_synthetic,
      "num_skipped": sum(num_skipped.values()), "num_skipped_by_reason": num_skipped,
      "skipped": skipped, "errors": errors, "seconds": round(time.time() - start, 3),
  }
  manifest = writer.close(extra={"ingest": {k: summary[k] for k in (
      "num_ok", "num_skipped", "num_skipped_by_reason")}})
  summary["num_shards"] = manifest["num_shards"]
  with open(os.path.join(out_dir, SUMMARY_FILE), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m sd3jax.data.ingest SOURCE OUT_DIR [--examples_per_shard N]`."""
  import argparse
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("source", nargs="+", help="image folder, tar file(s) or folder of tars")
  parser.add_argument("out_dir")
  parser.add_argument("--examples_per_shard", type=int, default=1000)
  parser.add_argument("--caption_encoding", default=None,
                      help="encoding of the .txt captions (default: UTF-8, invalid ones skipped)")
  args = parser.parse_args(argv)
  source = args.source[0] if len(args.source) == 1 else args.source
  summary = ingest(source, args.out_dir, examples_per_shard=args.examples_per_shard,
                   caption_encoding=args.caption_encoding)
  print(json.dumps({k: v for k, v in summary.items() if k not in ("skipped", "errors")}, indent=2))


if __name__ == "__main__":
  main()
