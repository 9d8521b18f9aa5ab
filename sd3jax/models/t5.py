"""The T5 encoder (v1.1, as T5-XXL in SD3; v1.0's ReLU FFN too) in Flax.

Computes what transformers' `T5EncoderModel` computes, so released weights load unchanged:
pre-RMSNorm blocks without biases, attention logits without the 1/sqrt(d) scale, one
relative position bias table (bucketed distances) owned by the first block and added in
every block, a gated-GELU (tanh) feed-forward for v1.1 ("gated-gelu") or a plain one for
v1.0 ("relu"), and a final RMSNorm. Returns the last hidden state.

T5-XXL has 4.7B parameters: every weight carries logical axes (embed -> fsdp,
heads / mlp / vocab -> tensor under the "fsdp_tp" rules) so it is created and run
sharded. The residual stream is float32; matmuls run in `dtype`. bfloat16 is safe (T5
overflows in float16, not in bfloat16, which has float32's range).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd3jax.models.clip import activation
from sd3jax.models.layers import Dense, RMSNorm, logical

Dtype = Any


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The fields of transformers' T5Config that change the encoder's computation."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  def __post_init__(self):
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"T5 feed_forward_proj {self.feed_forward_proj!r} is not of the form "
                       "'gated-ACT' or 'ACT' (e.g. 'gated-gelu', 'relu').")
    activation(self.dense_act_fn)

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_act_fn(self) -> str:
    # transformers maps "gated-gelu" to the tanh approximation (gelu_new), as T5 v1.1 was trained.
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any]) -> "T5Config":
    """From a transformers T5Config dict (config.json); missing keys take its defaults."""
    return cls(
        vocab_size=int(cfg.get("vocab_size", 32128)),
        d_model=int(cfg.get("d_model", 512)),
        d_kv=int(cfg.get("d_kv", 64)),
        d_ff=int(cfg.get("d_ff", 2048)),
        num_layers=int(cfg.get("num_layers", 6)),
        num_heads=int(cfg.get("num_heads", 8)),
        relative_attention_num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(cfg.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
        feed_forward_proj=str(cfg.get("feed_forward_proj", "relu")),
    )


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int, bidirectional: bool = True) -> np.ndarray:
  """(query_length, key_length) int32 bucket of each (key - query) distance.

  Computed on the host (shapes are static) in float32 in the same order of operations as
  transformers, so distances on a bucket boundary land in the same bucket.
  """
  rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(rel.dtype) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
  large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


def _constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
  return nn.with_logical_constraint(x, names)


class T5Attention(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
    cfg = self.config
    b, l, _ = x.shape
    inner = cfg.num_heads * cfg.d_kv
    proj = functools.partial(Dense, inner, axes=("embed", "heads"), use_bias=False,
                             dtype=self.dtype)
    split = lambda y: _constrain(y.reshape(b, l, cfg.num_heads, cfg.d_kv),
                                 ("act_batch", "act_len", "act_heads", "act_kv"))
    q, k, v = (split(proj(name=n)(x)) for n in ("q", "k", "v"))
    # No 1/sqrt(d_kv): T5 folds it into the initialisation of q.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, inner)
    return Dense(cfg.d_model, axes=("heads", "embed"), use_bias=False, dtype=self.dtype,
                 name="o")(out)


class T5FeedForward(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = functools.partial(Dense, cfg.d_ff, axes=("embed", "mlp"), use_bias=False,
                              dtype=self.dtype)
    act = activation(cfg.dense_act_fn)
    if cfg.is_gated_act:
      h = act(dense(name="wi_0")(x)) * dense(name="wi_1")(x)
    else:
      h = act(dense(name="wi")(x))
    h = _constrain(h, ("act_batch", "act_len", "act_mlp"))
    return Dense(cfg.d_model, axes=("mlp", "embed"), use_bias=False, dtype=self.dtype,
                 name="wo")(h)


class T5Block(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
    norm = functools.partial(RMSNorm, eps=self.config.layer_norm_epsilon, dtype=self.dtype)
    h = T5Attention(self.config, self.dtype, name="attention")(
        norm(name="attention_norm")(x), bias, mask)
    x = x + h.astype(jnp.float32)
    h = T5FeedForward(self.config, self.dtype, name="mlp")(norm(name="mlp_norm")(x))
    x = x + h.astype(jnp.float32)
    return _constrain(x, ("act_batch", "act_len", "act_embed"))


class T5EncoderModel(nn.Module):
  """T5 encoder stack: ids (B, L) -> last hidden state (B, L, d_model), float32."""
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """attention_mask (B, L), 1 = token, 0 = padding; None attends to every position
    (SD3's pipeline runs T5 without a mask, padding included)."""
    cfg = self.config
    _, l = input_ids.shape
    shared = self.param("shared", logical(nn.initializers.normal(1.0), ("vocab", "embed")),
                        (cfg.vocab_size, cfg.d_model), jnp.float32)
    x = _constrain(jnp.take(shared, input_ids, axis=0),
                   ("act_batch", "act_len", "act_embed"))

    # The first block owns the bias table; the bias it gives is shared by all blocks.
    table = self.param("relative_attention_bias",
                       logical(nn.initializers.normal(cfg.d_model**-0.5), (None, None)),
                       (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)
    buckets = relative_position_buckets(l, l, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    bias = jnp.take(table, jnp.asarray(buckets), axis=0).transpose(2, 0, 1)[None]

    mask = None
    if attention_mask is not None:
      mask = attention_mask[:, None, None, :] > 0
    for i in range(cfg.num_layers):
      x = T5Block(cfg, self.dtype, name=f"block_{i}")(x, bias, mask)
    return RMSNorm(eps=cfg.layer_norm_epsilon, dtype=jnp.float32, name="final_layer_norm")(x)
