"""Standalone evaluation of a run's checkpoints: `sd3jax evaluate --workdir RUN [--step N | --all-steps]`.

Writes WORKDIR/eval/step_<N>.json:

  {"step": N, "val_loss": mean over t, "per_t": {"0.0625": ..., ...}, "n": examples,
   "weights": "ema" | "raw",
   "shapes/<category>", "shapes/overall", "shapes/attribute_<key>", ...   (prompt following)
   "clip_score", "fid"}                                                    (feature hooks)

Prompt following needs a VAE and text encoders (config.precompute.vae / .text_encoders, the
ones the run's latents and embeddings came from); without them those keys are absent, not
zero. FID / CLIP score are present only when config.eval.fid_network / clip_network are set
(FID against ground-truth renders of the same prompt specs).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np
from ml_collections import ConfigDict

from sd3jax import buckets as buckets_lib
from sd3jax import config as config_lib
from sd3jax import parallel
from sd3jax import sample as sample_lib
from sd3jax.evals import features
from sd3jax.evals import validation


def eval_prompt_specs(config: ConfigDict) -> list[dict[str, Any]]:
  """config.eval.prompts_per_category prompts of every shapes category, seeded by eval.seed."""
  from sd3jax.data import shapes
  k = int(config.eval.get("prompts_per_category", 4))
  seed = int(config.eval.get("seed", 0))
  return [spec for cat in shapes.EVAL_CATEGORIES for spec in shapes.sample_eval_prompts(cat, k, seed)]


def eval_images(config: ConfigDict, pipe: sample_lib.Pipeline, progress: bool = False
                ) -> tuple[list[dict[str, Any]], np.ndarray | list[np.ndarray]]:
  """(eval_prompt_specs, images of them) sampled with config.eval's steps / cfg / cfg_max_t /
  autoguidance / shift / seed.

  Standalone evaluation and the in-training eval both sample here, so their numbers agree.
  With several aspect-ratio buckets (config.data.buckets), prompt i is sampled at bucket
  i mod B, with that bucket's sampling shift: the eval costs what one size costs, and
  `score_images` reports every bucket. `images` is then a list (sizes differ).
  """
  specs = eval_prompt_specs(config)
  sizes = buckets_lib.pixel_buckets(config)
  settings = sample_lib.run_sampling_settings(config)
  images: list[Any] = [None] * len(specs)
  for b, (h, w) in enumerate(sizes):
    which = list(range(b, len(specs), len(sizes)))
    if not which:
      continue
    out = sample_lib.generate(
        pipe, [specs[i]["prompt"] for i in which], height=h, width=w, steps=settings["steps"],
        guidance_scale=settings["cfg"], guidance_max_t=settings["cfg_max_t"],
        autoguidance=settings["autoguidance"],
        shift=buckets_lib.sample_shift(config, h, w, settings["shift"]),
        seed=int(config.eval.get("seed", 0)), progress=progress)
    for j, i in enumerate(which):
      images[i] = out[j]
  return specs, (np.stack(images) if len(sizes) == 1 else images)


def score_images(config: ConfigDict, specs: Sequence[dict[str, Any]],
                 images: np.ndarray) -> dict[str, Any]:
  """Shapes-checker scores (and the configured feature hooks) of `eval_images`."""
  from sd3jax.evals import shapes_checker
  prompts = [s["prompt"] for s in specs]
  size = int(config.data.image_size)
  out: dict[str, Any] = {f"shapes/{k}": v
                         for k, v in shapes_checker.score_images(images, specs).items()}
  sizes = [tuple(np.shape(im)[:2]) for im in images]
  if len(set(sizes)) > 1:  # one score per aspect-ratio bucket
    for hw in sorted(set(sizes)):
      which = [i for i, s in enumerate(sizes) if s == hw]
      scores = shapes_checker.score_images([images[i] for i in which], [specs[i] for i in which])
      out[f"shapes/{buckets_lib.name(*hw)}/overall"] = scores["overall"]
  fid_net, clip_net = features.networks_from_config(config.eval)
  if fid_net is not None and len(set(sizes)) > 1:
    logging.warning("config.eval.fid_network with several buckets: FID is not measured (its "
                    "features need one image size).")
    fid_net = None
  reference = None
  if fid_net is not None:
    reference = np.stack([shapes_checker.render_prompt(s, seed=i, height=size, width=size)[0]
                          for i, s in enumerate(specs)])
  out.update(features.present({
      "fid": features.compute_fid(fid_net, images, reference) if fid_net is not None else None,
      "clip_score": features.compute_clip_score(clip_net, images, prompts)}))
  return out


def prompt_following(config: ConfigDict, pipe: sample_lib.Pipeline,
                     progress: bool = False) -> dict[str, Any]:
  """Shapes-checker scores (and the configured feature hooks) of generated images."""
  return score_images(config, *eval_images(config, pipe, progress))


def evaluate_checkpoint(config: ConfigDict, workdir: str, step: int, *, use_ema: bool = True,
                        mesh: Any = None, progress: bool = False) -> dict[str, Any]:
  """Evaluates checkpoint `step` of `workdir`; writes and returns eval/step_<step>.json, or
  eval/step_<step>_<hash>.json (with "eval_changed") when config.eval differs from the run's
  own settings or the weights are the raw ones."""
  return _evaluate(sample_lib.run_config(config, workdir), workdir, step, use_ema, mesh,
                   progress, None)[0]


def _evaluate(config: ConfigDict, workdir: str, step: int, use_ema: bool, mesh: Any,
              progress: bool, pipe: sample_lib.Pipeline | None
              ) -> tuple[dict[str, Any], sample_lib.Pipeline | None]:
  """evaluate_checkpoint, reusing `pipe` (its VAE, text encoders and compiled sampler) when
  given: `--all-steps` loads the components and compiles once, and reads each checkpoint
  once. Returns (result, the pipeline with this step's weights)."""
  if mesh is None:
    mesh = parallel.make_mesh(*config_lib.mesh_sizes(config))
  model, params = sample_lib.load_run_params(config, workdir, mesh, step=step, use_ema=use_ema)
  result: dict[str, Any] = {"step": int(step), "weights": "ema" if use_ema else "raw"}
  result.update(validation.ValidationLoss(config, model, mesh)(params))
  if config_lib.evals_sample(config):
    if pipe is None:
      pipe = sample_lib.pipeline_from_params(
          config, model, params, sample_lib.load_run_components(config, mesh), mesh)
    else:
      pipe = sample_lib.with_transformer_params(pipe, params)
    result.update(prompt_following(config, pipe, progress))
  else:
    logging.info("No config.precompute.vae / text_encoders (or eval.prompts_per_category "
                 "= 0): prompt following not measured.")
  name = f"step_{int(step)}.json"
  changed = _changed_eval_settings(config, workdir)
  if changed or not use_ema:  # not the run's own eval: beside it, not over it
    result["eval_changed"] = changed
    tag = json.dumps([changed, use_ema], sort_keys=True, default=str).encode()
    name = f"step_{int(step)}_{hashlib.sha256(tag).hexdigest()[:8]}.json"
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", name), "w") as f:
      json.dump(result, f, indent=1)
  return result, pipe


def _changed_eval_settings(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """config.eval's settings that differ from the run's own (its config.json): an evaluation
  with other prompts, seeds or sampler settings must not replace the in-training eval's file,
  which the job's evaluate stage and the time-to-quality plot read."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return {}
  own = config_lib.to_json(sample_lib.run_config(None, workdir)).get("eval", {})
  now = config_lib.to_json(config).get("eval", {})
  return {k: v for k, v in sorted(now.items()) if own.get(k) != v}


def checkpoint_steps(workdir: str) -> list[int]:
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def evaluate_main(config: ConfigDict | None, workdir: str, step: int | None = None,
                  all_steps: bool = False, use_ema: bool = True) -> list[dict[str, Any]]:
  """`sd3jax evaluate`: the latest checkpoint, `step`, or every checkpoint (of a trainer run
  or of a job folder's MM-DiT)."""
  workdir = sample_lib.resolve_run_dir(workdir)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir} has no checkpoints/ steps to evaluate.")
  if all_steps:
    todo: Sequence[int] = steps
  elif step is not None:
    if int(step) not in steps:
      raise FileNotFoundError(f"{workdir} has no checkpoint of step {step}; it has {steps}.")
    todo = [int(step)]
  else:
    todo = [steps[-1]]
  config = sample_lib.run_config(config, workdir)
  mesh = parallel.make_mesh(*config_lib.mesh_sizes(config))
  results, pipe = [], None
  for s in todo:
    result, pipe = _evaluate(config, workdir, s, use_ema, mesh, True, pipe)
    results.append(result)
    logging.info("eval step %d: val_loss %.6f", s, results[-1]["val_loss"])
    print(json.dumps({k: v for k, v in results[-1].items() if k != "per_t"}))
  return results


__all__ = ["evaluate_checkpoint", "evaluate_main", "eval_images", "eval_prompt_specs",
           "prompt_following", "score_images", "checkpoint_steps"]
