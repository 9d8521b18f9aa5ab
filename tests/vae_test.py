"""The KL autoencoder: parity with diffusers' AutoencoderKL, interop round trips, sharding."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import traverse_util
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from sd3jax import parallel
from sd3jax.interop import diffusers_vae
from sd3jax.models import vae

# Tiny configs: (diffusers kwargs, image shapes to test). Weights are randomised below.
CASES = {
    "quant_2level": (dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
                          norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True),
                     [(2, 16, 16), (1, 16, 24)]),
    "noquant_2level": (dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=16,
                            norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                            scaling_factor=1.5305, shift_factor=0.0609),
                       [(2, 16, 16), (1, 24, 16)]),
    "f8_4level": (dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, latent_channels=16,
                       norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False),
                  [(2, 32, 32), (1, 32, 48)]),
}
RULES = parallel.RULE_PRESETS["fsdp_tp"] + (
    ("conv_in", "fsdp"), ("conv_out", "tensor"), ("conv_image", None), ("conv_latent", None),
    ("norm", None))


def _randomise(model: torch.nn.Module, seed: int) -> None:
  """Random weights everywhere (GroupNorm affine too), scaled to keep activations O(1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))


_FOLDERS = {}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """One saved random diffusers model per case, built once for the module."""
  if not _FOLDERS:
    for i, (name, (kw, _)) in enumerate(CASES.items()):
      n = len(kw["block_out_channels"])
      tm = TorchAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                              up_block_types=("UpDecoderBlock2D",) * n, **kw).eval()
      _randomise(tm, i)
      folder = str(tmp_path_factory.mktemp(name))
      tm.save_pretrained(folder)
      _FOLDERS[name] = (folder, tm)
  return _FOLDERS


def _init(model, seed=0):
  """Random float32 numpy params from the abstract shapes: no init compile (threefry init
  of even a tiny VAE takes ~15 s of CPU to compile). Kernels ~ 1/sqrt(fan_in), norm scales
  ~ 1, biases ~ 0.05: every parameter matters in the comparisons."""
  abstract = nn.unbox(jax.eval_shape(model.init_params, jax.random.key(0)))
  rs = np.random.RandomState(seed)

  def draw(path, leaf):
    shape, name = leaf.shape, path[-1].key
    noise = rs.randn(*shape).astype(np.float32)
    if name == "kernel":
      return noise / np.sqrt(np.prod(shape[:-1]))
    return (1.0 if name == "scale" else 0.0) + 0.05 * noise

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_diffusers(folders, case):
  folder, tm = folders[case]
  model, params = diffusers_vae.load_vae(folder)
  f = model.config.downsample_factor
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vae.AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=vae.AutoencoderKL.decode))
  rng = np.random.RandomState(0)
  for b, h, w in CASES[case][1]:
    x = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    z = rng.randn(b, h // f, w // f, model.config.latent_channels).astype(np.float32)
    with torch.no_grad():
      post = tm.encode(_nchw(x)).latent_dist
      t_mean, t_logvar = _nhwc(post.mean), _nhwc(post.logvar)
      t_dec = _nhwc(tm.decode(_nchw(z)).sample)
    p = encode(params, x)
    dec = decode(params, z)
    assert p.mean.shape == (b, h // f, w // f, model.config.latent_channels)
    assert dec.shape == (b, h, w, 3) and dec.dtype == jnp.float32
    # The clamp must not hide the comparison: most logvars are inside [-30, 20].
    assert np.mean(np.abs(t_logvar) < 19.0) > 0.9
    errs = (_rel(p.mean, t_mean), _rel(p.logvar, t_logvar), _rel(dec, t_dec))
    print(f"parity {case} {h}x{w}: rel L2 mean {errs[0]:.2e} logvar {errs[1]:.2e} "
          f"decode {errs[2]:.2e}")
    assert max(errs) < 1e-5, errs


def test_round_trip_to_diffusers(folders, tmp_path):
  """load -> save -> diffusers from_pretrained gives identical tensors, single and sharded."""
  folder, tm = folders["quant_2level"]
  model, params = diffusers_vae.load_vae(folder)
  ref = tm.state_dict()
  for sub, max_bytes in (("single", None), ("sharded", 40_000)):
    out = str(tmp_path / sub)
    kwargs = {} if max_bytes is None else {"max_shard_bytes": max_bytes}
    diffusers_vae.save_vae(model, params, out, **kwargs)
    shards = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    if max_bytes is None:
      assert shards == ["diffusion_pytorch_model.safetensors"]
    else:
      assert len(shards) > 2
      assert os.path.exists(os.path.join(out, "diffusion_pytorch_model.safetensors.index.json"))
    back = TorchAutoencoderKL.from_pretrained(out)
    assert list(back.config["block_out_channels"]) == [32, 64] and back.config.use_quant_conv
    got = back.state_dict()
    assert sorted(got) == sorted(ref)
    for k in ref:
      assert torch.equal(got[k], ref[k]), k
    _, params2 = diffusers_vae.load_vae(out)  # our loader reads the sharded folder too
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["use_quant_conv"] is True


def test_legacy_attention_names_and_1x1_layout(folders, tmp_path):
  """query/key/value/proj_attn names (and 1x1-conv shaped weights) load like to_q/..."""
  folder, _ = folders["noquant_2level"]
  _, params = diffusers_vae.load_vae(folder)
  state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  legacy = {}
  for k, v in state.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        v = v[:, :, None, None] if v.ndim == 2 else v
    legacy[k] = v
  assert any(".proj_attn.weight" in k for k in legacy)
  out = tmp_path / "legacy"
  out.mkdir()
  save_file(legacy, str(out / "diffusion_pytorch_model.safetensors"))
  (out / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  _, params2 = diffusers_vae.load_vae(str(out))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_straight_into_shards(folders):
  folder, _ = folders["quant_2level"]
  _, params = diffusers_vae.load_vae(folder)
  mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
  _, sharded = diffusers_vae.load_vae(folder, mesh=mesh, rules=RULES)
  kernel = sharded["decoder"]["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]
  assert kernel.sharding.spec == P(None, None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (3, 3, 64 // 4, 64 // 2)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_weight_mismatch_is_an_error(folders, tmp_path):
  folder, _ = folders["quant_2level"]
  out = tmp_path / "bad"
  out.mkdir()
  cfg = json.load(open(os.path.join(folder, "config.json")))
  (out / "diffusion_pytorch_model.safetensors").symlink_to(
      os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  (out / "config.json").write_text(json.dumps({**cfg, "latent_channels": 8}))
  with pytest.raises(ValueError, match="config needs"):
    diffusers_vae.load_vae(str(out))
  (out / "config.json").write_text(json.dumps({**cfg, "use_quant_conv": False}))
  with pytest.raises(ValueError, match="not used"):
    diffusers_vae.load_vae(str(out))
  (out / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderTiny"}))
  with pytest.raises(ValueError, match="not an AutoencoderKL"):
    diffusers_vae.load_vae(str(out))


def test_sd3_preset_matches_diffusers_names_and_shapes():
  """The full-size SD3 architecture maps one-to-one onto diffusers' (shapes only, no compute)."""
  cfg = vae.sd3_config()
  d = cfg.to_diffusers()
  assert (d["latent_channels"], d["scaling_factor"], d["shift_factor"]) == (16, 1.5305, 0.0609)
  assert d["block_out_channels"] == [128, 256, 512, 512] and d["layers_per_block"] == 2
  assert not d["use_quant_conv"] and not d["use_post_quant_conv"]
  assert vae.VAEConfig.from_diffusers(json.loads(json.dumps(d))) == cfg
  with torch.device("meta"):
    tm = TorchAutoencoderKL(**{k: v for k, v in d.items() if not k.startswith("_")})
  want = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
  model = vae.AutoencoderKL(cfg)
  abstract = nn.unbox(jax.eval_shape(model.init_params, jax.random.key(0)))
  got = {}
  for path, leaf in traverse_util.flatten_dict(abstract).items():
    shape = leaf.shape
    shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    got[diffusers_vae.torch_name(path)] = tuple(shape)
  assert got == want  # 83.8M parameters


def test_every_param_has_logical_axes():
  model = vae.AutoencoderKL(vae.vae_config(16, width=16))
  boxed = jax.eval_shape(model.init_params, jax.random.key(0))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  names = {n for x in leaves for n in x.names if n is not None}
  assert names == {"conv_in", "conv_out", "conv_image", "conv_latent", "norm"}
  specs = traverse_util.flatten_dict(vae.param_logical_axes(model))
  assert specs[("encoder", "conv_in", "kernel")] == P(None, None, "conv_image", "conv_out")
  assert specs[("decoder", "conv_out", "kernel")] == P(None, None, "conv_in", "conv_image")


def test_f8_family_and_latent_helpers():
  """vae_config: 8x down for 4 / 8 / 16 channels; scale and shift only in the helpers."""
  for c in (4, 8, 16):
    cfg = vae.vae_config(c, width=8)
    assert cfg.downsample_factor == 8 and cfg.block_out_channels == (8, 16, 32, 32)
  with pytest.raises(ValueError, match="choose 4, 8 or 16"):
    vae.vae_config(3)
  cfg = vae.VAEConfig(block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                      norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609)
  model = vae.AutoencoderKL(cfg)
  params = _init(model)
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
  key = jax.random.key(2)

  @jax.jit
  def run(params, x):
    post = model.apply({"params": params}, x, method=vae.AutoencoderKL.encode)
    lat, lat_s = model.encode_to_latents(params, x), model.encode_to_latents(params, x, key)
    ref = model.apply({"params": params}, post.mean, method=vae.AutoencoderKL.decode)
    return (post, lat, lat_s, post.sample(key), model.decode_latents(params, lat), ref,
            model.apply({"params": params}, x))

  post, lat, lat_s, sample, dec, ref, (recon, post2) = run(params, x)
  np.testing.assert_allclose(lat, (post.mean - 0.0609) * 1.5305, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lat_s, (sample - 0.0609) * 1.5305, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(lat_s - lat).max()) > 1e-3  # the sample differs from the mode
  np.testing.assert_allclose(dec, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(post2.mean, post.mean)
  scale, shift = vae.latent_scale_shift(lat * 3.0 + 2.0)
  normed = (np.asarray(lat * 3.0 + 2.0) - shift) * scale
  assert abs(normed.mean()) < 1e-5 and abs(normed.std() - 1.0) < 1e-5
  per_channel = vae.AutoencoderKL(vae.VAEConfig(**{**cfg.__dict__, "latents_mean": (0.0,) * 4,
                                                   "latents_std": (1.0,) * 4}))
  with pytest.raises(NotImplementedError, match="latents_mean"):
    per_channel.encode_to_latents(params, x)


def test_bf16_compute_and_remat():
  cfg = vae.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                      norm_num_groups=4)
  small = vae.VAEConfig(block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4)
  m32, m16 = vae.AutoencoderKL(cfg), vae.AutoencoderKL(cfg, dtype=jnp.bfloat16)
  ms32, mremat = vae.AutoencoderKL(small), vae.AutoencoderKL(small, remat=True)
  params = _init(m32)
  abstract16 = jax.eval_shape(m16.init_params, jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(abstract16)))
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  enc = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, method=vae.AutoencoderKL.encode))
  p32, p16 = enc(m32)(params), enc(m16)(params)
  dec = lambda m: jax.jit(lambda p: m.apply({"params": p}, p32.mean,
                                            method=vae.AutoencoderKL.decode))
  d32, d16 = dec(m32)(params), dec(m16)(params)
  assert d16.dtype == jnp.float32 and p16.mean.dtype == jnp.float32
  # bf16 everywhere (as diffusers in bf16): a few percent, measured 1.9% / 3.3% here.
  assert _rel(p16.mean, p32.mean) < 5e-2 and _rel(d16, d32) < 5e-2

  def loss(m, p):
    recon, post = m.apply({"params": p}, x[:, :8, :8], rng=jax.random.key(3))
    return jnp.square(recon - x[:, :8, :8]).mean() + 1e-3 * post.kl().mean()

  params = _init(ms32)
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(ms32, p)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(mremat, p)))(params)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bad_inputs_are_clear_errors():
  cfg = vae.VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
                      norm_num_groups=4)
  model = vae.AutoencoderKL(cfg)
  params = nn.unbox(jax.eval_shape(model.init_params, jax.random.key(0)))
  # Shape errors are raised while tracing: eval_shape shows them without compiling.
  enc = lambda x: jax.eval_shape(
      lambda p: model.apply({"params": p}, x, method=vae.AutoencoderKL.encode), params)
  dec = lambda z: jax.eval_shape(
      lambda p: model.apply({"params": p}, z, method=vae.AutoencoderKL.decode), params)
  with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 4"):
    enc(jnp.zeros((1, 18, 16, 3)))
  with pytest.raises(ValueError, match="3 channels"):
    enc(jnp.zeros((1, 16, 16, 4)))
  with pytest.raises(ValueError, match="3 channels"):
    enc(jnp.zeros((16, 16, 3)))
  with pytest.raises(ValueError, match="4 channels"):
    dec(jnp.zeros((1, 4, 4, 16)))
  with pytest.raises(ValueError, match="norm_num_groups"):
    vae.VAEConfig(block_out_channels=(8, 12), norm_num_groups=8)
  with pytest.raises(ValueError, match="not supported"):
    vae.VAEConfig.from_diffusers({"block_out_channels": [8], "norm_num_groups": 8,
                                  "some_new_option": 1})
  with pytest.raises(ValueError, match="DownEncoderBlock2D"):
    vae.VAEConfig.from_diffusers({"block_out_channels": [8], "norm_num_groups": 8,
                                  "down_block_types": ["AttnDownEncoderBlock2D"]})


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"fsdp": 4, "tensor": 2}])
def test_sharded_matches_single_device(mesh_shape):
  """Batch over the mesh, params created sharded (fsdp x tensor) == one device."""
  cfg = vae.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                      norm_num_groups=8, use_quant_conv=True, use_post_quant_conv=True)
  model = vae.AutoencoderKL(cfg)
  mesh = parallel.make_mesh(mesh_shape)
  # An rbg key: the same sharded creation, a fraction of threefry's compile time on CPU.
  params, shardings = parallel.create_sharded(model.init_params, mesh, RULES,
                                              jax.random.key(0, impl="rbg"))
  # Randomise every leaf so the comparison is not of mostly-zero biases.
  rs = np.random.RandomState(0)
  params = jax.tree.map(lambda p, s: jax.device_put(
      np.asarray(p) + 0.1 * rs.randn(*p.shape).astype(np.float32), s), params, shardings)
  if "tensor" in mesh_shape:
    spec = params["encoder"]["mid_block"]["resnets_0"]["conv1"]["kernel"].sharding.spec
    assert spec == P(None, None, "fsdp", "tensor")
  single = jax.tree.map(lambda p: jax.device_put(np.asarray(p), jax.devices()[0]), params)
  x = np.random.RandomState(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)

  def run(p, x):
    post = model.apply({"params": p}, x, method=vae.AutoencoderKL.encode)
    return post.mean, post.logvar, model.apply({"params": p}, post.mean,
                                               method=vae.AutoencoderKL.decode)

  ref = jax.jit(run)(single, x)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    xs = jax.device_put(x, parallel.batch_sharding(mesh, 4))
    out = jax.jit(run, in_shardings=(shardings, xs.sharding))(params, xs)
  assert len(out[2].sharding.device_set) == 8
  for a, b in zip(out, ref):
    assert _rel(a, b) < 1e-5
