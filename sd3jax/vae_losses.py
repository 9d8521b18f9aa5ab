"""Losses and metrics for training the KL autoencoder (LDM / taming-transformers recipe).

Everything here is a pure, jit-able function of arrays and params; the trainer owns the
loop, the optimizers and the logging. The recipe: L1 (or L2) reconstruction, plus an
optional LPIPS-style perceptual term, plus a small KL weight, plus, from `disc_start` on, a
PatchGAN discriminator with hinge loss whose generator term is scaled by the adaptive
weight ||grad rec|| / ||grad gan|| taken at the decoder's last layer.

One call, `vae_train_losses`, returns a total whose gradient w.r.t. params["vae"] is the
autoencoder's gradient and w.r.t. params["disc"] the discriminator's (each network sees the
other through stop_gradient), so a trainer needs a single value_and_grad per step.

Normalisation: the reconstruction and perceptual terms are means over pixel values; the KL
term is the per-image KL sum divided by the number of pixel values per image. This is
LDM's balance (its reconstruction term is a per-image sum), so LDM's kl_weight = 1e-6
keeps its meaning.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sd3jax.models import vae as vae_lib

Dtype = Any
FeatureFn = Callable[[jax.Array], Sequence[jax.Array]]


# ------------------------------------------------------------------ reconstruction and KL


def reconstruction_loss(images: jax.Array, recon: jax.Array, kind: str = "l1") -> jax.Array:
  """Mean absolute (l1) or squared (l2) error over all pixel values."""
  diff = recon.astype(jnp.float32) - images.astype(jnp.float32)
  if kind == "l1":
    return jnp.abs(diff).mean()
  if kind == "l2":
    return jnp.square(diff).mean()
  raise ValueError(f"rec_loss={kind!r}: choose 'l1' or 'l2'.")


def kl_loss(posterior: vae_lib.DiagonalGaussian) -> jax.Array:
  """Batch mean of the per-image KL(q(z|x) || N(0, I)) summed over latent elements."""
  return posterior.kl().mean()


# ---------------------------------------------------------------------------- perceptual


@flax.struct.dataclass
class Perceptual:
  """A frozen feature network: features(images in [-1, 1], NHWC) -> list of NHWC maps.

  It is a pytree (params are leaves), so it can be passed into jit as an argument rather
  than baked into the program as constants. `channel_weights` are LPIPS' learned
  non-negative per-channel weights, one (C,) vector per map; None sums channels equally.
  """
  params: Any
  channel_weights: tuple[jax.Array, ...] | None
  apply_fn: Callable[[Any, jax.Array], Sequence[jax.Array]] = flax.struct.field(
      pytree_node=False)

  def __call__(self, images: jax.Array) -> Sequence[jax.Array]:
    return self.apply_fn(self.params, images)


def perceptual_loss(net: Perceptual | FeatureFn, images: jax.Array,
                    recon: jax.Array) -> jax.Array:
  """LPIPS distance: channel-normalised feature differences, weighted, averaged over space.

  `net` is a `Perceptual` or any callable images -> list of feature maps. Mean over batch.
  """
  if net is None:
    raise ValueError("perceptual_loss needs a feature network; none is configured "
                     "(load one with load_lpips_vgg16(path) or set perceptual_weight=0).")
  weights = getattr(net, "channel_weights", None)
  fa, fb = net(images), net(recon)
  if weights is not None and len(weights) != len(fa):
    raise ValueError(f"{len(weights)} channel weight vectors for {len(fa)} feature maps.")
  total = jnp.zeros((), jnp.float32)
  for i, (a, b) in enumerate(zip(fa, fb)):
    a, b = _unit_channels(a), _unit_channels(b)
    d = jnp.square(a - b)
    d = d.sum(-1) if weights is None else (d * weights[i].astype(jnp.float32)).sum(-1)
    total = total + d.mean()
  return total


def _unit_channels(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / (jnp.sqrt(jnp.square(x).sum(-1, keepdims=True)) + eps)


# VGG16 `features` layout (torchvision): convs (3x3, ReLU) and 2x2 max pools ("M").
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision features indices).
_LPIPS_TAPS = (3, 8, 15, 22, 29)
# LPIPS' ScalingLayer: images in [-1, 1] -> the statistics VGG was trained on.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
  """VGG16's conv trunk, returning the five ReLU maps LPIPS compares. Widths come from params."""
  widths: tuple[int, ...] = tuple(c for c in _VGG16 if c != "M")

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    x = (images.astype(jnp.float32) - jnp.asarray(_LPIPS_SHIFT)) / jnp.asarray(_LPIPS_SCALE)
    feats, idx, conv = [], 0, 0
    for layer in _VGG16:
      if layer == "M":
        x = nn.max_pool(x, (2, 2), (2, 2))
        idx += 1
        continue
      x = nn.relu(vae_lib.Conv(self.widths[conv], name=f"features_{idx}")(x))
      conv += 1
      if idx + 1 in _LPIPS_TAPS:
        feats.append(x)
      idx += 2
    return feats


def load_lpips_vgg16(path: str) -> Perceptual:
  """An LPIPS(VGG16) network from local safetensors (a file, or a folder of them).

  Expected names: torchvision's `features.N.weight/bias` (or the lpips package's
  `net.sliceK.N.weight/bias`) and optionally LPIPS' `linK.model.1.weight` (1, C, 1, 1).
  Without the lin weights the distance sums channels equally (lpips' `lpips=False`).
  """
  from safetensors.numpy import load_file
  files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
  if not files or not all(os.path.exists(f) for f in files):
    raise FileNotFoundError(f"No LPIPS / VGG16 safetensors at {path!r}.")
  state = {}
  for f in files:
    state.update(load_file(f))
  convs, lins = {}, {}
  for k, v in state.items():
    parts = k.split(".")
    if parts[0] == "features" or (parts[0] == "net" and parts[1].startswith("slice")):
      idx, kind = int(parts[-2]), parts[-1]
      convs.setdefault(idx, {})[kind] = np.asarray(v, np.float32)
    elif parts[0].startswith("lin") and parts[-1] == "weight":
      lins[int(parts[0][3:])] = np.asarray(v, np.float32).reshape(-1)
  conv_idx = [i for i, _ in _vgg16_convs()]
  if sorted(convs) != conv_idx:
    raise ValueError(f"{path!r} does not hold VGG16 features: conv layers {sorted(convs)}, "
                     f"expected {conv_idx}.")
  params = {f"features_{i}": {"kernel": convs[i]["weight"].transpose(2, 3, 1, 0),
                              "bias": convs[i]["bias"]} for i in conv_idx}
  module = VGG16Features(widths=tuple(convs[i]["weight"].shape[0] for i in conv_idx))
  weights = None
  if lins:
    if sorted(lins) != list(range(len(_LPIPS_TAPS))):
      raise ValueError(f"{path!r}: LPIPS lin weights {sorted(lins)}, expected lin0..lin4.")
    weights = tuple(jnp.asarray(lins[i]) for i in range(len(_LPIPS_TAPS)))
  return Perceptual(params=jax.tree.map(jnp.asarray, params), channel_weights=weights,
                    apply_fn=lambda p, x: module.apply({"params": p}, x))


def pooled_features(net: Perceptual | FeatureFn, images: jax.Array) -> jax.Array:
  """(batch, C) spatial means of the deepest feature map of images in [-1, 1]: vectors for
  a reconstruction FID with the LPIPS network, via sd3jax.evals.features.fid_from_features
  (the package's one Frechet distance)."""
  return net(images)[-1].astype(jnp.float32).mean(axis=(1, 2))


def _vgg16_convs() -> list[tuple[int, int]]:
  out, idx = [], 0
  for layer in _VGG16:
    if layer == "M":
      idx += 1
    else:
      out.append((idx, layer))
      idx += 2
  return out


# -------------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
  """PatchGAN (taming-transformers' NLayerDiscriminator), NHWC; one logit per patch.

  4x4 convs with padding 1: stride 2 for the first n_layers, then two stride-1 convs, the
  last to one channel; LeakyReLU(0.2) between them.
  Normalisation is GroupNorm ("group", stateless, so no batch statistics to carry and
  shard) or none; taming's BatchNorm is not offered.
  """
  ndf: int = 64
  n_layers: int = 3
  norm: str = "group"
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if self.norm not in ("group", "none"):
      raise ValueError(f"PatchDiscriminator.norm={self.norm!r}: choose 'group' or 'none'.")
    init = nn.initializers.normal(0.02)  # taming's weights_init
    pad = ((1, 1), (1, 1))

    def conv(x, feats, stride, axes, name, use_bias=True):
      return vae_lib.Conv(feats, kernel_size=4, stride=stride, padding=pad, axes=axes,
                          use_bias=use_bias, dtype=self.dtype, kernel_init=init, name=name)(x)

    def norm(x, name):
      if self.norm == "none":
        return x
      return vae_lib.GroupNorm(math.gcd(self.norm_groups, x.shape[-1]), dtype=self.dtype,
                               scale_init=_taming_norm_init, name=name)(x)

    x = nn.leaky_relu(conv(images, self.ndf, 2, ("conv_image", "conv_out"), "conv_0"), 0.2)
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      x = conv(x, self.ndf * min(2 ** n, 8), stride, ("conv_in", "conv_out"), f"conv_{n}",
               use_bias=self.norm == "none")  # a norm follows: no bias, as taming
      x = nn.leaky_relu(norm(x, f"norm_{n}"), 0.2)
    logits = conv(x, 1, 1, ("conv_in", None), f"conv_{self.n_layers + 1}")
    return logits.astype(jnp.float32)


def _taming_norm_init(key, shape, dtype=jnp.float32):
  """N(1, 0.02): taming's init for the discriminator's norm scales."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
  return 0.5 * (jax.nn.relu(1.0 - logits_real).mean() + jax.nn.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (E[softplus(-D(x))] + E[softplus(D(G(z)))]): the non-saturating BCE form."""
  return 0.5 * (jax.nn.softplus(-logits_real).mean() + jax.nn.softplus(logits_fake).mean())


def generator_adv_loss(logits_fake: jax.Array) -> jax.Array:
  """-E[D(G(z))], the generator's side of the hinge game."""
  return -logits_fake.mean()


def adaptive_weight(rec_grad: jax.Array, gan_grad: jax.Array, disc_weight: float = 1.0,
                    max_weight: float = 1e4, eps: float = 1e-4) -> jax.Array:
  """disc_weight * clip(||rec_grad|| / (||gan_grad|| + eps), 0, max), without gradient.

  The grads are of the reconstruction (nll) and GAN losses w.r.t. the same last-layer
  weight; the ratio keeps the GAN term from overpowering reconstruction (taming / LDM).
  """
  w = jnp.linalg.norm(rec_grad.ravel()) / (jnp.linalg.norm(gan_grad.ravel()) + eps)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight)) * disc_weight


def disc_gate(step: jax.Array | int, disc_start: int, disc_factor: float = 1.0) -> jax.Array:
  """disc_factor from step `disc_start` on, 0 before (taming's adopt_weight); jit-able."""
  return jnp.where(jnp.asarray(step) >= disc_start, disc_factor, 0.0).astype(jnp.float32)


# --------------------------------------------------------------------------- train losses


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
  """Weights of the VAE objective; defaults are LDM's KL-f8 recipe (disc_start aside)."""
  rec_loss: str = "l1"            # "l1" or "l2"
  kl_weight: float = 1e-6         # on KL sum / pixel values per image (see module doc)
  perceptual_weight: float = 0.0  # > 0 needs a Perceptual network
  disc_weight: float = 0.5        # multiplies the adaptive weight; 0 disables the GAN
  disc_factor: float = 1.0
  disc_start: int = 50001
  disc_loss: str = "hinge"        # "hinge" or "vanilla"
  max_adaptive_weight: float = 1e4
  sample_posterior: bool = True

  def __post_init__(self):
    if self.rec_loss not in ("l1", "l2"):
      raise ValueError(f"rec_loss={self.rec_loss!r}: choose 'l1' or 'l2'.")
    if self.disc_loss not in ("hinge", "vanilla"):
      raise ValueError(f"disc_loss={self.disc_loss!r}: choose 'hinge' or 'vanilla'.")


def vae_train_losses(model: vae_lib.AutoencoderKL, disc: PatchDiscriminator | None,
                     params: dict, images: jax.Array, rng: jax.Array, step: jax.Array | int,
                     cfg: VAELossConfig, perceptual: Perceptual | FeatureFn | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total, metrics) for one VAE + discriminator step; params = {"vae": ..., "disc": ...}.

  grad(total) w.r.t. params["vae"] is the autoencoder's gradient, w.r.t. params["disc"]
  the discriminator's. Before `disc_start` the GAN branch is skipped at run time (lax.cond)
  and the discriminator's gradient is zero. Metric keys exist only for configured terms.
  """
  if cfg.perceptual_weight > 0 and perceptual is None:
    raise ValueError("VAELossConfig.perceptual_weight > 0 but no perceptual network is "
                     "configured; give a local LPIPS path or set perceptual_weight=0.")
  use_gan = disc is not None and cfg.disc_weight > 0
  vae_p = params["vae"]
  posterior = model.apply({"params": vae_p}, images, method=vae_lib.AutoencoderKL.encode)
  z = posterior.sample(rng) if cfg.sample_posterior else posterior.mode()
  hidden = model.apply({"params": vae_p}, z, method=vae_lib.AutoencoderKL.decode_hidden)
  last = vae_lib.last_layer(vae_p)
  recon = vae_lib.decoder_out(last, hidden, model.dtype)

  def nll_of(recon):
    rec = reconstruction_loss(images, recon, cfg.rec_loss)
    parts = {"rec_loss": rec}
    if cfg.perceptual_weight > 0:
      parts["perceptual"] = perceptual_loss(perceptual, images, recon)
      rec = rec + cfg.perceptual_weight * parts["perceptual"]
    return rec, parts

  nll, metrics = nll_of(recon)
  values_per_image = math.prod(images.shape[1:])
  kl = kl_loss(posterior) / values_per_image
  gen = nll + cfg.kl_weight * kl
  metrics.update(nll=nll, kl=kl)
  total = gen
  if use_gan:
    gate = disc_gate(step, cfg.disc_start, cfg.disc_factor)
    gan = lambda p, r: _gan_terms(disc, p, images, r, hidden, last, nll_of, cfg, model.dtype)
    zeros = jax.eval_shape(gan, params["disc"], recon)
    g_loss, d_weight, d_loss, lr, lf = jax.lax.cond(
        gate > 0, gan, lambda p, r: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros),
        params["disc"], recon)
    gen = gen + d_weight * gate * g_loss
    total = gen + gate * d_loss
    metrics.update(g_loss=g_loss, d_weight=d_weight, disc_factor=gate, d_loss=d_loss,
                   logits_real=lr, logits_fake=lf)
  metrics.update(gen_loss=gen, loss=total)
  return total, metrics


def _gan_terms(disc, disc_p, images, recon, hidden, last, nll_of, cfg, dtype):
  """Generator loss, adaptive weight, discriminator loss and mean logits."""
  frozen = jax.lax.stop_gradient(disc_p)
  g_loss = generator_adv_loss(disc.apply({"params": frozen}, recon))
  # Gradients w.r.t. the decoder's last kernel, through that layer only (the rest is fixed).
  h, b = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(last["bias"])
  out = lambda k: vae_lib.decoder_out({"kernel": k, "bias": b}, h, dtype)
  k0 = jax.lax.stop_gradient(last["kernel"])
  rec_grad = jax.grad(lambda k: nll_of(out(k))[0])(k0)
  gan_grad = jax.grad(lambda k: generator_adv_loss(disc.apply({"params": frozen}, out(k))))(k0)
  d_weight = adaptive_weight(rec_grad, gan_grad, cfg.disc_weight, cfg.max_adaptive_weight)
  logits_real = disc.apply({"params": disc_p}, images)
  logits_fake = disc.apply({"params": disc_p}, jax.lax.stop_gradient(recon))
  d_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
  d_loss = d_fn(logits_real, logits_fake)
  return g_loss, d_weight, d_loss, logits_real.mean(), logits_fake.mean()


# -------------------------------------------------------------------------------- metrics


def to_unit(images: jax.Array) -> jax.Array:
  """[-1, 1] -> [0, 1], clipped: the range PSNR and SSIM are reported in."""
  return jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Per-image PSNR in dB, shape (batch,); MSE floored at 1e-10 (identical images: 100 dB)."""
  mse = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
  mse = mse.mean(axis=tuple(range(1, mse.ndim)))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-10))


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-x ** 2 / (2.0 * sigma ** 2))
  return (g / g.sum()).astype(np.float32)


def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Per-image SSIM (Wang et al. 2004), shape (batch,): Gaussian window, 'valid' positions.

  Means of the SSIM map over positions and channels, as tf.image.ssim.
  """
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"ssim expects two NHWC arrays of one shape; got {a.shape} and {b.shape}.")
  if min(a.shape[1:3]) < win_size:
    raise ValueError(f"ssim: images of {a.shape[1]}x{a.shape[2]} are smaller than the "
                     f"{win_size}x{win_size} window.")
  c = a.shape[-1]
  g = jnp.asarray(_gaussian_window(win_size, sigma))

  def blur(x):  # separable depthwise Gaussian filter, valid positions only
    dn = ("NHWC", "HWIO", "NHWC")
    kh = jnp.tile(g.reshape(win_size, 1, 1, 1), (1, 1, 1, c))
    kw = jnp.tile(g.reshape(1, win_size, 1, 1), (1, 1, 1, c))
    x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn,
                                     feature_group_count=c,
                                     precision=jax.lax.Precision.HIGHEST)
    return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn,
                                        feature_group_count=c,
                                        precision=jax.lax.Precision.HIGHEST)

  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  mu_a, mu_b = blur(a), blur(b)
  # (Co)variances are shift-invariant: take them of mean-free images, which avoids the
  # float32 cancellation of E[x^2] - E[x]^2 on flat regions.
  a0 = a - a.mean(axis=(1, 2), keepdims=True)
  b0 = b - b.mean(axis=(1, 2), keepdims=True)
  m_a0, m_b0 = blur(a0), blur(b0)
  var_a = blur(a0 * a0) - m_a0 ** 2
  var_b = blur(b0 * b0) - m_b0 ** 2
  cov = blur(a0 * b0) - m_a0 * m_b0
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) *
                                                   (var_a + var_b + c2))
  return s.mean(axis=(1, 2, 3))


def reconstruction_metrics(images: jax.Array, recon: jax.Array) -> dict[str, jax.Array]:
  """Batch-mean PSNR and SSIM of images in [-1, 1], measured in [0, 1]."""
  a, b = to_unit(images), to_unit(recon)
  return {"psnr": psnr(a, b).mean(), "ssim": ssim(a, b).mean()}
