"""Experiment configs: loading, the trainer's key schema, and `validate`.

An experiment is a Python file with `get_config(arg=None) -> ConfigDict`. The keys the
trainer reads are listed once, with defaults, in `defaults()`; `validate` checks a config
against them and against the machine *before* anything is compiled, so a mistake costs
seconds, not a queue slot on a pod. Every error names the key and the fix.

Sections not in `defaults()` (for example `sample` or `eval`, owned by other commands)
pass through unchecked until their command adds them here.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import json
import math
import os
from typing import Any, Sequence

from ml_collections import ConfigDict

from sd3jax import parallel


class ConfigError(ValueError):
  """A config that cannot work; the message names the key and the fix."""


def defaults() -> ConfigDict:
  """Every key the trainer reads, with SD3-like defaults (sizes of SD3-medium at 256^2)."""
  c = ConfigDict()
  c.task = "mmdit"             # mmdit | vae (the KL autoencoder; sd3jax.tasks)
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256           # global, across all processes
  c.microbatches = 1           # gradient accumulation: batch_size / microbatches per pass
  c.init_from = ""             # weights only, into a fresh run: an sd3jax workdir or step folder
  c.init_from_ema = True       # take the EMA weights from init_from when it has them
  c.init_from_in_channels = 0  # init_from's model.in_channels when it differs (an editing
                               # model from a text-to-image one: the new inputs start at 0)
  c.compilation_cache_dir = "" # persistent XLA cache: a restarted job skips compiling

  from sd3jax.models import mmdit
  c.model = ConfigDict(dataclasses.asdict(mmdit.MMDiTConfig()))
  c.model.qk_norm = ""         # "" (none) or "rms_norm"
  c.model.dtype = "bfloat16"   # compute dtype; params, optimizer and loss stay float32

  c.data = ConfigDict(dict(
      source="synthetic",      # "synthetic" (sd3jax.data.synthetic) or "records"
      path="",                 # records folder for source="records"
      image_size=256,          # pixels, square; the reference size of the shift rule
      buckets=(),              # aspect-ratio buckets, pixel (h, w) pairs; (): one square
                               # bucket of image_size (sd3jax.buckets)
      vae_factor=8,            # VAE downsampling: latent side = image_size / vae_factor
      synthetic_period=0,      # synthetic batches repeat after this many (0: never)
      p_synthetic=0.5,         # records: probability of the synthetic caption
      producer_key="",         # records: required producer key of the precomputed set
      filter="",               # a dedup filter folder (sd3jax dedup cluster): precompute and
                               # image-text pipelines leave its duplicates out
      max_bad_records=0,       # records: unreadable records skipped (and counted) before a
                               # run stops on one; 0 stops at the first, naming its shard
      workers=0, threads=2, prefetch=4,  # records: grain worker processes / threads / buffer
      # task="vae": source "shapes" (a TFDS build at path, rendered if missing) or "records"
      shapes_num_train=10_000, shapes_num_val=1_000, shapes_seed=0,
  ))
  # task="vae": the KL autoencoder (models.vae.vae_config) and its losses (vae_losses).
  c.vae = ConfigDict(dict(
      latent_channels=16, width=32, layers_per_block=1, dtype="float32", remat=False,
      channel_mult=(1, 2, 4, 4),  # widths per level; f = 2 ** (levels - 1): f8 here
      norm_groups=0,           # GroupNorm groups; 0: 32, or width / 4 below width 128
      zero_init_residual=False,  # ResNet blocks (and attention) start as the identity
      init_logvar=0.0,         # initial posterior log-variance (encoder conv_out bias)
      fit_examples=512,        # export: scaling / shift factors fitted on this many images
      rec_loss="l1", kl_weight=1e-6, sample_posterior=True,
      perceptual_weight=0.0, perceptual_path="",  # LPIPS / VGG16 safetensors (local)
      disc_start=50_001, disc_weight=0.5, disc_factor=1.0, disc_loss="hinge",
      disc_ndf=64, disc_layers=3, disc_lr_ratio=1.0, disc_b1=0.5, disc_b2=0.9,
      eval_examples=64,        # held-out images for PSNR / SSIM (records: the last ones)
      train_crop=0,            # > 0: train on one random window of this side per image
  ))
  c.conditioning = ConfigDict(dict(
      clip_l_dim=768, clip_g_dim=1280, t5_dim=4096,
      clip_tokens=77, t5_tokens=77,
      drop_prob=0.464,         # each encoder dropped (zeroed) independently in training
      edit_drop_prob=0.05,     # editing models (records with a source image): text only,
                               # image only and both dropped, each with this probability
  ))
  c.flow = ConfigDict(dict(
      formulation="rf",        # rf | eps_linear | v_cosine | edm
      density="logit_normal",  # logit_normal | uniform | mode | cosmap
      logit_mean=0.0, logit_std=1.0,  # logit_normal(m, s)
      mode_scale=1.29,         # mode(s)
      shift=1.0,               # resolution shift of t (3.0 at 1024^2)
      shift_rule="fixed",      # fixed | resolution: shift x sqrt(h w) / image_size per
                               # bucket (sd3jax.buckets), in training and sampling
  ))
  c.optimizer = ConfigDict(dict(
      name="adamw",            # adamw | muon (Muon on the blocks' matrices, AdamW on the rest)
      muon_ns_steps=5,         # muon: Newton-Schulz iterations per update (the cost of Muon)
      learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      grad_clip_norm=1.0,      # global-norm clipping; 0 disables
      max_nonfinite_steps=20,  # stop after this many non-finite steps in a row
  ))
  c.schedule = ConfigDict(dict(
      name="warmup_constant",  # warmup_constant | cosine | wsd (warmup-stable-decay)
      warmup_steps=1000,
      decay_steps=0,           # wsd: length of the final decay (0: 20% of the run)
      final_fraction=0.0,      # cosine / wsd: final LR as a fraction of the peak
  ))
  c.ema = ConfigDict(dict(decay=0.9999, every_steps=1,
                          warmup=False))  # decay min(decay, (1 + step) / (10 + step))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))       # within a slice (ICI)
  c.mesh_dcn = ConfigDict(dict(data=1, fsdp=1, tensor=1))    # across slices (DCN)
  c.sharding_rules = "fsdp"    # dp | fsdp | fsdp_tp, or a list of (logical, mesh axes)
  c.checkpoint = ConfigDict(dict(
      every_steps=1000, keep_last=3,
      keep_every=0,            # steps divisible by this are kept forever (0: none)
      async_save=True,
  ))
  c.log = ConfigDict(dict(
      every_steps=10, progress_bar=True, tensorboard=True,
      peak_tflops_per_device=0.0,  # override the peak table for MFU (0: look up)
  ))
  c.eval = ConfigDict(dict(
      every_steps=0,           # 0: no evaluation during training
      batches=2,               # held-out examples = batches x batch_size (num_examples=0)
      fid_network="", clip_network="",  # sd3jax.evals feature networks ("" : skipped)
      # fid_network also gives task="vae" its eval/rfid (originals vs reconstructions).
      path="",                 # held-out precomputed records ("" : synthetic, seed + 1)
      num_examples=0,          # held-out examples for the validation loss (0: see batches)
      num_timesteps=8,         # fixed t = (j + 1/2) / num_timesteps
      per_device_batch=2,      # fixed per device, so the loss is the same on any dp mesh
      seed=0,                  # fixed noise per example: rng(seed, example index)
      conditioning_gap=True,   # also the loss with every encoder dropped: cond_gap
      prompts_per_category=4,  # shapes prompt-following (needs precompute.vae + text_encoders)
      sample_steps=28, sample_cfg=5.0, sample_shift=3.0,  # sampling for prompt following
      sample_cfg_max_t=1.0,    # guide only at t <= this (1: every step; flow.cfg)
      # Autoguidance above sample_cfg_max_t (flow.autoguide): scale (1: none) and the weak
      # model, a shorter run of the same MM-DiT (the job trains it: job.weak_steps).
      sample_autoguidance=1.0, sample_autoguidance_run="",
  ))
  return c


# Sections whose keys are checked strictly against defaults(). Others pass through.
def _checked_sections() -> set[str]:
  return {k for k, v in defaults().items() if isinstance(v, ConfigDict)}


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def load(path_and_arg: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Loads `experiments/FILE.py[:ARG]` and applies `KEY=VALUE` overrides; returns it locked."""
  path, _, arg = path_and_arg.partition(":")
  spec = importlib.util.spec_from_file_location("_sd3jax_experiment", path)
  if spec is None or not os.path.exists(path):
    raise ConfigError(f"--config: no experiment file at {path!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"Override {item!r} must look like KEY=VALUE.")
    set_key(config, key.removeprefix("config."), value)
  return config


def set_key(config: ConfigDict, dotted: str, value: Any) -> None:
  """Sets config.<dotted> = value (strings are parsed with the field's type)."""
  check_key_exists(config, dotted)
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  current = node[leaf]
  if isinstance(value, str) and not isinstance(current, str):
    value = _parse_like(value, current)
  node[leaf] = value  # an existing key: allowed on a locked config


def _parse_like(text: str, like: Any) -> Any:
  if isinstance(like, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"Expected a boolean, got {text!r}.")
  if isinstance(like, (int, float)):
    return type(like)(float(text)) if isinstance(like, float) else int(text)
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    if isinstance(like, (tuple, list)):  # Python literals too: ((64, 64), (48, 80))
      import ast
      try:
        return ast.literal_eval(text)
      except (ValueError, SyntaxError):
        pass
    raise ConfigError(f"Cannot read {text!r} as a {type(like).__name__} (JSON or a Python "
                      "literal, e.g. [[1024, 1024], [832, 1216]]).") from None


def all_keys(config: ConfigDict, prefix: str = "") -> list[str]:
  """Dotted names of every leaf, e.g. ['seed', 'optimizer.eps', ...]."""
  out = []
  for k, v in config.items():
    name = f"{prefix}{k}"
    out += all_keys(v, name + ".") if isinstance(v, ConfigDict) else [name]
  return out


def unknown_key_message(config: ConfigDict, dotted: str) -> str:
  """A message that names an unknown key, the closest known ones, and the fix."""
  *parents, leaf = dotted.split(".")
  node, where = config, "config"
  for p in parents:
    if not isinstance(node, ConfigDict) or p not in node:
      break
    node, where = node[p], f"{where}.{p}"
  siblings = sorted(node.keys()) if isinstance(node, ConfigDict) else []
  close = difflib.get_close_matches(dotted, all_keys(config), n=3, cutoff=0.6)
  msg = f"Unknown config key 'config.{dotted}'."
  if close:
    msg += " Did you mean " + " or ".join(f"'config.{c}'" for c in close) + "?"
  if siblings:
    msg += f" Keys under {where}: {', '.join(siblings)}."
  msg += (" Fix the spelling, or add the key to the experiment's get_config() (and to "
          "sd3jax/config.py:defaults() if the trainer should read it).")
  return msg


def check_key_exists(config: ConfigDict, dotted: str) -> None:
  node = config
  for p in dotted.split("."):
    if not isinstance(node, ConfigDict) or p not in node:
      raise ConfigError(unknown_key_message(config, dotted))
    node = node[p]


# Settings that name files or folders. A run stores them absolute, so that its config.json
# means the same thing from any directory (`sd3jax sample --workdir RUN` from elsewhere).
PATH_KEYS = ("data.path", "data.filter", "eval.path", "precompute.vae", "precompute.text_encoders",
             "precompute.source", "init_from", "compilation_cache_dir", "vae.perceptual_path",
             "job.data", "job.data_val", "eval.sample_autoguidance_run")


def absolute(path: str) -> str:
  """`path` made absolute; "" and URLs (gs://...) are kept as they are."""
  return path if not path or "://" in path else os.path.abspath(os.path.expanduser(path))


def with_absolute_paths(config: ConfigDict) -> ConfigDict:
  """A copy of `config` whose PATH_KEYS that are set are absolute paths."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for key in PATH_KEYS:
      section, _, leaf = key.rpartition(".")
      node = out
      for part in section.split(".") if section else ():
        node = node.get(part) if isinstance(node, ConfigDict) else None
      if isinstance(node, ConfigDict) and isinstance(node.get(leaf), str):
        node[leaf] = absolute(node[leaf])
  return out


# Settings a task never reads: left out of its config.json and log, so that neither shows
# defaults that do not apply (an MM-DiT run's `vae:` block is not the VAE it used).
_UNUSED_BY_TASK = {
    "mmdit": ("vae", "job", "data.shapes_num_train", "data.shapes_num_val", "data.shapes_seed"),
    "vae": ("model", "conditioning", "flow", "precompute", "job", "data.synthetic_period",
            "data.p_synthetic", "data.producer_key", "data.max_bad_records", "eval.conditioning_gap",
            "eval.prompts_per_category", "eval.sample_steps", "eval.sample_cfg",
            "eval.sample_cfg_max_t", "eval.sample_shift", "eval.clip_network", "eval.num_timesteps",
            "eval.sample_autoguidance", "eval.sample_autoguidance_run"),
}


def for_task(config_json: dict) -> dict:
  """`to_json(config)` without the settings its task does not read."""
  out = copy.deepcopy(config_json)
  for key in _UNUSED_BY_TASK.get(out.get("task", ""), ()):
    section, _, leaf = key.rpartition(".")
    node = out.get(section) if section else out
    if isinstance(node, dict):
      node.pop(leaf, None)
  return out


def to_json(config: ConfigDict) -> dict:
  """A JSON-compatible dict of the config (tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


# ---------------------------------------------------------------------------
# Validation (no compilation, no device memory)
# ---------------------------------------------------------------------------


def evals_sample(config: ConfigDict) -> bool:
  """Whether the run's evals sample and score prompts (sd3jax.evals.run): that needs the
  run's VAE and text encoders (config.precompute.vae / .text_encoders) and prompts."""
  pre = config.get("precompute", None) or {}
  return (bool(pre.get("vae")) and bool(pre.get("text_encoders"))
          and int(config.eval.get("prompts_per_category", 4)) > 0)


def validate(config: ConfigDict, num_devices: int | None = None) -> ConfigDict:
  """Raises ConfigError naming the key and the fix for configs that cannot work.

  Returns the config completed with defaults for keys it does not set.
  """
  import jax
  config = complete(config)
  num_devices = jax.device_count() if num_devices is None else num_devices

  # Mesh: fits the devices (and one -1 at most).
  dcn = dict(config.mesh_dcn)
  slices = (math.prod(dcn.values()) if -1 not in dcn.values()
            else len({getattr(d, "slice_index", 0) for d in jax.devices()}))
  try:
    if slices and slices > 1:
      dcn_sizes = parallel.resolve_mesh_shape(dcn, slices, "mesh_dcn")
      per_slice = num_devices // slices
    else:
      dcn_sizes, per_slice = (1, 1, 1), num_devices
    sizes = parallel.resolve_mesh_shape(dict(config.mesh), per_slice, "mesh")
  except ValueError as e:
    fixed = math.prod(v for v in config.mesh.values() if v != -1)
    if fixed > num_devices:
      raise ConfigError(
          f"config.mesh={dict(config.mesh)} needs {fixed} devices but only {num_devices} are "
          f"available: shrink config.mesh (e.g. --config.mesh.data=-1 to use all of them).") from e
    raise ConfigError(str(e)) from e
  total = [a * b for a, b in zip(sizes, dcn_sizes)]
  data, fsdp, tensor = total

  # Batch: divisible by the data shards, per microbatch.
  shards = data * fsdp
  if config.microbatches < 1:
    raise ConfigError(f"config.microbatches={config.microbatches} must be >= 1.")
  if config.batch_size % (shards * config.microbatches):
    raise ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by the data shards x "
        f"microbatches = (data {data} x fsdp {fsdp}) x {config.microbatches} = "
        f"{shards * config.microbatches}: set config.batch_size to a multiple of "
        f"{shards * config.microbatches} or change config.mesh / config.microbatches.")

  # Model: known fields, heads divisible by tensor parallelism.
  m = config.model
  if m.hidden_size % m.num_heads:
    raise ConfigError(f"config.model.hidden_size={m.hidden_size} is not divisible by "
                      f"config.model.num_heads={m.num_heads}.")
  if tensor > 1 and m.num_heads % tensor:
    raise ConfigError(f"config.model.num_heads={m.num_heads} is not divisible by the tensor "
                      f"axis {tensor}: change config.mesh.tensor.")

  # Image size: divisible by patch x VAE factor.
  factor = m.patch_size * config.data.vae_factor
  if config.data.image_size % factor:
    raise ConfigError(
        f"config.data.image_size={config.data.image_size} is not divisible by "
        f"config.model.patch_size x config.data.vae_factor = {m.patch_size} x "
        f"{config.data.vae_factor} = {factor}: use a multiple of {factor} (e.g. "
        f"{max(factor, round(config.data.image_size / factor) * factor)}).")
  latent = config.data.image_size // config.data.vae_factor
  if latent // m.patch_size > m.pos_embed_max_size:
    raise ConfigError(f"config.data.image_size={config.data.image_size} gives a "
                      f"{latent // m.patch_size}-patch side, larger than "
                      f"config.model.pos_embed_max_size={m.pos_embed_max_size}.")

  if config.task == "mmdit":
    from sd3jax import buckets as buckets_lib
    problems = buckets_lib.check(config)
    if problems:
      raise ConfigError(" ".join(problems))

  # Conditioning shapes agree with the model's input widths.
  cond = config.conditioning
  clip = cond.clip_l_dim + cond.clip_g_dim
  if m.pooled_projection_dim != clip:
    raise ConfigError(f"config.model.pooled_projection_dim={m.pooled_projection_dim} must equal "
                      f"config.conditioning.clip_l_dim + clip_g_dim = {clip}.")
  if m.joint_attention_dim != cond.t5_dim or clip > cond.t5_dim:
    raise ConfigError(f"config.model.joint_attention_dim={m.joint_attention_dim} must equal "
                      f"config.conditioning.t5_dim={cond.t5_dim}, which must be >= the CLIP "
                      f"width clip_l_dim + clip_g_dim = {clip} (SD3 pads CLIP to the T5 width).")
  if not 0.0 <= cond.drop_prob <= 1.0:
    raise ConfigError(f"config.conditioning.drop_prob={cond.drop_prob} must be in [0, 1].")
  if not 0.0 <= cond.edit_drop_prob <= 1.0 / 3:
    raise ConfigError(f"config.conditioning.edit_drop_prob={cond.edit_drop_prob} must be in "
                      "[0, 1/3]: text only, image only and both are dropped with it each.")
  widen = int(config.init_from_in_channels)
  if widen and (not config.init_from or not 0 < widen <= m.in_channels):
    raise ConfigError(f"config.init_from_in_channels={widen} needs config.init_from (a run "
                      f"whose model.in_channels it is) and must be at most model.in_channels="
                      f"{m.in_channels}; 0 means the same as model.in_channels.")

  if config.task not in ("mmdit", "vae"):
    raise ConfigError(f"config.task={config.task!r}; choose 'mmdit' or 'vae'.")
  if config.task == "vae":
    f = 2 ** (len(config.vae.channel_mult) - 1)  # models.vae.vae_config: one per level
    if config.data.image_size % f:
      raise ConfigError(f"config.data.image_size={config.data.image_size} is not divisible by "
                        f"the VAE's downsampling factor {f}.")
    crop = int(config.vae.get("train_crop", 0))
    if crop and (crop % f or not 0 < crop <= config.data.image_size):
      raise ConfigError(f"config.vae.train_crop={crop} must be a multiple of the VAE's "
                        f"downsampling factor {f} and at most config.data.image_size="
                        f"{config.data.image_size} (or 0 for whole images).")
    if config.data.source not in ("shapes", "records"):
      raise ConfigError(f"config.data.source={config.data.source!r} with config.task='vae'; "
                        "use 'shapes' or 'records' (ingested images).")

  # Numbers in their ranges: a negative learning rate trains (backwards), total_steps=0
  # "finishes" at once; both are mistakes, not settings.
  for key, (low, high, closed) in _RANGES.items():
    section, _, leaf = key.rpartition(".")
    value = (config[section] if section else config).get(leaf)
    if value is None:
      continue
    ok = (value >= low if closed[0] else value > low) and (
        high is None or (value <= high if closed[1] else value < high))
    if not ok:
      span = (("[" if closed[0] else "(") + f"{low}, " + ("inf)" if high is None else
              f"{high}" + ("]" if closed[1] else ")")))
      raise ConfigError(f"config.{key}={value} is out of range: it must be in {span}.")

  ev = config.eval
  if config.task == "mmdit" and evals_sample(config) and ev.sample_autoguidance != 1.0 and (
      ev.sample_cfg_max_t >= 1.0 or not ev.sample_autoguidance_run):
    raise ConfigError(
        f"config.eval.sample_autoguidance={ev.sample_autoguidance} guides the sampling steps "
        f"above config.eval.sample_cfg_max_t (now {ev.sample_cfg_max_t}; set it below 1) with "
        f"the weak model of config.eval.sample_autoguidance_run (now "
        f"{ev.sample_autoguidance_run!r}: a run folder of the same MM-DiT trained for fewer "
        "steps; `sd3jax run` trains one with job.weak_steps); or set it to 1 (none).")

  # Optimizer, schedules, checkpointing, logging.
  from sd3jax.optim import OPTIMIZERS  # pylint: disable=g-import-not-at-top
  if config.optimizer.get("name", "adamw") not in OPTIMIZERS:
    raise ConfigError(f"config.optimizer.name={config.optimizer.name!r}; choose one of "
                      f"{OPTIMIZERS}.")
  names = ("warmup_constant", "cosine", "wsd")
  if config.schedule.name not in names:
    raise ConfigError(f"config.schedule.name={config.schedule.name!r}; choose one of {names}.")
  for key in ("checkpoint.every_steps", "log.every_steps", "ema.every_steps"):
    sec, leaf = key.split(".")
    if config[sec][leaf] < 1:
      raise ConfigError(f"config.{key}={config[sec][leaf]} must be >= 1.")
  if isinstance(config.sharding_rules, str):
    try:
      parallel.get_rules(config.sharding_rules)
    except ValueError as e:
      raise ConfigError(f"config.sharding_rules: {e}") from e
  return config


# key -> (low, high or None, (low inclusive, high inclusive)); checked by validate().
_RANGES = {
    "total_steps": (1, None, (True, False)), "batch_size": (1, None, (True, False)),
    "optimizer.learning_rate": (0.0, None, (False, False)),
    "optimizer.b1": (0.0, 1.0, (True, False)), "optimizer.b2": (0.0, 1.0, (True, False)),
    "optimizer.eps": (0.0, None, (False, False)),
    "optimizer.weight_decay": (0.0, None, (True, False)),
    "optimizer.grad_clip_norm": (0.0, None, (True, False)),
    "optimizer.max_nonfinite_steps": (1, None, (True, False)),
    "optimizer.muon_ns_steps": (1, None, (True, False)),
    "schedule.warmup_steps": (0, None, (True, False)),
    "schedule.decay_steps": (0, None, (True, False)),
    "schedule.final_fraction": (0.0, 1.0, (True, True)),
    "ema.decay": (0.0, 1.0, (True, True)),
    "data.p_synthetic": (0.0, 1.0, (True, True)),
    "data.image_size": (1, None, (True, False)),
    "data.max_bad_records": (0, None, (True, False)),
    "flow.shift": (0.0, None, (False, False)), "flow.logit_std": (0.0, None, (False, False)),
    "checkpoint.keep_last": (1, None, (True, False)),
    "checkpoint.keep_every": (0, None, (True, False)),
    "eval.every_steps": (0, None, (True, False)),
    "eval.sample_cfg_max_t": (0.0, 1.0, (False, True)),
    "eval.sample_autoguidance": (1.0, None, (True, False)),
    "vae.kl_weight": (0.0, None, (True, False)),
}


def complete(config: ConfigDict) -> ConfigDict:
  """Defaults overlaid with `config`, locked. Unknown keys in checked sections are errors."""
  base = defaults()
  checked = _checked_sections()
  unknown = []
  for key, value in config.items():
    if key in checked and isinstance(value, ConfigDict):
      unknown += [f"{key}.{k}" for k in all_keys(value) if not _has(base, f"{key}.{k}")]
    elif key not in base and not isinstance(value, ConfigDict):
      unknown.append(key)
  if unknown:
    more = f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
    raise ConfigError(unknown_key_message(base, unknown[0]) + more)
  merged = _merge(base.to_dict(), config.to_dict())
  out = ConfigDict(merged)
  out.lock()
  return out


def _merge(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def _has(config: ConfigDict, dotted: str) -> bool:
  node = config
  for p in dotted.split("."):
    if not isinstance(node, ConfigDict) or p not in node:
      return False
    node = node[p]
  return True


def model_config(config: ConfigDict):
  """The MMDiTConfig the experiment describes."""
  from sd3jax.models import mmdit
  kw = dict(config.model)
  kw["qk_norm"] = kw.get("qk_norm") or None
  kw["dual_attention_layers"] = tuple(kw.get("dual_attention_layers", ()))
  return mmdit.MMDiTConfig(**kw)


def latent_size(config: ConfigDict) -> int:
  return config.data.image_size // config.data.vae_factor


def text_len(config: ConfigDict) -> int:
  return config.conditioning.clip_tokens + config.conditioning.t5_tokens


def mesh_sizes(config: ConfigDict) -> tuple[dict, dict | None]:
  """(ici, dcn) arguments for parallel.make_mesh."""
  dcn = dict(config.mesh_dcn)
  return dict(config.mesh), (dcn if math.prod(abs(v) for v in dcn.values()) > 1 else None)

