"""The main job's editing stages (experiments/shapes_edit.py), after the text-to-image ones.

  edit_data      the shapes edit triplets (TFDS build, WORKDIR/edit_data) and their records:
                 target latents' moments, source latents' means, instruction embeddings,
                 made by the job's own VAE and text encoders (WORKDIR/records/edit_train)
  edit_train     the editing MM-DiT (WORKDIR/edit): the text-to-image run's EMA weights, the
                 patch embedding widened to 2 x 16 input channels (new ones zero), trained by
                 the shared trainer with InstructPix2Pix's condition dropout
  edit_evaluate  success / preservation per edit type on held-out triplets against the copy
                 and regenerate baselines, the guidance table, a grid (WORKDIR/edit_eval.json,
                 WORKDIR/edit/edit_grid.png)
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

from ml_collections import ConfigDict

from sd3jax import config as config_lib

STAGES = ("edit_data", "edit_train", "edit_evaluate")
DEPENDS = {"edit_data": ("job.edit.data",), "edit_train": ("job.edit.train",),
           "edit_evaluate": ("job.edit.eval",)}


def edit_config(config: ConfigDict, paths) -> ConfigDict:
  """The editing run's trainer config: the text-to-image run's, with job.edit.train's
  changes (and nothing else), starting from its weights."""
  from sd3jax import job
  e = config.job.edit.train
  c = job.mmdit_config(config, paths)
  with c.unlocked():
    c.init_from, c.init_from_ema = paths.mmdit, True
    c.init_from_in_channels = int(c.model.in_channels)
    c.model.in_channels = 2 * int(c.model.out_channels)
    c.total_steps, c.batch_size = int(e.steps), int(e.batch)
    c.optimizer.name = str(e.get("optimizer", "adamw"))
    c.optimizer.learning_rate = float(e.learning_rate)
    c.flow.shift = float(e.shift)
    c.schedule.warmup_steps = int(e.warmup_steps)
    c.ema.decay = float(e.ema_decay)
    c.conditioning.drop_prob = float(e.encoder_drop_prob)
    c.conditioning.edit_drop_prob = float(e.edit_drop_prob)
    c.data.path = paths.edit_records
    c.data.p_synthetic = 0.0  # instructions have no synthetic caption
    c.eval.every_steps = 0    # edit_evaluate scores the final weights
    c.eval.sample_autoguidance, c.eval.sample_autoguidance_run = 1.0, ""  # no weak editor
    c.eval.path = ""
    c.checkpoint.every_steps = int(e.checkpoint_every)
    c.edit_eval = copy.deepcopy(config.job.edit.eval)  # `sd3jax edit`'s defaults
  return c


def _check_vocabulary(encoders_folder: str, instructions: list[str]) -> None:
  """Instructions with words the text encoders do not know would train on <unk>: refuse."""
  from sd3jax.interop import transformers as tf_interop
  tok = tf_interop.load_tokenizer(os.path.join(encoders_folder, "tokenizer_3"), None)
  unknown = sorted({w for text in instructions for w in text.lower().split()
                    if tok.convert_tokens_to_ids(w) == tok.unk_token_id})
  if unknown:
    raise config_lib.ConfigError(
        f"The text encoders in {encoders_folder} do not know the instruction words {unknown} "
        "(built before sd3jax knew them). Rebuild them: delete that folder and "
        "WORKDIR/job/encoders.json and every later marker, then rerun `sd3jax run`.")


def stage_edit_data(config: ConfigDict, paths) -> dict[str, Any]:
  from sd3jax.data import precompute, shapes_edit
  d = config.job.edit.data
  build = shapes_edit.build_edits(paths.edit_data, int(config.data.image_size),
                                  int(d.num_train), int(d.num_val), int(d.seed))
  source = shapes_edit.load_edits(build, "train")
  if not config.precompute.text_encoders:
    _check_vocabulary(paths.encoders, [source[i]["caption_original"]
                                       for i in range(min(len(source), 512))])
  c = edit_config(config, paths)
  with c.unlocked():
    c.precompute.source = build
  import jax.numpy as jnp
  from sd3jax import conditioning
  from sd3jax.data.batch_encoder import local_mesh
  from sd3jax.interop import diffusers_vae
  s = c.precompute
  mesh = local_mesh()
  te = conditioning.TextEncoders.from_pipeline_folder(
      paths.encoders, t5_length=int(c.conditioning.t5_tokens), t5_width=int(c.conditioning.t5_dim),
      mesh=mesh, rules=c.sharding_rules, dtype=jnp.float32)
  result = precompute.precompute(
      source, paths.edit_records, diffusers_vae.load_vae(paths.vae), te,
      global_batch=int(s.batch_size), resolution=int(c.data.image_size),
      storage_dtype=s.storage_dtype, examples_per_shard=int(s.examples_per_shard), mesh=mesh,
      rules=c.sharding_rules, vae_fingerprint=conditioning.folder_fingerprint(paths.vae))
  return {"build": build, "records": paths.edit_records, "num_train": len(source),
          "complete": result.complete}


def stage_edit_train(config: ConfigDict, paths) -> dict[str, Any]:
  from sd3jax import job, train
  result = train.train(edit_config(config, paths), paths.edit)
  if result.interrupted:
    raise job.Interrupted(f"editing MM-DiT stopped at step {result.step}")
  return {"path": paths.edit, "steps": result.step, "final_loss": result.metrics.get("loss")}


def stage_edit_evaluate(config: ConfigDict, paths) -> dict[str, Any]:
  from sd3jax import job, sample
  from sd3jax.data import shapes_edit
  from sd3jax.edit import evaluate, sampling
  e = config.job.edit
  c = sample.run_config(edit_config(config, paths), None)
  edit_pipe = sample.pipeline_from_run(c, paths.edit)
  t2i = sample.run_config(job.mmdit_config(config, paths), None)
  t2i_pipe = sample.pipeline_from_run(t2i, paths.mmdit)
  source = shapes_edit.load_edits(shapes_edit.dataset_dir(paths.edit_data, shapes_edit.config_name(
      int(config.data.image_size), int(config.data.image_size), int(e.data.num_train),
      int(e.data.num_val), int(e.data.seed))), "validation")
  examples = evaluate.held_out_edits(source, int(e.eval.per_type))
  result = evaluate.evaluate_editing(
      edit_pipe, t2i_pipe, examples, settings=sampling.run_edit_settings(c),
      t2i_settings=sample.run_sampling_settings(t2i),
      guidance=[tuple(g) for g in e.eval.guidance], guidance_examples=int(e.eval.guidance_per_type),
      out_dir=paths.edit)
  with open(paths.edit_eval, "w") as f:
    json.dump(result, f, indent=1, default=float)
  return {"path": paths.edit_eval, "grid": result.get("grid"), "success": result["model"]["success"],
          "preserved": result["model"]["preserved"]}


STAGE_FNS = {"edit_data": stage_edit_data, "edit_train": stage_edit_train,
             "edit_evaluate": stage_edit_evaluate}


def summary_lines(path: str) -> list[str]:
  """What `sd3jax run` prints about the editing model (from WORKDIR/edit_eval.json)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    ev = json.load(f)
  m, base = ev["model"], ev["baselines"]
  words = {"recolour": "recolour", "move": "move", "add": "add", "remove": "remove",
           "resize": "resize", "change_shape": "change shape"}
  lines = ["editing (held-out scenes; success / preservation): " + ", ".join(
      f"{words[t]} {v['success']:.2f} / {v['preserved']:.2f}" for t, v in m["per_type"].items())]
  lines.append(f"  mean {m['success']:.2f} / {m['preserved']:.2f}; baselines: copy "
               f"{base['copy']['success']:.2f} / {base['copy']['preserved']:.2f}" + (
                   f", regenerate {base['regenerate']['success']:.2f} / "
                   f"{base['regenerate']['preserved']:.2f}" if "regenerate" in base else ""))
  return lines
