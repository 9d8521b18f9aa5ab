"""Small building blocks shared by the MM-DiT, the VAE and the text encoders.

Every parameter is created with logical axis names (see sd3jax/parallel.py for how
names map onto the mesh), and every layer computes in `dtype` with float32 parameters.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def logical(init: nn.initializers.Initializer, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(axes))


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
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
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
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
    if self.use_scale:
      y = y * self.param("scale", logical(nn.initializers.ones_init(), (self.axis_name,)),
                         (x.shape[-1],), jnp.float32)
    return y.astype(self.dtype)
