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

Work units, so that many processes (hosts) share one ingest and a rerun resumes:
one unit per input tar (sorted paths), or per `examples_per_shard` consecutive
names of a folder (sorted). Unit u is written by process u % process_count as
exactly one shard, `shard_path(out_dir, u)` (empty when all its records are
bad), published by an atomic rename with its report (counts, listed bad names,
seconds) in the shard's sidecar. A rerun skips every published unit. The layout
depends only on the source and `examples_per_shard`, never on process_count, so
any split of the work writes the same records. `ingest_plan.json` (written
first) pins the arguments that decide the layout; a rerun with others is
refused. Whichever process finds every unit published merges the reports
(ingest_summary.json) and then writes the manifest; both are functions of the
published files only, so processes finishing together write the same bytes and
no barrier is needed.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import sys
import tarfile
import time
import zlib
from typing import Any, Iterator, Mapping, Sequence

from PIL import Image, ImageFile
from tqdm import tqdm

from sd3jax.data import records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SYNTHETIC_KEYS = ("caption_synthetic", "synthetic_caption", "recaption", "long_caption")
SUMMARY_FILE = "ingest_summary.json"
PLAN_FILE = "ingest_plan.json"
COLUMNS = ("height", "width")  # index columns of image_text records
REPORT_KEY = "ingest"  # a unit's report, in its shard's sidecar

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
def _folder_index(root: str) -> dict[str, dict[str, str]]:
  """name -> {extension: path} of every group under `root`, from directory listings only.

  Every process lists the whole tree (cheap next to reading it), so all agree on the units
  without talking; only a unit's owner reads its files. The names are held in memory: fine
  for tens of millions of files; a billion pairs should come as webdataset tars.
  """
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
  return groups


def _folder_groups(index: Mapping[str, Mapping[str, str]],
                   names: Sequence[str]) -> Iterator[tuple[str, dict[str, bytes] | _Skip]]:
  for name in names:
    files = {}
    try:
      for ext, path in index[name].items():
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


# ----------------------------------------------------------------------------
# The plan: units, ownership, what a rerun must match.
# ----------------------------------------------------------------------------
class IngestPlanError(FileExistsError):
  """`out_dir` holds (part of) an ingest of another source or with other arguments."""


def _units(kind: str, paths: Sequence[str], examples_per_shard: int
           ) -> tuple[list[list[str]], dict[str, dict[str, str]] | None]:
  """The work units in unit order (a tar path each, or folder names) and the folder index."""
  if kind == "webdataset":
    return [[p] for p in paths], None
  index = _folder_index(paths[0])
  names = sorted(index)
  return [names[i:i + examples_per_shard] for i in range(0, len(names), examples_per_shard)], index


def _make_plan(kind: str, paths: Sequence[str], units: Sequence[Sequence[str]],
               examples_per_shard: int, synthetic_keys: Sequence[str],
               caption_encoding: str | None) -> dict[str, Any]:
  """What decides the records (not process_count, not max_listed), as JSON values."""
  plan = {
      "tool": "sd3jax.data.ingest", "source_kind": kind,
      "source": [os.path.abspath(p) for p in paths],
      # Tars: one unit per tar whatever its size, so the shard size is not ours to pick.
      "examples_per_shard": examples_per_shard if kind == "folder" else None,
      "caption_encoding": caption_encoding, "synthetic_keys": list(synthetic_keys),
      "num_units": len(units),
  }
  if kind == "folder":  # Files added or removed would move every later unit's boundary.
    names = "\n".join(n for u in units for n in u).encode("utf-8", "surrogateescape")
    plan["names_sha256"] = hashlib.sha256(names).hexdigest()
  return plan


def _write_once(path: str, text: str) -> None:
  """Publishes `path` unless it exists: the first writer wins (a hard link never replaces)."""
  tmp = records.write_temp_text(path, text)
  try:
    os.link(tmp, path)
  except FileExistsError:
    pass
  except OSError:  # No hard links (some network filesystems): a rename; last writer wins.
    if not os.path.exists(path):
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _check_plan(out_dir: str, plan: Mapping[str, Any]) -> None:
  """Raises IngestPlanError naming each field where `out_dir`'s plan differs (arguments
  first, then what follows from them and the source)."""
  with open(os.path.join(out_dir, PLAN_FILE)) as f:
    old = json.load(f)
  show = lambda v: repr(v) if len(repr(v)) <= 200 else repr(v)[:200] + "..."
  diffs = [f"{k} {show(old.get(k))} there, {show(plan.get(k))} now"
           for k in list(plan) + [k for k in old if k not in plan] if old.get(k) != plan.get(k)]
  if diffs:
    raise IngestPlanError(f"{out_dir} holds an ingest made with other arguments (its "
                          f"{PLAN_FILE}): {'; '.join(diffs)}. Use a new out_dir or the same "
                          "arguments.")


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None and process_count is None:
    jax = sys.modules.get("jax")  # Not imported: jax.distributed cannot be running.
    if jax is not None and jax.distributed.is_initialized():
      return jax.process_index(), jax.process_count()
    return 0, 1
  if process_index is None or process_count is None:
    raise ValueError("Give both process_index and process_count, or neither.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count}).")
  return int(process_index), int(process_count)


# ----------------------------------------------------------------------------
# Writing one unit; merging the units' reports.
# ----------------------------------------------------------------------------
def _write_unit(path: str, unit: int, groups: Iterator, bar: tqdm, *,
                synthetic_keys: Sequence[str], caption_encoding: str | None,
                max_listed: int) -> dict[str, Any]:
  """Writes a unit's good pairs as one shard, its report in the sidecar; returns the report."""
  start = time.time()
  num_skipped: dict[str, int] = {}
  listed: dict[str, int] = {}
  errors: list[dict[str, str]] = []
  num_ok = num_synthetic = 0
  with records.ShardWriter(path, columns=COLUMNS) as writer:  # An error aborts the shard.
    for name, files in groups:
      bar.update(1)
      try:
        if isinstance(files, _Skip):
          raise files
        example = _candidate(name, files, synthetic_keys, caption_encoding)
      except _Skip as s:
        num_skipped[s.reason] = num_skipped.get(s.reason, 0) + 1
        if listed.get(s.reason, 0) < max_listed:
          listed[s.reason] = listed.get(s.reason, 0) + 1
          errors.append({"name": name, "reason": s.reason, "detail": s.detail})
        continue
      writer.write(example)
      num_ok += 1
      num_synthetic += bool(example["caption_synthetic"])
    report = {"unit": unit, "num_ok": num_ok, "num_with_synthetic_caption": num_synthetic,
              "num_skipped_by_reason": num_skipped, "errors": errors,
              "seconds": round(time.time() - start, 3)}
    writer.sidecar_extra[REPORT_KEY] = report
  return report


def _read_report(out_dir: str, unit: int) -> dict[str, Any]:
  path = records.shard_path(out_dir, unit)
  with open(path + ".json") as f:
    report = json.load(f).get(REPORT_KEY)
  if not report or report.get("unit") != unit:
    raise ValueError(f"{path} has no ingest report for unit {unit} in its sidecar: it was not "
                     "written by this ingest. Delete it and rerun to rewrite it.")
  return report


def _merge(reports: Sequence[Mapping[str, Any]], max_listed: int) -> dict[str, Any]:
  """The units' reports as one, in unit order: what one stream over all inputs would list."""
  num_skipped: dict[str, int] = {}
  skipped: dict[str, list[str]] = {}
  errors: list[dict[str, str]] = []
  for r in reports:
    for reason, n in r["num_skipped_by_reason"].items():
      num_skipped[reason] = num_skipped.get(reason, 0) + n
      skipped.setdefault(reason, [])
    for e in r["errors"]:
      if len(skipped[e["reason"]]) < max_listed:
        skipped[e["reason"]].append(e["name"])
        errors.append(e)
  return {
      "num_ok": sum(r["num_ok"] for r in reports),
      "num_with_synthetic_caption": sum(r["num_with_synthetic_caption"] for r in reports),
      "num_skipped": sum(num_skipped.values()), "num_skipped_by_reason": num_skipped,
      "skipped": skipped, "errors": errors,
      # Work time summed over units (all processes), not wall time: a function of the files.
      "seconds": round(sum(r["seconds"] for r in reports), 3),
  }


def _finish(out_dir: str, kind: str, paths: Sequence[str], num_units: int,
            head: Mapping[str, Any], tail: Mapping[str, Any],
            max_listed: int) -> dict[str, Any] | None:
  """Writes the summary, then the manifest, once every unit is published (else None).

  Both depend only on the published files (and max_listed), so processes that finish at
  once write the same bytes; "created" is the newest shard's time, not the clock's, because
  precompute identifies its source by it.
  """
  names = {os.path.basename(p) for p in records.completed_shards(out_dir)}
  expected = {records.shard_name(u) for u in range(num_units)}
  if names - expected:
    extra = sorted(names - expected)[:4]
    raise ValueError(f"{out_dir} holds shards outside the ingest plan ({extra}): they were "
                     "written by something else. Use a new out_dir.")
  if len(names) < num_units:
    return None
  reports = [_read_report(out_dir, u) for u in range(num_units)]
  merged = _merge(reports, max_listed)
  summary = {**head, **merged, "num_shards": num_units, **tail, "complete": True}
  records.atomic_write_text(os.path.join(out_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
  shards = [records.shard_path(out_dir, u) for u in range(num_units)]
  first = next((p for p, r in zip(shards, reports) if r["num_ok"]), None)
  newest = max([os.path.getmtime(p) for p in shards]
               or [os.path.getmtime(os.path.join(out_dir, PLAN_FILE))])
  records.write_manifest(
      out_dir, kind=records.KIND_IMAGE_TEXT,
      features=records.feature_spec(records.first_record(first)) if first else None,
      producer={"tool": "sd3jax.data.ingest", "source_kind": kind, "source": list(paths)},
      expected_num_examples=merged["num_ok"],
      extra={"created": datetime.datetime.fromtimestamp(newest, datetime.timezone.utc).isoformat(),
             "ingest": {k: merged[k] for k in ("num_ok", "num_skipped", "num_skipped_by_reason")}})
  return summary


def ingest(source: str | Sequence[str], out_dir: str, *, examples_per_shard: int = 1000,
           synthetic_keys: Sequence[str] = SYNTHETIC_KEYS, progress: bool = True,
           max_listed: int = 10_000, caption_encoding: str | None = None,
           process_index: int | None = None, process_count: int | None = None
           ) -> dict[str, Any]:
  """Writes every good image-caption pair of `source` to records in `out_dir`.

  Captions are decoded as UTF-8, or as `caption_encoding` when given; a caption that
  does not decode is skipped with the reason (its bytes are never replaced).

  Runs this process's units (process_index of process_count; default 0 of 1, or JAX's when
  jax.distributed is initialized) and resumes: published units are not redone. Returns the
  summary: counts, skipped names per reason (`errors` gives the detail of each), shard count,
  `seconds` (summed over units), `complete`. At most `max_listed` bad names are listed per
  reason (all are counted). Once every unit is published (by any process) the summary is of
  the whole set and also written to out_dir/ingest_summary.json, then the manifest;
  before that it covers this process's units only and `complete` is False.

  A folder that holds a complete record set, records from elsewhere, or an ingest with
  other arguments is refused (FileExistsError; IngestPlanError names the field). With
  process_count > 1 a process that finds the same ingest complete returns its summary.
  """
  if examples_per_shard < 1:
    raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}.")
  pi, pc = _process_layout(process_index, process_count)
  kind, paths = _resolve(source)
  units, index = _units(kind, paths, examples_per_shard)
  plan = json.loads(json.dumps(_make_plan(kind, paths, units, examples_per_shard,
                                          synthetic_keys, caption_encoding)))
  head = {"source": paths if kind == "webdataset" else paths[0], "source_kind": kind,
          "out_dir": out_dir}
  tail = {"num_units": len(units), "process_count": pc}
  plan_path = os.path.join(out_dir, PLAN_FILE)
  complete = os.path.exists(os.path.join(out_dir, records.MANIFEST))
  if complete or records.completed_shards(out_dir):
    if not os.path.exists(plan_path):
      raise FileExistsError(f"{out_dir} already holds records (not from this ingest: no "
                            f"{PLAN_FILE}); use a new directory.")
    _check_plan(out_dir, plan)
    if complete and pc == 1:
      raise FileExistsError(f"{out_dir} already holds this ingest, complete ({records.MANIFEST}"
                            "); use a new directory, or delete it to ingest again.")
    if complete:  # A late process of a multi-process run: nothing left to do.
      with open(os.path.join(out_dir, SUMMARY_FILE)) as f:
        return json.load(f)
  os.makedirs(out_dir, exist_ok=True)
  _write_once(plan_path, json.dumps(plan, indent=2))
  _check_plan(out_dir, plan)

  mine = list(range(pi, len(units), pc))  # The rule of precompute.owned_shards.
  records.remove_stale_shards(out_dir, mine)
  where = f" [process {pi}/{pc}]" if pc > 1 else ""
  bar = tqdm(desc=f"ingest {kind}{where}", unit="rec", disable=not progress)
  try:
    for u in mine:
      path = records.shard_path(out_dir, u)
      if os.path.exists(path):
        continue  # Published by an earlier run.
      groups = (_tar_groups(units[u][0]) if kind == "webdataset"
                else _folder_groups(index, units[u]))
      _write_unit(path, u, groups, bar, synthetic_keys=synthetic_keys,
                  caption_encoding=caption_encoding, max_listed=max_listed)
  finally:
    bar.close()
  summary = _finish(out_dir, kind, paths, len(units), head, tail, max_listed)
  if summary is not None:
    return summary
  # Others are still writing: this process's units only.
  done = [u for u in mine if os.path.exists(records.shard_path(out_dir, u))]
  merged = _merge([_read_report(out_dir, u) for u in done], max_listed)
  return {**head, **merged, "num_shards": len(done), **tail, "complete": False,
          "num_units_done": len(records.completed_shards(out_dir))}


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m sd3jax.data.ingest SOURCE... OUT_DIR [--examples_per_shard N]
  [--process_index I --process_count N]`."""
  import argparse
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("source", nargs="+", help="image folder, tar file(s) or folder of tars")
  parser.add_argument("out_dir")
  parser.add_argument("--examples_per_shard", type=int, default=1000,
                      help="folder sources: names per unit (= shard); tars: one unit each")
  parser.add_argument("--caption_encoding", default=None,
                      help="encoding of the .txt captions (default: UTF-8, invalid ones skipped)")
  parser.add_argument("--process_index", type=int, default=None,
                      help="this process, 0..process_count-1: it writes units u with "
                           "u %% process_count == process_index")
  parser.add_argument("--process_count", type=int, default=None,
                      help="processes sharing the ingest (any number of hosts, no coordinator)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  source = args.source[0] if len(args.source) == 1 else args.source
  summary = ingest(source, args.out_dir, examples_per_shard=args.examples_per_shard,
                   caption_encoding=args.caption_encoding, progress=not args.no_progress,
                   process_index=args.process_index, process_count=args.process_count)
  print_summary(summary)


def print_summary(summary: Mapping[str, Any]) -> None:
  """The counts (bad names are in ingest_summary.json), and what is left when incomplete."""
  print(json.dumps({k: v for k, v in summary.items() if k not in ("skipped", "errors")}, indent=2))
  if not summary["complete"]:
    print(f"{summary['num_units_done']} of {summary['num_units']} units are written; the "
          "record set is complete once the other processes finish theirs (the last one writes "
          "the manifest). Rerun a process that stopped to resume it.", file=sys.stderr)


if __name__ == "__main__":
  main()
