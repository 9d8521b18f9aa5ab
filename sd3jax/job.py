"""The main job: `sd3jax run --config experiments/shapes.py --workdir runs/shapes`.

One command runs an experiment's stages in order; each writes WORKDIR/job/STAGE.json when
it is done and is skipped on a rerun (a fingerprint of the settings it depends on must
match, so a changed config never silently reuses stale outputs):

  data        shapes TFDS build (WORKDIR/data), or the records folder in job.data
  encoders    embedded stand-in text encoders (WORKDIR/encoders), unless
              precompute.text_encoders names real ones
  vae         trains the 16-channel KL autoencoder of job.vae (WORKDIR/vae), unless
              precompute.vae; fits SD3's latent scaling / shift factors
  precompute  latents + embeddings: WORKDIR/records/train and /validation
  weak        the same MM-DiT trained for job.weak_steps only (WORKDIR/mmdit_weak): the weak
              model of the sampler's autoguidance (eval.sample_autoguidance; skipped at 1)
  train       the MM-DiT (WORKDIR/mmdit: checkpoints, metrics.jsonl, TensorBoard, eval/)
  sample      the grid of job.sample_prompts (WORKDIR/samples/grid.png)
  evaluate    validation loss, conditioning gap and prompt following of the final weights
              (WORKDIR/eval.json; the trainer's own eval of the last step when it made one),
              the checker's ceiling through the VAE, and WORKDIR/time_to_quality.png

The long stages resume where they stopped (trainer checkpoints, precompute shards), so
Ctrl-C or SIGTERM at any point followed by the same command finishes the job without
redoing finished work. Exit code 75 means "interrupted; rerun to continue".
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import signal
import time
from typing import Any, Callable, Iterator

from absl import logging
from ml_collections import ConfigDict
import numpy as np

from sd3jax import config as config_lib

EXIT_INTERRUPTED = 75
STAGES = ("data", "encoders", "vae", "precompute", "weak", "train", "sample", "evaluate")
# The config sections each stage reads (its fingerprint also covers every earlier stage).
_DEPENDS = {
    "data": ("job.data", "job.data_val", "job.shapes"),
    "encoders": ("job.encoders", "precompute.text_encoders"),
    "vae": ("job.vae", "precompute.vae"),
    "precompute": ("precompute", "conditioning", "data.image_size", "data.buckets",
                   "data.vae_factor"),
    "weak": ("task", "seed", "batch_size", "microbatches", "model", "data", "flow", "optimizer",
             "schedule", "ema", "mesh", "sharding_rules", "job.weak_steps",
             "eval.sample_autoguidance"),
    "train": ("task", "seed", "total_steps", "batch_size", "microbatches", "init_from", "model",
              "data", "flow", "optimizer", "schedule", "ema", "mesh", "sharding_rules"),
    "sample": ("job.sample_prompts", "job.sample_seed", "eval.sample_steps", "eval.sample_cfg",
               "eval.sample_cfg_max_t", "eval.sample_shift"),
    "evaluate": ("eval", "job.ceiling_examples"),
}


class Interrupted(Exception):
  """SIGTERM / SIGINT during a stage; everything finished so far is kept."""


# ---------------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------------

def _lookup(config: ConfigDict, dotted: str) -> Any:
  node: Any = config
  for part in dotted.split("."):
    if not hasattr(node, "get") or part not in node:
      return None
    node = node[part]
  return node.to_dict() if hasattr(node, "to_dict") else node


def stages_of(config: ConfigDict) -> tuple[str, ...]:
  """The job's stages: STAGES, then the editing ones when config.job has an `edit` section."""
  from sd3jax.edit import stages as edit_stages
  return STAGES + (edit_stages.STAGES if "edit" in config.job else ())


def _dataset_version(stage: str) -> str | None:
  """The TFDS version of the dataset a stage renders: a new release (other scenes) must not
  reuse a workdir's old data, records or weights."""
  if stage == "data":
    from sd3jax.data import shapes_tfds
    return str(shapes_tfds.Sd3jaxShapes.VERSION)
  if stage == "edit_data":
    from sd3jax.data import shapes_edit
    return str(shapes_edit.Sd3jaxShapesEdit.VERSION)
  return None


def fingerprints(config: ConfigDict) -> dict[str, str]:
  """Stage -> sha256 of the settings (and dataset version) it and every stage before it
  depend on."""
  from sd3jax.edit import stages as edit_stages
  depends = {**_DEPENDS, **edit_stages.DEPENDS}
  out, running = {}, hashlib.sha256()
  for stage in stages_of(config):
    for key in depends[stage]:
      running.update(json.dumps([key, _lookup(config, key)], sort_keys=True, default=str).encode())
    version = _dataset_version(stage)
    if version:
      running.update(json.dumps(["dataset_version", version]).encode())
    out[stage] = running.copy().hexdigest()[:16]
  return out


class Paths:
  """Where each stage reads and writes, relative to the workdir."""

  def __init__(self, workdir: str, config: ConfigDict):
    self.workdir = workdir
    self.job = os.path.join(workdir, "job")
    self.data = config.job.data or os.path.join(workdir, "data")
    self.shapes_build = ""  # the shapes build the precompute stage reads (one of several)
    if not config.job.data:
      from sd3jax.data import shapes_tfds
      s = config.job.shapes
      self.shapes_build = shapes_tfds.dataset_dir(self.data, shapes_tfds.config_name(
          int(s.resolution), int(s.resolution), int(s.num_train), int(s.num_val), int(s.seed),
          [tuple(b) for b in s.get("sizes", ())]))
    self.data_val = config.job.get("data_val", "")
    self.encoders = config.precompute.text_encoders or os.path.join(workdir, "encoders")
    self.vae_run = os.path.join(workdir, "vae")
    self.vae = config.precompute.vae or os.path.join(self.vae_run, "vae")
    self.records = os.path.join(workdir, "records")
    self.mmdit = os.path.join(workdir, "mmdit")
    self.mmdit_weak = os.path.join(workdir, "mmdit_weak")
    self.samples = os.path.join(workdir, "samples")
    self.eval = os.path.join(workdir, "eval.json")
    self.summary = os.path.join(workdir, "summary.json")
    self.time_to_quality = os.path.join(workdir, "time_to_quality.png")
    # The editing stages (experiments/shapes_edit.py; sd3jax.edit.stages).
    self.edit_data = os.path.join(workdir, "edit_data")
    self.edit_records = os.path.join(self.records, "edit_train")
    self.edit = os.path.join(workdir, "edit")
    self.edit_eval = os.path.join(workdir, "edit_eval.json")

  def marker(self, stage: str) -> str:
    return os.path.join(self.job, f"{stage}.json")


def _read_marker(paths: Paths, stage: str) -> dict[str, Any] | None:
  path = paths.marker(stage)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, record: dict[str, Any]) -> None:
  """Written whole or not at all (temp file, then rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1, default=float)
  os.replace(path + ".tmp", path)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
  """SIGTERM behaves as Ctrl-C outside the trainer (which handles both itself)."""
  def handler(signum, frame):
    raise Interrupted(signal.Signals(signum).name)
  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  except KeyboardInterrupt as e:
    raise Interrupted("SIGINT") from e
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# Stage configs
# ---------------------------------------------------------------------------------------------

def mmdit_config(config: ConfigDict, paths: Paths) -> ConfigDict:
  """The trainer's config: `config` with the job's paths filled in."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.data.path = os.path.join(paths.records, "train")
    if not c.eval.path and (paths.data_val or not config.job.data):
      c.eval.path = os.path.join(paths.records, "validation")
    c.precompute.vae = paths.vae
    c.precompute.text_encoders = paths.encoders
    c.precompute.source = paths.shapes_build or paths.data
    if uses_weak_model(config) and not c.eval.get("sample_autoguidance_run"):
      c.eval.sample_autoguidance_run = paths.mmdit_weak
  return c


def uses_weak_model(config: ConfigDict) -> bool:
  """Whether the job trains a weak MM-DiT for autoguidance (job.weak_steps > 0 and
  eval.sample_autoguidance != 1)."""
  return (int(config.job.get("weak_steps", 0)) > 0
          and float(config.eval.get("sample_autoguidance", 1.0)) != 1.0)


def weak_config(config: ConfigDict, paths: Paths) -> ConfigDict:
  """The weak run's trainer config: the MM-DiT's, for job.weak_steps, with no evals (and no
  autoguidance of its own)."""
  c = mmdit_config(config, paths)
  with c.unlocked():
    c.total_steps = int(config.job.weak_steps)
    c.eval.every_steps = 0
    c.eval.sample_autoguidance, c.eval.sample_autoguidance_run = 1.0, ""
  return c


def vae_config(config: ConfigDict, paths: Paths) -> ConfigDict:
  c = copy.deepcopy(config.job.vae)
  with c.unlocked():
    c.data.path = paths.data
    if config.job.data:  # real images: an ingested records folder
      c.data.source = "records"
  return c


# ---------------------------------------------------------------------------------------------
# Stages: each returns a JSON-able record of what it made.
# ---------------------------------------------------------------------------------------------

def stage_data(config: ConfigDict, paths: Paths) -> dict[str, Any]:
  if config.job.data:
    if not os.path.isdir(config.job.data):
      raise config_lib.ConfigError(f"config.job.data={config.job.data!r} does not exist; give "
                                   "a records folder (sd3jax.data.ingest) or '' for shapes.")
    return {"path": config.job.data, "built": False}
  from sd3jax.data import shapes_tfds
  s = config.job.shapes
  sizes = [tuple(b) for b in s.get("sizes", ())]
  shapes_tfds.build_shapes(paths.data, int(s.resolution), int(s.num_train), int(s.num_val),
                           int(s.seed), sizes=sizes)
  return {"path": paths.shapes_build, "num_train": int(s.num_train), "num_val": int(s.num_val),
          "sizes": [list(b) for b in sizes] or [[int(s.resolution)] * 2]}


def stage_encoders(config: ConfigDict, paths: Paths) -> dict[str, Any]:
  if config.precompute.text_encoders:
    return {"path": paths.encoders, "built": False}
  from sd3jax.data import shapes, shapes_edit
  from sd3jax.embedded_encoders import build_embedded_encoders
  e = config.job.encoders
  # The edit instructions' verbs are added tokens: captions encode as without them.
  build_embedded_encoders(paths.encoders, list(shapes.VOCABULARY), seed=int(e.seed),
                          clip_l_width=int(e.clip_l_width), clip_g_width=int(e.clip_g_width),
                          t5_width=int(e.t5_width), clip_max_length=int(e.clip_max_length),
                          added_words=shapes_edit.INSTRUCTION_WORDS)
  return {"path": paths.encoders, "built": True}


def stage_vae(config: ConfigDict, paths: Paths) -> dict[str, Any]:
  if config.precompute.vae:
    return {"path": paths.vae, "trained": False}
  from sd3jax import train
  result = train.train(vae_config(config, paths), paths.vae_run)
  if result.interrupted:
    raise Interrupted(f"vae training stopped at step {result.step}")
  metrics, final = {}, os.path.join(paths.vae_run, "eval", f"step_{result.step}.json")
  if os.path.exists(final):  # the trainer evaluates at the last step
    with open(final) as f:
      metrics = json.load(f)
  return {"path": paths.vae, "trained": True, "steps": result.step,
          **{k: v for k, v in metrics.items() if k in ("psnr", "ssim", "rfid")}}


def stage_precompute(config: ConfigDict, paths: Paths) -> dict[str, Any]:
  from sd3jax.data import precompute
  out = {}
  val_source = config.job.get("data_val", "")
  for split in ("train", "validation"):
    c = mmdit_config(config, paths)  # a copy
    with c.unlocked():
      c.precompute.split = split
      if config.job.data:  # records folders have no splits: job.data_val is the held-out set
        c.precompute.source = config.job.data if split == "train" else val_source
    if not c.precompute.source:
      logging.warning("No job.data_val: the validation loss falls back to synthetic batches.")
      continue
    precompute.precompute_main(c, os.path.join(paths.records, split), announce=False)
    out[split] = os.path.join(paths.records, split)
  return out


def stage_weak(config: ConfigDict, paths: Paths) -> dict[str, Any]:
  if not uses_weak_model(config):
    return {"skipped": "no autoguidance (eval.sample_autoguidance = 1 or job.weak_steps = 0)"}
  from sd3jax import train
  result = train.train(weak_config(config, paths), paths.mmdit_weak)
  if result.interrupted:
    raise Interrupted(f"weak MM-DiT training stopped at step {result.step}")
  return {"path": paths.mmdit_weak, "steps": result.step}


def stage_train(config: ConfigDict, paths: Paths) -> dict[str, Any]:
  from sd3jax import train
  result = train.train(mmdit_config(config, paths), paths.mmdit)
  if result.interrupted:
    raise Interrupted(f"MM-DiT training stopped at step {result.step}")
  return {"path": paths.mmdit, "steps": result.step,
          "final_loss": result.metrics.get("loss")}


def stage_sample(config: ConfigDict, paths: Paths) -> dict[str, Any]:
  from sd3jax import sample
  c = mmdit_config(config, paths)
  pipe = sample.pipeline_from_run(sample.run_config(c, None), paths.mmdit)
  from sd3jax import buckets as buckets_lib
  prompts = list(config.job.sample_prompts)
  settings = sample.run_sampling_settings(c)  # the in-training evals' settings
  images, names = [], []
  sizes = buckets_lib.pixel_buckets(c)
  for h, w in sizes:  # every prompt at every bucket, one block each
    images += list(sample.generate(
        pipe, prompts, height=h, width=w, steps=settings["steps"],
        guidance_scale=settings["cfg"], guidance_max_t=settings["cfg_max_t"],
        autoguidance=settings["autoguidance"],
        shift=buckets_lib.sample_shift(c, h, w, settings["shift"]),
        seed=int(config.job.sample_seed)))
    names += prompts if len(sizes) == 1 else [f"{p} {h}x{w}" for p in prompts]
  written = sample.save_images(images, paths.samples, names, cols=4)
  return {"grid": written[-1], "images": len(written) - 1}


def vae_ceiling(config: ConfigDict, paths: Paths) -> dict[str, float]:
  """The checker on VAE round trips of ground-truth renders of the eval prompts: the best
  score any MM-DiT on these latents can reach (and on the renders themselves)."""
  import jax
  from sd3jax.evals import run as eval_run
  from sd3jax.evals import shapes_checker
  from sd3jax.interop import diffusers_vae
  specs = eval_run.eval_prompt_specs(config)[:int(config.job.ceiling_examples)]
  size = int(config.data.image_size)
  truth = np.stack([shapes_checker.render_prompt(s, seed=i, height=size, width=size)[0]
                    for i, s in enumerate(specs)])
  model, params = diffusers_vae.load_vae(paths.vae)
  x = truth.astype(np.float32) / 127.5 - 1.0
  recon, _ = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)  # posterior mode
  recon = np.clip((np.asarray(recon) + 1.0) / 2.0, 0.0, 1.0)
  through_vae = shapes_checker.score_images(recon, specs)
  return {"truth_overall": shapes_checker.score_images(truth, specs)["overall"],
          **{f"vae_{k}": v for k, v in through_vae.items()
             if k in ("overall", "attribute_color", "attribute_shape", "attribute_position")}}


def stage_evaluate(config: ConfigDict, paths: Paths) -> dict[str, Any]:
  from sd3jax import sample
  from sd3jax.evals import run as eval_run
  from sd3jax.evals import time_to_quality
  c = sample.run_config(mmdit_config(config, paths), None)
  step = eval_run.checkpoint_steps(paths.mmdit)[-1]
  result = _in_training_eval(paths, step)
  if result is None:
    result = eval_run.evaluate_checkpoint(c, paths.mmdit, step, progress=True)
  if (int(config.job.get("ceiling_examples", 0)) > 0 and not config.job.data
      and config_lib.evals_sample(c)):  # the ceiling scores the eval's prompts
    result["ceiling"] = vae_ceiling(c, paths)
  _write_json(paths.eval, result)
  plot = time_to_quality.plot(os.path.join(paths.mmdit, "metrics.jsonl"), paths.job,
                              paths.time_to_quality, title=f"time to quality: {paths.workdir}")
  return {"path": paths.eval, "step": step, "plot": plot,
          "reused_in_training_eval": bool(result.get("in_training"))}


def _in_training_eval(paths: Paths, step: int) -> dict[str, Any] | None:
  """The trainer's own eval of the final step (same EMA weights, prompts, sampler settings
  and seeds as `sd3jax evaluate`), so the job does not sample the eval prompts twice. None
  when the trainer did not evaluate that step or measured no prompt following."""
  path = os.path.join(paths.mmdit, "eval", f"step_{int(step)}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    result = json.load(f)
  if "val_loss" not in result or "shapes/overall" not in result:
    return None
  per_t = {k[len("val_loss_t"):]: v for k, v in result.items() if k.startswith("val_loss_t")}
  return {"step": int(step), "weights": "ema", "in_training": True, "per_t": per_t,
          **{k: v for k, v in result.items() if not k.startswith("val_loss_t")}}


STAGE_FNS: dict[str, Callable[[ConfigDict, Paths], dict[str, Any]]] = {
    "data": stage_data, "encoders": stage_encoders, "vae": stage_vae,
    "precompute": stage_precompute, "weak": stage_weak, "train": stage_train,
    "sample": stage_sample,
    "evaluate": stage_evaluate}


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def summary(paths: Paths, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """What the job made, in one place (also WORKDIR/summary.json)."""
  out: dict[str, Any] = {"seconds": {s: r.get("seconds") for s, r in records.items()}}
  out["seconds"]["total"] = float(sum(v or 0.0 for v in out["seconds"].values()))
  if os.path.exists(paths.eval):
    with open(paths.eval) as f:
      ev = json.load(f)
    out["val_loss"] = ev.get("val_loss")
    out["cond_gap"] = ev.get("cond_gap")
    out["cond_gap_rel"] = ev.get("cond_gap_rel")
    out["shapes"] = {k.removeprefix("shapes/"): v for k, v in ev.items()
                     if k.startswith("shapes/") and not k.startswith("shapes/n")}
    out["ceiling"] = ev.get("ceiling")
  out["grid"] = records.get("sample", {}).get("grid")
  out["time_to_quality"] = records.get("evaluate", {}).get("plot")
  out["eval"] = paths.eval
  if "edit_evaluate" in records:
    out["edit_eval"] = paths.edit_eval
    out["edit_grid"] = records["edit_evaluate"].get("grid")
  return out


# The checker's keys in the words of the README's score table.
_SCORE_WORDS = (("attribute_color", "single-object colour"), ("attribute_shape", "shape"),
                ("attribute_position", "position"), ("count", "counts"),
                ("two_objects", "two objects"), ("single_object", "whole prompts: single"),
                ("color", "colour"), ("position", "position"), ("overall", "overall"))


def prompt_following_line(scores: dict[str, float]) -> str:
  """'prompt following: single-object colour 0.97, shape 0.58, ...' from checker keys."""
  return "prompt following: " + ", ".join(
      f"{words} {scores[key]:.2f}" for key, words in _SCORE_WORDS if key in scores)


def objects_drawn_line(scores: dict[str, float]) -> str:
  """'objects drawn minus asked: ...' from the checker's extra_objects_* keys ('' without)."""
  parts = []
  if "extra_objects_single" in scores:
    parts.append(f"one-object prompts {scores['extra_objects_single']:+.2f}")
  if "extra_objects_multi" in scores:
    parts.append(f"counts and pairs {scores['extra_objects_multi']:+.2f} (exactly as many: "
                 f"{scores['exact_objects_multi']:.2f})")
  return "objects drawn minus asked: " + ", ".join(parts) if parts else ""


# The single-object categories in the words of shape_by_prompt_line.
_SHAPE_PROMPT_WORDS = (("single_object", "shape only"), ("color", "with colour"),
                       ("position", "with colour and position"))


def shape_by_prompt_line(scores: dict[str, float]) -> str:
  """'shape by prompt: shape only 0.61, ...; no object drawn: ...' ('' without the keys)."""
  parts = [f"{words} {scores[f'attribute_shape_{cat}']:.2f}"
           for cat, words in _SHAPE_PROMPT_WORDS if f"attribute_shape_{cat}" in scores]
  if not parts:
    return ""
  line = "shape by prompt: " + ", ".join(parts)
  if "empty_single" in scores:
    line += f"; no object drawn for {100 * scores['empty_single']:.0f}% of one-object prompts"
  return line


def print_summary(s: dict[str, Any]) -> None:
  secs = s["seconds"]
  print("\nsd3jax run: done")
  print("  time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items() if v is not None))
  if s.get("val_loss") is not None:
    print(f"  validation loss (8 fixed t): {s['val_loss']:.4f}")
  if s.get("cond_gap") is not None:
    print(f"  conditioning gap (loss with every encoder dropped - with captions): "
          f"{s['cond_gap']:.4f} ({100 * s['cond_gap_rel']:.1f}% of the dropped loss)")
  if s.get("shapes"):
    print("  " + prompt_following_line(s["shapes"]))
    for line in (shape_by_prompt_line(s["shapes"]), objects_drawn_line(s["shapes"])):
      if line:
        print("  " + line)
  if s.get("ceiling"):
    c = s["ceiling"]
    words = dict(_SCORE_WORDS[:3])
    print(f"  checker ceiling: ground truth {c['truth_overall']:.2f}, through the VAE "
          f"{c['vae_overall']:.2f} (" + ", ".join(
              f"{words.get(k[4:], k[4:])} {v:.2f}" for k, v in c.items()
              if k.startswith("vae_attr")) + ")")
  print(f"  grid: {s.get('grid')}\n  scores: {s.get('eval')}")
  if s.get("time_to_quality"):
    print(f"  time to quality: {s['time_to_quality']}")
  if s.get("edit_eval"):
    from sd3jax.edit import stages as edit_stages
    for line in edit_stages.summary_lines(s["edit_eval"]):
      print("  " + line)
    print(f"  edit grid: {s.get('edit_grid')}\n  edit scores: {s['edit_eval']}")


def _stage_fn(stage: str) -> Callable[[ConfigDict, Paths], dict[str, Any]]:
  if stage in STAGE_FNS:
    return STAGE_FNS[stage]
  from sd3jax.edit import stages as edit_stages
  return edit_stages.STAGE_FNS[stage]


def _trainer_configs(config: ConfigDict, paths: Paths,
                     stages: tuple[str, ...]) -> list[ConfigDict]:
  """The trainer configs that `stages` will build (VAE, weak and main MM-DiT, editing
  MM-DiT)."""
  out = []
  if "vae" in stages and not config.precompute.get("vae"):
    out.append(vae_config(config, paths))
  if "weak" in stages and uses_weak_model(config):
    out.append(weak_config(config, paths))
  if "train" in stages:
    out.append(mmdit_config(config, paths))
  if "edit_train" in stages:
    from sd3jax.edit import stages as edit_stages
    out.append(edit_stages.edit_config(config, paths))
  return out


def run_main(config: ConfigDict, workdir: str, stages: tuple[str, ...] | None = None) -> int:
  """Runs (or finishes) the job in `workdir` (all its stages, or `stages`); returns the exit
  code."""
  if "job" not in config:
    raise config_lib.ConfigError("sd3jax run needs an experiment with a `job` section, e.g. "
                                 "experiments/shapes.py; `sd3jax train` runs a single model.")
  workdir = os.path.abspath(workdir)  # every path the job records means the same from anywhere
  config = config_lib.with_absolute_paths(config)
  paths = Paths(workdir, config)
  prints = fingerprints(config)
  stages = stages or stages_of(config)
  for trainer_config in _trainer_configs(config, paths, stages):
    config_lib.validate(trainer_config)  # a bad setting fails now, not stages later
  records: dict[str, dict[str, Any]] = {}
  for stage in stages:
    done = _read_marker(paths, stage)
    if done is not None:
      if done.get("fingerprint") != prints[stage]:
        raise config_lib.ConfigError(
            f"{workdir} finished stage {stage!r} with other settings "
            f"({_DEPENDS.get(stage, 'job.edit')}"
            f"{', the dataset release' if _dataset_version(stage) else ''} or an "
            f"earlier stage's changed). Use a new --workdir, or delete {paths.marker(stage)} and "
            "the markers after it to redo those stages.")
      logging.info("stage %s: done earlier (%s), skipped.", stage, paths.marker(stage))
      print(f"[{stage}] done earlier, skipped")
      records[stage] = done
      continue
    start = time.perf_counter()
    try:
      with _interruptible():
        record = _stage_fn(stage)(config, paths)
    except Interrupted as e:
      print(f"[{stage}] interrupted ({e}); finished stages and checkpoints are kept. Rerun the "
            "same command to continue.")
      return EXIT_INTERRUPTED
    record.update(stage=stage, fingerprint=prints[stage],
                  seconds=time.perf_counter() - start, finished=time.time())
    # Wall time over all attempts of a stage that was interrupted and resumed is not
    # tracked; `seconds` is the attempt that finished it.
    _write_json(paths.marker(stage), record)
    records[stage] = record
    print(f"[{stage}] done in {record['seconds']:.0f} s")
  s = summary(paths, records)
  _write_json(paths.summary, s)
  print_summary(s)
  return 0
