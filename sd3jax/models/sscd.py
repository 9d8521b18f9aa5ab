"""SSCD copy-detection descriptors (Pizzi et al. 2022) in Flax Linen, NHWC, inference only.

SSCD = torchvision ResNet-50 (v1.5: stride on the 3x3 conv) -> GeM pooling (p = 3) ->
Linear 2048 -> dims (512) -> L2 normalisation. It answers "is this generated image a near
copy of a training image?", so only inference is implemented. BatchNorm is frozen: scale,
bias, running mean and var are plain 'params' entries, so the weights are one pytree with
no mutable state (never train them: the running statistics would get gradients).

State-dict layouts read by `params_from_torch` / `load_sscd` (any of the prefixes
`module.`, `model.`, `backbone.` is stripped; `num_batches_tracked` is ignored):
  torchvision  `conv1.weight`, `bn1.*`, `layer{s}.{i}.{conv,bn}{1,2,3}.*`,
               `layer{s}.0.downsample.{0,1}.*`, `fc.{weight,bias}`, as in SSCD's
               Model("TV_RESNET50", 512, 3.0).state_dict() (all `backbone.`-prefixed;
               GeM has no parameters); the published `*.torchvision.pt` files load into it.
  classy       Model("CV_RESNET50", 512, 3.0), the `*.classy.pt` files:
               `backbone.initial_block._module.{0,1}.*`, `backbone.blocks.{s}.block{s}-{i}.`
               {`convolutional_block.{0,1,3,4,6}`, `bn`, `downsample.{0,1}`}`.*` (the older
               `blocks.{s}.{i}._module.` spelling too), `embeddings.1.{weight,bias}`.
  TorchScript  a `*.torchscript.pt` file's state_dict(), expected in one of the above.
The classy and TorchScript layouts follow SSCD's and ClassyVision's source; no published
file was read. ResNeXt trunks (sscd_disc_large) are not implemented.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import zipfile
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class SSCDConfig:
  """ResNet depths / stem width, descriptor size, GeM exponent and clamp (BN eps is 1e-5)."""
  depths: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  dims: int = 512
  gem_p: float = 3.0
  eps: float = 1e-6


class FrozenBatchNorm(nn.Module):
  """torch's BatchNorm2d in eval mode: (x - mean) / sqrt(var + eps) * scale + bias."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    mul = scale * jax.lax.rsqrt(var + self.eps)
    return x * mul + (bias - mean * mul)


def _conv(features: int, k: int, stride: int = 1, name: str | None = None) -> nn.Conv:
  return nn.Conv(features, (k, k), (stride, stride), padding=[(k // 2, k // 2)] * 2,
                 use_bias=False, precision=HIGHEST, name=name)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck; names follow its state dict (`downsample.0` -> downsample_0)."""
  planes: int
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(FrozenBatchNorm(name="bn1")(_conv(self.planes, 1, name="conv1")(x)))
    y = nn.relu(FrozenBatchNorm(name="bn2")(_conv(self.planes, 3, self.stride, "conv2")(y)))
    y = FrozenBatchNorm(name="bn3")(_conv(4 * self.planes, 1, name="conv3")(y))
    if self.downsample:
      x = FrozenBatchNorm(name="downsample_1")(
          _conv(4 * self.planes, 1, self.stride, "downsample_0")(x))
    return nn.relu(x + y)


class SSCD(nn.Module):
  """ImageNet-normalised NHWC float32 images [B, H, W, 3] -> L2-normalised [B, dims]."""
  config: SSCDConfig = SSCDConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    x = nn.relu(FrozenBatchNorm(name="bn1")(_conv(cfg.width, 7, 2, "conv1")(x)))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for s, depth in enumerate(cfg.depths):
      for i in range(depth):
        x = Bottleneck(cfg.width * 2**s, 2 if (s and not i) else 1, downsample=not i,
                       name=f"layer{s + 1}_{i}")(x)
    # GeM; an integral exponent is a product, as exact as torch's pow.
    x = jnp.maximum(x, cfg.eps)
    x = x**int(cfg.gem_p) if float(cfg.gem_p).is_integer() else x**cfg.gem_p
    x = jnp.mean(x, axis=(1, 2)) ** (1.0 / cfg.gem_p)
    x = nn.Dense(cfg.dims, precision=HIGHEST, name="fc")(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def preprocess(images: jax.Array, size: int, preserve_aspect_ratio: bool = False) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] NHWC -> resized, ImageNet-normalised float32.

  Default: straight to size x size, ignoring the aspect ratio (SSCD's "skew_320" recipe,
  which its README recommends for batched copy detection). preserve_aspect_ratio: the
  short side goes to `size` (its "small_288" recipe). Antialiased bilinear, close to
  but not bit-identical with torchvision's PIL resize (which rounds back to uint8).
  """
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  b, h, w, c = x.shape
  if preserve_aspect_ratio:
    short = min(h, w)
    out = (round(h * size / short), round(w * size / short))
  else:
    out = (size, size)
  if out != (h, w):
    x = jax.image.resize(x, (b, *out, c), "bilinear", antialias=True)
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def descriptor_fn(module: SSCD, params: Any, size: int = 288, preserve_aspect_ratio: bool = False
                  ) -> Callable[[jax.Array], jax.Array]:
  """A jitted images (uint8 or [0, 1] float, NHWC) -> float32 [B, dims] unit descriptors.

  params are an argument of the jitted function, not constants folded into it (100 MB).
  """

  @jax.jit
  def fn(params, images):
    return module.apply({"params": params}, preprocess(images, size, preserve_aspect_ratio))

  return functools.partial(fn, params)


_PREFIXES = ("module.", "model.", "backbone.")
_BN_TORCH = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_CLASSY_CONV = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3"}
_CLASSY_RENAMES = (  # applied in order
    (r"^initial_block\._module\.([01])\.", lambda m: _CLASSY_CONV[m[1]] + "."),
    (r"^embeddings\.1\.", lambda m: "fc."),
    (r"^blocks\.(\d+)\.(?:block\d+-(\d+)|(\d+)\._module)\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2] or m[3]}."),
    (r"^(layer\d+\.\d+\.)convolutional_block\.([01346])\.",
     lambda m: m[1] + _CLASSY_CONV[m[2]] + "."),
    (r"^(layer\d+\.\d+\.)bn\.", lambda m: m[1] + "bn3."),
)


def _torchvision_name(key: str) -> str:
  """Strips wrapper prefixes and renames the classy layout to torchvision's."""
  while key.startswith(_PREFIXES):
    key = key.split(".", 1)[1]
  for pattern, repl in _CLASSY_RENAMES:
    key = re.sub(pattern, repl, key)
  return key


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
    value = value.detach().cpu()
    value = value.float() if value.is_floating_point() else value
    value = value.numpy()
  return np.asarray(value)


def config_from_state_dict(state_dict: Mapping[str, Any]) -> SSCDConfig:
  """Depths, width and dims read off a checkpoint (either layout)."""
  names = {_torchvision_name(k): v for k, v in state_dict.items()}
  if "conv1.weight" not in names or "fc.weight" not in names:
    raise ValueError("Not an SSCD ResNet state dict: no conv1.weight / fc.weight (after "
                     f"renaming); first keys: {sorted(state_dict)[:5]}")
  depths = []
  while any(k.startswith(f"layer{len(depths) + 1}.") for k in names):
    s = len(depths) + 1
    depths.append(1 + max(int(k.split(".")[1]) for k in names if k.startswith(f"layer{s}.")))
  return SSCDConfig(depths=tuple(depths), width=int(np.shape(names["conv1.weight"])[0]),
                    dims=int(np.shape(names["fc.weight"])[0]))


def params_from_torch(state_dict: Mapping[str, Any], config: SSCDConfig | None = None) -> Any:
  """A torch SSCD state dict (np arrays or tensors; layouts in the module doc) -> params."""
  config = config or config_from_state_dict(state_dict)
  names = {_torchvision_name(k): k for k in state_dict if not k.endswith("num_batches_tracked")}
  abstract = jax.eval_shape(functools.partial(SSCD(config).init, jax.random.key(0)),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    *mods, p = [k.key for k in path]
    torch_p = "weight" if p == "kernel" else p if mods[-1] == "fc" else _BN_TORCH[p]
    flat[".".join(m.replace("_", ".") for m in mods) + "." + torch_p] = (path, leaf)
  missing = sorted(set(flat) - set(names))
  unexpected = sorted(set(names) - set(flat))
  if missing or unexpected:
    raise ValueError(
        f"SSCD state dict does not match {config}: missing {len(missing)} keys (torchvision "
        f"names) "
        f"{missing[:8]}, unexpected {len(unexpected)} keys {[names[k] for k in unexpected[:8]]}. "
        "Fix: pass the SSCDConfig the checkpoint was trained with (or config=None to read it "
        "off the checkpoint), and a torchvision- or classy-layout SSCD ResNet state dict "
        "(see sd3jax/models/sscd.py); ResNeXt trunks are not supported.")
  leaves = []
  for key, (path, leaf) in flat.items():
    value = _numpy(state_dict[names[key]]).astype(np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif value.ndim == 2:
      value = value.T
    if value.shape != leaf.shape:
      raise ValueError(f"SSCD state dict: {names[key]} has shape {value.shape} after "
                       f"conversion, {config} expects {leaf.shape}: pass the checkpoint's "
                       "config, or config=None to read it off the checkpoint.")
    leaves.append(value)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def _unnest(obj: Any) -> Mapping[str, Any]:
  """Descends through 'state_dict' / 'model' until the values are tensors."""
  while isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
    inner = obj.get("state_dict", obj.get("model"))
    if not isinstance(inner, Mapping):
      raise ValueError(f"No state dict found: top-level keys {sorted(obj)[:8]}")
    obj = inner
  return obj


def load_sscd(path: str, config: SSCDConfig | None = None) -> tuple[SSCD, Any]:
  """(module, params) from a local .safetensors, torch state dict or TorchScript file.

  Reading .pt / .pth needs torch, which is only a test dependency of sd3jax; .safetensors
  does not. A state dict nested under 'state_dict' or 'model' is unwrapped.
  """
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    state_dict = load_file(path)
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"load_sscd({path!r}) needs torch to read a torch checkpoint; torch is "
                        "a test-only dependency of sd3jax (pip install sd3jax[test]), or "
                        "convert the file to .safetensors first.") from e
    is_script = False
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        is_script = any(n.endswith("constants.pkl") for n in archive.namelist())
    if is_script:
      state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    else:
      state_dict = _unnest(torch.load(path, map_location="cpu", weights_only=True))
  config = config or config_from_state_dict(state_dict)
  return SSCD(config), params_from_torch(state_dict, config)
