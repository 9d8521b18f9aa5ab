"""Ahead-of-time compilation for accelerators that are not attached (TPU via libtpu).

Whether a configuration fits, and roughly how fast it runs, is known before a pod is
booked: libtpu compiles for any TPU topology on a CPU-only machine, and the compiled
executable reports per-device memory and XLA's cost analysis.

  devices = topology_devices("v5p:4x4x4")             # 64 compile-only devices
  mesh = parallel.make_mesh(ici={"fsdp": -1}, devices=devices)
  report = compile_report(train_step, (state, batch), in_shardings=..., mesh=mesh,
                          rules="fsdp", model_flops=...)
  print(format_report(report))

`compile_report` takes any function (jitted or not) and abstract arguments
(jax.ShapeDtypeStruct, with or without shardings): nothing is allocated.

Two things XLA's numbers do not say by themselves, corrected here:
- `cost_analysis()` counts the body of a while loop (`lax.scan`, `nn.scan`, microbatch
  accumulation) once, not once per iteration; measured here on TPU AOT too (a scanned
  depth-4 MM-DiT reports half the FLOPs of the unscanned one). The report counts matmul
  FLOPs from the jaxpr instead, where scan lengths are static, every iteration included,
  and scales bytes accessed by the matmuls' loop factor.
- A Pallas kernel (splash attention) is a custom call whose FLOPs XLA does not count at all;
  the report counts its matmuls once per grid point from the kernel's own jaxpr.
- libtpu's cost model ("optimal_seconds") is reported next to the roofline, with the loop
  correction applied to it as well: the two disagree, and a plan should see both.
- Going over HBM is a compile error on TPU (RESOURCE_EXHAUSTED), not a number; the report
  turns it into fits=False with XLA's message.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import math
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sd3jax import chips

GiB = chips.GiB

# The libtpu that jax[tpu] pins for the installed jax (jax 0.10.2: libtpu==0.0.42.*).
_LIBTPU_FALLBACK = "libtpu==0.0.42.1"


def libtpu_requirement() -> str:
  """The pip requirement for the libtpu matching the installed jax (from jax's metadata)."""
  try:
    for req in importlib.metadata.requires("jax") or ():
      if req.startswith("libtpu") and 'extra == "tpu"' in req:
        return req.split(";")[0].strip()
  except importlib.metadata.PackageNotFoundError:
    pass
  return _LIBTPU_FALLBACK


# ---------------------------------------------------------------------------
# Chips
# ---------------------------------------------------------------------------

# One table for the trainer's MFU and these estimates: sd3jax/chips.py.
Chip, CHIPS, chip_for = chips.Chip, chips.CHIPS, chips.chip_for


def _get_chip(chip: str | Chip | None, devices: Sequence[jax.Device]) -> Chip | None:
  if isinstance(chip, Chip):
    return chip
  if chip is None:
    return chip_for(devices[0]) if devices else None
  key = chip.lower().replace("tpu", "").strip(" -_")
  if key not in CHIPS:
    raise ValueError(f"Unknown chip {chip!r}; known: {sorted(CHIPS)} (or pass an aot.Chip).")
  return CHIPS[key]


# ---------------------------------------------------------------------------
# Topologies
# ---------------------------------------------------------------------------

_GENERATIONS = {"v4": 3, "v5p": 3, "v5e": 2, "v5litepod": 2, "v6e": 2}
_MEGACORE = ("v4", "v5p")  # two TensorCores per chip, one jax device per chip


def _slice_shape(gen: str, chips: int) -> tuple[int, ...]:
  """Standard slice shape for a chip count: 2x2(x1), then double the last smallest side."""
  ndim = _GENERATIONS[gen]
  if chips == 1:
    return (1,) * ndim
  if chips < 4 or chips & (chips - 1):
    raise ValueError(f"{gen} slices have 1 or 4, 8, 16, ... chips; got {chips}.")
  shape = [2, 2] + [1] * (ndim - 2)
  while math.prod(shape) < chips:
    i = max(j for j, s in enumerate(shape) if s == min(shape))
    shape[i] *= 2
  return tuple(shape)


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """'v5p:4x4x4' or the accelerator type 'v5p-128' -> ('v5p', (4, 4, 4)).

  Accelerator types count TensorCores on v4 / v5p (two per chip) and chips on v5e / v6e.
  """
  name = topology.strip().lower()
  m = re.fullmatch(r"(v\d+[a-z]*)[:=_]([0-9x]+)", name)
  if m and m.group(1) in _GENERATIONS:
    gen, dims = m.group(1), tuple(int(s) for s in m.group(2).split("x"))
  else:
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
    if not m or m.group(1) not in _GENERATIONS:
      raise ValueError(
          f"Unknown TPU topology {topology!r}. Use GENERATION:SHAPE such as v5p:2x2x1, "
          f"v5p:4x4x4, v4:2x2x1, v5e:2x2, v6e:4x4, or an accelerator type such as v5p-128 or "
          f"v6e-16; generations: {sorted(_GENERATIONS)}.")
    gen, n = m.group(1), int(m.group(2))
    dims = _slice_shape(gen, n // 2 if gen in _MEGACORE else n)
  gen = "v5e" if gen == "v5litepod" else gen
  if len(dims) == 2 and _GENERATIONS[gen] == 3:
    dims = dims + (1,)
  if len(dims) != _GENERATIONS[gen]:
    raise ValueError(f"TPU {gen} topologies have {_GENERATIONS[gen]} sides, got {topology!r}.")
  return gen, dims


@functools.lru_cache(maxsize=None)
def _topology_devices(gen: str, dims: tuple[int, ...], num_slices: int) -> tuple[jax.Device, ...]:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kw: dict[str, Any] = {}
  if gen in _MEGACORE:
    kw["chip_config_name"] = "megacore"
    # Full cubes (every side a multiple of 4) have wrap-around links (a torus).
    if all(d % 4 == 0 for d in dims):
      kw["wrap"] = (True,) * len(dims)
  if math.prod(dims) < 4:  # smaller than one host's 2x2 chips
    kw["chips_per_host_bounds"] = tuple(dims) + (1,) * (3 - len(dims))
  if num_slices > 1:
    kw["num_slices"] = num_slices
  name = f"{gen}:{'x'.join(map(str, dims))}"
  try:
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kw)
  except RuntimeError as e:  # JaxRuntimeError is a RuntimeError
    raise ValueError(f"libtpu rejected TPU topology {name!r} ({kw}): {e}") from e
  return tuple(desc.devices)


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """Compile-only devices of a TPU slice (or `num_slices` slices); no TPU needed.

  One device per chip (v4 / v5p in megacore mode). Works next to the CPU backend
  (JAX_PLATFORMS=cpu and fake CPU devices are fine): libtpu is loaded as a plugin.
  Repeated calls return the same device objects, so meshes built from them compare equal.
  """
  if (importlib.util.find_spec("libtpu") is None
      and not os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", ""))):
    raise RuntimeError(
        f"Compiling for a TPU topology needs libtpu, which is not installed. Install the "
        f"version jax {jax.__version__} was built against: pip install '{libtpu_requirement()}' "
        f"(or pip install 'jax[tpu]=={jax.__version__}').")
  # libtpu takes /tmp/libtpu_lockfile to own the (here absent) chips; any other process that
  # loaded it (e.g. `import jax` without JAX_PLATFORMS=cpu) would make this fail.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  gen, dims = parse_topology(topology)
  return list(_topology_devices(gen, dims, int(num_slices)))


# ---------------------------------------------------------------------------
# FLOPs from the jaxpr (loops expanded)
# ---------------------------------------------------------------------------

def _eqn_matmul_flops(eqn) -> float:
  name = eqn.primitive.name
  if name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / rhs[out_feature_dim]
  return 0.0


def pallas_call_flops(eqn) -> float:
  """Matmul FLOPs of one pallas_call: its cost estimate, else body matmuls x grid points."""
  estimate = eqn.params.get("cost_estimate")
  if estimate is not None and getattr(estimate, "flops", None):
    return float(estimate.flops)
  grid = getattr(eqn.params.get("grid_mapping"), "grid", ()) or ()
  return jaxpr_matmul_flops(eqn.params["jaxpr"]) * math.prod(int(g) for g in grid)


def _shard_map_reps(eqn) -> int:
  mesh = eqn.params["mesh"]
  axes = eqn.params.get("newly_manual_axes") or eqn.params.get("manual_axes") or mesh.axis_names
  return math.prod(dict(mesh.shape)[a] for a in axes)


def jaxpr_matmul_flops(jaxpr, expand_loops: bool = True, kernels_only: bool = False) -> float:
  """FLOPs of every dot_general / convolution in a (closed) jaxpr, global (all devices).

  With expand_loops, a scan body counts `length` times (what the hardware does);
  without, once (what XLA's cost_analysis does). while_loop trip counts are not static
  and count once either way; of cond branches the most expensive counts; a shard_map
  body (per-device shapes) counts once per device of its manual axes. A Pallas kernel
  (splash attention) is a custom call that XLA counts nothing for: with expand_loops it
  counts its own cost estimate, or else its body's matmuls once per grid point (exact for
  splash: 4 / 8 / 6 x B H T^2 D in the forward / dkv / dq kernels); without, zero.
  kernels_only: count only the Pallas kernels.
  """
  import jax.extend as jex  # pylint: disable=g-import-not-at-top
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      total += pallas_call_flops(eqn) if expand_loops else 0.0
      continue
    total += 0.0 if kernels_only else _eqn_matmul_flops(eqn)
    subs = [jaxpr_matmul_flops(j, expand_loops, kernels_only)
            for j in jex.core.jaxprs_in_params(eqn.params)]
    if not subs:
      continue
    name, reps = eqn.primitive.name, 1
    if name == "cond":
      total += max(subs)
      continue
    if name == "scan" and expand_loops:
      reps = eqn.params["length"]
    elif name == "shard_map":
      reps = _shard_map_reps(eqn)
    total += reps * sum(subs)
  return total


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def _devices_in(*trees: Any) -> list[jax.Device]:
  """The devices of the first sharding found in pytrees of shardings / ShapeDtypeStructs."""
  for tree in trees:
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
      s = leaf if isinstance(leaf, jax.sharding.Sharding) else getattr(leaf, "sharding", None)
      if isinstance(s, jax.sharding.Sharding):
        return sorted(s.device_set, key=lambda d: d.id)
  return []


def _first(ca: Any) -> Mapping[str, float]:
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return ca or {}


def compile_report(fn: Callable[..., Any], abstract_args: Sequence[Any], *,
                   in_shardings: Any = None, out_shardings: Any = None,
                   donate_argnums: int | Sequence[int] = (),
                   chip: str | Chip | None = None, model_flops: float | None = None,
                   mesh: Mesh | None = None, rules: Any = None,
                   hbm_fraction: float = 0.9) -> dict[str, Any]:
  """Compiles `fn(*abstract_args)` and returns per-device memory, FLOPs and time estimates.

  fn: any function, or an already jitted one (then leave the shardings / donation unset).
  abstract_args: jax.ShapeDtypeStruct pytrees (their `sharding`s are used where
    in_shardings is unset). mesh / rules: entered while tracing (jax.set_mesh and
    flax logical_axis_rules; rules is a sd3jax.parallel preset name or rule list) for
    functions that use logical constraints.
  chip: a CHIPS key or Chip; default: looked up from the devices' device_kind.
  model_flops: useful FLOPs of one call over all devices (e.g. 3 x forward FLOPs x batch),
    for MFU. hbm_fraction: the share of the chip's HBM a config may plan to use; the rest is
    margin for the runtime, fragmentation and input buffers (XLA itself refuses to compile
    beyond the usable HBM, 96-99% of nominal on TPU).

  Returns a flat dict; byte and FLOP figures are per device (see format_report):
  memory (argument/output/alias/temp/generated_code/total_bytes, fits), xla_flops and
  xla_bytes_accessed as XLA reports them, flops / bytes_accessed with the loop iterations
  XLA leaves out added back (matmuls exactly, from the jaxpr; bytes scaled by the matmuls'
  loop factor, roughly),
  and step_seconds = max(flops / peak, bytes / HBM bandwidth): a roofline estimate that
  ignores collectives over ICI / DCN and assumes peak matmul throughput (XLA's bytes are
  per-op operands + results, so the HBM side tends to be pessimistic). mfu = model_flops /
  n / step_seconds / peak.
  """
  if hasattr(fn, "trace") and in_shardings is None and out_shardings is None \
      and not donate_argnums:
    jitted = fn
  else:
    kw: dict[str, Any] = {"donate_argnums": donate_argnums}
    if in_shardings is not None:
      kw["in_shardings"] = in_shardings
    if out_shardings is not None:
      kw["out_shardings"] = out_shardings
    jitted = jax.jit(fn, **kw)

  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
    if rules is not None:
      from sd3jax import parallel  # pylint: disable=g-import-not-at-top
      stack.enter_context(nn.logical_axis_rules(parallel.get_rules(rules)))
    traced = jitted.trace(*abstract_args)
    lowered = traced.lower()

  report: dict[str, Any] = {}
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    devices = (list(mesh.devices.flat) if mesh is not None else
               _devices_in(in_shardings, out_shardings, abstract_args))
    c = _get_chip(chip, devices)
    return {"fits": False, "error": str(e).strip(), "num_devices": len(devices) or None,
            "device_kind": devices[0].device_kind if devices else None,
            "chip": c.name if c else None, "hbm_bytes": c.hbm_bytes if c else None,
            "compile_seconds": time.perf_counter() - t0}
  report["compile_seconds"] = time.perf_counter() - t0

  devices = _devices_in(compiled.input_shardings, compiled.output_shardings)
  n = max(len(devices), 1)
  c = _get_chip(chip, devices)
  report.update(num_devices=n, device_kind=devices[0].device_kind if devices else None,
                chip=c.name if c else None)

  # -- memory (per device) --
  mem = compiled.memory_analysis()
  if mem is not None:
    m = {"argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
         "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
         "generated_code_bytes": mem.generated_code_size_in_bytes}
    # Donated inputs reused as outputs are counted in both arguments and outputs.
    m["total_bytes"] = (m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"]
                        + m["temp_bytes"] + m["generated_code_bytes"])
    m["host_bytes"] = (mem.host_argument_size_in_bytes + mem.host_output_size_in_bytes
                       - mem.host_alias_size_in_bytes + mem.host_temp_size_in_bytes)
    report.update(m)
  if c is not None:
    report.update(hbm_bytes=c.hbm_bytes, hbm_fraction=hbm_fraction,
                  fits=(report["total_bytes"] <= hbm_fraction * c.hbm_bytes)
                  if "total_bytes" in report else None)

  # -- FLOPs and bytes (per device), loop bodies counted per iteration --
  ca = _first(compiled.cost_analysis())
  xla_flops = float(ca.get("flops", 0.0))
  xla_bytes = float(ca.get("bytes accessed", 0.0))
  mm_all = jaxpr_matmul_flops(traced.jaxpr, expand_loops=True) / n
  kernel_flops = jaxpr_matmul_flops(traced.jaxpr, kernels_only=True) / n
  mm_once = jaxpr_matmul_flops(traced.jaxpr, expand_loops=False) / n
  # Matmuls from the jaxpr, every iteration; the rest (elementwise, reductions) is what XLA
  # counts beyond the matmuls it sees once. XLA can count fewer than mm_once (loops it
  # restructures), hence the floor at the matmuls.
  flops = mm_all + max(0.0, xla_flops - mm_once)
  # How often loops repeat the matmuls XLA sees (kernels aside): scales XLA's loop-once bytes
  # and libtpu's loop-once time.
  loop_factor = (mm_all - kernel_flops) / mm_once if mm_once > 0 else 1.0
  report.update(xla_flops=xla_flops, xla_bytes_accessed=xla_bytes, matmul_flops=mm_all,
                kernel_flops=kernel_flops,
                flops=flops, bytes_accessed=xla_bytes * loop_factor, loop_factor=loop_factor)
  if "optimal_seconds" in ca:  # libtpu's own time estimate, loop bodies once too
    report["xla_optimal_seconds"] = float(ca["optimal_seconds"])
    # For v6e (libtpu 0.0.42) it came out negative (-77 to -171 s) for every d 24 / d 38 step
    # we compiled, at 256^2 and 1024^2: no estimate then.
    if report["xla_optimal_seconds"] > 0:
      report["cost_model_seconds"] = report["xla_optimal_seconds"] * loop_factor
  if model_flops is not None:
    report["model_flops"] = model_flops / n

  # -- time --
  if c is not None and flops > 0:
    compute_s, memory_s = flops / c.peak_flops, report["bytes_accessed"] / c.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    report.update(compute_seconds=compute_s, memory_seconds=memory_s, step_seconds=step_s,
                  bound="compute" if compute_s >= memory_s else "memory")
    if model_flops is not None:
      report["mfu"] = model_flops / n / step_s / c.peak_flops
  if c is not None and model_flops is not None and report.get("cost_model_seconds"):
    report["cost_model_mfu"] = model_flops / n / report["cost_model_seconds"] / c.peak_flops
  return report


def format_report(r: Mapping[str, Any]) -> str:
  """A few readable lines (GiB, TFLOP, ms) of a compile_report."""
  g = lambda b: f"{b / GiB:.2f} GiB"
  head = f"{r.get('num_devices')} x {r.get('chip') or r.get('device_kind')}"
  if "error" in r:
    return f"{head}: does NOT fit (compile failed).\n  {r['error']}"
  lines = [f"{head}, per device:"]
  if "total_bytes" in r:
    lines.append(f"  memory  arguments {g(r['argument_bytes'])}, outputs {g(r['output_bytes'])} "
                 f"(aliased {g(r['alias_bytes'])}), temporaries {g(r['temp_bytes'])}, code "
                 f"{g(r['generated_code_bytes'])} -> total {g(r['total_bytes'])}")
  if r.get("hbm_bytes") and r.get("fits") is not None:
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines.append(f"  HBM {g(r['hbm_bytes'])}: {verdict} ({r['total_bytes'] / r['hbm_bytes']:.0%} "
                 f"used; budget {r['hbm_fraction']:.0%})")
  lines.append(f"  FLOPs {r['flops'] / 1e12:.3f} TFLOP (XLA counts {r['xla_flops'] / 1e12:.3f}: "
               f"loop bodies once; loops repeat the matmuls x{r['loop_factor']:.1f}), "
               f"bytes accessed ~{r['bytes_accessed'] / 1e9:.1f} GB")
  if r.get("kernel_flops"):
    lines.append(f"  of which Pallas kernels (attention) {r['kernel_flops'] / 1e12:.3f} TFLOP, "
                 f"counted from the kernels' grids (XLA counts none)")
  if "step_seconds" in r:
    line = (f"  step ~{r['step_seconds'] * 1e3:.1f} ms ({r['bound']}-bound: compute "
            f"{r['compute_seconds'] * 1e3:.1f} ms, HBM {r['memory_seconds'] * 1e3:.1f} ms; "
            f"no collectives)")
    if "mfu" in r:
      line += f", MFU ~{r['mfu']:.0%}"
    lines.append(line)
  if "xla_optimal_seconds" in r and "cost_model_seconds" not in r:
    lines.append(f"  libtpu cost model: no estimate (it returned {r['xla_optimal_seconds']:.1f} s)")
  if "cost_model_seconds" in r:
    line = f"  libtpu cost model: ~{r['cost_model_seconds'] * 1e3:.1f} ms"
    if "cost_model_mfu" in r:
      line += f", MFU ~{r['cost_model_mfu']:.0%}"
    lines.append(line)
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Demo: an MM-DiT train step (forward, backward, AdamW) for a topology
# ---------------------------------------------------------------------------

def mmdit_train_step_report(cfg: Any, topology: str | Sequence[jax.Device], *,
                            global_batch: int, latent_hw: tuple[int, int], text_len: int,
                            ici: Mapping[str, int] | None = None, rules: str = "fsdp",
                            chip: str | Chip | None = None,
                            hbm_fraction: float = 0.9) -> dict[str, Any]:
  """compile_report of one rectified-flow AdamW step of `mmdit.MMDiT(cfg)` on `topology`.

  A stand-in for the trainer's step (no EMA, no clipping): float32 parameters and Adam
  moments sharded by `rules`, state donated, batch split over (data, fsdp).
  """
  import optax  # pylint: disable=g-import-not-at-top
  from sd3jax import parallel  # pylint: disable=g-import-not-at-top
  from sd3jax.models import mmdit  # pylint: disable=g-import-not-at-top

  devices = topology_devices(topology) if isinstance(topology, str) else list(topology)
  mesh = parallel.make_mesh(ici=ici or {"fsdp": -1}, devices=devices)
  model, tx = mmdit.MMDiT(cfg), optax.adamw(1e-4)

  def init(rng):
    params = mmdit.init_params(cfg, rng, tuple(latent_hw), text_len)
    return params, tx.init(params)

  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       nn.unbox(boxed), shardings)
  b, (h, w) = global_batch, latent_hw
  shapes = {"latents": (b, h, w, cfg.in_channels), "noise": (b, h, w, cfg.in_channels),
            "t": (b,), "context": (b, text_len, cfg.joint_attention_dim),
            "pooled": (b, cfg.pooled_projection_dim)}
  batch = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=parallel.batch_sharding(mesh, len(s)))
           for k, s in shapes.items()}

  def train_step(state, batch):
    params, opt_state = state
    x, eps, t = batch["latents"], batch["noise"], batch["t"]

    def loss_fn(p):
      tb = t[:, None, None, None]
      v = model.apply({"params": p}, (1 - tb) * x + tb * eps, t, batch["context"],
                      batch["pooled"])
      return jnp.mean(jnp.square(v - (eps - x)))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  model_flops = 3.0 * b * mmdit.flops_per_forward(cfg, h, w, text_len)
  report = compile_report(train_step, (state, batch), out_shardings=(shardings, None),
                          donate_argnums=0, chip=chip, model_flops=model_flops, mesh=mesh,
                          rules=rules, hbm_fraction=hbm_fraction)
  report.update(mesh=dict(mesh.shape), params=mmdit.count_params(cfg))
  return report
