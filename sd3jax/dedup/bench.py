"""Dedup throughput on this machine: descriptors, kNN queries and pair verifications per
second, and index memory.

  python -m sd3jax.dedup.bench [--descriptor DIR] [--sscd] [--million 1] [--out FILE.json]

Descriptors: the compiled descriptor over the local devices, on random images at its input
size (decoding is not included; it is measured separately on PNG bytes). Search: random unit
vectors, an exact flat index (on 100k) and an IVF-PQ index (on `million` x 1M), each queried
with 10k of its own vectors for the 10 nearest; memory is faiss's serialised index size.
Verification: shapes scenes against edited copies, decoded beforehand, batches of 64.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import numpy as np


def _timed(fn, *args, repeat: int = 3) -> float:
  fn(*args)  # compile / warm up
  times = []
  for _ in range(repeat):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def descriptor_speed(desc, batch: int = 256) -> dict[str, Any]:
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = jax.local_devices()
  batch = batch // len(devices) * len(devices)
  sharding = NamedSharding(Mesh(np.asarray(devices), ("data",)), P("data"))
  fn = jax.jit(desc.fn, in_shardings=sharding)
  x = np.random.default_rng(0).random((batch, desc.size, desc.size, 3), np.float32)
  seconds = _timed(fn, x)
  return {"descriptor": desc.name, "size": desc.size, "dims": desc.dims, "batch": batch,
          "images_per_second": round(batch / seconds, 1)}


def decode_speed(n: int = 512, size: int = 64) -> dict[str, Any]:
  from sd3jax.data import shapes
  from sd3jax.dedup.descriptors import prepare
  data = [shapes.encode_png(shapes.make_example(i, height=size, width=size)["image"])
          for i in range(n)]
  t = time.perf_counter()
  for d in data:
    prepare(d, 64)
  return {"what": f"PNG {size}x{size} decode + resize, one thread",
          "images_per_second": round(n / (time.perf_counter() - t), 1)}


def verify_speed(pairs: int = 64, size: int = 64) -> dict[str, Any]:
  from sd3jax.dedup import shapes_duplicates, verify
  from sd3jax.dedup.descriptors import prepare
  rng = np.random.default_rng(0)
  scenes = shapes_duplicates.unique_scenes(pairs, height=size, width=size)
  a = np.stack([s["image"] for s in scenes])
  b = np.stack([prepare(shapes_duplicates.near_copy(s["image"], rng)[0], size) for s in scenes])
  cfg = verify.VerifyConfig(size=size)
  seconds = _timed(lambda: verify.verify_images(a, b, cfg)["score"])
  return {"what": f"pair verification at {size}x{size}, batches of {pairs}",
          "pairs_per_second": round(pairs / seconds, 1)}


def search_speed(n: int, d: int, *, exact: bool, queries: int = 10_000, k: int = 10,
                 seed: int = 0) -> dict[str, Any]:
  import faiss
  from sd3jax.dedup.cluster import build_index
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d), np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  t = time.perf_counter()
  index, info = build_index(x, exact_limit=n if exact else 0)
  build = time.perf_counter() - t
  q = x[:queries]
  t = time.perf_counter()
  index.search(q, k + 1)
  search = time.perf_counter() - t
  size = len(faiss.serialize_index(index))
  return {"index": info["type"], "n": n, "dims": d, "build_seconds": round(build, 1),
          "queries_per_second": round(queries / search, 1),
          "index_bytes_per_vector": round(size / n, 1),
          "index_gib_per_million": round(size / n * 1e6 / 2**30, 3),
          "faiss_threads": faiss.omp_get_max_threads()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--descriptor", default=None, help="a CopyNet folder (default: random "
                      "CopyNet weights: the speed does not depend on them)")
  parser.add_argument("--sscd", action="store_true", help="also time SSCD ResNet-50 at 224 "
                      "and 320 (random weights)")
  parser.add_argument("--million", type=int, default=1)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  from sd3jax.dedup import copy_net, descriptors
  out: dict[str, Any] = {"devices": [str(d) for d in jax.local_devices()]}
  if args.descriptor:
    desc = descriptors.load_descriptor(args.descriptor)
  else:
    cfg = copy_net.CopyNetConfig()
    model = copy_net.CopyNet(cfg)
    params = model.init(jax.random.key(0), np.zeros((1, cfg.size, cfg.size, 3)))["params"]
    desc = descriptors.Descriptor("copy_net", "random", cfg.size, cfg.dims,
                                  lambda x: model.apply({"params": params}, x))
  out["descriptors"] = [descriptor_speed(desc)]
  if args.sscd:
    from sd3jax.models import sscd
    module = sscd.SSCD(sscd.SSCDConfig())
    for size in (224, 320):
      params = module.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))["params"]
      d = descriptors.Descriptor(f"sscd_resnet50@{size}", "random", size, 512,
                                 lambda x, p=params, s=size: module.apply(
                                     {"params": p}, sscd.preprocess(x, s)))
      out["descriptors"].append(descriptor_speed(d, batch=32))
  out["decode"] = decode_speed()
  out["verify"] = verify_speed()
  out["search"] = [search_speed(100_000, 128, exact=True), search_speed(100_000, 512, exact=True),
                   search_speed(args.million * 1_000_000, 128, exact=False),
                   search_speed(args.million * 1_000_000, 512, exact=False)]
  text = json.dumps(out, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
