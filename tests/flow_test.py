"""Tests for sd3jax.flow: densities, shift, formulations, samplers, guidance, a tiny trained model.

Measured numbers are printed (run with -s to see them); every assertion states its tolerance.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from sd3jax import flow

FORMULATIONS = ["rf", "eps_linear", "v_cosine", "edm"]


# ------------------------------------------------------------------------------------------------
# Densities and shift.
# ------------------------------------------------------------------------------------------------
DENSITY_CASES = [
    ("uniform", flow.get_density("uniform")),
    ("logit_normal(0,1)", flow.get_density("logit_normal")),
    ("logit_normal(0.5,0.6)", flow.get_density("logit_normal", m=0.5, s=0.6)),
    ("mode(1.29)", flow.get_density("mode", s=1.29)),
    ("mode(-0.5)", flow.get_density("mode", s=-0.5)),
    ("cosmap", flow.get_density("cosmap")),
    ("logit_normal(0,1) shift 3", flow.Shifted(flow.get_density("logit_normal"), 3.0)),
    ("mode(1.29) shift 3", flow.Shifted(flow.get_density("mode"), 3.0)),
]


@pytest.mark.parametrize("case", range(len(DENSITY_CASES)), ids=[c[0] for c in DENSITY_CASES])
def test_density_matches_analytic_cdf(case):
  label, density = DENSITY_CASES[case]
  rng = jax.random.PRNGKey(100 + case)  # one key per case: all samplers are monotone maps of u
  t = np.asarray(jax.jit(density.sample, static_argnums=1)(rng, (100_000,)))
  assert t.min() > 0 and t.max() < 1
  ks = scipy.stats.kstest(t, density.cdf)
  print(f"KS {label}: statistic={ks.statistic:.5f} p={ks.pvalue:.3f}")
  assert ks.pvalue > 0.01

  # pdf is the derivative of cdf, and ppf inverts cdf.
  grid = np.linspace(0.02, 0.98, 97)
  h = 1e-3
  numeric = (density.cdf(grid + h) - density.cdf(grid - h)) / (2 * h)
  np.testing.assert_allclose(density.pdf(grid), numeric, rtol=2e-3, atol=2e-3)
  u = np.linspace(0.01, 0.99, 99)
  np.testing.assert_allclose(density.cdf(np.asarray(density.ppf(u))), u, atol=2e-5)


def test_shift_maps_median():
  t = flow.get_density("logit_normal").sample(jax.random.PRNGKey(1), (100_000,))
  for shift in (1.0, 3.0, 4.0):
    median = float(np.median(np.asarray(flow.shift_time(t, shift))))
    expected = shift * 0.5 / (1 + (shift - 1) * 0.5)  # the unshifted median is sigmoid(0) = 0.5
    print(f"logit_normal(0,1) shift {shift}: median {median:.4f} expected {expected:.4f}")
    assert abs(median - expected) < 5e-3
  mode = flow.get_density("mode")
  m = float(mode.ppf(0.5))
  tm = np.asarray(flow.shift_time(mode.sample(jax.random.PRNGKey(2), (100_000,)), 3.0))
  assert abs(float(np.median(tm)) - 3 * m / (1 + 2 * m)) < 5e-3

  # The inverse shift, the pixel rule, and the shift of a non-rf clock acting on frame levels.
  t = np.linspace(0.01, 0.99, 50)
  np.testing.assert_allclose(flow.shift_time(flow.shift_time(t, 3.0), 1 / 3.0), t, rtol=1e-12)
  assert flow.resolution_shift(1024 * 1024) == 4.0 and flow.resolution_shift(256 * 256) == 1.0
  assert flow.resolution_shift(512 * 512, base_pixels=512 * 512) == 1.0
  for name in FORMULATIONS:
    f = flow.get_formulation(name)
    tt = jnp.linspace(0.05, 0.6, 20)  # eps_linear's shifted levels stay below its s_max here
    got, want = jax.jit(lambda t: (f.s_from_t(f.shift(t, 3.0)),
                                   flow.shift_time(f.s_from_t(t), 3.0)))(tt)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)


def test_mode_scale_outside_monotone_range_is_rejected():
  with pytest.raises(ValueError, match="monotone"):
    flow.get_density("mode", s=1.8)


def test_plot_densities(tmp_path):
  from PIL import Image
  path = flow.plot_densities(str(tmp_path / "densities.png"))
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size == (1600, 360)
    assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 10  # something was drawn


# ------------------------------------------------------------------------------------------------
# Formulations.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMULATIONS)
def test_formulation_conversions_are_consistent(name):
  f = flow.get_formulation(name)
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  x0 = jax.random.normal(k1, (16, 4, 4, 3))
  eps = jax.random.normal(k2, (16, 4, 4, 3))
  t = jnp.linspace(0.02, 0.98, 16)
  ends = jnp.array([0.0, 1.0])

  @jax.jit
  def compute(x0, eps, t):
    z, target = f.noisy(x0, eps, t), f.target(x0, eps, t)
    _, dz = jax.jvp(lambda t: f.noisy(x0, eps, t), (t,), (jnp.ones_like(t),))
    s = f.s_from_t(t)
    return dict(x0=f.to_x0(target, z, t), eps=f.to_eps(target, z, t), dz=dz,
                velocity=f.velocity(target, z, t), t=f.t_from_s(s), ab_s=f.ab_from_s(s),
                ab_t=f.ab(t), s_ends=f.s_from_t(ends), weight=f.loss_weight(t),
                ends=(f.noisy(x0[:2], eps[:2], ends), f.target(x0[:2], eps[:2], ends)))

  r = compute(x0, eps, t)
  np.testing.assert_allclose(r["x0"], x0, atol=2e-4)
  np.testing.assert_allclose(r["eps"], eps, atol=2e-4)
  # velocity is dz/dt of the forward process in the formulation's own time.
  np.testing.assert_allclose(r["velocity"], r["dz"], rtol=1e-4, atol=1e-4)
  # The straight-frame clock round-trips, and ab_from_s agrees with ab.
  np.testing.assert_allclose(r["t"], t, atol=1e-4)
  for got, want in zip(r["ab_s"], r["ab_t"]):
    np.testing.assert_allclose(got, want, atol=1e-4)
  # Both ends are finite; t = 0 is the data end, t = 1 the top frame level s_max.
  assert all(bool(jnp.all(jnp.isfinite(arr))) for arr in r["ends"])
  assert float(r["s_ends"][0]) == 0.0
  np.testing.assert_allclose(float(r["s_ends"][1]), f.s_max, rtol=1e-6)
  assert r["weight"].shape == (16,)


def test_paper_weights():
  """The paper's w_t (eq. 10 and section 3.1) for each formulation, up to a constant factor."""
  t = jnp.linspace(0.05, 0.95, 19)
  rf = flow.get_formulation("rf")
  np.testing.assert_allclose(jax.jit(rf.paper_weight)(t), t / (1 - t), rtol=1e-4)

  def ratio_spread(f, expected):
    r = np.asarray(jax.jit(f.paper_weight)(t)) / np.asarray(expected)
    return float(r.std() / r.mean())

  cos = flow.get_formulation("v_cosine")
  a, b = cos.ab(t)
  lam = 2 * jnp.log(a / b)
  assert ratio_spread(cos, jnp.exp(-lam / 2)) < 1e-4

  edm = flow.get_formulation("edm")
  a, b = edm.ab(t)
  lam = 2 * jnp.log(a / b)  # = -2 log sigma
  expected = scipy.stats.norm.pdf(np.asarray(lam), -2 * edm.p_mean, 2 * edm.p_std) * (
      np.exp(-np.asarray(lam)) + edm.sigma_data**2)
  assert ratio_spread(edm, expected) < 1e-4


def test_eps_linear_matches_ldm_discrete_schedule():
  from diffusers import DDPMScheduler
  ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                       num_train_timesteps=1000)
  alpha_bar = ddpm.alphas_cumprod.numpy().astype(np.float64)
  f = flow.get_formulation("eps_linear")
  a, b = f.ab((np.arange(1000) + 1) / 1000.0)  # discrete step k <-> t = (k + 1) / T
  da = np.abs(np.asarray(a) - np.sqrt(alpha_bar)).max()
  db = np.abs(np.asarray(b) - np.sqrt(1 - alpha_bar)).max()
  print(f"eps_linear vs LDM discrete: max |a diff| {da:.2e}, max |b diff| {db:.2e}")
  assert da < 2e-3 and db < 1e-3


def test_training_inputs_and_loss():
  f = flow.get_formulation("edm")
  x0 = jax.random.normal(jax.random.PRNGKey(4), (20_000, 2))
  z, t, target, weight = jax.jit(flow.training_inputs, static_argnums=(2, 3, 4))(
      jax.random.PRNGKey(5), x0, "edm", "uniform", 1.0)
  assert z.shape == target.shape == x0.shape and t.shape == weight.shape == (20_000,)
  assert float(t.min()) > 0 and float(t.max()) < 1
  np.testing.assert_allclose(f.to_x0(target, z, t), x0, atol=1e-3)  # z and target agree
  eps = f.to_eps(target, z, t)
  assert abs(float(eps.std()) - 1) < 0.02 and abs(float(eps.mean())) < 0.02

  # The shift is applied exactly once: rf + logit-normal(0, 1) + shift 3 has median 0.75.
  _, t3, _, _ = flow.training_inputs(jax.random.PRNGKey(6), x0, "rf", "logit_normal", 3.0)
  assert abs(float(jnp.median(t3)) - 0.75) < 0.01

  pred = (target + 0.1 * z).astype(jnp.bfloat16)
  got = flow.loss(pred, target, weight)
  want = np.mean(np.asarray(weight) * np.mean(
      (np.asarray(pred, np.float32) - np.asarray(target)) ** 2, axis=1))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Samplers against diffusers.
# ------------------------------------------------------------------------------------------------
def _velocity_np(z, t):
  return 0.5 * z - 0.3 * (1 - t) + 0.1 * z * t


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigmas_and_euler_match_diffusers(steps, shift):
  import torch
  from diffusers import FlowMatchEulerDiscreteScheduler
  sched = FlowMatchEulerDiscreteScheduler(shift=shift)
  sched.set_timesteps(steps)
  ours = flow.sigmas(steps, shift)
  sigma_diff = np.abs(ours - sched.sigmas.numpy()).max()

  z1 = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (3, 8, 8, 4)))
  x = torch.from_numpy(z1.copy())
  for i, timestep in enumerate(sched.timesteps):
    x = sched.step(_velocity_np(x, sched.sigmas[i]), timestep, x).prev_sample
  fn = lambda z, t: _velocity_np(z, t[:, None, None, None])
  got = jax.jit(lambda z: flow.sample(fn, z, steps, "euler", shift))(jnp.asarray(z1))
  sample_diff = np.abs(np.asarray(got) - x.numpy()).max()
  print(f"steps={steps} shift={shift}: max |sigma diff| {sigma_diff:.2e}, "
        f"max |sample diff| {sample_diff:.2e}")
  assert ours.shape == (steps + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
  assert sigma_diff <= 1e-6 and sample_diff <= 1e-6


# ------------------------------------------------------------------------------------------------
# Samplers on Gaussian data, where the exact posterior is known.
# ------------------------------------------------------------------------------------------------
MU = jnp.array([1.5, -0.7, 0.8, 2.0])
SD = jnp.array([0.5, 1.0, 2.0, 0.2])


def _gaussian_model(f):
  """The exact network for x0 ~ N(MU, diag SD^2), in f's own parameterisation."""
  def model_fn(z, t):
    a, b = (c[:, None] for c in f.ab(t))
    var = a**2 * SD**2 + b**2
    r = z - a * MU
    return f.target(MU + a * SD**2 / var * r, b / var * r, t)  # E[x0 | z], E[eps | z]
  return model_fn


def _gaussian_z1(f, n=20_000):
  """z1 from the exact t = 1 marginal (z1 = z_1 / b(1)): eps_linear's a(1) = 0.07 is not ignored."""
  xi = jax.random.normal(jax.random.PRNGKey(8), (n, 4))
  xi = (xi - xi.mean(0)) / xi.std(0)  # exact first two moments: the sample map is affine
  a1, b1 = (float(c) for c in f.ab(1.0))
  return a1 * MU / b1 + jnp.sqrt((a1 * SD) ** 2 + b1**2) / b1 * xi


def _moment_errors(f, sampler, steps, shift):
  out = jax.jit(lambda z: flow.sample(_gaussian_model(f), z, steps, sampler, shift, f))(
      _gaussian_z1(f))
  assert bool(jnp.all(jnp.isfinite(out)))
  mu_err = np.abs(np.asarray(out.mean(0) - MU) / MU).max()
  sd_err = np.asarray(out.std(0) / SD - 1)
  return mu_err, sd_err


@pytest.mark.parametrize("name", FORMULATIONS)
def test_heun_recovers_gaussian(name):
  f = flow.get_formulation(name)
  for shift in (1.0, 3.0):
    mu_err, sd_err = _moment_errors(f, "heun", 50, shift)
    print(f"{name} heun 50 shift {shift}: max rel mu err {mu_err:.2e}, "
          f"max rel sigma err {np.abs(sd_err).max():.2e}")
    assert mu_err < 0.01 and np.abs(sd_err).max() < 0.01


def test_sampler_orders_on_gaussian():
  """Euler halves its error when the steps double, Heun quarters it; DPM-Solver++(2M) within 2%."""
  f = flow.get_formulation("rf")
  e25, e50 = (np.abs(_moment_errors(f, "euler", n, 1.0)[1]).max() for n in (25, 50))
  h25, h50 = (np.abs(_moment_errors(f, "heun", n, 1.0)[1]).max() for n in (25, 50))
  d50 = np.abs(_moment_errors(f, "dpmpp_2m", 50, 1.0)[1]).max()
  print(f"sigma err: euler 25/50 {e25:.4f}/{e50:.4f}, heun 25/50 {h25:.5f}/{h50:.5f}, "
        f"dpmpp_2m 50 {d50:.4f}")
  assert 1.8 < e25 / e50 < 2.2 and 3.5 < h25 / h50 < 4.5 and d50 < 0.02


@pytest.mark.parametrize("name", FORMULATIONS)
def test_euler_is_ddim(name):
  """Euler in the straight frame is DDIM in the formulation's own coordinates (public API only)."""
  f = flow.get_formulation(name)
  fn = lambda z, t: jnp.tanh(z) * t[:, None] + 0.1 * z
  z1 = jax.random.normal(jax.random.PRNGKey(9), (4, 6))
  got = flow.sample(fn, z1, 6, "euler", 2.0, f)

  levels = flow.sigmas(6, 2.0).astype(np.float64) * f.s_max
  t = f.t_from_s(levels[0])
  z = f.ab(t)[1] * z1
  for s_next in levels[1:]:
    tv = jnp.full((4,), t)
    x0, eps = f.to_x0(fn(z, tv), z, tv), f.to_eps(fn(z, tv), z, tv)
    if s_next == 0:
      break
    t = f.t_from_s(s_next)
    a, b = f.ab(t)
    z = a * x0 + b * eps
  np.testing.assert_allclose(got, x0, rtol=1e-4, atol=1e-4)  # measured <= 4e-6


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_terminal_step_is_finite(sampler):
  fn = lambda z, t: 3.0 * jnp.sin(z) + t[:, None] - 1.0
  z1 = jax.random.normal(jax.random.PRNGKey(10), (8, 5))
  for name in FORMULATIONS:
    for steps in (1, 7):  # 7: first, second-order and both first-order end steps of dpmpp_2m
      out = flow.sample(fn, z1, steps, sampler, 3.0, name)
      assert bool(jnp.all(jnp.isfinite(out))), (name, steps)


def test_sampler_jits_and_vmaps():
  fn = lambda z, t: jnp.tanh(z) - t[:, None] * z
  zs = jax.random.normal(jax.random.PRNGKey(11), (3, 4, 2))
  for sampler, name in [("heun", "edm"), ("dpmpp_2m", "rf"), ("euler", "v_cosine")]:
    run = lambda z: flow.sample(fn, z, 8, sampler, 3.0, name)
    batched = jax.jit(jax.vmap(run))(zs)
    singles = jnp.stack([jax.jit(run)(z) for z in zs])
    np.testing.assert_allclose(batched, singles, rtol=1e-5, atol=1e-5)
  lowered = jax.jit(run).lower(zs[0]).as_text()
  assert "while" in lowered  # the steps are a scan, not an unrolled Python loop


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance.
# ------------------------------------------------------------------------------------------------
def test_cfg():
  batches = []
  gains = {2: [2.0, -1.0], 3: [2.0, 0.5, -1.0]}  # [cond; uncond] or [text+image; image; none]

  def model_fn(z, t):
    batches.append(z.shape[0])
    gain = jnp.repeat(jnp.array(gains[z.shape[0] // 4]), 4)[:, None]
    return gain * z + t[:, None]

  z = jax.random.normal(jax.random.PRNGKey(12), (4, 3))
  t = jnp.full((4,), 0.3)
  cond, image, uncond = 2.0 * z + 0.3, 0.5 * z + 0.3, -1.0 * z + 0.3
  np.testing.assert_allclose(flow.cfg(model_fn, 1.0)(z, t), cond, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(flow.cfg(model_fn, 4.5)(z, t), uncond + 4.5 * (cond - uncond),
                             rtol=1e-5, atol=1e-5)
  dual = flow.cfg(model_fn, 7.5, image_scale=1.5)(z, t)
  np.testing.assert_allclose(dual, uncond + 1.5 * (image - uncond) + 7.5 * (cond - image),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(flow.cfg(model_fn, 1.0, image_scale=1.0)(z, t), cond, atol=1e-5)
  assert batches == [8, 8, 12, 12]  # one batched network call per evaluation
  # Guidance inside a jitted sampler, with a traced scale.
  out = jax.jit(lambda z, s: flow.sample(flow.cfg(model_fn, s), z, 5, "heun"))(z, 3.0)
  assert out.shape == z.shape and bool(jnp.all(jnp.isfinite(out)))


def test_cfg_interval_guides_only_at_or_below_max_t():
  """max_t < 1: the conditional prediction itself above max_t, plain CFG at or below it, per
  example; 1.0 is plain CFG at every t."""
  def model_fn(z, t):  # [cond; uncond] = [2 z + t; -z + t], dual: [2 z; z / 2; -z] + t
    n = z.shape[0] // 4
    gain = jnp.repeat(jnp.array([2.0, -1.0] if n == 2 else [2.0, 0.5, -1.0]), 4)[:, None]
    return gain * z + t[:, None]

  z = jax.random.normal(jax.random.PRNGKey(13), (4, 3))
  t = jnp.array([0.2, 0.85, 0.86, 1.0])
  cond, image, uncond = 2.0 * z + t[:, None], 0.5 * z + t[:, None], -z + t[:, None]
  guided = uncond + 5.0 * (cond - uncond)
  on = np.array([True, True, False, False])[:, None]
  out = flow.cfg(model_fn, 5.0, max_t=0.85)(z, t)
  np.testing.assert_allclose(out, np.where(on, guided, cond), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(flow.cfg(model_fn, 5.0, max_t=1.0)(z, t),
                                flow.cfg(model_fn, 5.0)(z, t))
  dual = flow.cfg(model_fn, 4.0, image_scale=2.5, max_t=0.85)(z, t)
  dual_guided = uncond + 2.5 * (image - uncond) + 4.0 * (cond - image)
  np.testing.assert_allclose(dual, np.where(on, dual_guided, cond), rtol=1e-5, atol=1e-5)
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match="max_t must be in"):
      flow.cfg(model_fn, 5.0, max_t=bad)


def test_cfg_interval_runs_the_conditional_pass_alone_above_max_t():
  """With cond_fn, an evaluation whose every t is above max_t is one pass of cond_fn instead
  of the batched [cond; uncond] call; a batch at or below max_t, or of mixed t, is guided as
  without it. Same predictions either way."""
  def model_fn(z, t):  # [cond; uncond] = [2 z + t; -z + t]
    gain = jnp.repeat(jnp.array([2.0, -1.0]), z.shape[0] // 2)[:, None]
    return gain * z + t[:, None]

  def cond_fn(z, t):
    return 2.0 * z + t[:, None]

  z = jax.random.normal(jax.random.PRNGKey(14), (3, 4))
  for t in ([0.9, 0.95, 1.0], [0.2, 0.5, 0.85], [0.2, 0.9, 1.0]):
    t = jnp.array(t)
    want = flow.cfg(model_fn, 5.0, max_t=0.85)(z, t)
    got = jax.jit(flow.cfg(model_fn, 5.0, max_t=0.85, cond_fn=cond_fn))(z, t)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  marked = flow.cfg(model_fn, 5.0, max_t=0.85, cond_fn=lambda z, t: cond_fn(z, t) + 100.0)
  above, mixed = jnp.array([0.9, 0.95, 1.0]), jnp.array([0.2, 0.9, 1.0])
  np.testing.assert_allclose(marked(z, above), cond_fn(z, above) + 100.0, atol=1e-5)
  np.testing.assert_allclose(marked(z, mixed), flow.cfg(model_fn, 5.0, max_t=0.85)(z, mixed),
                             atol=1e-6)


def test_autoguide_above_min_t_and_the_guided_prediction_below():
  """Above min_t: weak + scale (cond - weak); at or below: guided_fn; per example when a
  batch mixes levels; scale 1 is the conditional prediction."""
  cond_fn = lambda z, t: 2.0 * z + t[:, None]
  weak_fn = lambda z, t: 0.5 * z - t[:, None]
  guided_fn = lambda z, t: -3.0 * z
  z = jax.random.normal(jax.random.PRNGKey(14), (4, 3))
  for t in (jnp.array([0.2, 0.85, 0.86, 1.0]), jnp.full((4,), 0.9), jnp.full((4,), 0.5)):
    high = np.asarray(t > 0.85)[:, None]
    auto = weak_fn(z, t) + 4.0 * (cond_fn(z, t) - weak_fn(z, t))
    out = jax.jit(flow.autoguide(guided_fn, cond_fn, weak_fn, 4.0, 0.85))(z, t)
    np.testing.assert_allclose(out, np.where(high, auto, guided_fn(z, t)), rtol=1e-5, atol=1e-5)
    one = flow.autoguide(guided_fn, cond_fn, weak_fn, 1.0, 0.85)(z, t)
    np.testing.assert_allclose(one, np.where(high, cond_fn(z, t), guided_fn(z, t)), rtol=1e-6,
                               atol=1e-6)


# ------------------------------------------------------------------------------------------------
# A tiny model trained with rf + logit-normal on a 2-D mixture of Gaussians.
# ------------------------------------------------------------------------------------------------
def _mixture(rng, n, modes=8, radius=1.5, std=0.15):
  r1, r2 = jax.random.split(rng)
  angle = 2 * jnp.pi * jax.random.randint(r1, (n,), 0, modes) / modes
  centers = radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
  return centers + std * jax.random.normal(r2, (n, 2))


class _MLP(nn.Module):
  width: int = 64

  @nn.compact
  def __call__(self, z, t):
    freqs = jnp.arange(1, 9, dtype=jnp.float32)
    h = jnp.concatenate([z, jnp.sin(jnp.pi * t[:, None] * freqs),
                         jnp.cos(jnp.pi * t[:, None] * freqs)], -1)
    for _ in range(3):
      h = nn.silu(nn.Dense(self.width)(h))
    return nn.Dense(2)(h)


def _energy_distance(x, y):
  """2 E|X - Y| - E|X - X'| - E|Y - Y'| (zero iff the distributions are equal)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mean_dist = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).mean()
  return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def test_tiny_mlp_learns_mixture():
  model, steps, batch = _MLP(), 2000, 256
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
  opt = optax.adam(optax.cosine_decay_schedule(5e-3, steps, 0.02))

  @jax.jit
  def train(params, rng):
    def step(state, rng):
      params, opt_state = state
      r1, r2 = jax.random.split(rng)
      x0 = _mixture(r1, batch)

      def loss_fn(p):
        z, t, target, weight = flow.training_inputs(r2, x0, "rf", "logit_normal")
        return flow.loss(model.apply(p, z, t), target, weight)

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    init = (params, opt.init(params))
    (params, _), losses = jax.lax.scan(step, init, jax.random.split(rng, steps))
    return params, losses

  trained, losses = train(params, jax.random.PRNGKey(1))
  z1 = jax.random.normal(jax.random.PRNGKey(2), (2000, 2))
  data = _mixture(jax.random.PRNGKey(3), 2000)
  draw = jax.jit(lambda p: flow.sample(lambda z, t: model.apply(p, z, t), z1, 50, "heun"))
  e_trained = _energy_distance(draw(trained), data)
  e_untrained = _energy_distance(draw(params), data)
  e_floor = _energy_distance(_mixture(jax.random.PRNGKey(4), 2000), data)
  print(f"energy distance: trained {e_trained:.4f}, untrained {e_untrained:.4f}, "
        f"data vs data {e_floor:.4f}; loss {float(losses[:100].mean()):.3f} -> "
        f"{float(losses[-200:].mean()):.3f}")
  assert e_trained < 0.02 and e_trained < 0.25 * e_untrained
