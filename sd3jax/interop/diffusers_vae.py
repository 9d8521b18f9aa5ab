"""diffusers `AutoencoderKL` folders <-> sd3jax.models.vae, losslessly.

The Flax tree mirrors diffusers' module names (`down_blocks_0/resnets_1/conv1/kernel` is
`down_blocks.0.resnets.1.conv1.weight`), so conversion is a renaming plus layouts:
conv kernels HWIO <-> OIHW, dense kernels (in, out) <-> (out, in), GroupNorm scale <-> weight.
Old checkpoints name the mid-block attention query / key / value / proj_attn (diffusers still
renames these on load) and some store those projections as 1x1 convs; both are accepted.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from sd3jax import parallel
from sd3jax.interop.safetensors_io import (DEFAULT_MAX_SHARD_BYTES, check_consumed,
                                           load_state_dict, read_config, save_state_dict, take)
from sd3jax.models.vae import AutoencoderKL, VAEConfig, param_logical_axes

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_name(path: tuple[str, ...]) -> str:
  """Flax param path -> diffusers state-dict key."""
  parts = [re.sub(r"^(.*)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
  return ".".join(parts + [_LEAF[path[-1]]])


def _to_torch(x: np.ndarray) -> np.ndarray:
  if x.ndim == 4:  # HWIO -> OIHW
    return x.transpose(3, 2, 0, 1)
  if x.ndim == 2:  # (in, out) -> (out, in)
    return x.T
  return x


def _from_torch(w: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
  if len(shape) == 4:
    w = w.transpose(2, 3, 1, 0)
  elif len(shape) == 2:
    if w.ndim == 4 and w.shape[2:] == (1, 1):  # a 1x1 conv stored for a linear layer
      w = w[:, :, 0, 0]
    w = w.T
  if tuple(w.shape) != tuple(shape):
    raise ValueError(f"Weight {name!r} has shape {tuple(w.shape)} after conversion but the "
                     f"config needs {tuple(shape)}; config.json and the weights disagree.")
  return np.ascontiguousarray(w, dtype=np.float32)


def _rename_legacy(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in state.items():
    m = re.match(r"^(.*\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$",
                 k)
    out[f"{m[1]}.{_LEGACY_ATTENTION[m[2]]}.{m[3]}" if m else k] = v
  return out


def params_from_state_dict(model: AutoencoderKL, state: dict[str, np.ndarray]) -> dict:
  """A diffusers state dict -> the model's (unboxed, numpy float32) params tree."""
  state = _rename_legacy(dict(state))
  abstract = nn.unbox(jax.eval_shape(model.init_params, jax.random.key(0)))
  flat = {}
  for path, leaf in traverse_util.flatten_dict(abstract).items():
    name = torch_name(path)
    flat[path] = _from_torch(take(state, name), leaf.shape, name)
  check_consumed(state, "AutoencoderKL")
  return traverse_util.unflatten_dict(flat)


def state_dict_from_params(params: Any) -> dict[str, np.ndarray]:
  """The model's params -> a diffusers state dict of float32 numpy arrays."""
  flat = traverse_util.flatten_dict(nn.unbox(params))
  return {torch_name(p): _to_torch(np.asarray(jax.device_get(v), np.float32))
          for p, v in flat.items()}


def load_vae(folder: str, dtype: Any = jnp.float32, remat: bool = False,
             mesh: Mesh | None = None, rules: Any = "fsdp") -> tuple[AutoencoderKL, dict]:
  """Model and float32 params from a diffusers AutoencoderKL folder (single or sharded).

  With a `mesh`, each tensor goes from host memory straight into its shards, laid out by
  the params' logical axes and `rules` (a parallel.py preset name or rule list).
  """
  model = AutoencoderKL(VAEConfig.from_diffusers(read_config(folder)), dtype=dtype, remat=remat)
  params = params_from_state_dict(model, load_state_dict(folder))
  if mesh is None:
    return model, jax.tree.map(jnp.asarray, params)
  shardings = parallel.logical_to_sharding(param_logical_axes(model), mesh, rules)
  return model, jax.tree.map(jax.device_put, params, shardings)


def save_vae(model: AutoencoderKL, params: Any, folder: str,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes config.json + diffusion_pytorch_model.safetensors (sharded with index if large)."""
  save_state_dict(state_dict_from_params(params), folder, model.config.to_diffusers(),
                  max_shard_bytes=max_shard_bytes)
