"""AdamW with global-norm clipping, learning-rate schedules, and the EMA of the weights.

The learning rate is a function of the trainer's step (not of optax's update count), so
a step skipped for non-finite gradients does not shift the schedule, and the logged LR
is exactly the one applied. It is fed in through `optax.inject_hyperparams`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

Schedule = Callable[[jax.Array], jax.Array]


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


def make_optimizer(opt: ConfigDict) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW; the learning rate is injected per step."""
  def build(learning_rate):
    parts = []
    if opt.grad_clip_norm and opt.grad_clip_norm > 0:
      parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    parts.append(optax.adamw(learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
  return optax.inject_hyperparams(build)(learning_rate=float(opt.learning_rate))


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
