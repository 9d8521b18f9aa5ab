"""The CLIP text transformer (text tower of CLIP-L/14 and OpenCLIP bigG/14) in Flax.

SD3 conditions on two CLIP text towers: it reads the penultimate hidden state of each
(77 tokens) and the projected pooled state at the end-of-text token. The module here
computes what transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` compute, so
the released weights load unchanged (see sd3jax/interop/transformers.py):

  - token + learned position embeddings, pre-LayerNorm blocks, causal self-attention
    (plus the key padding mask when one is given), quick-GELU or GELU MLP;
  - `hidden_states` = (embeddings, after block 1, ..., after block N), all before the
    final LayerNorm, exactly transformers' `output_hidden_states=True` tuple;
  - `last_hidden_state` = final LayerNorm of the last block's output;
  - pooled = last_hidden_state at the end-of-text token. transformers keeps two rules:
    a config with the legacy `eos_token_id == 2` takes the position of the largest token
    id (the EOS is the largest id in the original vocabulary), any other config takes the
    first position that holds `eos_token_id`.

The residual stream is kept in float32; matmuls run in `dtype` (bfloat16 on accelerators).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sd3jax.models.layers import Dense, LayerNorm, logical

Dtype = Any

# Activations by their transformers names (ACT2FN). The tanh-approximated variants are
# one formula under several names.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation called `name` in a transformers config, or a clear error."""
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r} in the text encoder config; supported: "
                     f"{sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of transformers' CLIPTextConfig that change the computation."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int | None = None  # None: no text projection (CLIPTextModel).

  def __post_init__(self):
    activation(self.hidden_act)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"CLIP hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_heads}.")

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any], with_projection: bool = True) -> "CLIPTextConfig":
    """From a transformers CLIPTextConfig dict (config.json); missing keys take its defaults."""
    if "text_config" in cfg:
      raise ValueError("This config.json is a full CLIPModel (text + vision); pass the folder "
                       "of a CLIPTextModel or CLIPTextModelWithProjection.")
    return cls(
        vocab_size=int(cfg.get("vocab_size", 49408)),
        hidden_size=int(cfg.get("hidden_size", 512)),
        intermediate_size=int(cfg.get("intermediate_size", 2048)),
        num_layers=int(cfg.get("num_hidden_layers", 12)),
        num_heads=int(cfg.get("num_attention_heads", 8)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 77)),
        hidden_act=str(cfg.get("hidden_act", "quick_gelu")),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        eos_token_id=int(cfg.get("eos_token_id", 49407)),
        projection_dim=int(cfg.get("projection_dim", 512)) if with_projection else None,
    )


@flax.struct.dataclass
class CLIPTextOutput:
  last_hidden_state: jax.Array  # (B, L, D), after the final LayerNorm.
  pooled: jax.Array  # (B, D), last_hidden_state at the end-of-text token.
  text_embeds: jax.Array | None  # (B, projection_dim), pooled @ text_projection.
  hidden_states: tuple[jax.Array, ...]  # num_layers + 1 of (B, L, D); SD3 uses [-2].


def _constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
  return nn.with_logical_constraint(x, names)


class CLIPAttention(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    b, l, d = x.shape
    head_dim = d // cfg.num_heads
    proj = functools.partial(Dense, d, axes=("embed", "heads"), dtype=self.dtype)
    split = lambda y: _constrain(y.reshape(b, l, cfg.num_heads, head_dim),
                                 ("act_batch", "act_len", "act_heads", "act_kv"))
    q = split(proj(name="q_proj")(x))
    k = split(proj(name="k_proj")(x))
    v = split(proj(name="v_proj")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
    # A fully masked row softmaxes to uniform weights, as transformers' additive mask does.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, d)
    return Dense(d, axes=("heads", "embed"), dtype=self.dtype, name="out_proj")(out)


class CLIPEncoderLayer(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    norm = functools.partial(LayerNorm, eps=cfg.layer_norm_eps, dtype=self.dtype)
    h = CLIPAttention(cfg, self.dtype, name="self_attn")(norm(name="layer_norm1")(x), mask)
    x = x + h.astype(jnp.float32)
    h = Dense(cfg.intermediate_size, axes=("embed", "mlp"), dtype=self.dtype,
              name="fc1")(norm(name="layer_norm2")(x))
    h = _constrain(activation(cfg.hidden_act)(h), ("act_batch", "act_len", "act_mlp"))
    h = Dense(cfg.hidden_size, axes=("mlp", "embed"), dtype=self.dtype, name="fc2")(h)
    x = x + h.astype(jnp.float32)
    return _constrain(x, ("act_batch", "act_len", "act_embed"))


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Index of the token whose final state is the pooled output, per transformers' rule."""
  if eos_token_id == 2:  # Legacy configs: the EOS is the largest id in each sequence.
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)  # First EOS (0 if there is none).


class CLIPTextModel(nn.Module):
  """CLIP text transformer; `config.projection_dim` adds CLIPTextModelWithProjection's head."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> CLIPTextOutput:
    """input_ids (B, L) int; attention_mask (B, L), 1 = token, 0 = padding (optional)."""
    cfg = self.config
    b, l = input_ids.shape
    if l > cfg.max_position_embeddings:
      raise ValueError(f"CLIP input has {l} tokens but max_position_embeddings is "
                       f"{cfg.max_position_embeddings}; truncate when tokenizing.")
    tokens = self.param("token_embedding",
                        logical(nn.initializers.normal(0.02), ("vocab", "embed")),
                        (cfg.vocab_size, cfg.hidden_size), jnp.float32)
    positions = self.param("position_embedding",
                           logical(nn.initializers.normal(0.01), (None, "embed")),
                           (cfg.max_position_embeddings, cfg.hidden_size), jnp.float32)
    x = jnp.take(tokens, input_ids, axis=0) + positions[None, :l]
    x = _constrain(x, ("act_batch", "act_len", "act_embed"))

    mask = jnp.tril(jnp.ones((l, l), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] > 0)

    hidden_states = [x]
    for i in range(cfg.num_layers):
      x = CLIPEncoderLayer(cfg, self.dtype, name=f"layers_{i}")(x, mask)
      hidden_states.append(x)
    last = LayerNorm(eps=cfg.layer_norm_eps, dtype=jnp.float32, name="final_layer_norm")(x)
    pooled = last[jnp.arange(b), eos_positions(input_ids, cfg.eos_token_id)]
    text_embeds = None
    if cfg.projection_dim is not None:
      text_embeds = Dense(cfg.projection_dim, axes=("embed", None), use_bias=False,
                          dtype=self.dtype, name="text_projection")(pooled)
      text_embeds = text_embeds.astype(jnp.float32)
    return CLIPTextOutput(last_hidden_state=last, pooled=pooled, text_embeds=text_embeds,
                          hidden_states=tuple(hidden_states))
