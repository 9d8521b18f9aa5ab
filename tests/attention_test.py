"""Attention kernels: splash (Pallas, run in interpret mode on CPU) against the einsum path,
sharded against unsharded, and the per-platform choice behind attention_impl="auto"."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd3jax import aot, parallel
from sd3jax.models import attention, mmdit


def _qkv(seed, batch, seq, heads, head_dim, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), dtype)
               for _ in range(3))


def _rel(a, b):
  """Relative L2 error; the absolute one where the reference is exactly zero."""
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1.0 * (jnp.linalg.norm(b) == 0)))


@pytest.mark.parametrize("head_dim,seq", [(64, 200), (32, 130)])
def test_splash_matches_einsum_forward_and_gradients(head_dim, seq):
  """SD3-like joint sequences (not a multiple of 128: padded and masked by segment ids)."""
  q, k, v = _qkv(0, 2, seq, 3, head_dim)
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  out = {}
  for name, fn in [("splash", attention.splash_attention), ("einsum", attention.softmax_attention)]:
    out[name] = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), (0, 1, 2)))(
        q, k, v)
    out[name + "_fwd"] = jax.jit(fn)(q, k, v)
  assert _rel(out["splash_fwd"], out["einsum_fwd"]) < 1e-5
  for g, h in zip(out["splash"][1], out["einsum"][1]):
    assert _rel(g, h) < 1e-5


def test_splash_in_the_model_sharded_equals_unsharded():
  """The MM-DiT (qk-norm, dual attention) with splash on a data x fsdp x tensor mesh."""
  cfg = mmdit.MMDiTConfig(depth=2, hidden_size=128, num_heads=2, joint_attention_dim=32,
                          pooled_projection_dim=16, qk_norm="rms_norm", dual_attention_layers=(0,),
                          pos_embed_max_size=16, sample_size=8)
  b, hw, length = 8, 8, 10
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((b, hw, hw, 16)), jnp.float32)
  t = jnp.linspace(0.1, 0.9, b)
  ctx = jnp.asarray(rng.standard_normal((b, length, 32)), jnp.float32)
  pooled = jnp.asarray(rng.standard_normal((b, 16)), jnp.float32)
  @jax.jit
  def init(init_key, noise_key):
    params = nn.unbox(mmdit.init_params(cfg, init_key, (hw, hw), length))
    keys = iter(jax.random.split(noise_key, 1000))  # adaLN-Zero starts at 0: perturb
    return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), params)
  params = init(jax.random.key(0), jax.random.key(1))

  def run(impl, mesh=None):
    model = mmdit.MMDiT(cfg.replace(attention_impl=impl))
    fn = jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x, t, ctx, pooled)))))
    if mesh is None:
      return fn(params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.get_rules("fsdp_tp")):
      return fn(params)

  loss0, grads0 = run("einsum")
  loss1, grads1 = run("splash")
  loss2, grads2 = run("splash", parallel.make_mesh(ici={"data": 2, "fsdp": 2, "tensor": 2}))
  np.testing.assert_allclose([loss1, loss2], [loss0, loss0], rtol=1e-5)
  for g0, g1, g2 in zip(*map(jax.tree.leaves, (grads0, grads1, grads2))):
    assert _rel(g1, g0) < 1e-5 and _rel(g2, g0) < 1e-5


def test_auto_picks_the_platform_kernel():
  f32 = jnp.zeros((1, 4, 2, 64), jnp.float32)
  bf16 = f32.astype(jnp.bfloat16)
  assert attention.resolve_impl("auto", f32, "tpu") == "splash"
  assert attention.resolve_impl("auto", bf16, "gpu") == "cudnn"
  assert attention.resolve_impl("auto", f32, "gpu") == "xla"          # cuDNN: half precision
  assert attention.resolve_impl("auto", jnp.zeros((1, 4, 2, 160), jnp.bfloat16), "gpu") == "xla"
  assert attention.resolve_impl("auto", f32, "cpu") == "einsum"
  assert attention.resolve_impl("auto", f32) == "einsum"                # this machine
  assert attention.resolve_impl("xla", f32, "tpu") == "xla"             # explicit wins
  # Mosaic cannot compile bf16 matmuls at precision "highest" (conftest sets it): XLA's.
  assert attention.resolve_impl("auto", bf16, "tpu") == "xla"
  with jax.default_matmul_precision("default"):
    assert attention.resolve_impl("auto", bf16, "tpu") == "splash"
  with pytest.raises(ValueError, match="choose one of"):
    attention.resolve_impl("flash", f32)
  # Under a mesh of TPU devices (an ahead-of-time compile from this CPU host), auto is splash.
  mesh = parallel.make_mesh(ici={"fsdp": -1}, devices=aot.topology_devices("v5p:2x2x1"))
  with jax.set_mesh(mesh):
    assert attention.resolve_impl("auto", f32) == "splash"


def test_splash_block_sizes_and_padding():
  assert attention.padded_length(4096 + 154) == 4352     # 1024^2: 34 x 128
  assert attention.splash_block(4352) == 256
  assert attention.padded_length(1024 + 154) == 1280 and attention.splash_block(1280) == 256
  assert attention.splash_block(4096) == 512


def test_kernel_flops_counted_from_the_grid():
  """XLA counts nothing inside a Pallas call; the report counts each kernel's body per grid
  point: 4 (forward) + 8 (dk, dv) + 6 (dq) x B H T^2 D for splash, T the padded length."""
  b, seq, heads, head_dim = 2, 300, 3, 64
  q = jax.ShapeDtypeStruct((b, seq, heads, head_dim), jnp.float32)
  loss = lambda q, k, v: jnp.sum(attention.splash_attention(q, k, v, interpret=True))
  fwd = jax.make_jaxpr(loss)(q, q, q)
  both = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, q, q)
  unit = b * heads * 384 ** 2 * head_dim
  assert aot.jaxpr_matmul_flops(fwd, kernels_only=True) == 4 * unit
  assert aot.jaxpr_matmul_flops(both, kernels_only=True) == (4 + 8 + 6) * unit
  # What XLA sees: the matmuls outside the kernels only.
  outside = aot.jaxpr_matmul_flops(both) - aot.jaxpr_matmul_flops(both, kernels_only=True)
  assert aot.jaxpr_matmul_flops(both, expand_loops=False) == outside < unit
