"""An editing MM-DiT from a text-to-image one: the same weights, wider patch embedding.

The editing model reads concat([noisy latent, source latent]) along channels. Its patch
embedding is a Dense over (p, p, C) patches; the text-to-image kernel fills the first C_t2i
channels of every patch position and the rest start at zero, so at step 0 the editing model
ignores the source and predicts exactly what the text-to-image model does
(tests/edit_test.py). InstructPix2Pix initialises its extra U-Net input channels the same way.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict


def widen_patch_kernel(kernel: Any, patch_size: int, in_channels: int) -> jax.Array:
  """(p*p*C_old, D) -> (p*p*in_channels, D): each patch position's new channels are zero."""
  p = int(patch_size)
  old = kernel.shape[0] // (p * p)
  if old * p * p != kernel.shape[0] or old > in_channels:
    raise ValueError(f"A patch-embedding kernel of {kernel.shape[0]} rows is not (p={p})^2 x C "
                     f"with C <= in_channels={in_channels}.")
  k = jnp.reshape(kernel, (p, p, old, kernel.shape[-1]))
  k = jnp.pad(k, ((0, 0), (0, 0), (0, in_channels - old), (0, 0)))
  return jnp.reshape(k, (p * p * in_channels, kernel.shape[-1]))


def load_widened_weights(config: ConfigDict, abstract_params: Any) -> Any:
  """config.init_from's weights (a run with model.in_channels = config.init_from_in_channels)
  in the shapes and shardings of `abstract_params` (this model's, wider)."""
  from sd3jax import checkpoint as ckpt_lib
  old = int(config.init_from_in_channels)
  p = int(config.model.patch_size)
  target = abstract_params["patch_embed"]["kernel"]
  narrow = jax.ShapeDtypeStruct((p * p * old, target.shape[1]), target.dtype,
                                sharding=target.sharding)
  source_abstract = {**abstract_params,
                     "patch_embed": {**abstract_params["patch_embed"], "kernel": narrow}}
  params = ckpt_lib.load_weights(config.init_from, source_abstract, config,
                                 use_ema=config.init_from_ema)
  wide = jax.jit(lambda k: widen_patch_kernel(k, p, int(config.model.in_channels)),
                 out_shardings=target.sharding)(params["patch_embed"]["kernel"])
  return {**params, "patch_embed": {**params["patch_embed"], "kernel": wide}}

