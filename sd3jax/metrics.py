"""Training metrics: metrics.jsonl, TensorBoard and a progress bar, written by process 0.

Throughput comes from the analytic FLOPs of the model (`mmdit.flops_per_forward`), never
from XLA's cost analysis, which counts the body of a scanned layer stack only once. A
train step is counted as 3x the forward FLOPs (forward + backward), so MFU here is model
FLOPs utilisation: rematerialised recomputation does not count as useful work.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

from sd3jax import chips


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak TFLOP/s of one device of this kind (sd3jax.chips); None when unknown."""
  chip = chips.chip_for(device_kind)
  return chip.peak_flops / 1e12 if chip is not None else None


class Throughput:
  """Steps/s, examples/s, TFLOP/s per device and MFU between two calls of `update`."""

  def __init__(self, flops_per_step: float, examples_per_step: int, num_devices: int,
               peak_tflops_per_device: float | None):
    self.flops_per_step = float(flops_per_step)
    self.examples_per_step = int(examples_per_step)
    self.num_devices = int(num_devices)
    self.peak = peak_tflops_per_device
    self._t, self._step = None, None

  def start(self, step: int) -> None:
    self._t, self._step = time.perf_counter(), step

  def update(self, step: int) -> dict[str, float]:
    """Rates over the steps finished since the last call (empty on the first call)."""
    now = time.perf_counter()
    if self._t is None or step <= self._step:
      self.start(step)
      return {}
    sps = (step - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    tflops = self.flops_per_step * sps / self.num_devices / 1e12
    out = {"steps_per_sec": sps, "examples_per_sec": sps * self.examples_per_step,
           "tflops_per_sec_per_device": tflops}
    if self.peak:
      out["mfu"] = tflops / self.peak
    return out


def _summary_writer_cls():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch when it is installed, only to accept torch tensors (we pass
  numpy); that costs seconds at every start, so the import is blocked while it loads.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


_SKIP = object()


def _scalar(v: Any) -> Any:
  """A JSON value for metrics.jsonl; _SKIP for what has none (arrays: histograms, images)."""
  if isinstance(v, (np.ndarray, np.generic, jax.Array)) and np.ndim(v) == 0:
    v = np.asarray(v).item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN / inf
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  return _SKIP


def truncate_after(path: str, step: int) -> int:
  """Drops the rows of metrics.jsonl logged after `step` (written whole: temp file, rename).

  A run killed after logging step 120 but resumed from its checkpoint of step 100 logs
  101-120 again; without this, readers saw two values for those steps. Returns the number
  of rows dropped. A torn last line (the kill came mid-write) is dropped too.
  """
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1
        continue
      if int(row.get("step", 0)) > step:
        dropped += 1
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
  return dropped


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl ({"step", "time", ...}); mirrors
  to TensorBoard and tqdm.

  Only process 0 writes; on other processes every method is a no-op.
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               tensorboard: bool = True, progress_bar: bool = True, desc: str | None = None):
    self.active = jax.process_index() == 0
    self._tb = self._bar = self._file = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    truncate_after(path, start_step)  # a resumed run re-logs the steps after its checkpoint
    self._file = open(path, "a")
    if tensorboard:
      self._tb = _summary_writer_cls()(os.path.join(workdir, "tensorboard"))
    if progress_bar:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       desc=desc)
    self._last_step = start_step

  def write(self, step: int, metrics: Mapping[str, Any],
            histograms: Mapping[str, np.ndarray] | None = None) -> None:
    """Logs scalars (and optional histograms) for `step`."""
    if not self.active:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    # "time" (unix seconds) lets a reader put any metric on a wall-clock axis.
    record = {"step": int(step), "time": round(time.time(), 3),
              **{k: v for k, v in values.items() if v is not _SKIP}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "time") and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      for k, v in (histograms or {}).items():
        self._tb.add_histogram(k, np.asarray(v), step)
    if self._bar is not None:
      self._bar.update(max(step - self._last_step, 0))
      shown = {k: record[k] for k in ("loss", "grad_norm", "steps_per_sec") if k in record}
      self._bar.set_postfix(
          {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()})
    self._last_step = step

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """A uint8 (H, W, 3) image to TensorBoard (e.g. a sample grid); nothing without it."""
    if self.active and self._tb is not None:
      self._tb.add_image(name, np.asarray(image, np.uint8), int(step), dataformats="HWC")
      self._tb.flush()

  def write_text(self, name: str, text: str) -> None:
    if self.active and self._tb is not None:
      self._tb.add_text(name, text, 0)

  def close(self) -> None:
    if not self.active:
      return
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._file.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file (for tests, scaling curves and reports)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
