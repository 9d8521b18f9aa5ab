"""SSCD descriptors: parity with a torchvision ResNet-50 + GeM + L2 reference, and loading."""
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torchvision_ref import import_torchvision

from sd3jax.models import sscd

TINY = sscd.SSCDConfig(depths=(1, 1, 1, 1), width=64, dims=32)


class GeM(torch.nn.Module):
  """SSCD's GlobalGeMPool2d: mean over H, W of clamp(x, 1e-6)^p, then ^(1/p)."""

  def __init__(self, p: float):
    super().__init__()
    self.p = p

  def forward(self, x):
    return x.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class TorchSSCD(torch.nn.Module):
  """SSCD's Model("TV_RESNET50", dims, 3.0): avgpool -> GeM, then L2 normalisation."""

  def __init__(self, config: sscd.SSCDConfig, seed: int = 0):
    super().__init__()
    torch.manual_seed(seed)
    resnet = import_torchvision().models.resnet
    self.backbone = resnet.ResNet(resnet.Bottleneck, list(config.depths), num_classes=config.dims)
    self.backbone.avgpool = GeM(config.gem_p)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # BN that is far from the identity, so a mixed-up stat shows
      for m in self.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
          m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
          m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
          m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
          m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
    self.eval()

  def forward(self, x):
    return torch.nn.functional.normalize(self.backbone(x))


def _run_both(model, params, config, images_nhwc):
  with torch.no_grad():
    ref = model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
  out = jax.jit(sscd.SSCD(config).apply)({"params": params}, images_nhwc)
  return np.asarray(out), ref


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny():
  model = TorchSSCD(TINY, seed=1)
  # Plain torchvision keys (no `backbone.`), as numpy.
  return model, {k.split(".", 1)[1]: v.numpy() for k, v in model.state_dict().items()}


def test_resnet50_parity():
  config = sscd.SSCDConfig()
  model = TorchSSCD(config)
  params = sscd.params_from_torch(model.state_dict(), config)
  images = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  out, ref = _run_both(model, params, config, images)
  assert out.shape == (2, 512)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-6)
  err = _rel(out, ref)
  print(f"SSCD ResNet-50 rel L2 error vs torch: {err:.2e}")
  assert err <= 1e-5
  # Random trunks give similar descriptors for any input: check the input-dependent part too.
  diff_err = _rel(out[0] - out[1], ref[0] - ref[1])
  print(f"  of the difference between the two descriptors: {diff_err:.2e}")
  assert diff_err <= 1e-4


def _classy(state_dict, old_spelling=False):
  """The torchvision keys renamed to SSCD's Model("CV_RESNET50") layout.

  Written from ClassyVision v0.6.0 classy_vision/models/resnext.py (InitialBlock._module,
  blocks.{s}.block{s}-{i}: convolutional_block 0/1/3/4/6, bn, downsample) and SSCD's
  model.py (embeddings = Sequential(GeM, Linear, L2Norm)).
  """
  conv = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6"}
  out = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    if parts[0] == "fc":
      out["embeddings.1." + parts[1]] = value
      continue
    if parts[0] in ("conv1", "bn1"):
      new = f"initial_block._module.{conv[parts[0]]}.{parts[1]}"
    else:
      s, i, mod, rest = int(parts[0][5:]) - 1, parts[1], parts[2], ".".join(parts[3:])
      block = f"{s}.{i}._module" if old_spelling else f"{s}.block{s}-{i}"
      if mod == "bn3":
        inner = "bn"
      elif mod == "downsample":
        inner = "downsample"
      else:
        inner = f"convolutional_block.{conv[mod]}"
      new = f"blocks.{block}.{inner}.{rest}"
    out["backbone." + new] = value
  return out


@pytest.mark.parametrize("old_spelling", [False, True])
def test_classy_layout_converts_like_torchvision(tiny, old_spelling):
  _, state_dict = tiny
  want = sscd.params_from_torch(state_dict, TINY)
  got = sscd.params_from_torch(_classy(state_dict, old_spelling))
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_load_sscd_formats(tiny, tmp_path):
  model, state_dict = tiny
  prefixed = {"backbone." + k: torch.from_numpy(v) for k, v in state_dict.items()}
  torch.save(prefixed, tmp_path / "sscd.torchvision.pt")
  torch.save({"state_dict": prefixed, "epoch": 3}, tmp_path / "nested.pt")
  torch.jit.trace(model, torch.zeros(1, 3, 32, 32)).save(str(tmp_path / "sscd.torchscript.pt"))
  save_file({k: v for k, v in state_dict.items() if v.dtype != np.int64},
            str(tmp_path / "sscd.safetensors"))

  module, params = sscd.load_sscd(str(tmp_path / "sscd.torchvision.pt"))  # config inferred
  assert module.config == TINY
  images = np.random.RandomState(1).randn(2, 48, 40, 3).astype(np.float32)
  out, ref = _run_both(model, params, TINY, images)
  assert _rel(out, ref) <= 1e-5
  for name in ("nested.pt", "sscd.torchscript.pt", "sscd.safetensors"):
    other = sscd.load_sscd(str(tmp_path / name), TINY)[1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, other, params)


def test_bad_state_dicts_name_the_problem(tiny):
  _, state_dict = tiny
  missing = {k: v for k, v in state_dict.items() if k != "layer2.0.bn1.running_var"}
  with pytest.raises(ValueError, match=r"missing 1 keys .* \['layer2\.0\.bn1\.running_var'\]"):
    sscd.params_from_torch(missing, TINY)
  with pytest.raises(ValueError, match=r"unexpected 1 keys \['head\.weight'\]"):
    sscd.params_from_torch({**state_dict, "head.weight": np.zeros(3)}, TINY)
  with pytest.raises(ValueError, match=r"missing 15 keys .* \['layer1\.1\.bn1\.bias'.*Fix: pass"):
    sscd.params_from_torch(state_dict, sscd.SSCDConfig(depths=(2, 1, 1, 1), dims=32))
  with pytest.raises(ValueError, match=r"fc\.bias has shape \(32,\).*config=None"):
    sscd.params_from_torch(state_dict, sscd.SSCDConfig(depths=(1, 1, 1, 1), dims=16))


def test_preprocess_and_descriptor_fn(tiny):
  rs = np.random.RandomState(2)
  images = rs.randint(0, 256, (3, 40, 60, 3)).astype(np.uint8)
  np.testing.assert_allclose(sscd.preprocess(images, 32),
                             sscd.preprocess(images.astype(np.float32) / 255, 32), atol=1e-6)
  assert sscd.preprocess(images, 32).shape == (3, 32, 32, 3)
  assert sscd.preprocess(images, 32, preserve_aspect_ratio=True).shape == (3, 32, 48, 3)
  grey = np.full((1, 8, 8, 3), 0.5, np.float32)
  want = (0.5 - np.array(sscd.IMAGENET_MEAN)) / np.array(sscd.IMAGENET_STD)
  np.testing.assert_allclose(sscd.preprocess(grey, 8)[0, 3, 5], want, rtol=1e-6)

  model, state_dict = tiny
  fn = sscd.descriptor_fn(sscd.SSCD(TINY), sscd.params_from_torch(state_dict), size=32)
  desc = np.asarray(fn(images))
  assert desc.shape == (3, 32) and desc.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(desc, axis=-1), 1.0, rtol=1e-6)
  with torch.no_grad():
    ref = model(torch.from_numpy(np.array(sscd.preprocess(images, 32)).transpose(0, 3, 1, 2)))
  assert _rel(desc, ref.numpy()) <= 1e-5
