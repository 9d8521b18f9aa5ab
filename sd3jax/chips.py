"""Accelerator specs, one table: HBM, dense bf16 peak and HBM bandwidth per device.

Used for MFU in the trainer's metrics (sd3jax.metrics), for roofline estimates and fit
checks in ahead-of-time compiles (sd3jax.aot) and for the benchmark.

Public spec sheets. TPU: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} ("System architecture"
tables: HBM capacity, HBM bandwidth, peak bf16 compute per chip; TPU v4 / v5p: one megacore
chip). GPU: NVIDIA A100 / H100 / H200 datasheets, dense (not 2:4 sparse) bf16 Tensor Core
FLOP/s, SXM form factor unless named. XLA's own "available HBM" when compiling for these TPUs
(from its out-of-memory message): v4 30.75G, v5e 15.75G, v5p 95.74G, v6e 31.25G.
"""
from __future__ import annotations

import dataclasses
from typing import Any

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One jax device: HBM, dense bf16 peak and HBM bandwidth."""
  name: str
  hbm_bytes: int
  peak_flops: float         # dense bf16 FLOP/s
  hbm_bandwidth: float      # bytes/s
  device_kinds: tuple[str, ...]  # jax device_kind spellings (GPUs: substrings of it)


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12, ("TPU v4",)),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 0.82e12, ("TPU v5 lite", "TPU v5e")),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.76e12, ("TPU v5", "TPU v5p")),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12, ("TPU v6 lite", "TPU v6e")),
    "a100": Chip("A100 80GB SXM", 80 * GiB, 312e12, 2.0e12, ("A100",)),
    "h100": Chip("H100 80GB SXM", 80 * GiB, 989e12, 3.35e12, ("H100",)),
    "h100-pcie": Chip("H100 PCIe", 80 * GiB, 756e12, 2.0e12, ("H100 PCIe",)),
    "h200": Chip("H200 141GB SXM", 141 * 10**9, 989e12, 4.8e12, ("H200",)),
}


def chip_for(device_or_kind: Any) -> Chip | None:
  """The CHIPS entry for a jax device (or its `device_kind`); None when unknown (e.g. CPU).

  TPU kinds match exactly ("TPU v5" is v5p, "TPU v5 lite" is v5e); GPU names match as
  substrings of the kind ("NVIDIA H100 80GB HBM3"), the longest name first, so an
  "H100 PCIe" is not taken for the SXM part.
  """
  kind = str(getattr(device_or_kind, "device_kind", device_or_kind))
  names = sorted(((k, chip) for chip in CHIPS.values() for k in chip.device_kinds),
                 key=lambda item: len(item[0]), reverse=True)
  for k, chip in names:
    if (kind == k or kind.startswith(k + " ")) if k.startswith("TPU") else k in kind:
      return chip
  return None


__all__ = ["Chip", "CHIPS", "GiB", "chip_for"]
