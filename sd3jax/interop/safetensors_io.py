"""Reading and writing Hugging Face style weight folders (config.json + safetensors).

Both diffusers and transformers store a model as `config.json` plus either one
`*.safetensors` file or several shards listed in `*.safetensors.index.json`.
These helpers give a flat {name: numpy array} view of such a folder, and write one
back, so the model-specific converters only deal with names and layouts.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

# Shards above this size are split, as transformers / diffusers do by default.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def read_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{folder!r} has no config.json; expected a diffusers / transformers model folder "
        "(config.json + *.safetensors). Pass the folder that holds config.json "
        "(for a full pipeline, e.g. PIPELINE/transformer).")
  with open(path) as f:
    return json.load(f)


def load_state_dict(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a folder, single file or sharded with an index, as float32-able numpy."""
  names = sorted(os.listdir(folder))
  index = [n for n in names if n.endswith(".safetensors.index.json")]
  if index:
    with open(os.path.join(folder, index[0])) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  else:
    files = [n for n in names if n.endswith(".safetensors")]
  if not files:
    raise FileNotFoundError(
        f"No *.safetensors weights in {folder!r}. Convert PyTorch .bin weights with "
        "`model.save_pretrained(folder, safe_serialization=True)` first.")
  state = {}
  for fname in files:
    state.update(load_file(os.path.join(folder, fname)))
  return state


def save_state_dict(state: Mapping[str, np.ndarray], folder: str, config: dict,
                    weights_name: str = "diffusion_pytorch_model.safetensors",
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes config.json and the weights, sharded with an index file when large."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  state = {k: np.ascontiguousarray(v) for k, v in state.items()}
  shards, current, size = [], {}, 0
  for name in sorted(state):
    nbytes = state[name].nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = state[name]
    size += nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(folder, weights_name), metadata={"format": "pt"})
    return
  stem = weights_name[: -len(".safetensors")]
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in shard})
  total = sum(v.nbytes for v in state.values())
  with open(os.path.join(folder, weights_name + ".index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def take(state: dict[str, np.ndarray], name: str) -> np.ndarray:
  """Pops one tensor, with an error that names what is missing."""
  if name not in state:
    raise KeyError(f"Weight {name!r} is missing from the checkpoint; "
                   "is the folder for the right model class and config?")
  return np.asarray(state.pop(name), dtype=np.float32)


def check_consumed(state: Mapping[str, np.ndarray], what: str) -> None:
  """Every checkpoint tensor must have found a home: leftovers mean a config mismatch."""
  if state:
    left = sorted(state)
    raise ValueError(f"{len(left)} weights of the {what} checkpoint were not used, e.g. "
                     f"{left[:5]}; the folder's config does not describe these weights.")
