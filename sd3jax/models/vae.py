"""The KL autoencoder of SD3 / SDXL (diffusers' `AutoencoderKL`), in Flax Linen, NHWC.

Encoder: conv_in -> down blocks (ResNet blocks, stride-2 conv with (0, 1, 0, 1) padding
between levels) -> mid block (resnet, single-head attention, resnet) -> GroupNorm, SiLU,
conv_out to 2 * latent channels (mean, logvar). The decoder mirrors it with nearest 2x
upsampling and one more ResNet block per level. Parameter names follow diffusers'
(`down_blocks.0.resnets.1.conv1` is `down_blocks_0/resnets_1/conv1`), so the converter in
sd3jax/interop/diffusers_vae.py is a renaming plus layout changes.

Latent normalisation (scale and shift) is NOT part of encode / decode: it is applied only
by `encode_to_latents` / `decode_latents`, the one place the diffusion model's latents are
made, so it cannot be applied twice or forgotten.

Logical axis names of the parameters (map them in the sharding rules):
  conv_in / conv_out   input / output channels of hidden-width convs and dense layers;
  conv_image           the pixel-channel axis (3) of the first encoder / last decoder conv;
  conv_latent          latent-channel axes (latent or 2 * latent channels);
  norm                 GroupNorm scale and bias (replicated everywhere).
The image and latent axes are small and not divisible by mesh sizes: keep them replicated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sd3jax.models.layers import Dense, logical

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]

SAME3: Padding = ((1, 1), (1, 1))
# diffusers' Downsample2D(padding=0) pads right and bottom by one, then a VALID stride-2 conv.
DOWN_PAD: Padding = ((0, 1), (0, 1))

# Keys of a diffusers AutoencoderKL config.json that this implementation understands.
_DIFFUSERS_KEYS = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
    "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The architecture and latent normalisation, field for field a diffusers config.json."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 16
  norm_num_groups: int = 32
  act_fn: str = "silu"
  scaling_factor: float = 1.5305
  shift_factor: float | None = 0.0609
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_block_add_attention: bool = True
  sample_size: int | tuple[int, ...] = 1024
  force_upcast: bool = True
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"VAEConfig.act_fn={self.act_fn!r}: only 'silu' is implemented.")
    if not self.block_out_channels:
      raise ValueError("VAEConfig.block_out_channels must have at least one level.")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
            f"VAEConfig.block_out_channels={self.block_out_channels}: {c} is not divisible by "
            f"norm_num_groups={self.norm_num_groups}; GroupNorm needs whole groups.")

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side: one stride-2 conv per level but the last."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: dict) -> "VAEConfig":
    """From a diffusers AutoencoderKL config.json dict; unknown keys are an error."""
    cls_name = config.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
      raise ValueError(f"config.json describes a {cls_name!r}, not an AutoencoderKL; pass the "
                       "folder of the VAE (for a pipeline, PIPELINE/vae).")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_KEYS)
    if unknown:
      raise ValueError(f"AutoencoderKL config keys {unknown} are not supported by "
                       "sd3jax.models.vae; the weights may not describe this architecture.")
    n = len(config.get("block_out_channels", (64,)))
    for key, want in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
      got = tuple(config.get(key, (want,) * n))
      if got != (want,) * n:
        raise ValueError(f"config {key}={list(got)}: only {n} x {want!r} is implemented.")
    kw = {k: v for k, v in config.items() if k in _DIFFUSERS_KEYS and
          k not in ("down_block_types", "up_block_types")}
    # Fill absent keys with diffusers' defaults, not ours, so a folder means what it says.
    defaults = dict(block_out_channels=(64,), layers_per_block=1, latent_channels=4,
                    scaling_factor=0.18215, shift_factor=None, use_quant_conv=True,
                    use_post_quant_conv=True, sample_size=32)
    for k, v in defaults.items():
      kw.setdefault(k, v)
    for k in ("block_out_channels", "latents_mean", "latents_std"):
      if kw.get(k) is not None:
        kw[k] = tuple(kw[k])
    if isinstance(kw.get("sample_size"), list):
      kw["sample_size"] = tuple(kw["sample_size"])
    return cls(**kw)

  def to_diffusers(self) -> dict:
    """A config.json dict that diffusers' AutoencoderKL.from_pretrained accepts."""
    d = dataclasses.asdict(self)
    n = len(self.block_out_channels)
    d.update(
        _class_name="AutoencoderKL",
        block_out_channels=list(self.block_out_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
    )
    for k in ("latents_mean", "latents_std", "sample_size"):
      if isinstance(d[k], tuple):
        d[k] = list(d[k])
    return d


def sd3_config() -> VAEConfig:
  """The released SD3 / SD3.5 VAE (16 latent channels, no quant convs)."""
  return VAEConfig()


def sdxl_config() -> VAEConfig:
  """The SDXL VAE (4 latent channels, quant convs, scale 0.13025, no shift)."""
  return VAEConfig(latent_channels=4, scaling_factor=0.13025, shift_factor=None,
                   use_quant_conv=True, use_post_quant_conv=True)


def vae_config(latent_channels: int = 16, width: int = 32, layers_per_block: int = 1,
               norm_num_groups: int | None = None, sample_size: int = 64,
               channel_mult: Sequence[int] = (1, 2, 4, 4)) -> VAEConfig:
  """The small family for CPU training: widths width x channel_mult, one level per entry.

  The default (1, 2, 4, 4) is f8 (64x64 images -> 8x8 latents); (1, 2, 4) is f4. Scale and
  shift start at 1 and 0: fit them to encoded data after training (`latent_scale_shift`),
  as SD3 did for its VAE.
  """
  if latent_channels not in (4, 8, 16):
    raise ValueError(f"vae_config(latent_channels={latent_channels}): choose 4, 8 or 16.")
  if not channel_mult or any(int(m) < 1 for m in channel_mult):
    raise ValueError(f"vae_config(channel_mult={tuple(channel_mult)}): give one positive "
                     "multiplier per level, e.g. (1, 2, 4, 4) for f8 or (1, 2, 4) for f4.")
  groups = norm_num_groups or (32 if width >= 128 else max(1, width // 4))
  return VAEConfig(block_out_channels=tuple(int(m) * width for m in channel_mult),
                   layers_per_block=layers_per_block, latent_channels=latent_channels,
                   norm_num_groups=groups, scaling_factor=1.0, shift_factor=None,
                   use_quant_conv=False, use_post_quant_conv=False, sample_size=sample_size)


PRESETS = {"sd3": sd3_config, "sdxl": sdxl_config}


# ---------------------------------------------------------------------------- posterior


@flax.struct.dataclass
class DiagonalGaussian:
  """q(z | x) = N(mean, exp(logvar)), NHWC; logvar clamped to [-30, 20] as diffusers does."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    eps = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
    return self.mean + self.std * eps

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over H, W, C: shape (batch,), as diffusers' kl()."""
    kl = 0.5 * (jnp.square(self.mean) + self.var - 1.0 - self.logvar)
    return kl.sum(axis=tuple(range(1, kl.ndim)))

  def nll(self, sample: jax.Array) -> jax.Array:
    """-log q(sample) summed over H, W, C: shape (batch,)."""
    nll = 0.5 * (np.log(2.0 * np.pi) + self.logvar + jnp.square(sample - self.mean) / self.var)
    return nll.sum(axis=tuple(range(1, nll.ndim)))


# ------------------------------------------------------------------------------- layers


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, stride: int = 1,
           padding: Padding = SAME3, dtype: Dtype = jnp.float32) -> jax.Array:
  """NHWC x HWIO convolution in `dtype`; the pure form of `Conv`, also used by the losses."""
  y = jax.lax.conv_general_dilated(
      x.astype(dtype), kernel.astype(dtype), (stride, stride), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


class Conv(nn.Module):
  """A 2-D convolution with HWIO kernel of logical axes (None, None, in, out)."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: Padding = SAME3
  axes: tuple[str | None, str | None] = ("conv_in", "conv_out")
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  # torch's default Conv2d init (kaiming_uniform with a = sqrt(5)): what diffusers trains from.
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
      1.0 / 3.0, "fan_in", "uniform")

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", logical(self.kernel_init, (None, None) + tuple(self.axes)),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    bias = None
    if self.use_bias:
      bias = self.param("bias", logical(nn.initializers.zeros_init(), self.axes[1:]),
                        (self.features,), jnp.float32)
    return conv2d(x, kernel, bias, self.stride, self.padding, self.dtype)


class GroupNorm(nn.Module):
  """GroupNorm over (H, W, channels of a group) with float32 statistics, eps 1e-6."""
  groups: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  scale_init: nn.initializers.Initializer = nn.initializers.ones_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.groups} groups.")
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)
    axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
    mean = xf.mean(axes, keepdims=True)
    var = jnp.square(xf - mean).mean(axes, keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    scale = self.param("scale", logical(self.scale_init, ("norm",)), (c,), jnp.float32)
    bias = self.param("bias", logical(nn.initializers.zeros_init(), ("norm",)), (c,), jnp.float32)
    return (y * scale + bias).astype(self.dtype)


def _constrain(x: jax.Array) -> jax.Array:
  return nn.with_logical_constraint(x, ("act_batch", None, None, "act_embed"))


class ResnetBlock(nn.Module):
  """norm-SiLU-conv twice, plus a 1x1 shortcut conv when the width changes."""
  features: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(GroupNorm(self.groups, dtype=self.dtype, name="norm1")(x))
    h = Conv(self.features, dtype=self.dtype, name="conv1")(h)
    h = nn.silu(GroupNorm(self.groups, dtype=self.dtype, name="norm2")(h))
    h = Conv(self.features, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, kernel_size=1, padding=((0, 0), (0, 0)), dtype=self.dtype,
               name="conv_shortcut")(x)
    return _constrain(x.astype(self.dtype) + h)


class Attention(nn.Module):
  """Single-head self-attention over the H x W positions, GroupNorm first, residual added."""
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = GroupNorm(self.groups, dtype=self.dtype, name="group_norm")(x).reshape(b, hgt * wid, c)
    dense = lambda name: Dense(c, axes=("conv_in", "conv_out"), dtype=self.dtype, name=name)
    q, k, v = (dense(n)(h)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))
    # (B, T, 1 head, C); logits and softmax in float32 (diffusers upcasts the softmax too).
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * (c ** -0.5), axis=-1)
    o = jnp.einsum("bhqk,bkhc->bqhc", probs.astype(self.dtype), v).reshape(b, hgt * wid, c)
    o = dense("to_out_0")(o).reshape(b, hgt, wid, c)
    return _constrain(x.astype(self.dtype) + o)


class Downsample(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return Conv(self.features, stride=2, padding=((0, 0), (0, 0)), dtype=self.dtype,
                name="conv")(x)


class Upsample(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return Conv(self.features, dtype=self.dtype, name="conv")(x)


class MidBlock(nn.Module):
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    resnet, attention = _maybe_remat(self.remat)
    c = x.shape[-1]
    x = resnet(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = attention(self.groups, self.dtype, name="attentions_0")(x)
    return resnet(c, self.groups, self.dtype, name="resnets_1")(x)


_RematResnetBlock, _RematAttention = nn.remat(ResnetBlock), nn.remat(Attention)


def _maybe_remat(remat: bool):
  """Block classes that recompute their activations in the backward pass when remat."""
  return (_RematResnetBlock, _RematAttention) if remat else (ResnetBlock, Attention)


class ResnetStack(nn.Module):
  """One level of the encoder or decoder: `num_layers` ResNet blocks, then an optional
  2x resampling ("down": stride-2 conv, "up": nearest 2x + conv, "": none).

  The parameter names are diffusers' (`resnets_j`, `downsamplers_0` / `upsamplers_0`), so
  DownEncoderBlock2D and UpDecoderBlock2D are both this module.
  """
  features: int
  num_layers: int
  groups: int
  resample: str = ""
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    resnet, _ = _maybe_remat(self.remat)
    for j in range(self.num_layers):
      x = resnet(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.features, self.dtype, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(self.features, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels)."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    chans = cfg.block_out_channels
    h = Conv(chans[0], axes=("conv_image", "conv_out"), dtype=self.dtype, name="conv_in")(x)
    h = _constrain(h)
    for i, ch in enumerate(chans):
      h = ResnetStack(ch, cfg.layers_per_block, cfg.norm_num_groups,
                      "down" if i < len(chans) - 1 else "", self.dtype, self.remat,
                      name=f"down_blocks_{i}")(h)
    h = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, self.remat,
                 name="mid_block")(h)
    h = nn.silu(GroupNorm(cfg.norm_num_groups, dtype=self.dtype, name="conv_norm_out")(h))
    return Conv(2 * cfg.latent_channels, axes=("conv_in", "conv_latent"), dtype=self.dtype,
                name="conv_out")(h)


class Decoder(nn.Module):
  """Latents (B, h, w, latent_channels) -> images (B, f h, f w, out_channels).

  With return_hidden=True it stops before conv_out and returns the activations that
  conv_out reads: the losses need them to take gradients w.r.t. the last layer.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, z: jax.Array, return_hidden: bool = False) -> jax.Array:
    cfg = self.config
    chans = tuple(reversed(cfg.block_out_channels))
    h = Conv(chans[0], axes=("conv_latent", "conv_out"), dtype=self.dtype, name="conv_in")(z)
    h = _constrain(h)
    h = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, self.remat,
                 name="mid_block")(h)
    for i, ch in enumerate(chans):
      h = ResnetStack(ch, cfg.layers_per_block + 1, cfg.norm_num_groups,
                      "up" if i < len(chans) - 1 else "", self.dtype, self.remat,
                      name=f"up_blocks_{i}")(h)
    h = nn.silu(GroupNorm(cfg.norm_num_groups, dtype=self.dtype, name="conv_norm_out")(h))
    if return_hidden:
      return h
    return Conv(cfg.out_channels, axes=("conv_in", "conv_image"), dtype=self.dtype,
                name="conv_out")(h)


def decoder_out(last: dict, hidden: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
  """The decoder's conv_out as a pure function of its params {'kernel', 'bias'}.

  Same computation as Decoder's last layer, cast to float32 like `AutoencoderKL.decode`.
  """
  return conv2d(hidden, last["kernel"], last["bias"], 1, SAME3, dtype).astype(jnp.float32)


def last_layer(params: dict) -> dict:
  """The params of the decoder's last layer (the adaptive GAN weight differentiates them)."""
  return params["decoder"]["conv_out"]


# -------------------------------------------------------------------------------- model


class AutoencoderKL(nn.Module):
  """The KL autoencoder. Images are NHWC in [-1, 1]; outputs and posteriors are float32.

  Methods for `apply(..., method=...)`: encode, decode, decode_hidden, __call__.
  Plain helpers that take params (call them on the unbound model): encode_to_latents,
  decode_latents, init_params.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.remat)
    self.decoder = Decoder(cfg, self.dtype, self.remat)
    if cfg.use_quant_conv:
      self.quant_conv = Conv(2 * cfg.latent_channels, kernel_size=1, padding=((0, 0), (0, 0)),
                             axes=(None, "conv_latent"), dtype=self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = Conv(cfg.latent_channels, kernel_size=1, padding=((0, 0), (0, 0)),
                                  axes=(None, "conv_latent"), dtype=self.dtype)

  def _check(self, x: jax.Array, channels: int, what: str, factor: int) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f"AutoencoderKL.{what} expects NHWC arrays with {channels} channels "
                       f"(batch, height, width, {channels}); got shape {tuple(x.shape)}.")
    if factor > 1 and (x.shape[1] % factor or x.shape[2] % factor):
      raise ValueError(
          f"AutoencoderKL.{what}: image size {x.shape[1]}x{x.shape[2]} is not divisible by the "
          f"VAE's downsampling factor {factor} (2 ** (len(block_out_channels) - 1)); resize or "
          f"crop images to a multiple of {factor}.")

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    cfg = self.config
    self._check(images, cfg.in_channels, "encode", cfg.downsample_factor)
    moments = self.encoder(images)
    if cfg.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def _pre_decoder(self, z: jax.Array) -> jax.Array:
    self._check(z, self.config.latent_channels, "decode", 1)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return z

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(self._pre_decoder(z)).astype(jnp.float32)

  def decode_hidden(self, z: jax.Array) -> jax.Array:
    """The decoder's activations just before conv_out (see `decoder_out`)."""
    return self.decoder(self._pre_decoder(z), return_hidden=True)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None
               ) -> tuple[jax.Array, DiagonalGaussian]:
    """Reconstruction and posterior; z is sampled when rng is given, else the mode."""
    posterior = self.encode(images)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return self.decode(z), posterior

  # Helpers on the unbound module: they call apply themselves.

  @nn.nowrap
  def init_params(self, rng: jax.Array, image_size: int | None = None) -> dict:
    """Boxed (logical-axis annotated) params; use with parallel.create_sharded."""
    side = image_size or self.config.downsample_factor
    x = jnp.zeros((1, side, side, self.config.in_channels), jnp.float32)
    return self.init(rng, x)["params"]

  @nn.nowrap
  def encode_to_latents(self, params: dict, images: jax.Array,
                        rng: jax.Array | None = None) -> jax.Array:
    """The diffusion model's latents: (z - shift) * scale, z sampled if rng else the mean."""
    self._check_plain_normalisation()
    posterior = self.apply({"params": params}, images, method=AutoencoderKL.encode)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return normalize_latents(z, self.config.scaling_factor, self.config.shift_factor)

  @nn.nowrap
  def decode_latents(self, params: dict, latents: jax.Array) -> jax.Array:
    """Images from the diffusion model's latents: decode(latents / scale + shift)."""
    self._check_plain_normalisation()
    z = denormalize_latents(latents, self.config.scaling_factor, self.config.shift_factor)
    return self.apply({"params": params}, z, method=AutoencoderKL.decode)

  @nn.nowrap
  def _check_plain_normalisation(self) -> None:
    if self.config.latents_mean is not None or self.config.latents_std is not None:
      raise NotImplementedError(
          "This VAE config has per-channel latents_mean / latents_std; sd3jax only implements "
          "the scalar (z - shift_factor) * scaling_factor normalisation of SD3 / SDXL.")


def normalize_latents(z: Any, scaling_factor: float, shift_factor: float | None) -> Any:
  """VAE latents -> the diffusion model's: (z - shift) * scale (numpy or jax, float32).

  The one definition: precompute's records pipeline, `encode_to_latents`, training,
  sampling, evaluation and export all go through this function and its inverse.
  """
  return (z - np.float32(shift_factor or 0.0)) * np.float32(scaling_factor)


def denormalize_latents(latents: Any, scaling_factor: float, shift_factor: float | None) -> Any:
  """The inverse of `normalize_latents`: latents / scale + shift."""
  return latents / np.float32(scaling_factor) + np.float32(shift_factor or 0.0)


def latent_scale_shift(latents: jax.Array) -> tuple[float, float]:
  """(scaling_factor, shift_factor) that give encoded latents zero mean and unit std."""
  latents = np.asarray(latents, np.float64)
  mean = float(latents.mean())
  return float(1.0 / latents.std()), mean


def param_logical_axes(model: AutoencoderKL) -> Any:
  """The logical PartitionSpec of every parameter, without allocating any."""
  abstract = jax.eval_shape(model.init_params, jax.random.key(0))
  return nn.get_partition_spec(abstract)


__all__: Sequence[str] = (
    "VAEConfig", "sd3_config", "sdxl_config", "vae_config", "PRESETS", "DiagonalGaussian",
    "AutoencoderKL", "Encoder", "Decoder", "ResnetStack", "conv2d", "decoder_out", "last_layer",
    "latent_scale_shift", "normalize_latents", "denormalize_latents", "param_logical_axes",
)
