"""`sd3jax compile`: the real train step, compiled ahead of time for a TPU topology.

  sd3jax compile --config experiments/scaling.py:preset=paper,depth=24 --topology v5p:4x4x4

No TPU is needed: libtpu compiles for any slice on this machine (`aot.topology_devices`).
The step is `train.make_train_step` (forward, backward over microbatches, clipping,
AdamW, EMA, non-finite guard) with the state created abstractly by `train.abstract_state`
in the shardings of the config's mesh and rules, and the batch split over the data axes,
exactly as `sd3jax train` would compile it. Printed: per-device memory (arguments,
temporaries, outputs), whether it fits the chip's HBM, XLA's FLOPs with scan loops
counted per iteration, and two step-time / MFU estimates: a roofline and libtpu's own
cost model (`aot.compile_report`).

  sd3jax compile --config ... --topology v5p:4x4x4 --search

answers "what fits, and how fast" before a pod is booked: for each attention kernel (splash
and XLA's on TPU) and remat policy, lightest first, it finds the fewest microbatches that fit
(a binary search over the counts the batch allows; a heavier policy never needs more
microbatches than a lighter one needed, which bounds its search), prints every row that fits
with both estimates, and the one config line to run. Rows are ranked by libtpu's cost model
where it reports one: it is the compiler's own estimate of its fused program, while the
roofline takes XLA's per-op bytes (every operand and result, as if nothing were fused) and
so is pessimistic for memory-bound programs.

With aspect-ratio buckets (config.data.buckets), every bucket is its own program: the
largest (most pixels) is compiled and reported first, then the others with the same
settings, and the verdict says whether the whole set fits with that one microbatch count.
`--search` plans on the largest bucket, then checks its best row on the other buckets.
"""
from __future__ import annotations

import copy
import math
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from sd3jax import aot
from sd3jax import buckets as buckets_lib
from sd3jax import config as config_lib
from sd3jax.console import say

GiB = aot.GiB
REMAT_ORDER = ("none", "save_dots", "save_dots_no_batch", "full")  # lightest first


def one_bucket(config: ConfigDict, bucket: tuple[int, int]) -> ConfigDict:
  """`config` restricted to one pixel (h, w) bucket."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.data.buckets = (tuple(int(v) for v in bucket),)
  return c


def buckets_largest_first(config: ConfigDict) -> list[tuple[int, int]]:
  sizes = buckets_lib.pixel_buckets(config)
  big = buckets_lib.largest(sizes)
  return [big] + [b for b in sizes if b != big]


def compile_main(config: ConfigDict, topology: str, *, num_slices: int = 1,
                 hbm_fraction: float = 0.9, verbose: bool = True) -> dict[str, Any]:
  """compile_report of the config's train step on `topology` (e.g. 'v5p:4x4x4'); prints it.

  Several buckets: the largest bucket's report, with "buckets" (one row per bucket, largest
  first) and "all_buckets_fit" added.
  """
  sizes = buckets_largest_first(config)
  if len(sizes) > 1:
    reports = []
    for b in sizes:
      if verbose:
        say(f"bucket {buckets_lib.name(*b)} ({len(reports) + 1}/{len(sizes)}):")
      reports.append(compile_main(one_bucket(config, b), topology, num_slices=num_slices,
                                  hbm_fraction=hbm_fraction, verbose=verbose))
    report = dict(reports[0])
    report.update(buckets=[bucket_row(b, r) for b, r in zip(sizes, reports)],
                  all_buckets_fit=all(r.get("fits") for r in reports))
    if verbose:
      print(format_buckets(report))
    return report
  from sd3jax import optim, parallel, train  # pylint: disable=g-import-not-at-top
  from sd3jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from sd3jax.models import mmdit  # pylint: disable=g-import-not-at-top

  devices = aot.topology_devices(topology, num_slices=num_slices)
  config = config_lib.validate(config, num_devices=len(devices))
  mesh = train.make_mesh(config, devices)
  rules = parallel.get_rules(config.sharding_rules)
  model_cfg = config_lib.model_config(config)
  task = train.make_task(config, mesh, "")
  schedule = optim.make_schedule(config.schedule, config.optimizer.learning_rate,
                                 config.total_steps)
  init_fn = train.state_init_fn(task.init_params, task.tx)
  state, shardings = train.abstract_state(init_fn, mesh, rules, jax.random.PRNGKey(config.seed))
  axes = train.batch_axes(rules)
  batch = {k: jax.ShapeDtypeStruct(s, jnp.float32,
                                   sharding=NamedSharding(mesh, P(axes, *([None] * (len(s) - 1)))))
           for k, s in synthetic.batch_shapes(config, config.batch_size).items()}
  batch_shardings = {k: v.sharding for k, v in batch.items()}
  step = train.make_train_step(config, task, schedule)
  report = aot.compile_report(step, (state, batch), in_shardings=(shardings, batch_shardings),
                              out_shardings=(shardings, parallel.replicated(mesh)),
                              donate_argnums=0, model_flops=task.flops_per_step, mesh=mesh,
                              rules=rules, hbm_fraction=hbm_fraction)
  report.update(topology=topology, mesh=dict(mesh.shape), rules=config.sharding_rules,
                remat_policy=model_cfg.remat_policy, attention_impl=model_cfg.attention_impl,
                scan_layers=model_cfg.scan_layers,
                dtype=model_cfg.dtype, batch_size=config.batch_size,
                microbatches=config.microbatches, params=mmdit.count_params(model_cfg),
                latent="x".join(map(str, buckets_lib.latent_buckets(config)[0])))
  if verbose:
    print(format_compile(report))
  return report


def format_compile(r: dict[str, Any]) -> str:
  head = (f"{r['topology']}: mesh {r['mesh']}, rules {r['rules']}, remat {r['remat_policy']}, "
          f"attention {r['attention_impl']}, "
          f"{r['params'] / 1e6:,.1f}M params, batch {r['batch_size']} "
          f"({r['microbatches']} microbatches), latent {r['latent']}, {r['dtype']}")
  return head + "\n" + aot.format_report(r)


def _seconds(s: float) -> str:
  return f"{s:,.1f} s" if s >= 10 else f"{s * 1e3:,.{0 if s >= 0.01 else 2}f} ms"


def bucket_row(bucket: tuple[int, int], r: dict[str, Any]) -> dict[str, Any]:
  keep = ("fits", "temp_bytes", "total_bytes", "step_seconds", "mfu", "cost_model_seconds",
          "cost_model_mfu", "error", "compile_seconds")
  return {"bucket": buckets_lib.name(*bucket), **{k: r[k] for k in keep if k in r}}


def format_buckets(report: dict[str, Any]) -> str:
  """One line per bucket and the verdict for the set."""
  ms = _seconds
  lines = ["", f"Buckets on {report['topology']}, {report['microbatches']} microbatches, "
           f"remat {report['remat_policy']}, attention {report['attention_impl']}:",
           "| bucket | fits | temps / total per chip | roofline step (MFU) | "
           "libtpu cost model (MFU) |", "|---|---|---|---|---|"]
  for row in report["buckets"]:
    mem = (f"{row['temp_bytes'] / GiB:.2f} / {row['total_bytes'] / GiB:.2f} GiB"
           if "total_bytes" in row else "-")
    roof = f"{ms(row['step_seconds'])} ({row.get('mfu', 0):.0%})" if "step_seconds" in row else "-"
    cost = (f"{ms(row['cost_model_seconds'])} ({row.get('cost_model_mfu', 0):.0%})"
            if "cost_model_seconds" in row else "-")
    lines.append(f"| {row['bucket']} | {'yes' if row.get('fits') else 'NO'} | {mem} | {roof} "
                 f"| {cost} |")
  lines.append("All buckets fit with these settings." if report["all_buckets_fit"] else
               "Not every bucket fits: raise config.microbatches or use a heavier remat "
               "policy (sd3jax compile --search).")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# --search: what fits, and how fast
# ---------------------------------------------------------------------------

def microbatch_options(batch_size: int, batch_shards: int) -> list[int]:
  """Microbatch counts the batch allows (every microbatch splits evenly over the data axes)."""
  return [m for m in range(1, batch_size + 1)
          if batch_size % m == 0 and (batch_size // m) % batch_shards == 0]


def _needed_bytes(error: str) -> float | None:
  """The memory an out-of-HBM compile asked for, from XLA's message ("Used 146.2G of ...",
  "required for HLO temporaries (256.12G) exceeds ...")."""
  m = (re.search(r"Used ([\d.]+)([KMGT])? of", error)
       or re.search(r"required for [^(]*\(([\d.]+)([KMGT])?\)", error))
  if not m:
    return None
  return float(m.group(1)) * 1024.0 ** " KMGT".index(m.group(2) or " ")


def _estimate(r: dict[str, Any]) -> float:
  """The step time a search ranks by: libtpu's cost model where reported, else the roofline."""
  return r.get("cost_model_seconds") or r.get("step_seconds") or math.inf


def search(config: ConfigDict, topology: str, *, remats: Sequence[str] = REMAT_ORDER,
           attention: Sequence[str] | None = None, num_slices: int = 1,
           hbm_fraction: float = 0.9, verbose: bool = True,
           compile_fn: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
  """Fewest microbatches that fit, per (attention, remat); the fastest of those first.

  compile_fn(config, topology, num_slices=, hbm_fraction=, verbose=): compile_main, or a
  stand-in with its contract (tests).

  Returns {"rows": one dict per (attention, remat) (fits False when even the most
  microbatches do not fit), "tried": every compile, "best": the fastest row that fits or
  None, "command": the config flags of the best}.
  """
  from sd3jax import train  # pylint: disable=g-import-not-at-top
  devices = aot.topology_devices(topology, num_slices=num_slices)
  config = config_lib.validate(config, num_devices=len(devices))
  mesh = dict(train.make_mesh(config, devices).shape)
  options = microbatch_options(config.batch_size, mesh["data"] * mesh["fsdp"])
  attention = tuple(attention or ("splash", "xla"))
  bad = [r for r in remats if r not in REMAT_ORDER]
  if bad:
    raise config_lib.ConfigError(f"Unknown remat policies {bad}; choose from {REMAT_ORDER}.")
  remats = sorted(remats, key=REMAT_ORDER.index)
  tried: list[dict[str, Any]] = []
  sizes = buckets_largest_first(config)

  def compile_one(attn: str, remat: str, mb: int,
                  bucket: tuple[int, int] = sizes[0]) -> dict[str, Any]:
    c = one_bucket(config, bucket)
    c.model.attention_impl, c.model.remat_policy, c.microbatches = attn, remat, mb
    t0 = time.perf_counter()
    r = (compile_fn or compile_main)(c, topology, num_slices=num_slices,
                                     hbm_fraction=hbm_fraction, verbose=False)
    r.setdefault("topology", topology)
    r.update(attention_impl=attn, remat_policy=remat, microbatches=mb,
             wall_seconds=time.perf_counter() - t0)
    if "error" in r:
      r["needed_bytes"] = _needed_bytes(r["error"])
    tried.append(r)
    if verbose:
      say(f"  {attn:6s} remat {remat:18s} {mb:4d} microbatches: {_fit_words(r)} "
          f"({r['wall_seconds']:.0f} s)")
    return r

  rows = []
  for attn in attention:
    top = len(options) - 1        # a heavier remat needs at most the lighter one's count
    for remat in remats:
      lo, hi, best = 0, top, None
      while lo <= hi:
        mid = (lo + hi) // 2
        r = compile_one(attn, remat, options[mid])
        if r.get("fits"):
          best, hi = r, mid - 1
        else:
          lo = mid + 1
      if best is None:
        rows.append({"attention_impl": attn, "remat_policy": remat, "fits": False,
                     "microbatches": options[top]})
        continue
      rows.append(best)
      top = options.index(best["microbatches"])
  fitting = sorted((r for r in rows if r.get("fits")),
                   key=lambda r: (_estimate(r), r["microbatches"]))
  best = fitting[0] if fitting else None
  others = []  # the best row's settings on the smaller buckets: the set runs with one setting
  if best is not None and len(sizes) > 1:
    if verbose:
      say("Checking the other buckets with the best settings:")
    others = [compile_one(best["attention_impl"], best["remat_policy"], best["microbatches"], b)
              for b in sizes[1:]]
  command = (f"--config.model.attention_impl={best['attention_impl']} "
             f"--config.model.remat_policy={best['remat_policy']} "
             f"--config.microbatches={best['microbatches']}") if best else None
  result = {"rows": rows, "tried": tried, "best": best, "command": command,
            "topology": topology, "options": options,
            "bucket": buckets_lib.name(*sizes[0]),
            "other_buckets": [bucket_row(b, r) for b, r in zip(sizes[1:], others)]}
  if verbose:
    print(format_search(result))
  return result


def _fit_words(r: dict[str, Any]) -> str:
  if r.get("fits"):
    return f"fits, {r['total_bytes'] / GiB:.1f} GiB per chip"
  if r.get("needed_bytes"):
    return f"does not fit (XLA asked for {r['needed_bytes'] / GiB:.1f} GiB)"
  if "total_bytes" in r:
    return (f"does not fit ({r['total_bytes'] / GiB:.1f} GiB per chip, over "
            f"{r['hbm_fraction']:.0%} of HBM)")
  return "does not fit"


def format_search(result: dict[str, Any]) -> str:
  """The search as a table: one row per (attention, remat), the fastest first."""
  head = ("| attention | remat | microbatches | temps / total per chip | roofline step (MFU) "
          "| libtpu cost model (MFU) |")
  lines = [f"Search on {result['topology']} (microbatch counts tried from {result['options']}; "
           f"{len(result['tried'])} compiles):", "", head, "|---|---|---|---|---|---|"]
  ms = _seconds
  rows = sorted(result["rows"], key=lambda r: (not r.get("fits"), _estimate(r)))
  for r in rows:
    if not r.get("fits"):
      lines.append(f"| {r['attention_impl']} | {r['remat_policy']} | - | does not fit at "
                   f"{r['microbatches']} | | |")
      continue
    roof = f"{ms(r['step_seconds'])} ({r.get('mfu', 0):.0%})" if "step_seconds" in r else "-"
    cost = (f"{ms(r['cost_model_seconds'])} ({r.get('cost_model_mfu', 0):.0%})"
            if "cost_model_seconds" in r else "-")
    lines.append(f"| {r['attention_impl']} | {r['remat_policy']} | {r['microbatches']} | "
                 f"{r['temp_bytes'] / GiB:.2f} / {r['total_bytes'] / GiB:.2f} GiB | {roof} | "
                 f"{cost} |")
  lines.append("")
  if any("xla_optimal_seconds" in r and "cost_model_seconds" not in r for r in result["rows"]):
    lines.append("libtpu's cost model gave no valid estimate for this chip (a negative time); "
                 "rows are ranked by the roofline.")
  if result["best"] is None:
    lines.append("Nothing fits: use a larger slice, a smaller batch per chip, or tensor "
                 "parallelism (config.mesh, sharding_rules=fsdp_tp).")
  else:
    basis = ("libtpu's cost model" if "cost_model_seconds" in result["best"]
             else "the roofline")
    lines.append(f"Fastest by {basis}; run it with:\n  {result['command']}")
  if result.get("other_buckets"):
    bad = [r["bucket"] for r in result["other_buckets"] if not r.get("fits")]
    lines.append(f"Planned on the largest bucket, {result['bucket']}; with these settings "
                 + (f"bucket(s) {', '.join(bad)} do NOT fit." if bad else
                    f"the other buckets ({', '.join(r['bucket'] for r in result['other_buckets'])}) "
                    "fit too."))
  return "\n".join(lines)
