"""Whole diffusers SD3 pipeline folders <-> `sd3jax.sample.Pipeline`.

A folder is what `StableDiffusion3Pipeline.save_pretrained` writes:

  model_index.json                 component -> [library, class]; null for a missing T5
  transformer/                     SD3Transformer2DModel  (load_transformer / save_transformer)
  vae/                             AutoencoderKL          (load_vae / save_vae)
  text_encoder{,_2,_3}/            CLIPTextModelWithProjection x 2, T5EncoderModel (optional)
  tokenizer{,_2,_3}/
  scheduler/scheduler_config.json  FlowMatchEulerDiscreteScheduler: `shift` is the sampling shift

The text encoders are frozen, so export copies their folders (from the folder a pipeline was
loaded from, or from any folder in the same layout, e.g. the experiment's text-encoder
folder) instead of converting their weights back.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sd3jax import parallel
from sd3jax.conditioning import LAYOUT, TextEncoders
from sd3jax.interop import safetensors_io as st
from sd3jax.interop.diffusers import load_transformer, save_transformer
from sd3jax.interop.diffusers_vae import load_vae, save_vae
from sd3jax.models import mmdit
from sd3jax.sample import Pipeline

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# Scheduler options that change the noise levels in ways sd3jax.flow does not implement, with
# the values under which FlowMatchEulerDiscreteScheduler equals flow.sigmas(steps, shift).
_SCHEDULER_PLAIN = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                    "use_karras_sigmas": False, "use_exponential_sigmas": False,
                    "use_beta_sigmas": False, "stochastic_sampling": False,
                    "num_train_timesteps": 1000}
_ENCODER_DIRS = tuple(d for name in ("clip_l", "clip_g", "t5") for d in LAYOUT[name])
_FALLBACK_CLASSES = {"text_encoder": "CLIPTextModelWithProjection",
                     "text_encoder_2": "CLIPTextModelWithProjection",
                     "text_encoder_3": "T5EncoderModel", "tokenizer": "CLIPTokenizer",
                     "tokenizer_2": "CLIPTokenizer", "tokenizer_3": "T5TokenizerFast"}


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def read_model_index(folder: str) -> dict:
  """model_index.json of a pipeline folder, with errors that say what the folder should be."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Pipeline folder {folder!r} does not exist.")
  path = os.path.join(folder, "model_index.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{folder!r} has no model_index.json, so it is not a diffusers pipeline folder. Pass the "
        "folder that StableDiffusion3Pipeline.save_pretrained wrote (model_index.json, "
        "transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/); for a single model use "
        "load_transformer / load_vae on its subfolder.")
  index = _read_json(path)
  if not str(index.get("_class_name", "")).startswith("StableDiffusion3"):
    raise ValueError(f"{path} describes a {index.get('_class_name')!r}; load_pipeline reads "
                     "StableDiffusion3Pipeline folders (SD3 / SD3.5).")
  for name, want in (("transformer", "SD3Transformer2DModel"), ("vae", "AutoencoderKL"),
                     ("scheduler", SCHEDULER_CLASS)):
    got = (index.get(name) or [None, None])[1]
    if got != want:
      raise ValueError(f"{path}: component {name!r} is {got!r}; sd3jax needs {want!r}.")
  return index


def scheduler_shift(config: dict) -> float:
  """The sampling shift of a FlowMatchEulerDiscreteScheduler config; other schedules fail."""
  if config.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
    raise ValueError(f"Scheduler {config['_class_name']!r} is not supported; sd3jax samples "
                     f"on {SCHEDULER_CLASS}'s noise levels.")
  for key, plain in _SCHEDULER_PLAIN.items():
    if key in config and config[key] != plain:
      raise NotImplementedError(
          f"scheduler_config.json sets {key}={config[key]!r}; sd3jax's samplers implement the "
          f"plain shifted schedule ({key}={plain!r}). Edit the config or pass shift= explicitly "
          "after setting it to the plain value.")
  return float(config.get("shift", 1.0))


def load_pipeline(folder: str, *, t5_length: int = 256, use_t5: bool = True,
                  mesh: Mesh | None = None, rules: Any = "fsdp_tp",
                  text_encoder_dtype: Any = jnp.float32, vae_dtype: Any = jnp.float32,
                  **execution) -> Pipeline:
  """A diffusers SD3 pipeline folder -> Pipeline, weights on devices.

  `execution` goes to the MM-DiT (dtype, scan_layers, remat_policy, attention_impl).
  `t5_length` is diffusers' max_sequence_length (256). A folder without T5 (text_encoder_3
  null or absent), or use_t5=False, gives zeros in its place, as the reference does. With
  a mesh, the MM-DiT and text encoders are sharded by `rules` and the VAE replicated.
  """
  index = read_model_index(folder)
  sub = lambda name: os.path.join(folder, name)
  sched_path = os.path.join(sub("scheduler"), "scheduler_config.json")
  if not os.path.exists(sched_path):
    raise FileNotFoundError(f"{sched_path} is missing; it holds the sampling shift (3.0 for "
                            "SD3). Copy it from the source pipeline.")
  sched = _read_json(sched_path)
  shift = scheduler_shift(sched)

  model, tparams = load_transformer(sub("transformer"), **execution)
  cfg = model.cfg
  if mesh is None:
    tparams = jax.device_put(tparams)
  else:
    specs = nn.get_partition_spec(
        jax.eval_shape(lambda r: mmdit.init_params(cfg, r), jax.random.key(0)))
    # Each tensor goes from host memory straight into its shards.
    tparams = jax.tree.map(jax.device_put, tparams,
                           parallel.logical_to_sharding(specs, mesh, rules))
  vae, vparams = load_vae(sub("vae"), dtype=vae_dtype)
  if mesh is not None:
    vparams = jax.device_put(vparams, NamedSharding(mesh, P()))
  if vae.config.latent_channels != cfg.out_channels:  # an editing transformer takes 2x in
    raise ValueError(f"The VAE has {vae.config.latent_channels} latent channels but the "
                     f"transformer predicts out_channels={cfg.out_channels}.")

  has_t5 = (index.get("text_encoder_3") or [None, None])[0] is not None and os.path.exists(
      os.path.join(sub("text_encoder_3"), "config.json"))
  encoders = TextEncoders.from_pipeline_folder(
      folder, dtype=text_encoder_dtype, t5_length=t5_length, use_t5=use_t5 and has_t5,
      t5_width=cfg.joint_attention_dim, mesh=mesh, rules=rules)
  if encoders.pooled_width != cfg.pooled_projection_dim:
    raise ValueError(f"The CLIP projections give pooled vectors of {encoders.pooled_width} but "
                     f"the transformer's pooled_projection_dim is {cfg.pooled_projection_dim}.")
  return Pipeline(transformer=model, transformer_params=tparams, vae=vae, vae_params=vparams,
                  text_encoders=encoders, shift=shift, formulation="rf",
                  text_encoder_folder=os.path.abspath(folder), scheduler_config=sched,
                  mesh=mesh, rules=rules)


# ------------------------------------------------------------------------------------------------
# Export.
# ------------------------------------------------------------------------------------------------
def _encoder_sources(pipeline: Pipeline, text_encoder_folder: str | None) -> dict[str, str]:
  """subfolder name (text_encoder, tokenizer_3, ...) -> the folder to copy it from."""
  root = text_encoder_folder or pipeline.text_encoder_folder
  if root is not None:
    found = {d: os.path.join(root, d) for d in _ENCODER_DIRS
             if os.path.isdir(os.path.join(root, d))}
    src_index = os.path.join(root, "model_index.json")
    if os.path.exists(src_index):  # A null T5 in the source stays null.
      idx = _read_json(src_index)
      found = {d: p for d, p in found.items() if (idx.get(d) or [None])[0] is not None}
  elif pipeline.text_encoders is not None:
    found = {}
    for name, enc in pipeline.text_encoders.encoders.items():
      if enc is not None and len(enc.sources) == 2:
        found.update(zip(LAYOUT[name], enc.sources))
  else:
    found = {}
  missing = [d for d in _ENCODER_DIRS[:4] if d not in found]
  if missing:
    raise FileNotFoundError(
        f"save_pipeline: no source for {missing}. Pass text_encoder_folder=, a folder in the "
        "diffusers layout (text_encoder, text_encoder_2, [text_encoder_3], tokenizer, "
        f"tokenizer_2, [tokenizer_3]); searched {root!r}.")
  if ("text_encoder_3" in found) != ("tokenizer_3" in found):
    only = "text_encoder_3" if "text_encoder_3" in found else "tokenizer_3"
    raise FileNotFoundError(f"save_pipeline: text_encoder_3 and tokenizer_3 come together; found "
                            f"only {only} in {root!r}.")
  return found


def _component_class(name: str, path: str, source_index: dict) -> list[str]:
  """[library, class] for model_index.json: the source's entry, else read from the folder."""
  entry = source_index.get(name)
  if entry and entry[0] is not None:
    return list(entry)
  cls = None
  if name.startswith("text_encoder"):
    conf = os.path.join(path, "config.json")
    if os.path.exists(conf):
      cls = (_read_json(conf).get("architectures") or [None])[0]
  else:
    conf = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(conf):
      cls = _read_json(conf).get("tokenizer_class")
  return ["transformers", cls or _FALLBACK_CLASSES[name]]


def _diffusers_version() -> str:
  try:
    return importlib.metadata.version("diffusers")
  except importlib.metadata.PackageNotFoundError:
    return "0.30.0"


def save_pipeline(pipeline: Pipeline, folder: str, *, text_encoder_folder: str | None = None,
                  overwrite: bool = False,
                  max_shard_bytes: int = st.DEFAULT_MAX_SHARD_BYTES) -> str:
  """Writes a folder that `StableDiffusion3Pipeline.from_pretrained(folder)` loads; returns it.

  Text encoders and tokenizers are copied from `text_encoder_folder` (diffusers layout), else
  from the folder the pipeline was loaded from, else from the folders its TextEncoders were
  loaded from. Without a T5 the index says null for it, and diffusers then needs
  `from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)` (its own rule).
  """
  if pipeline.formulation != "rf":
    raise ValueError(f"Only rectified-flow models (formulation 'rf') run in diffusers' SD3 "
                     f"pipeline; this one predicts {pipeline.formulation!r}.")
  sources = _encoder_sources(pipeline, text_encoder_folder)
  if os.path.isdir(folder) and os.listdir(folder):
    if not overwrite:
      raise FileExistsError(f"{folder!r} is not empty; pass overwrite=True to replace it.")
    target = os.path.abspath(folder)
    inside = [p for p in sources.values()
              if os.path.commonpath([target, os.path.abspath(p)]) == target]
    if inside:
      raise ValueError(f"save_pipeline would delete its own sources {inside} by replacing "
                       f"{folder!r}; write to another folder.")
    shutil.rmtree(folder)
  root = text_encoder_folder or pipeline.text_encoder_folder
  src_index_path = os.path.join(root, "model_index.json") if root else ""
  src_index = _read_json(src_index_path) if os.path.exists(src_index_path) else {}

  os.makedirs(folder, exist_ok=True)
  save_transformer(pipeline.transformer, pipeline.transformer_params,
                   os.path.join(folder, "transformer"), max_shard_bytes=max_shard_bytes)
  save_vae(pipeline.vae, pipeline.vae_params, os.path.join(folder, "vae"),
           max_shard_bytes=max_shard_bytes)
  sched = {k: v for k, v in (pipeline.scheduler_config or {}).items() if not k.startswith("_")}
  sched.update(_class_name=SCHEDULER_CLASS, _diffusers_version=_diffusers_version(),
               shift=float(pipeline.shift), num_train_timesteps=1000)
  scheduler_shift(sched)  # An exported schedule must be one sd3jax samples the same way.
  os.makedirs(os.path.join(folder, "scheduler"))
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(sched, f, indent=2, sort_keys=True)

  index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": _diffusers_version(),
           "transformer": ["diffusers", "SD3Transformer2DModel"],
           "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", SCHEDULER_CLASS],
           "image_encoder": [None, None], "feature_extractor": [None, None]}
  for name in _ENCODER_DIRS:
    if name in sources:
      shutil.copytree(sources[name], os.path.join(folder, name))
      index[name] = _component_class(name, sources[name], src_index)
    else:
      index[name] = [None, None]
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return folder


__all__ = ["load_pipeline", "save_pipeline", "read_model_index", "scheduler_shift", "Pipeline"]
