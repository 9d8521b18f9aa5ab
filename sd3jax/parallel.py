"""Device mesh, logical-axis rules, and sharded state creation.

Parameters and activations are annotated with *logical* axis names (embed, mlp,
heads, act_batch, ...). A rule set maps each logical name onto mesh axes; the
mesh has three axes:

  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3),
  tensor  Megatron-style tensor parallelism of heads and MLP features.

The batch is always split over (data, fsdp). Switching between data parallel,
FSDP and FSDP + tensor parallel is a choice of rules and mesh shape, nothing else.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The batch dimension's mesh axes, fsdp major. With ("data", "fsdp") XLA (0.10, CPU; Shardy and
# GSPMD alike) miscompiles the MM-DiT under fsdp_tp on a mesh with data, fsdp and tensor all > 1:
# whole batch shards come out wrong. The order only decides which rows live where.
BATCH_AXES = ("fsdp", "data")

# Rules shared by every preset: how activations are laid out.
_ACTIVATION_RULES = (
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_kv", None),
)

# Parameter rules per preset. Names not listed are replicated.
RULE_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    "dp": _ACTIVATION_RULES + (
        ("embed", None), ("mlp", None), ("heads", None), ("vocab", None),
        ("conv_in", None), ("conv_out", None),
    ),
    "fsdp": _ACTIVATION_RULES + (
        ("embed", "fsdp"), ("mlp", None), ("heads", None), ("vocab", None),
        ("conv_in", "fsdp"), ("conv_out", None),
    ),
    "fsdp_tp": _ACTIVATION_RULES + (
        ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
        ("conv_in", "fsdp"), ("conv_out", "tensor"),
    ),
}


def get_rules(preset_or_rules: str | Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """Returns a rule tuple from a preset name or an explicit list of (name, axes) pairs."""
  if isinstance(preset_or_rules, str):
    if preset_or_rules not in RULE_PRESETS:
      raise ValueError(f"Unknown sharding rules {preset_or_rules!r}; choose one of "
                       f"{sorted(RULE_PRESETS)} or give a list of (logical, mesh axes) pairs.")
    return RULE_PRESETS[preset_or_rules]
  return tuple((str(name), tuple(ax) if isinstance(ax, list) else ax)
               for name, ax in preset_or_rules)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int,
                       what: str = "mesh") -> tuple[int, ...]:
  """Sizes for (data, fsdp, tensor); one size may be -1 (= all remaining devices)."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.{what} has unknown axes {sorted(unknown)}; the mesh axes are "
                     f"{MESH_AXES}.")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.{what}: at most one axis may be -1, got {dict(shape)}.")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.{what}: axis sizes must be positive or -1, got {dict(shape)}.")
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.{what}={dict(shape)}: {num_devices} devices are not divisible "
                       f"by the fixed axes' product {known}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.{what}={dict(shape)} needs {math.prod(sizes)} devices but {num_devices} are "
        f"available; make the product of the sizes {num_devices} (or set one axis to -1).")
  return tuple(sizes)


def make_mesh(ici: Mapping[str, int] | None = None, dcn: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh. `dcn` gives the across-slice factors of a multi-slice job.

  With dcn, the full size of an axis is ici * dcn and devices are arranged so that the
  dcn part of each axis runs across slices (slow links) and the ici part within them.
  """
  devices = list(devices if devices is not None else jax.devices())
  dcn_sizes = resolve_mesh_shape(dcn, _num_slices(devices), "mesh_dcn") if dcn else (1, 1, 1)
  per_slice = len(devices) // math.prod(dcn_sizes)
  ici_sizes = resolve_mesh_shape(dict(ici or {"data": -1}), per_slice, "mesh")
  if math.prod(dcn_sizes) > 1:
    arr = mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices)
  else:
    try:
      arr = mesh_utils.create_device_mesh(ici_sizes, devices)
    except (ValueError, NotImplementedError, AssertionError):
      arr = np.asarray(devices).reshape(ici_sizes)
  return Mesh(arr, MESH_AXES)


def _num_slices(devices: Sequence[jax.Device]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


# XLA:CPU (jaxlib 0.10) hands dots and convolutions to YNNPACK. For convolutional nets (the
# VAE) its own kernels are faster, above all for the weight gradients (convolutions with a
# 64x64 window): the shapes job's VAE step 632 -> 370 ms, its VAE stage 316 -> 232 s and
# precompute 79 -> 49 s, the sampler (MM-DiT steps + VAE decode) on 100 eval prompts
# 13.8-15.4 -> 12.5-12.7 s, the editing sampler on 192 edits 35.8-42.2 -> 23.4-26.0 s (AMD
# EPYC, AVX2, 2 cores). The MM-DiT's train step is not: it is about 5% faster
# with YNNPACK, so this is set per program, not in XLA_FLAGS.
_CPU_CONV_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def conv_compiler_options(devices: Sequence[jax.Device] | Mesh | None = None
                          ) -> dict[str, str] | None:
  """`jax.jit(..., compiler_options=)` for a convolution-heavy program on these devices
  (default: jax.devices()): YNNPACK fusions off on CPU, None (XLA's defaults) elsewhere."""
  if isinstance(devices, Mesh):
    devices = list(devices.devices.flat)
  devices = list(devices) if devices is not None else jax.devices()
  return dict(_CPU_CONV_OPTIONS) if devices[0].platform == "cpu" else None


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules) -> Any:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, get_rules(rules))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over BATCH_AXES (data and fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules, *args,
                   shardings: Any = None) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` with its outputs created directly in their shards.

  Returns (state, shardings). The abstract shapes come from jax.eval_shape, the
  logical partition specs from the flax Partitioned boxes, so no device ever holds
  the full set of weights. The returned state is unboxed (plain arrays). Pass
  `shardings` when already known (e.g. from a restore target) to skip one trace.
  """
  if shardings is None:
    abstract = jax.eval_shape(init_fn, *args)
    specs = nn.get_partition_spec(abstract)
    shardings = logical_to_sharding(specs, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules(rules)):
    state = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return state, shardings
