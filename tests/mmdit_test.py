"""MM-DiT: parity with diffusers' SD3Transformer2DModel, layouts, remat, sharding, sizes."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from sd3jax import parallel
from sd3jax.interop import diffusers as di
from sd3jax.models import mmdit

# Tiny configs of the three released architectures (head_dim 16, 2 heads).
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
            pooled_projection_dim=12, pos_embed_max_size=12)
VARIANTS = {
    "sd3": dict(num_layers=3),
    "sd35_large": dict(num_layers=3, qk_norm="rms_norm"),
    "sd35_medium": dict(num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def reference(request, tmp_path_factory):
  """A randomly initialised diffusers model (every weight random, norms included), saved."""
  torch.manual_seed(0)
  model = SD3Transformer2DModel(**TINY, **VARIANTS[request.param])
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.normal_(0.0, 0.1)
  folder = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(folder)
  return model.eval(), folder


def _inputs(rng, b, h, w, text_len, c=4, joint=24, pooled=12):
  x = rng.standard_normal((b, h, w, c)).astype(np.float32)
  t = rng.uniform(0, 1, (b,)).astype(np.float32)
  ctx = rng.standard_normal((b, text_len, joint)).astype(np.float32)
  pool = rng.standard_normal((b, pooled)).astype(np.float32)
  return x, t, ctx, pool


def _torch_forward(model, x, t, ctx, pool):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(ctx),
                torch.from_numpy(pool), torch.from_numpy(t * 1000.0)).sample
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("scan", [True, False])
def test_parity_with_diffusers(reference, scan):
  ref_model, folder = reference
  model, params = di.load_transformer(folder, scan_layers=scan)
  rng = np.random.default_rng(0)
  for (h, w) in [(8, 8), (6, 10)]:          # square and non-square latents
    for text_len in (5, 11):
      x, t, ctx, pool = _inputs(rng, 2, h, w, text_len)
      want = _torch_forward(ref_model, x, t, ctx, pool)
      got = np.asarray(model.apply({"params": params}, x, t, ctx, pool))
      assert got.shape == want.shape
      assert _rel(got, want) <= 1e-5, (h, w, text_len, _rel(got, want))
      assert np.abs(got - want).max() <= 1e-4


def test_gradients_match_diffusers(reference):
  """The hand-written backward passes (attention, norms, GELU) against torch autograd."""
  ref_model, folder = reference
  model, params = di.load_transformer(folder, scan_layers=False)
  rng = np.random.default_rng(3)
  x, t, ctx, pool = _inputs(rng, 2, 8, 6, 5)
  w = rng.standard_normal(x.shape).astype(np.float32)

  def loss(p, x):
    return jnp.sum(model.apply({"params": p}, x, t, ctx, pool) * w)
  g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  ref_model.zero_grad()
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_(True)
  out = ref_model(xt, torch.from_numpy(ctx), torch.from_numpy(pool),
                  torch.from_numpy(t * 1000.0)).sample
  (out * torch.from_numpy(w.transpose(0, 3, 1, 2))).sum().backward()
  want_x = xt.grad.numpy().transpose(0, 2, 3, 1)
  assert _rel(np.asarray(g_x), want_x) <= 1e-5, _rel(np.asarray(g_x), want_x)
  want = di.transformer_params_from_state(
      model.cfg, {k: p.grad.numpy() for k, p in ref_model.named_parameters()})
  flat_got = jax.tree_util.tree_flatten_with_path(g_params)[0]
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  assert len(flat_got) == len(flat_want)
  worst = max((_rel(np.asarray(g), np.asarray(flat_want[k])), jax.tree_util.keystr(k))
              for k, g in flat_got if np.linalg.norm(flat_want[k]) > 0)
  assert worst[0] <= 1e-4, worst


def test_round_trip_identical_tensors(reference, tmp_path):
  ref_model, folder = reference
  model, params = di.load_transformer(folder)
  di.save_transformer(model, params, str(tmp_path / "rt"))
  again = SD3Transformer2DModel.from_pretrained(str(tmp_path / "rt"))
  want, got = ref_model.state_dict(), again.state_dict()
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(want[k].numpy(), got[k].numpy(), err_msg=k)
  arch = lambda c: {k: list(v) if isinstance(v, tuple) else v for k, v in c.items() if k[0] != "_"}
  assert arch(again.config) == arch(ref_model.config)


def test_sharded_safetensors_with_index_loads(reference, tmp_path):
  ref_model, folder = reference
  model, params = di.load_transformer(folder)
  di.save_transformer(model, params, str(tmp_path / "sharded"), max_shard_bytes=20_000)
  files = os.listdir(tmp_path / "sharded")
  assert "diffusion_pytorch_model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  again = SD3Transformer2DModel.from_pretrained(str(tmp_path / "sharded"))
  for k, v in ref_model.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), again.state_dict()[k].numpy())
  _, params2 = di.load_transformer(str(tmp_path / "sharded"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_param_count_matches_diffusers(reference):
  ref_model, folder = reference
  model, _ = di.load_transformer(folder)
  assert mmdit.count_params(model.cfg) == sum(p.numel() for p in ref_model.parameters())


def test_presets_sizes():
  medium = mmdit.count_params(mmdit.preset("sd3-medium"))
  large = mmdit.count_params(mmdit.preset("sd3.5-large"))
  assert medium == 2_028_328_000          # the released SD3-medium transformer, per diffusers
  assert 1.9e9 < medium < 2.2e9 and 7.8e9 < large < 8.3e9
  assert mmdit.preset(24).hidden_size == 1536 and mmdit.preset(38).num_heads == 38
  cfg = mmdit.preset("sd3.5-medium")
  assert cfg.dual_attention_layers == tuple(range(13)) and cfg.pos_embed_max_size == 384


def _tiny_cfg(**kw):
  base = dict(depth=3, hidden_size=32, num_heads=2, in_channels=4, out_channels=4,
              joint_attention_dim=24, pooled_projection_dim=12, pos_embed_max_size=12,
              sample_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))
  return mmdit.MMDiTConfig(**(base | kw))


def _random_params(cfg, seed=0):
  """Every parameter random, N(0, 0.1^2) (zero-initialised layers would hide bugs). Drawn in
  NumPy on the init's abstract shapes: JAX's initialisers would each be an XLA compile."""
  shapes = jax.eval_shape(lambda r: nn.unbox(mmdit.init_params(cfg, r)), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _loss_and_grad(cfg, params, batch):
  def loss(p):
    return jnp.mean(mmdit.MMDiT(cfg).apply({"params": p}, *batch) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_scan_and_remat_do_not_change_numbers():
  batch = _inputs(np.random.default_rng(1), 2, 8, 6, 5)
  base = _tiny_cfg(scan_layers=True)
  params = _random_params(base)
  l0, g0 = _loss_and_grad(base, params, batch)
  for scan, remat in [(False, "none"), (True, "full"), (False, "full"), (True, "save_dots")]:
    cfg = base.replace(scan_layers=scan, remat_policy=remat)
    p = mmdit.convert_layout(params, base, cfg)
    l1, g1 = _loss_and_grad(cfg, p, batch)
    g1 = mmdit.convert_layout(g1, cfg, base)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g1, g0)


@pytest.mark.parametrize("mesh_shape,rules", [
    ({"data": 8}, "dp"),
    ({"fsdp": 8}, "fsdp"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
])
def test_sharded_forward_backward_equals_single_device(mesh_shape, rules):
  cfg = _tiny_cfg()
  batch = tuple(jnp.asarray(a) for a in _inputs(np.random.default_rng(2), 8, 8, 8, 6))
  params = _random_params(cfg)
  l0, g0 = _loss_and_grad(cfg, params, batch)

  mesh = parallel.make_mesh(mesh_shape)
  specs = nn.get_partition_spec(jax.eval_shape(lambda r: mmdit.init_params(cfg, r),
                                                jax.random.key(0)))
  shardings = parallel.logical_to_sharding(specs, mesh, rules)
  sharded = jax.device_put(params, shardings)
  batch = tuple(jax.device_put(a, parallel.batch_sharding(mesh, a.ndim)) for a in batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.get_rules(rules)):
    l1, g1 = _loss_and_grad(cfg, sharded, batch)
  if rules != "dp":  # parameters really are split across devices
    kernel = sharded["blocks_1"]["img_mlp"]["fc1"]["kernel"]
    assert kernel.addressable_shards[0].data.size < kernel.size
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)


def test_create_sharded_init_is_sharded():
  cfg = _tiny_cfg()
  mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
  params, shardings = parallel.create_sharded(
      lambda r: mmdit.init_params(cfg, r), mesh, "fsdp_tp", jax.random.key(0))
  kernel = params["blocks_1"]["img_mlp"]["fc1"]["kernel"]     # (layers, embed, mlp)
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], 32 // 4, 128 // 2)


def test_bfloat16_compute_close_to_float32():
  cfg = _tiny_cfg()
  params = _random_params(cfg)
  batch = _inputs(np.random.default_rng(3), 2, 8, 8, 5)
  f32 = mmdit.MMDiT(cfg).apply({"params": params}, *batch)
  bf16 = mmdit.MMDiT(cfg.replace(dtype="bfloat16")).apply({"params": params}, *batch)
  assert bf16.dtype == jnp.float32
  assert _rel(np.asarray(bf16), np.asarray(f32)) < 3e-2


def test_zero_init_output_for_training_from_scratch():
  cfg = _tiny_cfg()
  params = jax.jit(lambda r: nn.unbox(mmdit.init_params(cfg, r)))(jax.random.key(0))
  out = mmdit.MMDiT(cfg).apply({"params": params}, *_inputs(np.random.default_rng(4), 2, 8, 8, 5))
  assert np.all(np.asarray(out) == 0.0)           # adaLN-Zero: proj_out and modulations start at 0
  assert np.all(np.asarray(params["blocks_0"]["img_mod"]["kernel"]) == 0.0)


def test_errors_name_the_problem():
  cfg = _tiny_cfg()
  params = _random_params(cfg)
  too_big = _inputs(np.random.default_rng(5), 1, 26, 8, 5)   # 13 patches > table side 12
  with pytest.raises(ValueError, match="pos_embed_max_size"):
    mmdit.MMDiT(cfg).apply({"params": params}, *too_big)
  odd = _inputs(np.random.default_rng(5), 1, 7, 8, 5)
  with pytest.raises(ValueError, match="patch_size"):
    mmdit.MMDiT(cfg).apply({"params": params}, *odd)
  with pytest.raises(ValueError, match="dual_attention_layers"):
    _tiny_cfg(dual_attention_layers=(2,))
  with pytest.raises(ValueError, match="preset"):
    mmdit.preset("sd4-giant")


def test_flops_formula_counts_matmuls():
  cfg = _tiny_cfg(dual_attention_layers=())
  f = mmdit.flops_per_forward(cfg, 8, 8, 5)
  d, n, l = 32, 16, 5
  blocks = 2 * (24 * (n + l) * d * d + 4 * (n + l) ** 2 * d + 24 * d * d) \
      + (24 * n * d * d + 6 * l * d * d + 4 * (n + l) ** 2 * d + 16 * d * d)
  embed = 2 * n * 16 * d + 2 * (256 * d + d * d) + 2 * (12 * d + d * d) + 2 * l * 24 * d
  final = 4 * d * d + 2 * n * d * 16
  assert f == blocks + embed + final


def test_hand_written_backward_passes_equal_autodiff():
  """softmax_attention, normalize and gelu_tanh: values and gradients vs. plain jnp + autodiff."""
  from sd3jax.models import attention, layers
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 9, 3, 8)), jnp.float32) for _ in range(3))

  def plain_attention(q, k, v):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)

  def plain_norm(x, center):
    if center:
      return (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)

  x = jnp.asarray(3.0 * rng.standard_normal((4, 5, 16)) + 1.0, jnp.float32)
  cases = [(attention.softmax_attention, plain_attention, (q, k, v)),
           (lambda x: layers.normalize(x, 1e-6, True), lambda x: plain_norm(x, True), (x,)),
           (lambda x: layers.normalize(x, 1e-6, False), lambda x: plain_norm(x, False), (x,)),
           (layers.gelu_tanh, lambda x: jax.nn.gelu(x, approximate=True), (x,))]
  for ours, plain, args in cases:
    np.testing.assert_allclose(ours(*args), plain(*args), rtol=1e-5, atol=1e-5)
    w = jnp.asarray(rng.standard_normal(plain(*args).shape), jnp.float32)
    argnums = tuple(range(len(args)))
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums)(*args)
    want = jax.grad(lambda *a: jnp.sum(plain(*a) * w), argnums)(*args)
    for g, h in zip(got, want):
      np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


def test_attention_implementations_agree():
  cfg = _tiny_cfg()
  params = _random_params(cfg)
  batch = _inputs(np.random.default_rng(6), 2, 8, 8, 5)
  ein = mmdit.MMDiT(cfg).apply({"params": params}, *batch)
  xla = mmdit.MMDiT(cfg.replace(attention_impl="xla")).apply({"params": params}, *batch)
  np.testing.assert_allclose(np.asarray(xla), np.asarray(ein), rtol=1e-5, atol=1e-6)
