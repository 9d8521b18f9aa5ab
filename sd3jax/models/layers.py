"""Small building blocks shared by the MM-DiT, the VAE and the text encoders.

Every parameter is created with logical axis names (see sd3jax/parallel.py for how
names map onto the mesh), and every layer computes in `dtype` with float32 parameters.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def logical(init: nn.initializers.Initializer, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def normalize(x: jax.Array, eps: float, center: bool) -> jax.Array:
  """(x - mean) / std over the last axis (LayerNorm), or x / rms (RMSNorm) when not center.

  The backward pass is written out, dx = (g - mean(g) - y mean(g y)) / std (without the
  mean(g) term for RMS), instead of autodiff through the two reductions: fewer passes over
  the activations, which is most of a norm's cost on CPU.
  """
  return _normalize_fwd(x, eps, center)[0]


def _normalize_fwd(x, eps, center):
  if center:
    x = x - x.mean(-1, keepdims=True)
  inv = jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)
  y = x * inv
  return y, (y, inv)


def _normalize_bwd(eps, center, res, g):
  del eps
  y, inv = res
  dx = g - y * jnp.mean(g * y, axis=-1, keepdims=True)
  if center:
    dx = dx - jnp.mean(g, axis=-1, keepdims=True)
  return (dx * inv,)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU, tanh approximation (SD3's MLPs): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

  Same values as `jax.nn.gelu(x, approximate=True)`; the derivative is written out so the
  backward pass is one elementwise op on the saved input.
  """
  return 0.5 * x * (1.0 + _gelu_tanh_term(x))


def _gelu_tanh_term(x):
  return jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x))


def _gelu_fwd(x):
  return gelu_tanh(x), x


def _gelu_bwd(x, g):
  t = _gelu_tanh_term(x)
  dt = (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
  return (g * (0.5 * (1.0 + t) + 0.5 * x * dt),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


class Dense(nn.Module):
  """y = x W + b with W of logical axes `axes` = (in, out); a plain 2-D matmul.

  The input is flattened to 2-D before the matmul: on CPU this is measurably faster
  than a batched dot_general, and it is what XLA does on accelerators anyway.
  """
  features: int
  axes: tuple[str | None, str | None] = ("embed", "mlp")
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", logical(self.kernel_init, self.axes),
                        (x.shape[-1], self.features), jnp.float32)
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", logical(self.bias_init, self.axes[1:]), (self.features,),
                        jnp.float32)
      y = y + bias.astype(self.dtype)
    return y.reshape(*lead, self.features)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, statistics in float32; affine optional."""
  eps: float = 1e-6
  use_scale: bool = True
  use_bias: bool = True
  axis_name: str | None = "norm"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = normalize(x.astype(jnp.float32), self.eps, True)
    if self.use_scale:
      y = y * self.param("scale", logical(nn.initializers.ones_init(), (self.axis_name,)),
                         (x.shape[-1],), jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", logical(nn.initializers.zeros_init(), (self.axis_name,)),
                         (x.shape[-1],), jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis (T5, and the MM-DiT's QK-norm), statistics in float32."""
  eps: float = 1e-6
  use_scale: bool = True
  axis_name: str | None = "norm"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = normalize(x.astype(jnp.float32), self.eps, False)
    if self.use_scale:
      y = y * self.param("scale", logical(nn.initializers.ones_init(), (self.axis_name,)),
                         (x.shape[-1],), jnp.float32)
    return y.astype(self.dtype)
