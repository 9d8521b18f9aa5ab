"""The trainer's in-training evaluations: validation loss, prompt following, and their logging.

Each hook is an `EvalFn`, (step, state) -> {name: value}. The trainer runs them every
config.eval.every_steps on the EMA weights; `run_evals` writes the scalars to
WORKDIR/eval/step_<N>.json and the metrics log, and images (uint8 HWC) to TensorBoard.
They measure exactly what `sd3jax evaluate` measures (same prompts, sampler settings, seeds),
so a run's curve and a standalone evaluation of a checkpoint agree.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from sd3jax import metrics as metrics_lib

# (step, state) -> {name: scalar}; a uint8 (H, W, 3) array is an image (TensorBoard only).
EvalFn = Callable[[int, Any], Mapping[str, Any]]


def make_validation_loss(config: ConfigDict, model: nn.Module, mesh: Mesh) -> EvalFn:
  """Loss of the EMA weights at fixed t and noise, no encoder dropout, on the held-out set
  (config.eval.path, else synthetic with seed + 1): sd3jax.evals.validation."""
  from sd3jax.evals import validation
  val = validation.ValidationLoss(config, model, mesh)

  def evaluate(step: int, state: Any) -> dict[str, float]:
    return validation.flat_metrics(val(state.ema_params))
  return evaluate


def make_prompt_following(config: ConfigDict, model: nn.Module, mesh: Mesh,
                          workdir: str) -> EvalFn:
  """Shapes prompt following of the EMA weights, as `sd3jax evaluate` measures it (same
  prompts, sampler settings and seeds), and WORKDIR/samples/step_<N>.png: one row per
  category, the same prompts at every step. The VAE and text encoders load once, here."""
  from sd3jax import sample as sample_lib
  from sd3jax.evals import run as eval_run
  components = sample_lib.load_run_components(config, mesh)
  pipe = sample_lib.pipeline_from_params(config, model, None, components, mesh)
  cols = int(config.eval.get("prompts_per_category", 4))

  def evaluate(step: int, state: Any) -> dict[str, Any]:
    nonlocal pipe  # Carries the compiled sampler from one eval to the next.
    pipe = sample_lib.with_transformer_params(pipe, state.ema_params)
    specs, images = eval_run.eval_images(config, pipe)  # Sharded: every process samples.
    grid = sample_lib.make_grid([sample_lib.to_uint8(im) for im in images], cols=cols)
    if jax.process_index() == 0:
      sample_lib.save_image(os.path.join(workdir, "samples", f"step_{step}.png"), grid)
    return {**eval_run.score_images(config, specs, images), "samples": grid}
  return evaluate


def _is_image(v: Any) -> bool:
  return isinstance(v, np.ndarray) and v.ndim == 3 and v.dtype == np.uint8


def run_evals(step: int, state: Any, eval_fns: Sequence[EvalFn], workdir: str,
              writer: metrics_lib.MetricsWriter) -> dict[str, Any]:
  """Runs the EvalFns; scalars go to eval/step_<N>.json and eval/<name> metrics, images to
  TensorBoard's eval/<name>. Returns the scalars."""
  results: dict[str, Any] = {}
  for fn in eval_fns:
    results.update(fn(step, state))
  images = {k: v for k, v in results.items() if _is_image(v)}
  results = {k: v for k, v in results.items() if k not in images}
  if results and jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", f"step_{step}.json"), "w") as f:
      json.dump({"step": step, **results}, f, indent=1)
    writer.write(step, {f"eval/{k}": v for k, v in results.items()})
  for k, image in images.items():
    writer.write_image(step, f"eval/{k}", image)
  return results


