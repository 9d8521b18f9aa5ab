"""The frozen encoders of precompute, compiled for one batch shape and sharded on a local mesh.

`BatchEncoder` runs the VAE encoder (one program per bucket shape) and every text encoder
(one program for both captions) over a process's own devices, batch split over the
("data", "fsdp") axes. Weights are frozen and nothing is communicated between processes,
so each process encodes its own shards (sd3jax.data.precompute). Compiled programs are
kept per (HLO, devices): a rerun or resume in the same process skips XLA.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sd3jax import parallel


def local_mesh(devices: Sequence[jax.Device] | None = None,
               shape: Mapping[str, int] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over this process's devices (default: data = all)."""
  devices = list(devices if devices is not None else jax.local_devices())
  return parallel.make_mesh(dict(shape or {"data": -1}), None, devices)


def _place(tree: Any, mesh: Mesh) -> Any:
  """Params onto `mesh`: arrays already laid out on it stay; the rest is replicated."""
  rep = NamedSharding(mesh, P())

  def put(x):
    if (isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
        and x.sharding.mesh == mesh):
      return x
    return jax.device_put(x, rep)
  return jax.tree.map(put, nn.unbox(tree))


# Compiled programs of this process by (HLO, devices): reruns and resumes skip XLA.
_COMPILED: dict[tuple, Any] = {}


def _compile(fn, args, mesh: Mesh, rules) -> Any:
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.get_rules(rules)):
    lowered = fn.lower(*args)
  key = (hashlib.sha256(lowered.as_text().encode()).hexdigest(),
         tuple(d.id for d in mesh.devices.flat))
  if key not in _COMPILED:
    while len(_COMPILED) >= 16:
      _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = lowered.compile()
  return _COMPILED[key]


class BatchEncoder:
  """VAE moments (one program per bucket shape) + all text encoders (one program), sharded.

  Both captions go through the text encoders as one batch of 2B prompts, or only the
  originals (B) when no example of the batch has a synthetic one. Outputs are cast to the
  storage dtype on the device (half the transfer for bfloat16).
  """

  def __init__(self, vae_model, vae_params, text_encoders, mesh: Mesh, rules,
               storage_dtype: str, batch: int):
    self.mesh, self.rules, self.batch = mesh, rules, batch
    self.dtype = jnp.dtype(storage_dtype)
    self.te = text_encoders
    self.vae_model = vae_model
    self.vae_params = _place(vae_params, mesh)
    names = [n for n in ("clip_l", "clip_g", "t5") if text_encoders.encoders[n] is not None]
    self.text_params = {n: _place(text_encoders.encoders[n].params, mesh) for n in names}
    skip = text_encoders.clip_skip
    self.hidden_index = -2 if skip is None else -(skip + 2)  # as TextEncoders.encode
    self._vae: dict[tuple[int, int], Any] = {}
    self._text: dict[int, Any] = {}

  def _batch_sharding(self, ndim: int) -> NamedSharding:
    return parallel.batch_sharding(self.mesh, ndim)

  def _abstract(self, tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)

  def vae_fn(self, hw: tuple[int, int], count: int | None = None):
    """The compiled encoder of `count` images (default: the batch; edits send 2x) of hw."""
    count = int(count or self.batch)
    key = hw if count == self.batch else (*hw, count)
    if key not in self._vae:
      model, dtype = self.vae_model, self.dtype

      def fn(params, images):
        post = model.apply({"params": params}, images, method=type(model).encode)
        return post.mean.astype(dtype), post.std.astype(dtype)
      out = self._batch_sharding(4)
      jitted = jax.jit(fn, out_shardings=(out, out),
                       compiler_options=parallel.conv_compiler_options(self.mesh))
      images = jax.ShapeDtypeStruct((count, *hw, 3), jnp.float32,
                                    sharding=self._batch_sharding(4))
      self._vae[key] = _compile(jitted, (self._abstract(self.vae_params), images), self.mesh,
                                self.rules)
    return self._vae[key]

  def text_fn(self, count: int | None = None):
    """The compiled text encoders for `count` prompts (default: both captions, 2B)."""
    count = int(count or 2 * self.batch)
    if count not in self._text:
      encs, index, dtype = self.te.encoders, self.hidden_index, self.dtype
      use_mask = self.te.t5_attention_mask

      def fn(params, ids):
        out = {}
        for name in ("clip_l", "clip_g"):
          o = encs[name].model.apply({"params": params[name]}, ids[name])
          out[name] = o.hidden_states[index].astype(dtype)
          out[f"{name}_pooled"] = o.text_embeds.astype(dtype)
        if "t5" in params:
          mask = ids["t5_mask"] if use_mask else None
          out["t5"] = encs["t5"].model.apply({"params": params["t5"]}, ids["t5"],
                                             mask).astype(dtype)
        return out
      ids = {n: jax.ShapeDtypeStruct((count, self._length(n)), jnp.int32,
                                     sharding=self._batch_sharding(2))
             for n in ("clip_l", "clip_g", "t5", "t5_mask")}
      jitted = jax.jit(fn, out_shardings=self._batch_sharding(2))  # prefix: every output
      self._text[count] = _compile(jitted, (self._abstract(self.text_params), ids), self.mesh,
                                   self.rules)
    return self._text[count]

  def _length(self, name: str) -> int:
    return self.te.t5_length if name.startswith("t5") else self.te.clip_length

  def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
    """Host-side (loader thread): ids for every encoder, T5's mask too."""
    from sd3jax.interop import transformers as tf_interop
    out = {}
    for name in ("clip_l", "clip_g", "t5"):
      enc = self.te.encoders[name]
      if enc is None:
        out[name] = np.zeros((len(prompts), self._length(name)), np.int32)
        out["t5_mask"] = out[name]
        continue
      ids, mask = tf_interop.tokenize(enc.tokenizer, prompts, self._length(name))
      out[name] = ids
      if name == "t5":
        out["t5_mask"] = mask
    return out

  def __call__(self, images: np.ndarray, ids: Mapping[str, np.ndarray]) -> tuple:
    """Dispatches both programs (asynchronously); returns device arrays."""
    put = lambda x: jax.device_put(x, self._batch_sharding(x.ndim))
    mean, std = self.vae_fn(tuple(images.shape[1:3]), len(images))(self.vae_params,
                                                                   put(images))
    text = self.text_fn(len(ids["clip_l"]))(self.text_params,
                                            {k: put(v) for k, v in ids.items()})
    return mean, std, text
