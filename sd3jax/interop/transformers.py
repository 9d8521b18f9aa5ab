"""Loading transformers text-encoder folders (and their tokenizers) into sd3jax's Flax models.

A folder is what `save_pretrained` writes: config.json plus one *.safetensors file or
shards with an index. Supported classes:

  CLIPTextModelWithProjection  (SD3's text_encoder / text_encoder_2: CLIP-L/14, OpenCLIP bigG/14)
  CLIPTextModel                (no projection; pooled output only)
  T5EncoderModel               (SD3's text_encoder_3: T5 v1.1 XXL); a T5ForConditionalGeneration
                               folder also loads, its decoder weights are ignored.

Every checkpoint tensor must find its place and every parameter must be filled, so a
folder that does not match its config fails with the names involved. With a `mesh`, each
parameter is placed straight into its shards (T5-XXL never sits whole on one device).

Tokenizers load through transformers' AutoTokenizer from a local folder only.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sd3jax import parallel
from sd3jax.interop.safetensors_io import check_consumed, load_state_dict, read_config, take
from sd3jax.models.clip import CLIPTextConfig, CLIPTextModel
from sd3jax.models.t5 import T5Config, T5EncoderModel

Params = dict[str, Any]
CLIP_MAX_LENGTH = 77


# ---------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------
def _linear(state: dict, name: str, bias: bool = True) -> dict[str, np.ndarray]:
  """A torch nn.Linear (weight (out, in)) as a Dense's {kernel (in, out), bias}."""
  out = {"kernel": take(state, f"{name}.weight").T}
  if bias:
    out["bias"] = take(state, f"{name}.bias")
  return out


def _layer_norm(state: dict, name: str) -> dict[str, np.ndarray]:
  return {"scale": take(state, f"{name}.weight"), "bias": take(state, f"{name}.bias")}


def clip_params_from_state_dict(state: dict[str, np.ndarray],
                                config: CLIPTextConfig) -> Params:
  """transformers CLIP text weights -> CLIPTextModel params.

  Consumes (empties) `state`, so each source tensor is freed once converted.
  """
  # transformers 4 saves every CLIP text class under "text_model."; transformers 5's plain
  # CLIPTextModel saves its modules at the top level.
  p = "text_model." if any(k.startswith("text_model.") for k in state) else ""
  state.pop(p + "embeddings.position_ids", None)  # A buffer in old checkpoints.
  params: Params = {
      "token_embedding": take(state, p + "embeddings.token_embedding.weight"),
      "position_embedding": take(state, p + "embeddings.position_embedding.weight"),
      "final_layer_norm": _layer_norm(state, p + "final_layer_norm"),
  }
  for i in range(config.num_layers):
    lp = f"{p}encoder.layers.{i}."
    params[f"layers_{i}"] = {
        "layer_norm1": _layer_norm(state, lp + "layer_norm1"),
        "layer_norm2": _layer_norm(state, lp + "layer_norm2"),
        "self_attn": {n: _linear(state, f"{lp}self_attn.{n}")
                      for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "fc1": _linear(state, lp + "mlp.fc1"),
        "fc2": _linear(state, lp + "mlp.fc2"),
    }
  if config.projection_dim is not None:
    params["text_projection"] = _linear(state, "text_projection", bias=False)
  check_consumed(state, "CLIP text encoder")
  return params


def _is_clip_with_projection(cfg: dict, state: dict) -> bool:
  if "text_projection.weight" in state:
    return True
  archs = cfg.get("architectures") or []
  if "CLIPTextModelWithProjection" in archs:
    raise KeyError("config.json names CLIPTextModelWithProjection but the weights have no "
                   "'text_projection.weight'.")
  return False


# ---------------------------------------------------------------------------------------
# T5
# ---------------------------------------------------------------------------------------
def t5_params_from_state_dict(state: dict[str, np.ndarray], config: T5Config) -> Params:
  """transformers T5 encoder weights -> T5EncoderModel params.

  Consumes (empties) `state`, so each source tensor is freed once converted.
  """
  # The embedding is tied: saved as shared.weight, encoder.embed_tokens.weight, or both.
  # Where both are present and differ, transformers leaves them untied and the encoder
  # reads encoder.embed_tokens, so that one wins.
  shared = state.pop("shared.weight", None)
  embed = state.pop("encoder.embed_tokens.weight", shared)
  if embed is None:
    raise KeyError("Weight 'shared.weight' (or 'encoder.embed_tokens.weight') is missing "
                   "from the T5 checkpoint.")
  # Decoder / LM head of a full T5ForConditionalGeneration checkpoint: not used by an encoder.
  for name in [n for n in state if n.startswith("decoder.") or n == "lm_head.weight"]:
    del state[name]
  nobias = lambda n: {"kernel": take(state, f"{n}.weight").T}
  params: Params = {
      "shared": np.asarray(embed, np.float32),
      "relative_attention_bias": take(
          state, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
      "final_layer_norm": {"scale": take(state, "encoder.final_layer_norm.weight")},
  }
  ff_names = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
  for i in range(config.num_layers):
    bp = f"encoder.block.{i}.layer."
    params[f"block_{i}"] = {
        "attention_norm": {"scale": take(state, bp + "0.layer_norm.weight")},
        "attention": {n: nobias(f"{bp}0.SelfAttention.{n}") for n in ("q", "k", "v", "o")},
        "mlp_norm": {"scale": take(state, bp + "1.layer_norm.weight")},
        "mlp": {n: nobias(f"{bp}1.DenseReluDense.{n}") for n in ff_names},
    }
  check_consumed(state, "T5 encoder")
  return params


# ---------------------------------------------------------------------------------------
# Placement and checks shared by both loaders
# ---------------------------------------------------------------------------------------
def abstract_params(model: nn.Module, seq_len: int) -> Any:
  """Boxed (Partitioned) abstract params of `model`, without computing anything."""
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  return jax.eval_shape(lambda i: model.init(jax.random.PRNGKey(0), i), ids)["params"]


def _check_shapes(params: Params, abstract: Any, what: str) -> None:
  want = nn.unbox(abstract)
  flat_got = {jax.tree_util.keystr(k): v.shape
              for k, v in jax.tree_util.tree_leaves_with_path(params)}
  flat_want = {jax.tree_util.keystr(k): v.shape
               for k, v in jax.tree_util.tree_leaves_with_path(want)}
  if flat_got.keys() != flat_want.keys():
    raise ValueError(f"{what}: converted parameters do not match the model: missing "
                     f"{sorted(flat_want.keys() - flat_got.keys())[:5]}, extra "
                     f"{sorted(flat_got.keys() - flat_want.keys())[:5]}.")
  bad = [(k, flat_got[k], flat_want[k]) for k in flat_want if flat_got[k] != flat_want[k]]
  if bad:
    raise ValueError(f"{what}: weight shapes disagree with config.json, e.g. (name, checkpoint, "
                     f"config) {bad[:3]}.")


def place_params(params: Params, abstract: Any, mesh: Mesh | None, rules: Any) -> Params:
  """Host numpy params -> device arrays; with a mesh, each one directly in its shards."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, params)
  shardings = parallel.logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
      params, shardings)


def load_clip(folder: str, dtype: Any = jnp.float32, mesh: Mesh | None = None,
              rules: Any = "fsdp_tp") -> tuple[CLIPTextModel, Params]:
  """A CLIPTextModelWithProjection / CLIPTextModel folder -> (Flax model, params)."""
  cfg = read_config(folder)
  state = load_state_dict(folder)
  config = CLIPTextConfig.from_hf(cfg, with_projection=_is_clip_with_projection(cfg, state))
  model = CLIPTextModel(config, dtype=dtype)
  params = clip_params_from_state_dict(state, config)
  abstract = abstract_params(model, min(config.max_position_embeddings, CLIP_MAX_LENGTH))
  _check_shapes(params, abstract, f"CLIP text encoder in {folder!r}")
  return model, place_params(params, abstract, mesh, rules)


def load_t5(folder: str, dtype: Any = jnp.float32, mesh: Mesh | None = None,
            rules: Any = "fsdp_tp") -> tuple[T5EncoderModel, Params]:
  """A T5EncoderModel (or full T5) folder -> (Flax encoder, params)."""
  cfg = read_config(folder)
  if cfg.get("model_type", "t5") not in ("t5", "mt5"):  # Not umt5: per-layer position biases.
    raise ValueError(f"{folder!r} holds a {cfg.get('model_type')!r} model, not T5.")
  state = load_state_dict(folder)
  config = T5Config.from_hf(cfg)
  model = T5EncoderModel(config, dtype=dtype)
  params = t5_params_from_state_dict(state, config)
  abstract = abstract_params(model, 8)
  _check_shapes(params, abstract, f"T5 encoder in {folder!r}")
  return model, place_params(params, abstract, mesh, rules)


# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------
def load_tokenizer(folder: str, max_length: int | None = None):
  """A transformers tokenizer from a local folder; `max_length` becomes its model_max_length.

  CLIP tokenizers keep their own model_max_length (77) unless told otherwise; for T5 pass
  the sequence length the experiment uses (SD3: 77 or 256).
  """
  from transformers import AutoTokenizer  # Heavy import; only needed here.

  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Tokenizer folder {folder!r} does not exist (tokenizers are read "
                            "from local folders only, never downloaded).")
  tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
  if max_length is not None:
    tok.model_max_length = int(max_length)
  if tok.pad_token is None:
    raise ValueError(f"The tokenizer in {folder!r} has no pad token; SD3 pads every prompt "
                     "to a fixed length.")
  return tok


def as_prompt_list(prompts: str | Sequence[str], what: str = "prompts") -> list[str]:
  """A str or a sequence of str as a non-empty list, with a clear error otherwise."""
  if isinstance(prompts, str):
    return [prompts]
  prompts = list(prompts)
  if not prompts:
    raise ValueError(f"{what} is empty; pass at least one prompt.")
  bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
  if bad:
    raise TypeError(f"{what} must be strings, got {bad[:3]}.")
  return prompts


def tokenize(tokenizer, prompts: str | Sequence[str],
             max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Pads / truncates to exactly `max_length` (default: the tokenizer's model_max_length).

  Returns (input_ids, attention_mask), both (B, max_length) int32. Special tokens are added
  (CLIP: BOS ... EOS; T5: ... EOS), and truncation keeps the EOS, as in SD3's pipeline.
  """
  prompts = as_prompt_list(prompts)
  max_length = int(max_length or tokenizer.model_max_length)
  enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                  add_special_tokens=True, return_tensors="np")
  return (np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32))


def tokenize_clip(tokenizer, prompts: str | Sequence[str],
                  max_length: int = CLIP_MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
  return tokenize(tokenizer, prompts, max_length)


def tokenize_t5(tokenizer, prompts: str | Sequence[str],
                max_length: int = 256) -> tuple[np.ndarray, np.ndarray]:
  return tokenize(tokenizer, prompts, max_length)
