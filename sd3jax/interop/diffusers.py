"""Exchange weights with diffusers folders (config.json + safetensors), both directions.

`load_transformer` / `save_transformer` cover `SD3Transformer2DModel`. The conversion is
a table of (diffusers name, sd3jax path, layout) entries, so each weight's fate is
visible in one place and nothing is silently dropped (leftovers are an error).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from sd3jax.interop import safetensors_io as st
from sd3jax.models import mmdit

# ---------------------------------------------------------------------------
# SD3Transformer2DModel
# ---------------------------------------------------------------------------

_CONFIG_KEYS = {  # diffusers config key -> MMDiTConfig field
    "num_layers": "depth", "patch_size": "patch_size", "in_channels": "in_channels",
    "out_channels": "out_channels", "joint_attention_dim": "joint_attention_dim",
    "pooled_projection_dim": "pooled_projection_dim", "pos_embed_max_size": "pos_embed_max_size",
    "sample_size": "sample_size", "qk_norm": "qk_norm", "dual_attention_layers": "dual_attention_layers",
}


def transformer_config_from_diffusers(conf: dict, **execution) -> mmdit.MMDiTConfig:
  """MMDiTConfig from a diffusers config.json dict; `execution` sets dtype, scan, remat."""
  if conf.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
    raise ValueError(f"Expected an SD3Transformer2DModel folder, got {conf['_class_name']}.")
  hidden = conf["num_attention_heads"] * conf["attention_head_dim"]
  cap = conf.get("caption_projection_dim", hidden)
  if cap != hidden:
    raise ValueError(f"caption_projection_dim={cap} differs from the hidden size {hidden}; SD3 blocks "
                     "need them equal.")
  kw = {field: conf[key] for key, field in _CONFIG_KEYS.items() if key in conf}
  kw["out_channels"] = kw.get("out_channels") or conf.get("in_channels", 16)
  return mmdit.MMDiTConfig(hidden_size=hidden, num_heads=conf["num_attention_heads"], **kw, **execution)


def transformer_config_to_diffusers(cfg: mmdit.MMDiTConfig) -> dict:
  conf = {key: getattr(cfg, field) for key, field in _CONFIG_KEYS.items()}
  conf["dual_attention_layers"] = list(cfg.dual_attention_layers)
  conf.update(_class_name="SD3Transformer2DModel", num_attention_heads=cfg.num_heads,
              attention_head_dim=cfg.head_dim, caption_projection_dim=cfg.hidden_size)
  return conf


def _block_table(i: int, dual: bool, pre_only: bool, qk_norm: bool) -> list[tuple[str, tuple[str, ...]]]:
  """(diffusers module prefix, sd3jax path inside the block) for block i's linear/norm layers."""
  pre = f"transformer_blocks.{i}."
  rows = [("norm1.linear", ("img_mod",)), ("norm1_context.linear", ("txt_mod",)),
          ("attn.to_q", ("img_qkv", "q")), ("attn.to_k", ("img_qkv", "k")),
          ("attn.to_v", ("img_qkv", "v")), ("attn.add_q_proj", ("txt_qkv", "q")),
          ("attn.add_k_proj", ("txt_qkv", "k")), ("attn.add_v_proj", ("txt_qkv", "v")),
          ("attn.to_out.0", ("img_out",)), ("ff.net.0.proj", ("img_mlp", "fc1")),
          ("ff.net.2", ("img_mlp", "fc2"))]
  if qk_norm:
    rows += [("attn.norm_q", ("img_qkv", "q_norm")), ("attn.norm_k", ("img_qkv", "k_norm")),
             ("attn.norm_added_q", ("txt_qkv", "q_norm")), ("attn.norm_added_k", ("txt_qkv", "k_norm"))]
  if not pre_only:
    rows += [("attn.to_add_out", ("txt_out",)), ("ff_context.net.0.proj", ("txt_mlp", "fc1")),
             ("ff_context.net.2", ("txt_mlp", "fc2"))]
  if dual:
    rows += [("attn2.to_q", ("img_qkv2", "q")), ("attn2.to_k", ("img_qkv2", "k")),
             ("attn2.to_v", ("img_qkv2", "v")), ("attn2.to_out.0", ("img_out2",))]
    if qk_norm:
      rows += [("attn2.norm_q", ("img_qkv2", "q_norm")), ("attn2.norm_k", ("img_qkv2", "k_norm"))]
  return [(pre + name, path) for name, path in rows]


_TOP_TABLE = [
    ("time_text_embed.timestep_embedder.linear_1", ("t_embedder", "fc1")),
    ("time_text_embed.timestep_embedder.linear_2", ("t_embedder", "fc2")),
    ("time_text_embed.text_embedder.linear_1", ("y_embedder", "fc1")),
    ("time_text_embed.text_embedder.linear_2", ("y_embedder", "fc2")),
    ("context_embedder", ("context_embedder",)),
    ("norm_out.linear", ("final_mod",)),
    ("proj_out", ("proj_out",)),
]


def _is_norm(path: tuple[str, ...]) -> bool:
  return path[-1].endswith("_norm")


def _to_jax(state: dict, name: str, path: tuple[str, ...]) -> dict:
  if _is_norm(path):
    return {"scale": st.take(state, name + ".weight")}
  return {"kernel": st.take(state, name + ".weight").T, "bias": st.take(state, name + ".bias")}


def _to_torch(tree: dict, name: str, path: tuple[str, ...]) -> dict:
  if _is_norm(path):
    return {name + ".weight": np.asarray(tree["scale"])}
  return {name + ".weight": np.asarray(tree["kernel"]).T, name + ".bias": np.asarray(tree["bias"])}


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def transformer_params_from_state(cfg: mmdit.MMDiTConfig, state: dict) -> dict:
  """diffusers state dict -> sd3jax params (numpy, float32) in cfg's layout."""
  state = dict(state)
  p, c, d = cfg.patch_size, cfg.in_channels, cfg.hidden_size
  rest = {}
  conv = st.take(state, "pos_embed.proj.weight")  # (D, C, p, p) -> (p*p*C, D) in (i, j, c) order
  rest["patch_embed"] = {"kernel": conv.transpose(2, 3, 1, 0).reshape(p * p * c, d),
                         "bias": st.take(state, "pos_embed.proj.bias")}
  table = state.pop("pos_embed.pos_embed", None)
  if table is not None:
    ours = mmdit.pos_embed_table(d, cfg.pos_embed_max_size, cfg.sample_size // p)
    if not np.allclose(np.asarray(table, np.float32).reshape(ours.shape), ours, atol=1e-5):
      raise ValueError("The checkpoint's position table differs from the sin-cos table its config "
                       "describes (sample_size / pos_embed_max_size mismatch?).")
  for name, path in _TOP_TABLE:
    _set(rest, path, _to_jax(state, name, path))
  blocks = []
  for start, length, dual, pre_only in mmdit.segments(cfg):
    for i in range(start, start + length):
      block = {}
      for name, path in _block_table(i, dual, pre_only, bool(cfg.qk_norm)):
        _set(block, path, _to_jax(state, name, path))
      blocks.append(block)
  st.check_consumed(state, "SD3Transformer2DModel")
  return mmdit.stack_blocks(cfg, rest, blocks)


def transformer_params_to_state(cfg: mmdit.MMDiTConfig, params: dict) -> dict[str, np.ndarray]:
  """sd3jax params (any layout cfg describes) -> diffusers state dict."""
  params = _to_numpy(params)
  rest, blocks = mmdit.unstack_blocks(cfg, params)
  p, c, d = cfg.patch_size, cfg.in_channels, cfg.hidden_size
  state = {
      "pos_embed.proj.weight": rest["patch_embed"]["kernel"].reshape(p, p, c, d).transpose(3, 2, 0, 1),
      "pos_embed.proj.bias": rest["patch_embed"]["bias"],
      "pos_embed.pos_embed": mmdit.pos_embed_table(d, cfg.pos_embed_max_size, cfg.sample_size // p)
                             .reshape(1, -1, d),
  }
  for name, path in _TOP_TABLE:
    state.update(_to_torch(_get(rest, path), name, path))
  for start, length, dual, pre_only in mmdit.segments(cfg):
    for i in range(start, start + length):
      for name, path in _block_table(i, dual, pre_only, bool(cfg.qk_norm)):
        state.update(_to_torch(_get(blocks[i], path), name, path))
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def _to_numpy(tree):
  import jax  # local: keeps this module importable for pure-numpy conversions
  return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a), np.float32), tree)


def load_transformer(folder: str, **execution) -> tuple[mmdit.MMDiT, dict]:
  """(model, params) from a diffusers SD3Transformer2DModel folder (single or sharded files).

  `execution` overrides dtype / scan_layers / remat_policy / attention_impl.
  Params are host numpy float32; put them on devices with jax.device_put + shardings.
  """
  cfg = transformer_config_from_diffusers(st.read_config(folder), **execution)
  params = transformer_params_from_state(cfg, st.load_state_dict(folder))
  return mmdit.MMDiT(cfg), params


def save_transformer(model: mmdit.MMDiT, params: dict, folder: str,
                     max_shard_bytes: int = st.DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes a folder that `SD3Transformer2DModel.from_pretrained(folder)` loads."""
  cfg = model.cfg
  st.save_state_dict(transformer_params_to_state(cfg, params), folder,
                     transformer_config_to_diffusers(cfg),
                     weights_name="diffusion_pytorch_model.safetensors",
                     max_shard_bytes=max_shard_bytes)


__all__ = ["load_transformer", "save_transformer", "transformer_config_from_diffusers",
           "transformer_config_to_diffusers", "transformer_params_from_state",
           "transformer_params_to_state"]


# The VAE and whole pipelines, re-exported so `sd3jax.interop.diffusers` is the one entry point.
# The pipeline names resolve lazily: sd3jax.interop.pipeline imports this module.
from sd3jax.interop.diffusers_vae import load_vae, save_vae  # noqa: E402

_PIPELINE_NAMES = ("Pipeline", "load_pipeline", "save_pipeline")


def __getattr__(name: str):
  if name in _PIPELINE_NAMES:
    from sd3jax.interop import pipeline
    return getattr(pipeline, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ += ["load_vae", "save_vae", *_PIPELINE_NAMES]
