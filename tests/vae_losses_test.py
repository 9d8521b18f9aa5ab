"""VAE training losses and metrics: closed forms, references, and the combined step loss."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.numpy import save_file

from sd3jax import vae_losses as L
from sd3jax.models import vae


def _random_params(module_init, seed=0):
  """Random numpy params from abstract shapes (no init compile); kernels ~ 1/sqrt(fan_in)."""
  abstract = nn.unbox(jax.eval_shape(module_init, jax.random.key(0)))
  rs = np.random.RandomState(seed)

  def draw(path, leaf):
    noise = rs.randn(*leaf.shape).astype(np.float32)
    if path[-1].key == "kernel":
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return (1.0 if path[-1].key == "scale" else 0.0) + 0.05 * noise

  return jax.tree_util.tree_map_with_path(draw, abstract)


# ----------------------------------------------------------------------------- posterior


def test_kl_matches_closed_form_and_diffusers():
  rs = np.random.RandomState(0)
  mean = rs.randn(2, 3, 5, 4).astype(np.float32)
  logvar = rs.uniform(-3, 2, (2, 3, 5, 4)).astype(np.float32)
  logvar[0, 0, 0, :2] = (25.0, -40.0)  # outside the clamp range
  post = vae.DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], -1))
  ref = DiagonalGaussianDistribution(torch.from_numpy(
      np.concatenate([mean, logvar], -1).transpose(0, 3, 1, 2).copy()))
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(post.logvar, nhwc(ref.logvar))
  assert float(post.logvar.max()) == 20.0 and float(post.logvar.min()) == -30.0
  np.testing.assert_allclose(post.std, nhwc(ref.std), rtol=1e-6)
  np.testing.assert_allclose(post.kl(), ref.kl().numpy(), rtol=1e-6)
  lv = np.clip(logvar.astype(np.float64), -30, 20)
  closed = 0.5 * (mean.astype(np.float64) ** 2 + np.exp(lv) - 1.0 - lv).sum((1, 2, 3))
  np.testing.assert_allclose(post.kl(), closed, rtol=1e-6)
  np.testing.assert_allclose(L.kl_loss(post), closed.mean(), rtol=1e-6)
  z = rs.randn(*mean.shape).astype(np.float32)
  z_t = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
  np.testing.assert_allclose(post.nll(z), ref.nll(z_t).numpy(), rtol=1e-5)
  np.testing.assert_array_equal(post.mode(), mean)
  key = jax.random.key(0)
  np.testing.assert_allclose(post.sample(key),
                             mean + post.std * jax.random.normal(key, mean.shape), rtol=1e-6)


# ------------------------------------------------------------------------------ GAN terms


def test_hinge_vanilla_and_generator_losses():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = (0, .5, 2), relu(1 + fake) = (0, 1, 2).
  np.testing.assert_allclose(L.hinge_d_loss(real, fake), 0.5 * (2.5 / 3 + 3.0 / 3), rtol=1e-6)
  np.testing.assert_allclose(L.generator_adv_loss(fake), 1.0 / 3, rtol=1e-6)
  sp = lambda x: np.log1p(np.exp(x))
  want = 0.5 * (sp(-np.array([2.0, 0.5, -1.0])).mean() + sp(np.array([-2.0, 0.0, 1.0])).mean())
  np.testing.assert_allclose(L.vanilla_d_loss(real, fake), want, rtol=1e-6)
  # A perfect discriminator (margin met) has zero hinge loss.
  assert float(L.hinge_d_loss(jnp.full(4, 3.0), jnp.full(4, -3.0))) == 0.0


def test_adaptive_weight_on_a_linear_toy():
  """Last layer W; rec = ||W x - y||^2, gan = c . (W x): both gradients are closed forms."""
  rs = np.random.RandomState(0)
  w0 = rs.randn(3, 4).astype(np.float32)
  x, y, c = rs.randn(4).astype(np.float32), rs.randn(3).astype(np.float32), rs.randn(3)
  c = c.astype(np.float32)
  rec_grad = jax.grad(lambda w: jnp.sum(jnp.square(w @ x - y)))(w0)
  gan_grad = jax.grad(lambda w: jnp.dot(c, w @ x))(w0)
  np.testing.assert_allclose(rec_grad, 2 * np.outer(w0 @ x - y, x), rtol=1e-5)
  np.testing.assert_allclose(gan_grad, np.outer(c, x), rtol=1e-5)
  want = np.linalg.norm(2 * np.outer(w0 @ x - y, x)) / (np.linalg.norm(np.outer(c, x)) + 1e-4)
  np.testing.assert_allclose(L.adaptive_weight(rec_grad, gan_grad, 0.5), 0.5 * want, rtol=1e-5)
  # Clamped at max_weight when the GAN gradient vanishes; no gradient flows through it.
  np.testing.assert_allclose(L.adaptive_weight(rec_grad, 0 * gan_grad, 0.5), 0.5 * 1e4)
  g = jax.grad(lambda r: L.adaptive_weight(r, gan_grad))(rec_grad)
  assert not np.any(np.asarray(g))


def test_disc_gate():
  gate = jax.jit(lambda s: L.disc_gate(s, 100, 0.7))
  assert [float(gate(s)) for s in (0, 99, 100, 5000)] == [0.0, 0.0, pytest.approx(0.7),
                                                          pytest.approx(0.7)]


def test_patch_discriminator_matches_taming_layout():
  """NLayerDiscriminator's conv / stride / padding layout, checked against torch."""
  disc = L.PatchDiscriminator(ndf=8, n_layers=2)
  x = np.random.RandomState(0).uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)
  boxed = jax.eval_shape(lambda k: disc.init(k, x), jax.random.key(0))["params"]
  names = {n for b in jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
           for n in b.names}
  assert names == {None, "conv_image", "conv_in", "conv_out", "norm"}
  params = _random_params(lambda k: disc.init(k, x)["params"])
  assert "bias" not in params["conv_1"] and "bias" in params["conv_0"]
  logits = jax.jit(lambda p: disc.apply({"params": p}, x))(params)
  # 32x24 -> 16x12 -> 8x6 (stride 2), -> 7x5 -> 6x4 (4x4, stride 1, pad 1).
  assert logits.shape == (2, 6, 4, 1)
  tn = torch.nn
  ref = tn.Sequential(
      tn.Conv2d(3, 8, 4, 2, 1), tn.LeakyReLU(0.2),
      tn.Conv2d(8, 16, 4, 2, 1, bias=False), tn.GroupNorm(16, 16, eps=1e-6), tn.LeakyReLU(0.2),
      tn.Conv2d(16, 32, 4, 1, 1, bias=False), tn.GroupNorm(32, 32, eps=1e-6), tn.LeakyReLU(0.2),
      tn.Conv2d(32, 1, 4, 1, 1))
  hwio = lambda k: torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy())
  vec = lambda v: torch.from_numpy(np.asarray(v).copy())
  with torch.no_grad():
    for i, name in ((0, "conv_0"), (2, "conv_1"), (5, "conv_2"), (8, "conv_3")):
      ref[i].weight.copy_(hwio(params[name]["kernel"]))
      if "bias" in params[name]:
        ref[i].bias.copy_(vec(params[name]["bias"]))
    for i, name in ((3, "norm_1"), (6, "norm_2")):
      ref[i].weight.copy_(vec(params[name]["scale"]))
      ref[i].bias.copy_(vec(params[name]["bias"]))
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- combined loss


def _tiny_setup():
  cfg = vae.VAEConfig(block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                      norm_num_groups=4)
  model = vae.AutoencoderKL(cfg)
  disc = L.PatchDiscriminator(ndf=8, n_layers=1)
  x = np.random.RandomState(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  params = {"vae": _random_params(model.init_params, 0),
            "disc": _random_params(lambda k: disc.init(k, x)["params"], 1)}
  return model, disc, params, jnp.asarray(x)


def test_vae_train_losses_gradients_and_adaptive_weight():
  model, disc, params, x = _tiny_setup()
  lc = L.VAELossConfig(disc_start=10, kl_weight=1e-2, disc_weight=0.5)
  rng = jax.random.key(3)

  def parts(p, step):
    total, m = L.vae_train_losses(model, disc, p, x, rng, step, lc)
    return jnp.stack([total, m["gen_loss"], m["disc_factor"] * m["d_loss"]]), m

  jac_fn = jax.jit(jax.jacrev(parts, has_aux=True))
  zero = lambda tree: not any(np.any(np.asarray(v)) for v in jax.tree.leaves(tree))
  close = lambda a, b: all(np.allclose(u, v, rtol=1e-5, atol=1e-8) for u, v in
                           zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  pick = lambda tree, i: jax.tree.map(lambda v: v[i], tree)

  jac, m = jac_fn(params, 10)  # discriminator on
  g_total, g_gen, g_d = pick(jac, 0), pick(jac, 1), pick(jac, 2)
  assert zero(g_gen["disc"]) and zero(g_d["vae"])  # each network sees the other as fixed
  assert close(g_total["vae"], g_gen["vae"]) and close(g_total["disc"], g_d["disc"])
  assert not zero(g_total["disc"]) and not zero(g_total["vae"])
  assert float(m["disc_factor"]) == 1.0 and float(m["d_weight"]) > 0
  want = (m["nll"] + lc.kl_weight * m["kl"] + m["d_weight"] * m["g_loss"] + m["d_loss"])
  np.testing.assert_allclose(m["loss"], want, rtol=1e-6)
  assert set(m) == {"rec_loss", "nll", "kl", "g_loss", "d_weight", "disc_factor", "d_loss",
                    "logits_real", "logits_fake", "gen_loss", "loss"}

  # The adaptive weight is taming's: gradients of the two losses w.r.t. the decoder's last
  # kernel, here taken through the whole forward pass with that kernel swapped in.
  def forward_with_kernel(k):
    p = jax.tree.map(lambda v: v, params["vae"])
    p["decoder"]["conv_out"]["kernel"] = k
    post = model.apply({"params": p}, x, method=vae.AutoencoderKL.encode)
    return model.apply({"params": p}, post.sample(rng), method=vae.AutoencoderKL.decode)

  k0 = params["vae"]["decoder"]["conv_out"]["kernel"]
  rec_grad = jax.grad(lambda k: L.reconstruction_loss(x, forward_with_kernel(k)))(k0)
  gan_grad = jax.grad(lambda k: L.generator_adv_loss(
      disc.apply({"params": params["disc"]}, forward_with_kernel(k))))(k0)
  np.testing.assert_allclose(m["d_weight"], L.adaptive_weight(rec_grad, gan_grad, 0.5),
                             rtol=1e-5)
  post = model.apply({"params": params["vae"]}, x, method=vae.AutoencoderKL.encode)
  np.testing.assert_allclose(m["kl"], post.kl().mean() / (16 * 16 * 3), rtol=1e-5)
  np.testing.assert_allclose(m["rec_loss"], L.reconstruction_loss(x, forward_with_kernel(k0)),
                             rtol=1e-5)

  jac, m = jac_fn(params, 9)  # before disc_start: no GAN terms, no discriminator gradient
  assert zero(pick(jac, 0)["disc"])
  assert float(m["disc_factor"]) == 0.0 and float(m["d_loss"]) == 0.0
  np.testing.assert_allclose(m["loss"], m["nll"] + lc.kl_weight * m["kl"], rtol=1e-6)


def test_vae_train_losses_perceptual_and_absent_terms():
  model, disc, params, x = _tiny_setup()
  rng = jax.random.key(0)
  feats = lambda im: [im, nn.avg_pool(im, (2, 2), (2, 2))]
  lc = L.VAELossConfig(rec_loss="l2", perceptual_weight=0.3, disc_weight=0.0)
  loss, m = jax.jit(lambda p: L.vae_train_losses(model, disc, p, x, rng, 0, lc, feats))(params)
  assert "perceptual" in m and "g_loss" not in m and "d_loss" not in m
  recon, _ = model.apply({"params": params["vae"]}, x, rng=rng)
  np.testing.assert_allclose(m["perceptual"], L.perceptual_loss(feats, x, recon), rtol=1e-5)
  np.testing.assert_allclose(m["rec_loss"], jnp.square(recon - x).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["nll"], m["rec_loss"] + 0.3 * m["perceptual"], rtol=1e-6)
  with pytest.raises(ValueError, match="no perceptual network is configured"):
    L.vae_train_losses(model, disc, params, x, rng, 0, lc, None)
  with pytest.raises(ValueError, match="needs a feature network"):
    L.perceptual_loss(None, x, x)
  with pytest.raises(ValueError, match="rec_loss"):
    L.VAELossConfig(rec_loss="l3")
  with pytest.raises(ValueError, match="rec_loss"):
    L.reconstruction_loss(x, x, "huber")


# ---------------------------------------------------------------------------- perceptual


def _tiny_vgg(widths, seed):
  """torchvision's vgg16().features layout with small widths, random weights."""
  tn, layers, cin, w = torch.nn, [], 3, iter(widths)
  torch.manual_seed(seed)
  for item in L._VGG16:
    if item == "M":
      layers.append(tn.MaxPool2d(2, 2))
    else:
      cout = next(w)
      layers += [tn.Conv2d(cin, cout, 3, padding=1), tn.ReLU()]
      cin = cout
  return tn.Sequential(*layers).eval()


def test_lpips_vgg16_loader_matches_torch(tmp_path):
  widths = (4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8)
  ref = _tiny_vgg(widths, 0)
  rs = np.random.RandomState(0)
  lin = [rs.uniform(0, 1, (1, c, 1, 1)).astype(np.float32) for c in (4, 8, 8, 8, 8)]
  state = {f"features.{k}": v.numpy() for k, v in ref.state_dict().items()}
  state.update({f"lin{i}.model.1.weight": w for i, w in enumerate(lin)})
  save_file(state, str(tmp_path / "lpips.safetensors"))
  net = L.load_lpips_vgg16(str(tmp_path / "lpips.safetensors"))
  x = rs.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + 0.3 * rs.randn(*x.shape), -1, 1).astype(np.float32)
  dist = jax.jit(lambda n, a, b: L.perceptual_loss(n, a, b))
  got = dist(net, x, y)

  def torch_lpips(a, b):
    shift = torch.tensor(L._LPIPS_SHIFT).view(1, 3, 1, 1)
    scale = torch.tensor(L._LPIPS_SCALE).view(1, 3, 1, 1)
    feats = []
    for im in (a, b):
      h, out = (torch.from_numpy(im.transpose(0, 3, 1, 2).copy()) - shift) / scale, []
      for i, layer in enumerate(ref):
        h = layer(h)
        if i in L._LPIPS_TAPS:
          out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
      feats.append(out)
    return sum(((fa - fb).pow(2) * torch.from_numpy(w)).sum(1).mean()
               for fa, fb, w in zip(*feats, lin)).item()

  with torch.no_grad():
    want = torch_lpips(x, y)
  print(f"lpips jax {float(got):.6f} torch {want:.6f}")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(float(dist(net, x, x))) < 1e-10  # the same features up to rounding
  pooled = L.pooled_features(net, x)
  np.testing.assert_allclose(pooled, np.asarray(net(x)[-1]).mean((1, 2)), rtol=1e-6)
  assert pooled.shape == (2, 8)
  # The lpips package's own names (net.sliceK.N) load to the same network.
  slices = {0: 1, 5: 2, 10: 3, 17: 4, 24: 5}
  renamed = {}
  for k, v in state.items():
    if k.startswith("features."):
      idx = int(k.split(".")[1])
      s = max(i for i in slices if i <= idx)
      k = f"net.slice{slices[s]}.{idx}.{k.split('.')[2]}"
    renamed[k] = v
  (tmp_path / "pkg").mkdir()
  save_file(renamed, str(tmp_path / "pkg" / "model.safetensors"))
  np.testing.assert_allclose(dist(L.load_lpips_vgg16(str(tmp_path / "pkg")), x, y), got,
                             rtol=1e-6)
  del state["features.28.weight"], state["features.28.bias"]
  save_file(state, str(tmp_path / "broken.safetensors"))
  with pytest.raises(ValueError, match="does not hold VGG16 features"):
    L.load_lpips_vgg16(str(tmp_path / "broken.safetensors"))
  with pytest.raises(FileNotFoundError):
    L.load_lpips_vgg16(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------- metrics


def _ssim_numpy(a, b, win=11, sigma=1.5, data_range=1.0):
  """SSIM by its definition: Gaussian-weighted statistics of every valid 11x11 window."""
  g = np.exp(-((np.arange(win) - (win - 1) / 2) ** 2) / (2 * sigma ** 2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  out = []
  for ai, bi in zip(np.asarray(a, np.float64), np.asarray(b, np.float64)):
    va = np.lib.stride_tricks.sliding_window_view(ai, (win, win), axis=(0, 1))
    vb = np.lib.stride_tricks.sliding_window_view(bi, (win, win), axis=(0, 1))
    mu_a, mu_b = (va * w).sum((-1, -2)), (vb * w).sum((-1, -2))
    da, db = va - mu_a[..., None, None], vb - mu_b[..., None, None]
    var_a, var_b = (da * da * w).sum((-1, -2)), (db * db * w).sum((-1, -2))
    cov = (da * db * w).sum((-1, -2))
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) *
                                                     (var_a + var_b + c2))
    out.append(s.mean())
  return np.array(out)


def test_psnr_known_values():
  a = jnp.zeros((2, 8, 8, 3))
  np.testing.assert_allclose(L.psnr(a, a + 0.1), [20.0, 20.0], rtol=1e-5)
  signs = np.where(np.indices((1, 8, 8, 3)).sum(0) % 2, 1.0, -1.0)
  np.testing.assert_allclose(L.psnr(a[:1] + 0.5, 0.5 + 0.05 * signs), [10 * np.log10(400)],
                             rtol=1e-5)  # mse = 0.0025 -> 26.02 dB
  np.testing.assert_allclose(L.psnr(a, a), [100.0, 100.0])
  np.testing.assert_allclose(L.psnr(a * 255, a * 255 + 25.5, data_range=255.0), [20.0, 20.0],
                             rtol=1e-5)


def test_ssim_identical_constant_and_noise_against_numpy():
  rs = np.random.RandomState(0)
  a = rs.uniform(0, 1, (2, 24, 20, 3)).astype(np.float32)
  np.testing.assert_allclose(L.ssim(a, a), [1.0, 1.0], atol=1e-6)
  # Constant images: zero variance, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
  c1 = 1e-4
  want = (2 * 0.3 * 0.5 + c1) / (0.3 ** 2 + 0.5 ** 2 + c1)
  np.testing.assert_allclose(L.ssim(jnp.full((1, 16, 16, 1), 0.3), jnp.full((1, 16, 16, 1), 0.5)),
                             [want], rtol=1e-5)
  for noise in (0.05, 0.3):
    b = np.clip(a + noise * rs.randn(*a.shape), 0, 1).astype(np.float32)
    got, ref = np.asarray(L.ssim(a, b)), _ssim_numpy(a, b)
    print(f"ssim noise {noise}: jax {got} numpy {ref}")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert np.all(ref < 0.999)
  m = L.reconstruction_metrics(jnp.asarray(a) * 2 - 1, jnp.asarray(b) * 2 - 1)
  np.testing.assert_allclose(m["ssim"], _ssim_numpy(a, b).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["psnr"], L.psnr(a, b).mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="smaller than the 11x11 window"):
    L.ssim(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))


def test_frechet_distance_is_the_one_in_evals_features():
  """The VAE's rFID uses sd3jax.evals.features; vae_losses keeps no second copy."""
  from sd3jax.evals import features
  assert not hasattr(L, "frechet_distance") and not hasattr(L, "feature_statistics")
  rs = np.random.RandomState(0)
  f = rs.randn(500, 6)
  mu, sigma = features.feature_stats(f)
  np.testing.assert_allclose(mu, f.mean(0))
  assert abs(features.fid_from_stats(mu, sigma, mu, sigma)) < 1e-8
  # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2.
  s1, s2 = rs.uniform(0.5, 2, 6), rs.uniform(0.5, 2, 6)
  m1, m2 = rs.randn(6), rs.randn(6)
  want = np.square(m1 - m2).sum() + np.square(np.sqrt(s1) - np.sqrt(s2)).sum()
  np.testing.assert_allclose(features.fid_from_stats(m1, np.diag(s1), m2, np.diag(s2)), want,
                             rtol=1e-9)
