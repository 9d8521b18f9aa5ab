"""The MM-DiT of Stable Diffusion 3 / 3.5 (Esser et al. 2024), in Flax Linen.

Two token streams, image patches and text tokens, each with its own weights
(adaLN-Zero modulation, QKV, output projection, GELU-tanh MLP), meet in one joint
attention over [image; text]. The last block is "context pre-only": its text stream
only feeds attention. SD3.5-medium adds an image-only second attention in its first
blocks ("dual attention"). Computes exactly what diffusers' SD3Transformer2DModel
computes, but on NHWC latents and with t in [0, 1] (scaled by 1000 inside).

Blocks of the same kind are grouped into segments; with `scan_layers` each segment is
one `nn.scan` (parameters stacked on a leading "layers" axis), which keeps compile time
flat in depth. `sd3jax.interop.diffusers` converts between both layouts.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd3jax.models import attention as attention_lib
from sd3jax.models.layers import Dense, LayerNorm, RMSNorm, gelu_tanh

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = attention_lib.IMPLS


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Architecture and execution settings. Field names follow diffusers where they exist."""
  depth: int = 24
  hidden_size: int = 1536
  num_heads: int = 24
  patch_size: int = 2
  in_channels: int = 16
  out_channels: int = 16
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 2048
  pos_embed_max_size: int = 192
  sample_size: int = 128           # latent side the position table's grid is scaled to
  qk_norm: str | None = None       # None or "rms_norm"
  dual_attention_layers: tuple[int, ...] = ()
  # Execution (not architecture).
  dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "auto"    # see sd3jax.models.attention

  def __post_init__(self):
    object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.")
    if self.qk_norm not in (None, "rms_norm"):
      raise ValueError(f"qk_norm={self.qk_norm!r}; supported: None, 'rms_norm'.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}.")
    if self.depth < 1:
      raise ValueError(f"depth must be >= 1, got {self.depth}.")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth - 1]
    if bad:
      raise ValueError(f"dual_attention_layers {bad} out of range: dual attention is allowed in "
                       f"blocks 0..{self.depth - 2} (the last block is context pre-only).")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> "MMDiTConfig":
    return dataclasses.replace(self, **kw)


PRESETS = {
    "sd3-medium": dict(depth=24, pos_embed_max_size=192),
    "sd3.5-medium": dict(depth=24, qk_norm="rms_norm", pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(depth=38, qk_norm="rms_norm", pos_embed_max_size=192),
}


def preset(name_or_depth: str | int, **overrides) -> MMDiTConfig:
  """The paper's size family: depth d -> hidden 64 d, d heads of 64; or a named release."""
  if isinstance(name_or_depth, str) and not name_or_depth.isdigit():
    if name_or_depth not in PRESETS:
      raise ValueError(f"Unknown MM-DiT preset {name_or_depth!r}; known: {sorted(PRESETS)} "
                       "or an integer depth.")
    kw = dict(PRESETS[name_or_depth])
  else:
    kw = {"depth": int(name_or_depth)}
  d = kw["depth"]
  kw.setdefault("hidden_size", 64 * d)
  kw.setdefault("num_heads", d)
  kw.update(overrides)
  return MMDiTConfig(**kw)


# ---------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------

def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[sin, cos] of pos * 10000^(-k / (dim/2)), in float64 like the reference table."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_embed_table(dim: int, max_size: int, base_size: int) -> np.ndarray:
  """The (max_size, max_size, dim) 2-D sin-cos table; first half encodes x, second half y.

  Positions are scaled so that `base_size` patches span `base_size` units regardless of
  the table size (SD3: 192-side table for a 64-patch base grid).
  """
  if dim % 4:
    raise ValueError(f"hidden_size {dim} must be divisible by 4 for the 2-D sin-cos table.")
  coords = np.arange(max_size, dtype=np.float32) / (max_size / base_size)
  ys, xs = np.meshgrid(coords, coords, indexing="ij")
  table = np.concatenate([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], axis=1)
  return table.reshape(max_size, max_size, dim).astype(np.float32)


def crop_pos_embed(table: np.ndarray, h: int, w: int) -> np.ndarray:
  """Centre crop of the table to an (h, w) patch grid; any aspect ratio."""
  size = table.shape[0]
  if h > size or w > size:
    raise ValueError(
        f"Latent grid {h}x{w} patches exceeds pos_embed_max_size={size}. Use a smaller image, or a "
        f"model with a larger pos_embed_max_size (>= {max(h, w)}).")
  top, left = (size - h) // 2, (size - w) // 2
  return table[top:top + h, left:left + w].reshape(h * w, -1)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """Sinusoid of t (already scaled to [0, 1000]) with cos first, as SD3 expects."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPEmbedder(nn.Module):
  """Linear -> SiLU -> Linear: the timestep and pooled-text embedders."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Dense(self.features, ("embed_in", "mlp"), dtype=self.dtype, name="fc1")(x)
    return Dense(self.features, ("mlp", "embed"), dtype=self.dtype, name="fc2")(nn.silu(x))


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------

class QKV(nn.Module):
  """Per-stream query/key/value projections with the optional per-head RMSNorm."""
  cfg: MMDiTConfig

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    out = []
    for name in ("q", "k", "v"):
      y = Dense(cfg.hidden_size, ("embed", "heads"), dtype=dt, name=name)(x)
      y = y.reshape(*y.shape[:-1], cfg.num_heads, cfg.head_dim)
      if cfg.qk_norm and name != "v":
        y = RMSNorm(1e-6, axis_name="kv", dtype=dt, name=f"{name}_norm")(y)
      out.append(nn.with_logical_constraint(y, ("act_batch", "act_len", "act_heads", "act_kv")))
    return out


class MLP(nn.Module):
  """GELU-tanh MLP with 4x expansion."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = Dense(4 * self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    h = nn.with_logical_constraint(gelu_tanh(h), ("act_batch", "act_len", "act_mlp"))
    return Dense(self.hidden, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


ZEROS = nn.initializers.zeros_init()


class JointBlock(nn.Module):
  """One MM-DiT block. Returns (img, txt); txt is passed through unchanged when pre-only."""
  cfg: MMDiTConfig
  context_pre_only: bool = False
  dual_attention: bool = False

  @nn.compact
  def __call__(self, carry, temb):
    img, txt = carry
    cfg, dt = self.cfg, self.cfg.compute_dtype
    d = cfg.hidden_size
    ln = lambda name: LayerNorm(1e-6, use_scale=False, use_bias=False, dtype=dt, name=name)
    c = nn.silu(temb)

    n_img = 9 if self.dual_attention else 6
    img_mod = Dense(n_img * d, ("embed", "mlp"), dtype=dt, kernel_init=ZEROS, name="img_mod")(c)
    img_mod = jnp.split(img_mod, n_img, axis=-1)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = img_mod[:6]
    img_normed = ln("img_norm1")(img)
    img_attn_in = _modulate(img_normed, shift_a, scale_a)

    if self.context_pre_only:
      scale_c, shift_c = jnp.split(
          Dense(2 * d, ("embed", "mlp"), dtype=dt, kernel_init=ZEROS, name="txt_mod")(c), 2, axis=-1)
    else:
      txt_mod = Dense(6 * d, ("embed", "mlp"), dtype=dt, kernel_init=ZEROS, name="txt_mod")(c)
      shift_c, scale_c, gate_ca, shift_cm, scale_cm, gate_cm = jnp.split(txt_mod, 6, axis=-1)
    txt_attn_in = _modulate(ln("txt_norm1")(txt), shift_c, scale_c)

    # Joint attention over [image; text].
    qi, ki, vi = QKV(cfg, name="img_qkv")(img_attn_in)
    qt, kt, vt = QKV(cfg, name="txt_qkv")(txt_attn_in)
    n = img.shape[1]
    out = attention_lib.attention(jnp.concatenate([qi, qt], 1), jnp.concatenate([ki, kt], 1),
                                  jnp.concatenate([vi, vt], 1), cfg.attention_impl)
    out = out.reshape(*out.shape[:2], d)
    img = img + gate_a[:, None] * Dense(d, ("heads", "embed"), dtype=dt, name="img_out")(out[:, :n])

    if self.dual_attention:
      shift_a2, scale_a2, gate_a2 = img_mod[6:]
      q2, k2, v2 = QKV(cfg, name="img_qkv2")(_modulate(img_normed, shift_a2, scale_a2))
      out2 = attention_lib.attention(q2, k2, v2, cfg.attention_impl).reshape(img.shape)
      img = img + gate_a2[:, None] * Dense(d, ("heads", "embed"), dtype=dt, name="img_out2")(out2)

    h = _modulate(ln("img_norm2")(img), shift_m, scale_m)
    img = img + gate_m[:, None] * MLP(d, dt, name="img_mlp")(h)
    img = nn.with_logical_constraint(img, ("act_batch", "act_len", "act_embed"))

    if not self.context_pre_only:
      txt = txt + gate_ca[:, None] * Dense(d, ("heads", "embed"), dtype=dt, name="txt_out")(out[:, n:])
      h = _modulate(ln("txt_norm2")(txt), shift_cm, scale_cm)
      txt = txt + gate_cm[:, None] * MLP(d, dt, name="txt_mlp")(h)
      txt = nn.with_logical_constraint(txt, ("act_batch", "act_len", "act_embed"))
    return (img, txt), None


def segments(cfg: MMDiTConfig) -> list[tuple[int, int, bool, bool]]:
  """Runs of consecutive blocks of one kind: (start, length, dual_attention, context_pre_only)."""
  kinds = [(i in cfg.dual_attention_layers, i == cfg.depth - 1) for i in range(cfg.depth)]
  runs = []
  for i, kind in enumerate(kinds):
    if runs and runs[-1][2:] == kind:
      runs[-1] = (runs[-1][0], runs[-1][1] + 1, *kind)
    else:
      runs.append((i, 1, *kind))
  return runs


# Matches every name block_names can give, in either layout (optim's Muon split reads it).
BLOCK_NAME = re.compile(r"blocks?_\d+")


def block_names(cfg: MMDiTConfig) -> list[str]:
  """Parameter-tree names of the block modules, in order (one per segment when scanned)."""
  if cfg.scan_layers:
    return [f"blocks_{s}" for s in range(len(segments(cfg)))]
  return [f"block_{i}" for i in range(cfg.depth)]


class MMDiT(nn.Module):
  """model.apply({'params': p}, x (B,H,W,C), t (B,) in [0,1], context (B,L,J), pooled (B,P))."""
  cfg: MMDiTConfig

  @nn.compact
  def __call__(self, x, t, context, pooled):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    b, hgt, wid, ch = x.shape
    p, d = cfg.patch_size, cfg.hidden_size
    if hgt % p or wid % p:
      raise ValueError(f"Latent size {hgt}x{wid} is not divisible by patch_size {p}.")
    if ch != cfg.in_channels:
      raise ValueError(f"Latent has {ch} channels; the model expects in_channels={cfg.in_channels}.")
    h, w = hgt // p, wid // p

    # Patchify + linear == conv with kernel = stride = p.
    patches = x.reshape(b, h, p, w, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * ch)
    img = Dense(d, ("patch", "embed"), dtype=dt, name="patch_embed")(patches)
    table = pos_embed_table(d, cfg.pos_embed_max_size, cfg.sample_size // p)
    img = img + jnp.asarray(crop_pos_embed(table, h, w), dt)[None]
    img = nn.with_logical_constraint(img, ("act_batch", "act_len", "act_embed"))

    temb = MLPEmbedder(d, dt, name="t_embedder")(timestep_embedding(t * 1000.0).astype(dt))
    temb = temb + MLPEmbedder(d, dt, name="y_embedder")(pooled.astype(dt))
    txt = Dense(d, ("embed_in", "embed"), dtype=dt, name="context_embedder")(context.astype(dt))
    txt = nn.with_logical_constraint(txt, ("act_batch", "act_len", "act_embed"))

    carry = (img, txt)
    policy = REMAT_POLICIES[cfg.remat_policy]
    for s, (start, length, dual, pre_only) in enumerate(segments(cfg)):
      block_cls = JointBlock
      if cfg.remat_policy != "none":
        block_cls = nn.remat(JointBlock, policy=policy, prevent_cse=not cfg.scan_layers)
      if cfg.scan_layers:
        scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=nn.broadcast, length=length,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        carry, _ = scanned(cfg, pre_only, dual, name=f"blocks_{s}")(carry, temb)
      else:
        for i in range(start, start + length):
          carry, _ = block_cls(cfg, pre_only, dual, name=f"block_{i}")(carry, temb)
    img = carry[0]

    scale, shift = jnp.split(
        Dense(2 * d, ("embed", "mlp"), dtype=dt, kernel_init=ZEROS, name="final_mod")(nn.silu(temb)),
        2, axis=-1)
    img = _modulate(LayerNorm(1e-6, use_scale=False, use_bias=False, dtype=dt, name="final_norm")(img),
                    shift, scale)
    out = Dense(p * p * cfg.out_channels, ("embed", "patch"), dtype=dt, kernel_init=ZEROS,
                name="proj_out")(img)
    out = out.reshape(b, h, w, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, hgt, wid, cfg.out_channels).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Size and cost
# ---------------------------------------------------------------------------

def init_params(cfg: MMDiTConfig, rng: jax.Array, latent_hw: tuple[int, int] = (8, 8),
                text_len: int = 4) -> Any:
  """Boxed (logically partitioned) parameters; wrap with parallel.create_sharded at scale."""
  x = jnp.zeros((1, *latent_hw, cfg.in_channels))
  return MMDiT(cfg).init(rng, x, jnp.zeros((1,)), jnp.zeros((1, text_len, cfg.joint_attention_dim)),
                         jnp.zeros((1, cfg.pooled_projection_dim)))["params"]


def count_params(cfg: MMDiTConfig) -> int:
  """Exact parameter count, from abstract shapes (no memory is allocated)."""
  p = cfg.patch_size * 2
  shapes = jax.eval_shape(lambda r: nn.unbox(init_params(cfg, r, (p, p))), jax.random.key(0))
  return int(sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))


def flops_per_forward(cfg: MMDiTConfig, height: int, width: int, text_len: int) -> float:
  """Analytic FLOPs of one forward pass for one example (multiply-add = 2 FLOPs).

  Counts every matmul and the two attention matmuls; elementwise work is ignored.
  `height`, `width` are the latent size (not pixels). A train step is ~3x this.
  """
  d, p = cfg.hidden_size, cfg.patch_size
  n, l = (height // p) * (width // p), text_len
  f = 2 * n * (p * p * cfg.in_channels) * d                       # patch embedding
  f += 2 * (256 * d + d * d) + 2 * (cfg.pooled_projection_dim * d + d * d)  # t / pooled MLPs
  f += 2 * l * cfg.joint_attention_dim * d                        # context embedder
  for i in range(cfg.depth):
    pre_only, dual = i == cfg.depth - 1, i in cfg.dual_attention_layers
    f += 2 * d * (9 if dual else 6) * d + 2 * d * (2 if pre_only else 6) * d  # modulation
    f += 2 * n * d * 3 * d + 2 * n * d * d + 2 * n * d * 8 * d    # image qkv, out, mlp
    f += 2 * l * d * 3 * d                                         # text qkv
    if not pre_only:
      f += 2 * l * d * d + 2 * l * d * 8 * d                       # text out, mlp
    f += 4 * (n + l) ** 2 * d                                      # QK^T and PV
    if dual:
      f += 2 * n * d * 4 * d + 4 * n * n * d                       # second attention
  f += 2 * d * 2 * d + 2 * n * d * p * p * cfg.out_channels       # final modulation + proj
  return float(f)


# ---------------------------------------------------------------------------
# Parameter layouts: per-block list <-> scanned / unscanned tree
# ---------------------------------------------------------------------------

def unstack_blocks(cfg: MMDiTConfig, params: dict) -> tuple[dict, list[dict]]:
  """Splits params into (non-block params, [block 0 params, block 1 params, ...])."""
  rest = {k: v for k, v in params.items() if not k.startswith("block")}
  blocks = []
  if cfg.scan_layers:
    for s, (_, length, _, _) in enumerate(segments(cfg)):
      stacked = params[f"blocks_{s}"]
      blocks += [jax.tree_util.tree_map(lambda a, i=i: a[i], stacked) for i in range(length)]
  else:
    blocks = [params[f"block_{i}"] for i in range(cfg.depth)]
  return rest, blocks


def stack_blocks(cfg: MMDiTConfig, rest: dict, blocks: Sequence[dict]) -> dict:
  """Inverse of unstack_blocks, for the layout `cfg.scan_layers` asks for."""
  if len(blocks) != cfg.depth:
    raise ValueError(f"Got {len(blocks)} blocks for a depth-{cfg.depth} model.")
  params = dict(rest)
  if cfg.scan_layers:
    for s, (start, length, _, _) in enumerate(segments(cfg)):
      params[f"blocks_{s}"] = jax.tree_util.tree_map(
          lambda *a: jnp.stack(a), *blocks[start:start + length])
  else:
    params.update({f"block_{i}": b for i, b in enumerate(blocks)})
  return params


def convert_layout(params: dict, src: MMDiTConfig, dst: MMDiTConfig) -> dict:
  """Re-lays parameters saved with src.scan_layers for a model with dst.scan_layers."""
  return stack_blocks(dst, *unstack_blocks(src, params))
