"""AdamW (or Muon) with global-norm clipping, learning-rate schedules, and the EMA of the weights.

The learning rate is a function of the trainer's step (not of optax's update count), so
a step skipped for non-finite gradients does not shift the schedule, and the logged LR
is exactly the one applied. It is fed in through `optax.inject_hyperparams`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from sd3jax.models.mmdit import BLOCK_NAME

Schedule = Callable[[jax.Array], jax.Array]
OPTIMIZERS = ("adamw", "muon")  # config.optimizer.name


def make_schedule(sched: ConfigDict, peak: float, total_steps: int) -> Schedule:
  """warmup_constant | cosine | wsd (warmup, stable, then linear decay to final_fraction)."""
  warmup = int(sched.warmup_steps)
  final = float(peak) * float(sched.final_fraction)
  ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if sched.name == "warmup_constant":
    rest = optax.constant_schedule(peak)
  elif sched.name == "cosine":
    rest = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1),
                                       alpha=sched.final_fraction)
  elif sched.name == "wsd":
    decay = int(sched.decay_steps) or max(int(0.2 * total_steps), 1)
    stable = max(total_steps - warmup - decay, 0)
    rest = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay)], [stable])
  else:
    raise ValueError(f"config.schedule.name={sched.name!r}; choose warmup_constant, cosine or wsd.")
  if warmup <= 0:
    return rest
  # The LR at step s is used for the update made *by* step s; step 0 gets peak / warmup.
  return optax.join_schedules([lambda s: ramp(s + 1), rest], [warmup])


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only (not on biases, norm scales or 1-D embeddings)."""
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def _muon_dims(params: Any) -> Any:
  """Which weights Muon orthogonalises: the transformer blocks' matrices, as (in, out), or
  (depth, in, out) when the blocks are scanned (depth is a batch axis). Everything else
  (embedders, the output head, biases, norm scales) stays with AdamW, as in Muon's recipe."""
  from optax.contrib import MuonDimensionNumbers

  def dims(path, p):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    in_block = any(BLOCK_NAME.fullmatch(str(n)) for n in names)
    if not in_block or names[-1] != "kernel" or p.ndim not in (2, 3):
      return None
    return MuonDimensionNumbers(p.ndim - 2, p.ndim - 1)
  return jax.tree_util.tree_map_with_path(dims, params)


def make_optimizer(opt: ConfigDict) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW (or Muon on the blocks' matrices with AdamW on the rest,
  `opt.name = "muon"`); the learning rate is injected per step."""
  name = opt.get("name", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name={name!r}; choose one of {OPTIMIZERS}.")

  def build(learning_rate):
    parts = []
    if opt.grad_clip_norm and opt.grad_clip_norm > 0:
      parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    if name == "muon":
      from optax.contrib import muon
      # consistent_rms 0.2: updates of AdamW's RMS, so AdamW's learning rate carries over
      # (Liu et al. 2025, "Muon is scalable for LLM training").
      parts.append(muon(learning_rate, ns_steps=int(opt.get("muon_ns_steps", 5)),
                        beta=0.95, eps=opt.eps,
                        weight_decay=opt.weight_decay, adam_b1=opt.b1, adam_b2=opt.b2,
                        adam_weight_decay=opt.weight_decay, nesterov=True,
                        muon_weight_dimension_numbers=_muon_dims, consistent_rms=0.2))
    else:
      parts.append(optax.adamw(learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                               weight_decay=opt.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
  tx = optax.inject_hyperparams(build)(learning_rate=float(opt.learning_rate))
  if name == "adamw":
    return tx
  # Muon's init labels params by their path and shape, so it needs them unboxed; its state
  # is then boxed like the params again, so it shards as they do (FSDP / TP).
  return optax.GradientTransformation(lambda params: _rebox(tx.init(nn.unbox(params)), params),
                                      tx.update)


def _rebox(state: Any, boxed_params: Any) -> Any:
  """Wraps each optimizer-state array that sits under a parameter's path (its trailing dict
  keys) and has that parameter's shape in the parameter's logical-axis box."""
  boxes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    if isinstance(leaf, nn.Partitioned):
      boxes[tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))] = leaf

  def box(path, x):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    for i in range(len(keys)):
      b = boxes.get(tuple(keys[i:]))
      if b is not None and getattr(x, "shape", None) == b.value.shape:
        return b.replace_boxed(x)
    return x
  return jax.tree_util.tree_map_with_path(box, state)


def with_learning_rate(opt_state: Any, lr: jax.Array) -> Any:
  """Returns opt_state whose injected learning rate is `lr` (for the next update)."""
  hyper = dict(opt_state.hyperparams)
  hyper["learning_rate"] = jnp.asarray(lr, hyper["learning_rate"].dtype)
  return opt_state._replace(hyperparams=hyper)


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float, every: int,
               warmup: bool = False) -> Any:
  """ema <- decay * ema + (1 - decay) * params on steps divisible by `every`, else unchanged.

  `step` counts completed steps (1 after the first update), so every=1 updates each step.
  With `warmup` the decay is min(decay, (1 + step) / (10 + step)) (diffusers' EMAModel
  default): a short run's EMA does not keep most of its random init (0.998 ** 500 = 37%).
  """
  if decay <= 0.0:
    return params
  d = jnp.float32(decay)
  if warmup:
    s = jnp.asarray(step, jnp.float32)
    d = jnp.minimum(d, (1.0 + s) / (10.0 + s))
  d = jnp.where(step % every == 0, d, jnp.float32(1.0))
  return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
